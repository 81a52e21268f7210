// Package health is the middle layer of caddy-shaker: the health state of
// every probed address and its probe schedule on the engine. It knows
// nothing of Caddy. The Caddy glue above it (the caddyshaker package)
// asks for addresses to be probed, reads their health on every request,
// and is told of every probe and every change of state through an
// Observer; the engine below it (package shaker) runs the probes.
//
// One address probed with one set of Settings is one Checker, however
// many upstream sources and configs use it: a Registry hands out
// references, and a checker stops when its last one is released. Its
// state therefore survives config reloads.
package health

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Settings say how an address is probed and judged.
type Settings struct {
	// Interval is the time between the starts of two probes.
	Interval time.Duration
	// Timeout is how long a probe waits for a SYN-ACK.
	Timeout time.Duration
	// FastInterval, when set, is used while the address is changing
	// state (failures counted while it is up, answers while it is down),
	// as HAProxy's fastinter.
	FastInterval time.Duration
	// DownInterval, when set, is used while the address is down, as
	// HAProxy's downinter.
	DownInterval time.Duration
	// Passes is the consecutive answered probes that bring a down
	// address back up.
	Passes int
	// Fails is the consecutive failed probes that take an up address
	// down.
	Fails int
	// JitterPercent and Jitter vary every interval used (Interval,
	// FastInterval or DownInterval) at random, as Envoy's
	// interval_jitter and HAProxy's spread-checks, so that many proxies
	// probing the same backends do not fall into step: each is drawn
	// uniformly from [iv-j, iv+j], so the mean rate does not change.
	// With JitterPercent, j is that percentage of the interval in use
	// (0 to 50); with Jitter, j is that duration, but at most half the
	// interval in use (Jitter itself at most half of Interval). Give at
	// most one; zero for both means no jitter.
	JitterPercent float64
	Jitter        time.Duration
}

// Validate reports settings the state machine cannot use.
func (s Settings) Validate() error {
	switch {
	case s.Interval <= 0:
		return fmt.Errorf("interval %v: must be positive", s.Interval)
	case s.Timeout <= 0:
		return fmt.Errorf("timeout %v: must be positive", s.Timeout)
	case s.Passes < 1:
		return fmt.Errorf("passes %d: must be at least 1", s.Passes)
	case s.Fails < 1:
		return fmt.Errorf("fails %d: must be at least 1", s.Fails)
	case s.FastInterval < 0:
		return fmt.Errorf("fast_interval %v: must be positive", s.FastInterval)
	case s.DownInterval < 0:
		return fmt.Errorf("down_interval %v: must be positive", s.DownInterval)
	case !(s.JitterPercent >= 0 && s.JitterPercent <= 50): // NaN too
		return fmt.Errorf("jitter %v%%: must be from 0 to 50%%", s.JitterPercent)
	case s.Jitter < 0:
		return fmt.Errorf("jitter %v: must not be negative", s.Jitter)
	case s.Jitter > s.Interval/2:
		return fmt.Errorf("jitter %v: must be at most half the interval (%v)", s.Jitter, s.Interval/2)
	case s.Jitter > 0 && s.JitterPercent > 0:
		return fmt.Errorf("jitter %v and %v%%: give a duration or a percentage, not both", s.Jitter, s.JitterPercent)
	}
	return nil
}

// jittered returns iv varied by the jitter: drawn uniformly from
// [iv-j, iv+j], with j as Settings.JitterPercent or Settings.Jitter
// say, never more than iv/2; iv itself without jitter. It runs on the
// engine's loop for every probe: math/rand/v2's global source is cheap,
// safe for concurrent use and allocates nothing.
func (s *Settings) jittered(iv time.Duration) time.Duration {
	var j time.Duration
	switch {
	case s.JitterPercent > 0:
		j = time.Duration(float64(iv) * s.JitterPercent / 100)
	case s.Jitter > 0:
		j = s.Jitter
	}
	j = min(j, iv/2)
	if j <= 0 {
		return iv
	}
	lo := iv - j
	d := lo + time.Duration(rand.Int64N(2*int64(j)+1)) // 2j+1 <= iv+1: no overflow
	if d < lo {
		return math.MaxInt64 // iv+j past the end of time.Duration
	}
	return max(d, min(iv, MinInterval)) // never below MinInterval (nor iv, if shorter)
}

// Want is an address a source needs probed, under the name it was
// configured as.
type Want struct {
	Addr     netip.AddrPort
	Settings Settings
	Name     string
}

// AdminState is what an operator said of an address: it belongs to the
// address, whatever checkers or configs probe it, and survives reloads.
type AdminState uint32

