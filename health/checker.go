package health

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

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
	if res.Outcome == shaker.Up {
		c.lastRTT, c.lastErr = res.RTT, nil
	} else {
		c.lastErr = res.Err
	}
	was := standing{passes: c.passes, fails: c.fails, known: c.known, healthy: c.healthy.Load(), rejoin: c.rejoin.Load()}
	st, tr, ok := step(was, c.set, res.Outcome)
	c.passes, c.fails, c.known = st.passes, st.fails, st.known
	if ok {
		changed := was.known && was.healthy != tr.Up
		if !was.known || was.rejoin || changed {
			c.since = now.UnixNano()
		}
		if changed {
			c.transitions++
		}
		if tr.Up && (was.rejoin || changed) {
			c.returned.Store(Now())
		}
		c.healthy.Store(st.healthy)
		if was.rejoin {
			c.rejoin.Store(st.rejoin)
		}
		tr.Addr, tr.Name, tr.Settings = c.addr, c.name, c.set
		tr.Outcome, tr.Err, tr.RTT, tr.At = res.Outcome, res.Err, res.RTT, now
		if was.healthy != tr.Up || was.rejoin {
			r.version.Add(1) // in or out of service (a first Up changes nothing)
		}
		r.announce(news{tr: tr})
	}
	return c.afterFirst(c.nextIntervalLocked(), second, res.Duration)
}

// standing is the part of a checker's state that its results move: the
// consecutive answers (passes) and failures (fails), whether it has had a
// first result (known), its health, and whether it is back from
// maintenance and waiting for its first result (rejoin).
type standing struct {
	passes, fails          int32
	known, healthy, rejoin bool
}

// step is the state machine's pass/fail step, a pure function: the
// standing after a result with outcome o, one that says something about
// the backend (o.Backend(); Up is an answer, any other a failure), under
// settings s, and the transition it makes, if any (ok). The first result
// makes one, as does the first after maintenance (Rejoin, whatever the
// health before), s.Passes answers in a row while down and s.Fails
// failures in a row while up. The transition has Up, First, Rejoin and N
// set; the rest is the caller's to fill in.
func step(was standing, s Settings, o shaker.Outcome) (now standing, tr Transition, ok bool) {
	up := o == shaker.Up
	now = was
	now.known = true
	var n int32
	need := s.Fails
	if up {
		now.passes, now.fails = was.passes+1, 0
		n, need = now.passes, s.Passes
	} else {
		now.passes, now.fails = 0, was.fails+1
		n = now.fails
	}
	switch {
	case was.rejoin:
		tr = Transition{Up: up, Rejoin: true}
	case !was.known:
		tr = Transition{Up: up, First: true}
	case was.healthy != up && int(n) >= need:
		tr = Transition{Up: up}
	default:
		return now, Transition{}, false
	}
	now.healthy, now.rejoin = up, false
	tr.N = int(n)
	return now, tr, true
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
