package caddyshaker

import (
	"errors"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Defaults of the health check settings, as an SRE would expect them
// (the same as HAProxy's `inter 2s rise 2 fall 3`).
const (
	DefaultInterval        = 2 * time.Second
	DefaultTimeout         = time.Second
	DefaultPasses          = 2
	DefaultFails           = 3
	DefaultResolveInterval = time.Minute
	DefaultResolveTimeout  = 5 * time.Second

	// MinInterval is the shortest interval, fast_interval or
	// down_interval: below it an address would be probed back to back.
	MinInterval = time.Millisecond
)

// reg is the process-wide state: the engine and every address's checker.
// It lives at package level so that health state survives config reloads.
var reg = &registry{
	checkers: make(map[checkKey]*checker),
	byAddr:   make(map[netip.AddrPort][]*checker),
}

// registry holds the engine and the checkers, keyed by address and
// settings: the same address with the same settings is probed once,
// however many handlers and configs use it.
type registry struct {
	engineState

	mu       sync.Mutex
	checkers map[checkKey]*checker
	byAddr   map[netip.AddrPort][]*checker // the checkers of each address
}

// checkKey identifies a checker: what is probed, and how.
type checkKey struct {
	addr     netip.AddrPort
	interval time.Duration
	timeout  time.Duration
	passes   int
	fails    int
	// fastInterval is used while the address is changing state (failed
	// probes while up, answered ones while down), downInterval while it
	// is down; 0 means interval.
	fastInterval time.Duration
	downInterval time.Duration
}

// checker is the health state of one address, and its probe schedule.
// Its probes run one at a time: a probe is started by the timer, and its
// result (on the engine's loop goroutine) re-arms the timer.
type checker struct {
	key    checkKey
	addr   string // key.addr as text, IPv6 in brackets
	doneFn func(shaker.Result)

	// healthy is read on every proxied request. An address not probed
	// yet counts as up.
	healthy atomic.Bool

	mu          sync.Mutex
	refs        int
	names       map[string]int // upstreams as configured -> references
	timer       *time.Timer
	stopped     bool
	known       bool // has a first result
	passes      int  // consecutive
	fails       int  // consecutive
	lastRTT     time.Duration
	lastErr     error
	checkedAt   time.Time
	probeStart  time.Time
	queue       []transition
	announcing  bool
	probesTotal uint64
}

// transition is a change of state to announce (log, event, metric).
type transition struct {
	up    bool
	first bool
	rtt   time.Duration
	err   error
	at    time.Time
	n     int // consecutive results that made it
}

// want is one address a source needs probed, under a configured name.
type want struct {
	key  checkKey
	name string
}

// acquire takes a reference to the checker of each wanted key, creating
// the missing ones. It returns the checkers, in the order of ws, and the
// new ones, whose probes do not start until they are given to arm.
func (r *registry) acquire(ws []want) (all, fresh []*checker) {
	all = make([]*checker, len(ws))
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, w := range ws {
		c := r.checkers[w.key]
		if c == nil {
			c = newChecker(w.key)
			r.inheritLocked(c)
			r.checkers[w.key] = c
			r.byAddr[w.key.addr] = append(r.byAddr[w.key.addr], c)
			r.refreshGaugeLocked(w.key.addr)
			fresh = append(fresh, c)
		}
		c.mu.Lock()
		c.refs++
		c.names[w.name]++
		c.mu.Unlock()
		all[i] = c
	}
	return all, fresh
}

// inheritLocked gives a new checker the state of another checker of the
// same address (with other settings, as after a reload that changed
// them), so that a down address does not look up while the new settings
// take over.
func (r *registry) inheritLocked(c *checker) {
	for _, o := range r.byAddr[c.key.addr] {
		o.mu.Lock()
		if o.known {
			c.known = true
			c.healthy.Store(o.healthy.Load())
			c.passes, c.fails = o.passes, o.fails
			c.lastRTT, c.lastErr, c.checkedAt = o.lastRTT, o.lastErr, o.checkedAt
			c.probesTotal = o.probesTotal
		}
		o.mu.Unlock()
		if c.known {
			return
		}
	}
}

// arm starts the probes of new checkers, spread over the interval: the
// first one at once, the others at even steps, so that many addresses do
// not make one burst of SYNs.
func arm(cs []*checker) {
	for i, c := range cs {
		delay := c.key.interval * time.Duration(i) / time.Duration(len(cs))
		c.mu.Lock()
		if !c.stopped && c.timer == nil {
			c.timer = time.AfterFunc(delay, c.fire)
		}
		c.mu.Unlock()
	}
}

// release drops the references taken by acquire. A checker without
// references stops: its timer is stopped, a probe in flight is not
// re-armed, and its state is forgotten.
func (r *registry) release(ws []want) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, w := range ws {
		c := r.checkers[w.key]
		if c == nil {
			continue
		}
		c.mu.Lock()
		c.refs--
		if c.names[w.name]--; c.names[w.name] <= 0 {
			delete(c.names, w.name)
		}
		last := c.refs <= 0
		if last {
			c.stopped = true
			if c.timer != nil {
				c.timer.Stop()
			}
		}
		c.mu.Unlock()
		if last {
			delete(r.checkers, w.key)
			others := slices.DeleteFunc(r.byAddr[w.key.addr], func(x *checker) bool { return x == c })
			if len(others) == 0 {
				delete(r.byAddr, w.key.addr)
			} else {
				r.byAddr[w.key.addr] = others
			}
			r.refreshGaugeLocked(w.key.addr)
		}
	}
}