const (
	// Ready: in service as its health allows. The default.
	Ready AdminState = iota
	// Drain: no new requests; probes go on and its health is tracked.
	Drain
	// Maint: no requests and no probes; its health is unknown until it
	// is ready again, and then known from its first probe, at once.
	Maint
)

// String is the state's name: ready, drain or maint.
func (a AdminState) String() string {
	switch a {
	case Ready:
		return "ready"
	case Drain:
		return "drain"
	case Maint:
		return "maint"
	}
	return fmt.Sprintf("AdminState(%d)", uint32(a))
}

// ParseAdminState parses ready, drain or maint.
func ParseAdminState(s string) (AdminState, error) {
	for a := Ready; a <= Maint; a++ {
		if s == a.String() {
			return a, nil
		}
	}
	return 0, fmt.Errorf("admin state %q: must be ready, drain or maint", s)
}

// ErrNotProbed is SetAdminState's error for an address no checker probes.
var ErrNotProbed = errors.New("address not probed")

// Transition is a change of an address's health, or its first result.
type Transition struct {
	Addr netip.AddrPort
	// Name is the upstream as configured that the address is reported
	// under.
	Name string
	// Up is the new state.
	Up bool
	// First is true for the address's first result: an address counts
	// as up before it, so a first Up changes nothing.
	First bool
	// Rejoin is true for the first result after maintenance: Up when
	// the address answered, whatever its state before.
	Rejoin bool
	// Outcome and Err are the last probe's; RTT its round trip when up.
	Outcome shaker.Outcome
	Err     error
	RTT     time.Duration
	// N is the number of consecutive results that made the change.
	N int
	// Settings are the checker's.
	Settings Settings
	At       time.Time
}

// Reason says why the last probe failed, in words for logs: refused,
// "timeout after 1s", unreachable, or the error.
func (t Transition) Reason() string { return Reason(t.Outcome, t.Err, t.Settings.Timeout) }

// Reason says why a probe failed, in words for logs and the admin API.
func Reason(o shaker.Outcome, err error, timeout time.Duration) string {
	switch o {
	case shaker.Up:
		return ""
	case shaker.Refused, shaker.Unreachable:
		return o.String()
	case shaker.Timeout:
		return "timeout after " + timeout.String()
	}
	if err != nil {
		return err.Error()
	}
	return o.String()
}

// Observer is told what happens. The glue implements it: metrics, logs
// and events.
type Observer interface {
	// Probed is called with every probe's result, on the engine's loop
	// goroutine: it must be quick and must not block.
	Probed(res shaker.Result)
	// Changed is called for each transition.
	Changed(t Transition)
	// LocalFailing is called when probes start failing on this host
	// (failing true, with the error: out of file descriptors, ports or
	// memory) and when they work again, once each way.
	LocalFailing(failing bool, err error)
	// Changed and LocalFailing are called in the order the registry saw
	// the news, one call at a time, on the registry's announcer goroutine:
	// never on the engine's loop, which only queues them and never waits
	// for them. The announcer runs while there is news to hand over, and
	// SetEngine(nil), the registry's stop, returns only once it is done.
}

// Registry holds the checkers of every probed address and schedules their
// probes on an engine. Its methods are safe for concurrent use.
type Registry struct {
	obs atomic.Pointer[Observer]
	// version counts the changes that can move an address in or out of
	// service: health transitions and admin state changes.
	version atomic.Uint64

	mu       sync.Mutex
	engine   *shaker.Engine
	checkers map[netip.AddrPort]*Checker // first checker of each address; others follow in next
	n        int
	admin    map[netip.AddrPort]AdminState // addresses not Ready
	counts   counts                        // checkers by health and admin state (counts.go)

	qmu        sync.Mutex
	queue      []news     // for the observer, oldest first
	announcing bool       // the announcer goroutine runs
	announced  *sync.Cond // on qmu: announcing went false

	localFailing atomic.Bool
	lastLocal    atomic.Int64 // monotonic ns of the last local failure
	base         time.Time

	// pace paces first probes (see Start) over all Starts: one right
	// after another queues its first probes behind the other's. Under mu.
	pace pacer
}

// NewRegistry returns an empty registry, with no engine yet.
func NewRegistry() *Registry {
	r := &Registry{
		checkers: make(map[netip.AddrPort]*Checker),
		admin:    make(map[netip.AddrPort]AdminState),
		base:     time.Now(),
	}
	r.announced = sync.NewCond(&r.qmu)
	return r
}

