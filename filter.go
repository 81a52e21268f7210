package caddyshaker

import (
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
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

// CountAndNote is Count, with a change of failing open logged by f
// (FailOpen.Note): what every integration does before it chooses.
func (pc *ProbeConfig) CountAndNote(n int, at func(int) Member, f *FailOpen, logger *zap.Logger) Tally {
	t := pc.Count(n, at)
	f.Note(logger, t, pc.PanicThreshold)
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

// KeepRamping is Choose for a list built once and drawn from per choice,
// as a load-balancing policy's list in service is: it calls keep(i, ramps)
// for each member that gets traffic, those ramping up under slow start
// included (ramps true: DrawOut draws them in or out of each choice), and
// returns when the first ramp ends (health.Now's clock; 0: none), when
// the list is to be built again.
func (pc *ProbeConfig) KeepRamping(n int, at func(int) Member, t Tally, keep func(i int, ramps bool)) int64 {
	now := health.Now()
	var first int64
	pc.Choose(n, at, t, nil, func(i int) {
		end := pc.RampEnd(at(i), t, now)
		keep(i, end != 0)
		if end != 0 && (first == 0 || end < first) {
			first = end
		}
	})
	return first
}

// Ramp is a member of a policy's list in service that ramps up under slow
// start (KeepRamping): U is the member, an upstream.
type Ramp[U any] struct {
	U        U
	Returned int64 // when it came back into service (Member.Returned)
}

// DrawOut is what one choice leaves out of a list of n members in service
// of which ramping ramp up over slow: each is in it with a probability
// that grows from 0 to 1 over slow. It is nil when none is left out, and
// when the draws leave out every one of the n (better every upstream in
// service than none). With no ramping member it does no work.
func DrawOut[U any](slow time.Duration, ramping []Ramp[U], n int) []U {
	if len(ramping) == 0 {
		return nil
	}
	now := health.Now()
	var out []U
	for _, r := range ramping {
		if !slowStartDraw(r.Returned, now, slow) {
			out = append(out, r.U)
		}
	}
	if len(out) == n {
		return nil
	}
	return out
}

// Without is a new list of the members of pool, in order, but those in
// out (DrawOut's).
func Without[S ~[]U, U comparable](pool S, out []U) S {
	kept := make(S, 0, len(pool)-len(out))
	for _, u := range pool {
		if !slices.Contains(out, u) {
			kept = append(kept, u)
		}
	}
	return kept
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
