package caddyshaker

import (
	"math/rand/v2"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Member is what the in-service rule needs to know of one upstream.
type Member struct {
	// In: new requests may go to it (up, and neither drained nor in
	// maintenance). An upstream that cannot be probed, or is not probed
	// yet, is in.
	In bool
	// Ready: neither drained nor in maintenance; what failing open
	// (panic_threshold) falls back to.
	Ready bool
	// Returned is when it came back into service, on the clock of
	// health.Now, for slow start; 0 when it has served since its first
	// result.
	Returned int64
}

// Tally is the first half of the in-service rule: how many members are in
// service and ready, whether the pool fails open (fewer than
// panic_threshold x ready are in service), and whether one ramps up under
// slow start.
type Tally struct {
	In, Ready int
	Panic     bool // failing open: every ready member serves
	Ramp      bool // a member in service is ramping up (slow_start)
}

// Serving is how many members Choose keeps at most.
func (t Tally) Serving() int {
	if t.Panic {
		return t.Ready
	}
	return t.In
}

// Count is the first half of the in-service rule, one pass over n
// members. It is pure: at(i) is member i.
func (pc *ProbeConfig) Count(n int, at func(int) Member) Tally {
	var t Tally
	for i := range n {
		m := at(i)
		if m.Ready {
			t.Ready++
		}
		if m.In {
			t.In++
			t.Ramp = t.Ramp || pc.SlowStart > 0 && m.Returned != 0
		}
	}
	t.Panic = pc.PanicThreshold > 0 && float64(t.In) < pc.PanicThreshold*float64(t.Ready)
	return t
}

// Choose is the second half of the in-service rule: it calls keep(i), in
// order, for each member that gets traffic. Failing open, those are the
// ready ones. Otherwise they are those in service, a ramping one only
// when draw(returned) includes it: draw is called for ramping members
// only, once per call, and when the draws leave out every member in
// service, all of them are kept rather than none (better than no
// upstream). It returns how many it kept.
func (pc *ProbeConfig) Choose(n int, at func(int) Member, t Tally, draw func(returned int64) bool, keep func(int)) int {
	kept := 0
	for pass := 0; pass < 2 && kept == 0; pass++ {
		for i := range n {
			m := at(i)
			ok := m.In
			switch {
			case t.Panic:
				ok = m.Ready
			case ok && t.Ramp && pass == 0 && m.Returned != 0 && draw != nil:
				ok = draw(m.Returned)
			}
			if ok {
				keep(i)
				kept++
			}
		}
		if t.Panic || !t.Ramp || t.In == 0 {
			break
		}
	}
	return kept
}

// SlowStartDraw returns the draw for Choose at now (health.Now): an upstream
// that came back into service at returned is kept with a probability that
// grows linearly from 0 to 1 over slow_start.
func (pc *ProbeConfig) SlowStartDraw(now int64) func(returned int64) bool {
	slow := time.Duration(pc.SlowStart)
	return func(returned int64) bool { return slowStartDraw(returned, now, slow) }
}

// slowStartDraw decides whether an address that came back into service at
// returned (unix ns; 0: never) is in one choice at now: with a
// probability that grows linearly from 0 to 1 over slow.
func slowStartDraw(returned, now int64, slow time.Duration) bool {
	el := now - returned
	if returned == 0 || el >= int64(slow) {
		return true
	}
	return el > 0 && rand.Int64N(int64(slow)) < el
}

// RampEnd is when member m's slow-start ramp ends (health.Now's clock), if
// m ramps up at now in a list of Tally t; 0 if it does not.
func (pc *ProbeConfig) RampEnd(m Member, t Tally, now int64) int64 {
	slow := int64(pc.SlowStart)
	if t.Panic || slow <= 0 || !m.In || m.Returned == 0 || now-m.Returned >= slow {
		return 0
	}
	return m.Returned + slow
}

// FailOpen remembers whether a list fails open (Tally.Panic), and logs each
// change: one line when it starts, one when it stops.
type FailOpen struct{ on atomic.Bool }

// Note logs if t's Panic differs from the last one noted.
func (f *FailOpen) Note(logger *zap.Logger, t Tally, threshold float64) {
	if t.Panic == f.on.Load() || !f.on.CompareAndSwap(!t.Panic, t.Panic) {
		return
	}
	fields := []zap.Field{zap.Int("up", t.In), zap.Int("addresses", t.Ready), zap.Float64("panic_threshold", threshold)}
	if t.Panic {
		logger.Error("too few upstreams up: failing open, sending requests to every address", fields...)
	} else {
		logger.Info("enough upstreams up again: sending requests only to those up", fields...)
	}
}