// Version changes whenever an address may have moved in or out of service
// (a health transition, an admin state change): who keeps a list of the
// addresses in service rebuilds it when Version has moved, rather than
// checking every address on every request.
func (r *Registry) Version() uint64 { return r.version.Load() }

// SetObserver sets who is told of probes and transitions; nil for no one.
func (r *Registry) SetObserver(o Observer) {
	if o == nil {
		r.obs.Store(nil)
		return
	}
	r.obs.Store(&o)
}

func (r *Registry) observer() Observer {
	if p := r.obs.Load(); p != nil {
		return *p
	}
	return nil
}

// SetEngine gives the registry the engine to probe with, or takes it away
// (nil) when it is closed. A new engine takes over every checker, as
// Start does: those with a result have their first probes on it spread
// over their intervals, those without are probed at once (paced).
// SetEngine(nil) is the registry's stop: it returns once the observer has
// been told everything queued before it, and the announcer goroutine is
// gone.
func (r *Registry) SetEngine(e *shaker.Engine) {
	if e == nil {
		defer r.waitAnnounced()
	}
	r.mu.Lock()
	if r.engine == e {
		r.mu.Unlock()
		return
	}
	r.engine = e
	var all []*Checker
	for _, c := range r.checkers {
		for ; c != nil; c = c.next {
			c.mu.Lock()
			if c.sched != nil {
				c.sched.Stop() // the old engine's
				c.sched = nil
			}
			if c.armed && c.AdminState() != Maint {
				all = append(all, c)
			}
			c.mu.Unlock()
		}
	}
	if e != nil {
		r.arm(e, all)
	}
	r.mu.Unlock()
}

// Acquire takes a reference to the checker of each want, creating those
// that are missing. It returns the checkers, in the order of ws, and the
// new ones, whose probes do not start until they are given to Start.
func (r *Registry) Acquire(ws []Want) (all, fresh []*Checker) {
	all = make([]*Checker, len(ws))
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, w := range ws {
		c := r.findLocked(w.Addr, w.Settings)
		if c == nil {
			c = &Checker{r: r, addr: w.Addr, set: w.Settings}
			c.healthy.Store(true)
			c.admin.Store(uint32(r.admin[w.Addr]))
			r.inheritLocked(c)
			c.next = r.checkers[w.Addr]
			r.checkers[w.Addr] = c
			r.n++
			r.counts.add(c.classLocked(), 1)
			fresh = append(fresh, c)
		}
		c.mu.Lock()
		c.addName(w.Name)
		c.mu.Unlock()
		all[i] = c
	}
	return all, fresh
}

func (r *Registry) findLocked(addr netip.AddrPort, s Settings) *Checker {
	for c := r.checkers[addr]; c != nil; c = c.next {
		if c.set == s {
			return c
		}
	}
	return nil
}

// inheritLocked gives a new checker the state of another checker of the
// same address (with other settings, as after a reload that changed
// them), so that a down address does not look up while the new settings
// take over.
func (r *Registry) inheritLocked(c *Checker) {
	for o := r.checkers[c.addr]; o != nil; o = o.next {
		o.mu.Lock()
		if o.known {
			c.known = true
			c.healthy.Store(o.healthy.Load())
			c.passes, c.fails = o.passes, o.fails
			c.lastRTT, c.lastOutcome, c.lastErr, c.checkedAt = o.lastRTT, o.lastOutcome, o.lastErr, o.checkedAt
			c.probes = o.probes
			c.since, c.transitions = o.since, o.transitions
			c.rejoin.Store(o.rejoin.Load())
			c.returned.Store(o.returned.Load())
		}
		o.mu.Unlock()
		if c.known {
			return
		}
	}
}

// Start starts the probes of new checkers.
//
// An address not probed yet counts as up, so a new checker is probed at
// once: the first probes of cs go out one after another as fast as the
// engine's Burst allows (64,000 a second; past half of the engine's
// max_sockets, as many per timeout), never later than the even spread
// over the interval would have sent them: 1,000 addresses in 16 ms. An
// address's health is thus unknown for one round trip if it answers, at
// most the timeout if not. From the second probe on, the probes are
// spread over the interval as if the first ones had been (the k-th of n
// at k/n of the interval, then every interval, with jitter), so that many
// addresses, proxies or reloads do not fall into step and make bursts of
// SYNs: only the first probe is compressed. A checker that inherited a
// result (see Acquire) is not unknown: its first probe is spread too.
func (r *Registry) Start(cs []*Checker) {
	if len(cs) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range cs {
		c.mu.Lock()
		c.armed = true
		c.mu.Unlock()
	}
	if r.engine != nil {
		r.arm(r.engine, cs)
	}
}

