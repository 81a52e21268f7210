package health

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Want is an address a source needs probed, under the name it was
// configured as.
type Want struct {
	Addr     netip.AddrPort
	Settings Settings
	Name     string
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