func newChecker(key checkKey) *checker {
	initMetrics()
	c := &checker{
		key:   key,
		addr:  key.addr.String(),
		names: make(map[string]int),
	}
	c.doneFn = c.done
	c.healthy.Store(true)
	return c
}

// fire starts a probe. It runs on the timer's goroutine.
func (c *checker) fire() {
	e := reg.cur.Load()
	c.mu.Lock()
	if c.stopped || e == nil {
		c.mu.Unlock()
		return
	}
	c.probeStart = time.Now()
	c.mu.Unlock()
	e.ProbeAsync(c.key.addr, c.key.timeout, c.doneFn)
}

// done takes a probe's result. It runs on the engine's loop goroutine (or
// synchronously in fire when the engine is closed): it must not block, so
// it only updates state under a short lock, re-arms the timer, and hands
// transitions to a goroutine.
func (c *checker) done(res shaker.Result) {
	if errors.Is(res.Err, shaker.ErrClosed) {
		return // the engine is gone: never re-arm
	}
	observeProbe(res)
	local := errors.Is(res.Err, shaker.ErrLocal)
	noteLocal(local, res)
	now := time.Now()
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return
	}
	if local {
		// this host could not make the probe (out of fds, ports or
		// memory): it says nothing about the backend, so it counts
		// neither way; probe again after the interval
		c.timer.Reset(max(c.key.interval-now.Sub(c.probeStart), 0))
		c.mu.Unlock()
		return
	}
	c.probesTotal++
	c.checkedAt = now
	var tr *transition
	if res.Err == nil {
		c.lastRTT, c.lastErr = res.RTT, nil
		c.passes++
		c.fails = 0
		switch {
		case !c.known:
			tr = &transition{up: true, first: true}
		case !c.healthy.Load() && c.passes >= c.key.passes:
			tr = &transition{up: true}
		}
	} else {
		c.lastErr = res.Err
		c.fails++
		c.passes = 0
		switch {
		case !c.known:
			tr = &transition{up: false, first: true}
		case c.healthy.Load() && c.fails >= c.key.fails:
			tr = &transition{up: false}
		}
	}
	c.known = true
	if tr != nil {
		c.healthy.Store(tr.up)
		tr.rtt, tr.err, tr.at = res.RTT, res.Err, now
		tr.n = max(c.passes, c.fails)
		c.queue = append(c.queue, *tr)
		if !c.announcing {
			c.announcing = true
			go c.announce()
		}
	}
	c.timer.Reset(max(c.nextIntervalLocked()-now.Sub(c.probeStart), 0))
	c.mu.Unlock()
}

// nextIntervalLocked is the time from the start of the last probe to the
// next one: fast_interval while the address is changing state (failures
// counted while it is up, answers while it is down), down_interval while
// it is down, interval otherwise, as HAProxy's fastinter and downinter.
func (c *checker) nextIntervalLocked() time.Duration {
	healthy := c.healthy.Load()
	switch {
	case !c.known:
	case healthy && c.fails > 0, !healthy && c.passes > 0:
		if c.key.fastInterval > 0 {
			return c.key.fastInterval
		}
	case !healthy:
		if c.key.downInterval > 0 {
			return c.key.downInterval
		}
	}
	return c.key.interval
}

// announce logs, emits and counts the queued transitions, in order.
func (c *checker) announce() {
	for {
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.announcing = false
			c.mu.Unlock()
			return
		}
		tr := c.queue[0]
		c.queue = c.queue[1:]
		name := c.nameLocked()
		c.mu.Unlock()
		reg.refreshGauge(c.key.addr)
		herald := reg.herald.Load()
		if herald == nil {
			continue
		}
		fields := []zap.Field{zap.String("upstream", name), zap.String("address", c.addr)}
		if tr.up {
			fields = append(fields, zap.Duration("rtt", tr.rtt))
			if tr.first {
				// it counted as up already: no change of state, so
				// no info line and no event
				herald.logger.Debug("upstream up (first probe)", fields...)
				continue
			}
			fields = append(fields, zap.Int("passes", tr.n))
			herald.logger.Info("upstream up", fields...)
		} else {
			fields = append(fields, zap.String("reason", reason(tr.err, c.key.timeout)))
			if !tr.first {
				fields = append(fields, zap.Int("fails", tr.n))
			}
			herald.logger.Warn("upstream down", fields...)
		}
		if herald.events != nil {
			ev := "unhealthy"
			if tr.up {
				ev = "healthy"
			}
			herald.events.Emit(herald.ctx, ev, map[string]any{"host": c.addr, "upstream": name})
		}
	}
}

