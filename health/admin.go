package health

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

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