// arm registers the schedules of cs on e, but for those that have one,
// as Start says. Under r.mu, so that the engine cannot change in between
// (Every takes only its loop's lock).
func (r *Registry) arm(e *shaker.Engine, cs []*Checker) {
	now := Now()
	n := time.Duration(len(cs))
	for i, c := range cs {
		c.mu.Lock()
		spread := c.set.Interval * time.Duration(i) / n
		if c.known {
			c.armLocked(e, spread, 0)
			c.mu.Unlock()
			continue
		}
		b := e.Burst(c.set.Timeout)
		slot := r.pace.slot(now, b)
		first, second, paced := firstProbe(time.Duration(slot-now), spread, c.set.Interval)
		if c.armLocked(e, first, second) && paced {
			r.pace.take(slot, b)
		}
		c.mu.Unlock()
	}
}

// pacer paces bursts of first probes as a shaker.Burst says: at most
// Rate a second (next), and at most Size within any Timeout, as a
// generic cell rate algorithm (tat: the theoretical arrival time of a
// probe sent at Size per Timeout). Times are on the clock of Now.
type pacer struct {
	next int64 // the earliest slot at Rate
	tat  int64
}

// slot is the earliest time from now at which a probe may start.
func (p *pacer) slot(now int64, b shaker.Burst) int64 {
	t := max(int64(b.Timeout)/int64(b.Size), 1)
	return max(now, p.next, p.tat-int64(b.Size-1)*t)
}

// take counts a probe started at slot.
func (p *pacer) take(slot int64, b shaker.Burst) {
	p.next = slot + int64(float64(time.Second)/b.Rate)
	p.tat = max(p.tat, slot) + max(int64(b.Timeout)/int64(b.Size), 1)
}

// firstProbe says when a new checker's first probe goes, from now: at
// its paced slot (slot from now), unless the even spread over the
// interval puts it sooner (spread from now; a rate too low for the pool);
// paced says which. Its second probe goes second after the first, where
// the spread puts it: at spread, or an interval after the first probe
// when that is not later.
func firstProbe(slot, spread, interval time.Duration) (first, second time.Duration, paced bool) {
	first, paced = slot, true
	if first > spread {
		first, paced = spread, false
	}
	second = spread - first
	if second <= 0 {
		second = interval
	}
	return first, second, paced
}

// armLocked registers c's schedule on e, its first probe after first and
// its second second after that (0: as its first result says), unless it
// has one, is stopped or is in maintenance. It reports whether it did.
// Under c.mu.
func (c *Checker) armLocked(e *shaker.Engine, first, second time.Duration) bool {
	if c.stopped || c.sched != nil || c.AdminState() == Maint {
		return false
	}
	c.second = second
	c.sched = e.Every(c.addr, shaker.Period{Interval: c.set.Interval, Timeout: c.set.Timeout, First: first}, c.Observe)
	return true
}

// Release drops the references taken by Acquire. A checker without
// references stops: no probe of it starts again, and its state is
// forgotten.
func (r *Registry) Release(ws []Want) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, w := range ws {
		c := r.findLocked(w.Addr, w.Settings)
		if c == nil {
			continue
		}
		c.mu.Lock()
		last := c.dropName(w.Name)
		var sched *shaker.Schedule
		if last {
			r.counts.add(c.classLocked(), -1)
			c.stopped = true
			sched, c.sched = c.sched, nil
		}
		c.mu.Unlock()
		if !last {
			continue
		}
		sched.Stop()
		p := r.checkers[w.Addr]
		if p == c {
			if c.next == nil {
				delete(r.checkers, w.Addr)
			} else {
				r.checkers[w.Addr] = c.next
			}
		} else {
			for p.next != c {
				p = p.next
			}
			p.next = c.next
		}
		c.next = nil
		r.n--
		if r.checkers[w.Addr] == nil {
			// no longer probed: an operator's word on it is forgotten
			delete(r.admin, w.Addr)
		}
	}
}

// Len is the number of checkers.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// EachAddress calls fn for every probed address with its health: up when
// any of its checkers is up (several sources may probe it with different
// settings). fn runs under the registry's lock: it must be quick and must
// not call the registry.
func (r *Registry) EachAddress(fn func(addr netip.AddrPort, healthy bool)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for addr, c := range r.checkers {
		up := false
		for ; c != nil && !up; c = c.next {
			up = c.Healthy()
		}
		fn(addr, up)
	}
}