// localFailing is set while probes fail on this host (ErrLocal);
// lastLocal is the time of the last such failure (monotonic, ns).
var (
	localFailing atomic.Bool
	lastLocal    atomic.Int64
)

// monoStart is the origin of lastLocal's clock.
var monoStart = time.Now()

// noteLocal logs when probes start and stop failing on this host: one
// line each way, not one per probe. It runs on the engine's loop, so the
// logging is handed to a goroutine.
func noteLocal(local bool, res shaker.Result) {
	err := res.Err
	now := int64(time.Since(monoStart))
	if local {
		lastLocal.Store(now)
	} else if localFailing.Load() && now-int64(res.Duration) <= lastLocal.Load() {
		// a probe whose SYN went out before the last local failure (it
		// had its socket already) says nothing about this host now
		return
	}
	if localFailing.Load() == local || localFailing.Swap(local) == local {
		return
	}
	go func() {
		herald := reg.herald.Load()
		if herald == nil {
			return
		}
		if local {
			herald.logger.Error("probes failing on this host: backends keep their state until probes work again",
				zap.Error(err))
		} else {
			herald.logger.Info("probes working again on this host")
		}
	}()
}

// reason says why a probe failed, in words for the log.
func reason(err error, timeout time.Duration) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, shaker.ErrRefused):
		return "refused"
	case errors.Is(err, shaker.ErrTimeout):
		return "timeout after " + timeout.String()
	case errors.Is(err, shaker.ErrUnreachable):
		return "unreachable"
	}
	return err.Error()
}

// nameLocked is the upstream as configured that the checker is reported
// under: the first in order of the names that reference it.
func (c *checker) nameLocked() string {
	first := ""
	for n := range c.names {
		if first == "" || n < first {
			first = n
		}
	}
	return first
}

// Status is the health of one probed address, as the admin API shows it.
type Status struct {
	// Upstream is the upstream as configured (first one, if several
	// configured upstreams resolve to this address).
	Upstream string `json:"upstream"`
	// Address is the address probed, host:port, IPv6 in brackets.
	Address string `json:"address"`
	// Healthy is true when the address is in service.
	Healthy bool `json:"healthy"`
	// LastRTTMicros is the kernel's SYN to SYN-ACK round trip of the
	// last successful probe, in microseconds.
	LastRTTMicros int64 `json:"last_rtt_us"`
	// LastError is why the last probe failed; "" when it succeeded.
	LastError string `json:"last_error"`
	// CheckedAt is the time of the last result (RFC 3339); null before
	// the first one.
	CheckedAt *time.Time `json:"checked_at"`
	// Passes and Fails are the consecutive successes and failures.
	Passes int `json:"passes"`
	Fails  int `json:"fails"`
	// Probes is the number of probes with a result.
	Probes uint64 `json:"probes"`
	// Interval and Timeout are the settings the address is probed with;
	// FastInterval and DownInterval are shown when set.
	Interval     string `json:"interval"`
	Timeout      string `json:"timeout"`
	FastInterval string `json:"fast_interval,omitempty"`
	DownInterval string `json:"down_interval,omitempty"`
}

// statuses returns the state of every probed address, sorted by upstream
// then address.
func (r *registry) statuses() []Status {
	r.mu.Lock()
	cs := make([]*checker, 0, len(r.checkers))
	for _, c := range r.checkers {
		cs = append(cs, c)
	}
	r.mu.Unlock()
	out := make([]Status, 0, len(cs))
	for _, c := range cs {
		c.mu.Lock()
		s := Status{
			Upstream:      c.nameLocked(),
			Address:       c.addr,
			Healthy:       c.healthy.Load(),
			LastRTTMicros: c.lastRTT.Microseconds(),
			Passes:        c.passes,
			Fails:         c.fails,
			Probes:        c.probesTotal,
			Interval:      c.key.interval.String(),
			Timeout:       c.key.timeout.String(),
		}
		if c.key.fastInterval > 0 {
			s.FastInterval = c.key.fastInterval.String()
		}
		if c.key.downInterval > 0 {
			s.DownInterval = c.key.downInterval.String()
		}
		if c.lastErr != nil {
			s.LastError = reason(c.lastErr, c.key.timeout)
		}
		if c.known {
			t := c.checkedAt.UTC()
			s.CheckedAt = &t
		}
		c.mu.Unlock()
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Upstream != out[j].Upstream {
			return out[i].Upstream < out[j].Upstream
		}
		if out[i].Address != out[j].Address {
			return out[i].Address < out[j].Address
		}
		di, _ := time.ParseDuration(out[i].Interval)
		dj, _ := time.ParseDuration(out[j].Interval)
		return di < dj
	})
	return out
}
