//go:build linux && !shaker_fallback

package shaker

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestTimerHeap: random pushes, removals (Stop), moves to now (Now) and
// pops keep the timer heap a heap, each entry's due its schedule's, and
// each schedule's idx its place; the pops come out in due order.
func TestTimerHeap(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	l := &loop{}
	var in []*Schedule // in the heap
	check := func(step int) {
		t.Helper()
		if len(l.timers) != len(in) {
			t.Fatalf("step %d: %d entries, want %d", step, len(l.timers), len(in))
		}
		for i, e := range l.timers {
			if e.s.idx != int32(i) || e.due != e.s.due {
				t.Fatalf("step %d: entry %d: idx %d, due %d, its schedule's %d", step, i, e.s.idx, e.due, e.s.due)
			}
			if i > 0 && l.timers[(i-1)/2].due > e.due {
				t.Fatalf("step %d: entry %d (due %d) under one due %d", step, i, e.due, l.timers[(i-1)/2].due)
			}
		}
	}
	for step := 0; step < 20000; step++ {
		switch op := r.IntN(10); {
		case op < 5 || len(in) == 0: // push
			s := &Schedule{due: r.Int64N(1000)}
			l.timerPush(s)
			in = append(in, s)
		case op < 7: // remove one anywhere
			s := in[r.IntN(len(in))]
			l.timerRemove(int(s.idx))
			if s.idx != -1 {
				t.Fatalf("step %d: a removed schedule's idx is %d", step, s.idx)
			}
			in = slices.DeleteFunc(in, func(x *Schedule) bool { return x == s })
		case op < 8: // due now: earlier, moved up
			s := in[r.IntN(len(in))]
			s.due = max(s.due-r.Int64N(500), 0)
			l.timers[s.idx].due = s.due
			l.timerUp(int(s.idx))
		default: // pop the head
			head := l.timers[0]
			for _, x := range in {
				if x.due < head.due {
					t.Fatalf("step %d: head due %d, but %d is in the heap", step, head.due, x.due)
				}
			}
			l.timerRemove(0)
			in = slices.DeleteFunc(in, func(x *Schedule) bool { return x == head.s })
		}
		check(step)
	}
}