// SetAdminState sets addr's administrative state for every checker of it,
// now and later (a checker made for it after a reload takes it too), and
// returns the state before. Drain keeps probing; Maint stops its probes
// and forgets its health; Ready after Maint probes it at once and keeps
// it out of service until that probe answers. It returns ErrNotProbed
// for an address no checker probes. The state is forgotten when the
// address is no longer probed.
func (r *Registry) SetAdminState(addr netip.AddrPort, st AdminState) (AdminState, error) {
	if st > Maint {
		return 0, fmt.Errorf("admin state %d: must be ready, drain or maint", uint32(st))
	}
	r.mu.Lock()
	first := r.checkers[addr]
	if first == nil {
		r.mu.Unlock()
		return 0, ErrNotProbed
	}
	prev := r.admin[addr]
	if prev == st {
		r.mu.Unlock()
		return prev, nil
	}
	if st == Ready {
		delete(r.admin, addr)
	} else {
		r.admin[addr] = st
	}
	e := r.engine
	now := time.Now().UnixNano()
	mono := Now()
	var rearm []*Checker
	var stops []*shaker.Schedule
	for c := first; c != nil; c = c.next {
		c.mu.Lock()
		old := c.classLocked()
		c.admin.Store(uint32(st))
		switch {
		case st == Maint:
			// health unknown from now on; no probes
			if c.sched != nil {
				stops = append(stops, c.sched)
				c.sched = nil
			}
			c.rejoin.Store(false)
			c.since = now
			c.passes, c.fails = 0, 0
		case prev == Maint:
			// back: out of service until the first probe, at once
			c.rejoin.Store(true)
			if c.armed && !c.stopped {
				rearm = append(rearm, c)
			}
		case st == Ready && c.healthy.Load() && !c.rejoin.Load():
			// back from drain: slow start ramps from now
			c.returned.Store(mono)
		}
		c.recount(old)
		c.mu.Unlock()
	}
	// under r.mu, so that SetEngine cannot swap the engine in between
	// (Every takes only its loop's lock)
	if e != nil {
		for _, c := range rearm {
			c.mu.Lock()
			c.armLocked(e, 0, 0) // at once
			c.mu.Unlock()
		}
	}
	r.version.Add(1)
	r.mu.Unlock()
	for _, s := range stops {
		s.Stop()
	}
	return prev, nil
}

// AddressStatuses returns the state of every checker of addr, sorted like
// Statuses; none when it is not probed.
func (r *Registry) AddressStatuses(addr netip.AddrPort) []Status {
	r.mu.Lock()
	var cs []*Checker
	for c := r.checkers[addr]; c != nil; c = c.next {
		cs = append(cs, c)
	}
	r.mu.Unlock()
	return sortedStatuses(cs)
}

// Checkers returns every checker, for tests and reports.
func (r *Registry) Checkers() []*Checker {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Checker, 0, r.n)
	for _, c := range r.checkers {
		for ; c != nil; c = c.next {
			out = append(out, c)
		}
	}
	return out
}

// Checker is the health state of one address under one set of settings,
// and its probe schedule.
type Checker struct {
	r    *Registry
	addr netip.AddrPort
	set  Settings
	next *Checker // under r.mu

	// healthy is read on every proxied request. An address not probed
	// yet counts as up.
	healthy atomic.Bool
	// admin is the address's AdminState, read on every request too.
	admin atomic.Uint32
	// rejoin: back from maintenance, out of service until its first
	// result.
	rejoin atomic.Bool
	// returned is when the address last came back into service, on the
	// clock of Now: down to up, or back from maintenance or drain; 0 if
	// it has been in service since its first result. For slow start.
	returned atomic.Int64
	// lastNow is when a probe was last asked for out of turn (ProbeNow),
	// on the clock of Now; 0 never.
	lastNow atomic.Int64

	mu          sync.Mutex
	sched       *shaker.Schedule
	second      time.Duration    // from the first probe to the second (see Start); 0 once used, or none
	name        string           // the name referenced first, or the least
	names       map[string]int32 // references per name, once there are several names
	refs        int32
	armed       bool // given to Start
	stopped     bool
	known       bool // has a first result
	passes      int32
	fails       int32
	lastOutcome shaker.Outcome
	lastRTT     time.Duration
	lastErr     error
	checkedAt   int64 // unix ns of the last result
	probes      uint64
	since       int64  // unix ns the address entered its health state (unknown included); 0 before
	transitions uint32 // changes of health since the first result
}

// Addr is the address probed.
func (c *Checker) Addr() netip.AddrPort { return c.addr }

// Settings are the checker's settings.
func (c *Checker) Settings() Settings { return c.set }

