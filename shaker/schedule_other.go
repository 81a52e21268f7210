//go:build !linux || shaker_fallback

package shaker

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Schedule is a periodic probe registered with Every. Stop it when it is
// no longer wanted.
type Schedule struct {
	e        *Engine
	addr     netip.AddrPort
	scope    uint32
	err      error
	timeout  int64
	interval int64
	cur      int64
	idx      int32
	fn       func(Result) time.Duration

	mu      sync.Mutex
	timer   *time.Timer
	due     time.Time
	stopped atomic.Bool
}

// Stop ends the schedule: no probe of it starts afterwards, and its
// callback is not called again (a call already running may finish).
// Stop is cheap, idempotent and safe from any goroutine.
func (s *Schedule) Stop() {
	if s == nil || s.stopped.Swap(true) {
		return
	}
	s.mu.Lock()
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
	if s.e != nil {
		s.e.scheduled.Add(-1)
	}
}

// Now starts the schedule's next probe at once, and the schedule goes on
// from there. While a probe of it is in flight it does nothing. Now is
// cheap, safe from any goroutine, and does nothing on a stopped schedule.
func (s *Schedule) Now() {
	if s == nil || s.stopped.Load() || s.e == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Stop reports false when the timer has fired: a probe is in flight.
	if s.timer != nil && !s.stopped.Load() && s.timer.Stop() {
		s.due = time.Now()
		s.timer.Reset(0)
	}
}

// every arms a schedule's first probe; each result arms the next.
func (e *Engine) every(s *Schedule, first time.Duration) {
	s.e = e
	e.mu.Lock()
	closed := e.closed
	e.mu.Unlock()
	if closed {
		s.stopped.Store(true)
		return
	}
	e.scheduled.Add(1)
	s.mu.Lock()
	s.due = time.Now().Add(max(first, 0))
	s.timer = time.AfterFunc(max(first, 0), s.fire)
	s.mu.Unlock()
}

func (s *Schedule) fire() {
	if s.stopped.Load() {
		return
	}
	s.e.submit(request{addr: s.addr, timeout: time.Duration(s.timeout), err: s.err, done: s.done})
}

func (s *Schedule) done(res Result) {
	if res.Outcome == Closed || s.stopped.Load() {
		return
	}
	next := s.fn(res)
	if next <= 0 {
		next = time.Duration(s.interval)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped.Load() {
		return
	}
	s.due = s.due.Add(next)
	s.timer.Reset(max(time.Until(s.due), 0))
}
