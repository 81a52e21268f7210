//go:build linux && !shaker_fallback

package shaker

import (
	"net/netip"
	"sync/atomic"
	"time"
)

// Schedule is a periodic probe registered with Every. Stop it when it is
// no longer wanted.
type Schedule struct {
	l        *loop
	addr     netip.AddrPort
	scope    uint32
	err      error // a zone lookup failure, each probe's result
	timeout  int64
	interval int64 // Period.Interval
	fn       func(Result) time.Duration

	// Owned by the loop goroutine.
	cur      int64 // the interval that set due (for lateness)
	due      int64 // engine time of the next probe
	idx      int32 // place in the loop's timer heap; -1 when not there
	inFlight bool
	removed  bool    // gone from the loop for good
	rawPort  uint16  // raw mode: the source port of the last probe
	src4     [4]byte // raw mode: the IPv4 source address, looked up at srcAt
	srcAt    int64

	stopped atomic.Bool
}

// Stop ends the schedule: no probe of it starts afterwards, and its
// callback is not called again (a call already running may finish). A
// probe in flight still ends with its SYN-ACK, timeout or Close. Stop is
// cheap, idempotent and safe from any goroutine, the callback included.
func (s *Schedule) Stop() {
	if s == nil || s.stopped.Swap(true) || s.l == nil {
		return
	}
	l := s.l
	l.mu.Lock()
	if !l.closed {
		l.scheduled.Add(-1)
		l.stops = append(l.stops, s)
		l.wakeLocked()
	}
	l.mu.Unlock()
}

// Now starts the schedule's next probe at once, in the loop's next turn,
// and the schedule goes on from there. While a probe of it is in flight it
// does nothing: that probe's result comes soon anyway. Now is cheap, safe
// from any goroutine, and does nothing on a stopped schedule.
func (s *Schedule) Now() {
	if s == nil || s.stopped.Load() || s.l == nil {
		return
	}
	l := s.l
	l.mu.Lock()
	if !l.closed {
		l.nows = append(l.nows, s)
		l.wakeLocked()
	}
	l.mu.Unlock()
}

// every hands a new schedule to its loop.
func (e *Engine) every(s *Schedule, first time.Duration) {
	l := e.loopOf(s.addr)
	s.l = l
	s.due = e.now() + min(int64(max(first, 0)), farFuture/2)
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		s.stopped.Store(true)
		return
	}
	l.scheduled.Add(1)
	l.adds = append(l.adds, s)
	l.wakeLocked()
	l.mu.Unlock()
}