// Healthy reports whether the address's health lets it serve: up, or not
// probed yet; not while in maintenance or waiting for its first result
// after it. It is cheap enough for every request.
func (c *Checker) Healthy() bool {
	return c.healthy.Load() && !c.rejoin.Load() && c.AdminState() != Maint
}

// AdminState is the address's administrative state.
func (c *Checker) AdminState() AdminState { return AdminState(c.admin.Load()) }

// InService reports whether new requests may go to the address: it is
// Ready and Healthy. Cheap enough for every request.
func (c *Checker) InService() bool { return c.AdminState() == Ready && c.Healthy() }

// ReturnedAt is when the address last came back into service (down to up,
// back from maintenance or drain), on the clock of Now; 0 when it has
// served since its first result. Slow start ramps from it.
func (c *Checker) ReturnedAt() int64 { return c.returned.Load() }

// monoBase is the origin of Now.
var monoBase = time.Now()

// Now is the time on the monotonic clock that ReturnedAt uses, in ns: a
// step of the wall clock does not move it. It is never 0.
func Now() int64 { return int64(time.Since(monoBase)) + 1 }

// ProbeNow asks for a probe of the address at once, out of its schedule,
// as after a request against it failed; not more often than once per
// fast_interval (the interval when unset), nor while it is in
// maintenance. It reports whether a probe was asked for.
func (c *Checker) ProbeNow() bool {
	if c.AdminState() == Maint {
		return false
	}
	every := c.set.FastInterval
	if every <= 0 {
		every = c.set.Interval
	}
	now := Now()
	last := c.lastNow.Load()
	if last != 0 && now-last < int64(every) || !c.lastNow.CompareAndSwap(last, now) {
		return false
	}
	c.mu.Lock()
	sched := c.sched
	c.mu.Unlock()
	if sched == nil {
		return false
	}
	sched.Now()
	return true
}

// Probes is the number of probes with a result.
func (c *Checker) Probes() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.probes
}

// addName counts a reference under name. Most checkers have one name, so
// the map exists only once there is a second.
func (c *Checker) addName(name string) {
	c.refs++
	switch {
	case c.refs == 1:
		c.name = name
	case c.names == nil && name == c.name:
		// still one name
	default:
		if c.names == nil {
			c.names = map[string]int32{c.name: c.refs - 1}
		}
		c.names[name]++
		c.name = minName(c.names)
	}
}

// dropName drops a reference under name and reports whether it was the
// last.
func (c *Checker) dropName(name string) bool {
	c.refs--
	if c.names != nil {
		if c.names[name]--; c.names[name] <= 0 {
			delete(c.names, name)
		}
		if len(c.names) == 1 {
			for n := range c.names {
				c.name = n
			}
			c.names = nil
		} else if len(c.names) > 1 {
			c.name = minName(c.names)
		}
	}
	return c.refs <= 0
}

func minName(m map[string]int32) string {
	first, ok := "", false
	for n := range m {
		if !ok || n < first {
			first, ok = n, true
		}
	}
	return first
}

// Observe takes a probe's result and returns the time from that probe's
// start to the next one. The engine calls it on its loop goroutine for
// every scheduled probe (others may call it too, with results from
// elsewhere): it must not block, so it updates state under a short lock
// and hands transitions to the registry's announcer. Results that say
// nothing about the backend (Local, Closed) change nothing.
func (c *Checker) Observe(res shaker.Result) time.Duration {
	r := c.r
	obs := r.observer()
	if obs != nil {
		obs.Probed(res)
	}
	local := res.Outcome == shaker.Local
	r.noteLocal(obs, local, res)
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.recount(c.classLocked())
	if c.stopped || c.AdminState() == Maint {
		// a result that came in as the schedule stopped: it says
		// nothing any more
		return 0
	}
	// the first probe was sent early (see Start): the second one goes
	// where the spread over the interval puts it, or sooner
	second := c.second
	c.second = 0
	if !res.Outcome.Backend() {
		// this host could not make the probe (out of fds, ports or
		// memory), or the engine is closing: it says nothing about the
		// backend, so it counts neither way; probe again after the
		// interval
		return c.afterFirst(c.set.Interval, second, res.Duration)
	}
	c.probes++
	c.checkedAt = now.UnixNano()
	c.lastOutcome = res.Outcome
	var tr *Transition
	rejoin := c.rejoin.Load()
	if res.Outcome == shaker.Up {
		c.lastRTT, c.lastErr = res.RTT, nil
		c.passes++
		c.fails = 0
		switch {
		case rejoin:
			tr = &Transition{Up: true, Rejoin: true}
		case !c.known:
			tr = &Transition{Up: true, First: true}
		case !c.healthy.Load() && int(c.passes) >= c.set.Passes:
			tr = &Transition{Up: true}
		}
	} else {
		c.lastErr = res.Err
		c.fails++
		c.passes = 0
		switch {
		case rejoin:
			tr = &Transition{Up: false, Rejoin: true}
		case !c.known:
			tr = &Transition{Up: false, First: true}
		case c.healthy.Load() && int(c.fails) >= c.set.Fails:
			tr = &Transition{Up: false}
		}
	}
	known := c.known
	c.known = true
	if tr != nil {
		was := c.healthy.Load()
		changed := known && was != tr.Up
		if !known || rejoin || changed {
			c.since = now.UnixNano()
		}
		if changed {
			c.transitions++
		}
		if tr.Up && (rejoin || changed) {
			c.returned.Store(Now())
		}
		c.healthy.Store(tr.Up)
		if rejoin {
			c.rejoin.Store(false)
		}
		tr.Addr, tr.Name, tr.Settings = c.addr, c.name, c.set
		tr.Outcome, tr.Err, tr.RTT, tr.At = res.Outcome, res.Err, res.RTT, now
		tr.N = int(max(c.passes, c.fails))
		if was != tr.Up || rejoin {
			r.version.Add(1) // in or out of service (a first Up changes nothing)
		}
		r.announce(news{tr: *tr})
	}
	return c.afterFirst(c.nextIntervalLocked(), second, res.Duration)
}

