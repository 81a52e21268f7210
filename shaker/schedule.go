package shaker

import (
	"net/netip"
	"time"
)

// Period says when a periodic probe runs (see Every).
type Period struct {
	// Interval is the time between the starts of two probes, unless the
	// callback returns another. It must be positive.
	Interval time.Duration
	// Timeout is each probe's timeout, from its SYN; <= 0 means
	// Options.DefaultTimeout.
	Timeout time.Duration
	// First is the delay of the first probe from the call to Every. Give
	// many schedules different ones (spread over the interval) so that
	// they do not make one burst of SYNs.
	First time.Duration
}

// Every registers a periodic probe of addr with the engine, and returns
// its handle. The engine's loop starts each probe from its own timer heap
// when it is due, with no goroutine, timer or wake-up of its own: every
// probe due in a turn of the loop starts in that turn, in due order, a
// batch at a time with answers read between batches.
//
// fn is called with each probe's result, on the loop goroutine: it must
// not block, nor call Close; it may call Stop. It returns the time from
// this probe's due time to the next probe's; <= 0 means p.Interval. A
// next time that has passed already (a timeout longer than the interval)
// starts the next probe at once: probes of one schedule never overlap,
// and a schedule that could not keep up does not make up for missed
// probes with a burst.
//
// fn is never called with a Closed result: after Close, or after Stop,
// it is not called again (a call already running on the loop finishes).
// Every after Close returns a stopped schedule.
func (e *Engine) Every(addr netip.AddrPort, p Period, fn func(Result) time.Duration) *Schedule {
	if fn == nil {
		panic("shaker: Every with a nil callback")
	}
	if p.Interval <= 0 {
		panic("shaker: Every with an interval <= 0")
	}
	if p.Timeout <= 0 {
		p.Timeout = e.defaultTimeout
	}
	s := &Schedule{
		addr:     addr,
		timeout:  int64(p.Timeout),
		interval: int64(p.Interval),
		cur:      int64(p.Interval),
		fn:       fn,
		idx:      -1,
	}
	s.scope, s.err = scopeOf(addr)
	e.every(s, p.First)
	return s
}

// Addr is the address the schedule probes.
func (s *Schedule) Addr() netip.AddrPort { return s.addr }

// scopeOf looks up the interface index of an IPv6 zone, on the caller's
// goroutine, never on the loop.
func scopeOf(addr netip.AddrPort) (uint32, error) {
	if z := addr.Addr().Zone(); z != "" && addr.Addr().Is6() && !addr.Addr().Is4In6() {
		return zoneIndex(z)
	}
	return 0, nil
}