// afterFirst is the time from a probe's due time to the next probe's,
// with next the interval in use (see nextIntervalLocked), jittered. But
// after a first probe sent early (second > 0, see Start) the second probe
// goes where the spread over the interval puts it, or sooner if a shorter
// fast_interval or down_interval is in use. A first probe that took longer
// than that (a timeout: took is from its SYN to its result) moves its
// second on by whole intervals, past the result: the engine starts a next
// probe whose time has passed at once, so the dead addresses of a Start
// would be probed in one burst from then on.
func (c *Checker) afterFirst(next, second, took time.Duration) time.Duration {
	d := c.set.jittered(next)
	if second <= 0 {
		return d
	}
	if second <= took {
		iv := c.set.Interval
		second += ((took-second)/iv + 1) * iv
	}
	if next < c.set.Interval && d > took && d < second {
		return d
	}
	return second
}

// nextIntervalLocked is the time from the start of the last probe to the
// next one: fast_interval while the address is changing state (failures
// counted while it is up, answers while it is down), down_interval while
// it is down, interval otherwise, as HAProxy's fastinter and downinter.
func (c *Checker) nextIntervalLocked() time.Duration {
	healthy := c.healthy.Load()
	switch {
	case !c.known:
	case healthy && c.fails > 0, !healthy && c.passes > 0:
		if c.set.FastInterval > 0 {
			return c.set.FastInterval
		}
	case !healthy:
		if c.set.DownInterval > 0 {
			return c.set.DownInterval
		}
	}
	return c.set.Interval
}

// news is one thing the observer is told: a transition, or probes starting
// or stopping to fail on this host (local).
type news struct {
	tr      Transition
	local   bool
	failing bool
	err     error
}

// announce queues news for the observer and starts the announcer if it is
// not running. It never waits for the observer: the engine's loop calls it.
// One announcer at a time hands the queue over, in order.
func (r *Registry) announce(n news) {
	r.qmu.Lock()
	r.queue = append(r.queue, n)
	start := !r.announcing
	r.announcing = true
	r.qmu.Unlock()
	if start {
		go r.announceLoop()
	}
}

// announceLoop is the announcer: it hands the queue to the observer until
// the queue is empty, then ends.
func (r *Registry) announceLoop() {
	for {
		r.qmu.Lock()
		q := r.queue
		r.queue = nil
		if len(q) == 0 {
			r.announcing = false
			r.announced.Broadcast()
			r.qmu.Unlock()
			return
		}
		r.qmu.Unlock()
		obs := r.observer()
		for _, n := range q {
			switch {
			case obs == nil:
			case n.local:
				obs.LocalFailing(n.failing, n.err)
			default:
				obs.Changed(n.tr)
			}
		}
	}
}

// waitAnnounced waits until the announcer has handed over the queue and
// ended.
func (r *Registry) waitAnnounced() {
	r.qmu.Lock()
	for r.announcing {
		r.announced.Wait()
	}
	r.qmu.Unlock()
}

// noteLocal tells the observer when probes start and stop failing on this
// host: once each way, not once per probe.
func (r *Registry) noteLocal(obs Observer, local bool, res shaker.Result) {
	now := int64(time.Since(r.base))
	if local {
		r.lastLocal.Store(now)
	} else if r.localFailing.Load() && now-int64(res.Duration) <= r.lastLocal.Load() {
		// a probe whose SYN went out before the last local failure (it
		// had its socket already) says nothing about this host now
		return
	}
	if r.localFailing.Load() == local || r.localFailing.Swap(local) == local {
		return
	}
	if obs != nil {
		r.announce(news{local: true, failing: local, err: res.Err})
	}
}

// LocalFailing reports whether probes fail on this host now.
func (r *Registry) LocalFailing() bool { return r.localFailing.Load() }

// Status is the health of one probed address under one set of settings,
// as the admin API shows it.
type Status struct {
	// Upstream is the upstream as configured (the first, in order, if
	// several configured upstreams resolve to this address).
	Upstream string `json:"upstream"`
	// Address is the address probed, host:port, IPv6 in brackets.
	Address string `json:"address"`
	// Healthy is true when the address's health lets it serve: up, or
	// not probed yet. False in maintenance, and after it until its first
	// probe answers.
	Healthy bool `json:"healthy"`
	// Health is up, down, or unknown (not probed yet; in maintenance, and
	// after it until its first result).
	Health string `json:"health"`
	// AdminState is ready, drain or maint (see the admin API's POST
	// /shaker/upstreams/<address>/<action>).
	AdminState string `json:"admin_state"`
	// Since is when the address entered its current health state (its
	// first result counts); null before its first result.
	Since *time.Time `json:"since"`
	// Transitions is how many times its health changed since it was
	// first probed.
	Transitions uint32 `json:"transitions"`
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
	// Jitter ("5%" or "200ms"), FastInterval and DownInterval are shown
	// when set.
	Interval     string `json:"interval"`
	Timeout      string `json:"timeout"`
	Jitter       string `json:"jitter,omitempty"`
	FastInterval string `json:"fast_interval,omitempty"`
	DownInterval string `json:"down_interval,omitempty"`
}

// Status returns the checker's state.
func (c *Checker) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	admin := c.AdminState()
	s := Status{
		Upstream:      c.name,
		Address:       c.addr.String(),
		Healthy:       c.Healthy(),
		Health:        "unknown",
		AdminState:    admin.String(),
		Transitions:   c.transitions,
		LastRTTMicros: c.lastRTT.Microseconds(),
		Passes:        int(c.passes),
		Fails:         int(c.fails),
		Probes:        c.probes,
		Interval:      c.set.Interval.String(),
		Timeout:       c.set.Timeout.String(),
	}
	switch {
	case c.set.JitterPercent > 0:
		s.Jitter = strconv.FormatFloat(c.set.JitterPercent, 'g', -1, 64) + "%"
	case c.set.Jitter > 0:
		s.Jitter = c.set.Jitter.String()
	}
	if c.set.FastInterval > 0 {
		s.FastInterval = c.set.FastInterval.String()
	}
	if c.set.DownInterval > 0 {
		s.DownInterval = c.set.DownInterval.String()
	}
	if c.known && c.lastOutcome != shaker.Up {
		s.LastError = Reason(c.lastOutcome, c.lastErr, c.set.Timeout)
	}
	switch {
	case !c.known || admin == Maint || c.rejoin.Load():
	case c.healthy.Load():
		s.Health = "up"
	default:
		s.Health = "down"
	}
	if c.since != 0 {
		t := time.Unix(0, c.since).UTC()
		s.Since = &t
	}
	if c.known {
		t := time.Unix(0, c.checkedAt).UTC()
		s.CheckedAt = &t
	}
	return s
}

// Statuses returns the state of every checker, sorted by upstream, then
// address, then interval.
func (r *Registry) Statuses() []Status { return sortedStatuses(r.Checkers()) }

func sortedStatuses(cs []*Checker) []Status {
	out := make([]Status, len(cs))
	ivs := make([]time.Duration, len(cs))
	for i, c := range cs {
		out[i] = c.Status()
		ivs[i] = c.set.Interval
	}
	idx := make([]int, len(cs))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool {
		x, y := &out[idx[a]], &out[idx[b]]
		if x.Upstream != y.Upstream {
			return x.Upstream < y.Upstream
		}
		if x.Address != y.Address {
			return x.Address < y.Address
		}
		return ivs[idx[a]] < ivs[idx[b]]
	})
	sorted := make([]Status, len(out))
	for i, j := range idx {
		sorted[i] = out[j]
	}
	return sorted
}
