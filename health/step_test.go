package health

import (
	"testing"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestStep drives the pure pass/fail step from a table: the standing
// before a result, the result's outcome, and the standing and transition
// after it. Settings: 2 passes bring a down address up, 3 fails take an
// up one down (the table's last rows use 1 and 1).
func TestStep(t *testing.T) {
	s23 := Settings{Passes: 2, Fails: 3}
	s11 := Settings{Passes: 1, Fails: 1}
	// fresh is a new checker: not known, and up until its first result.
	fresh := standing{healthy: true}
	tests := []struct {
		name string
		s    Settings
		was  standing
		o    shaker.Outcome
		now  standing
		tr   *Transition // nil: none; else only Up, First, Rejoin and N are the step's
	}{
		{"first answer", s23, fresh, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, &Transition{Up: true, First: true, N: 1}},
		{"first failure", s23, fresh, shaker.Refused,
			standing{fails: 1, known: true}, &Transition{First: true, N: 1}},
		{"first timeout", s23, fresh, shaker.Timeout,
			standing{fails: 1, known: true}, &Transition{First: true, N: 1}},
		{"up answers", s23, standing{passes: 7, known: true, healthy: true}, shaker.Up,
			standing{passes: 8, known: true, healthy: true}, nil},
		{"up, a failure resets passes", s23, standing{passes: 7, known: true, healthy: true}, shaker.Refused,
			standing{fails: 1, known: true, healthy: true}, nil},
		{"up, fails-1 failures", s23, standing{fails: 1, known: true, healthy: true}, shaker.Unreachable,
			standing{fails: 2, known: true, healthy: true}, nil},
		{"up, the Fails-th failure takes it down", s23, standing{fails: 2, known: true, healthy: true}, shaker.Timeout,
			standing{fails: 3, known: true}, &Transition{N: 3}},
		{"up, an answer resets fails", s23, standing{fails: 2, known: true, healthy: true}, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, nil},
		{"down fails on", s23, standing{fails: 3, known: true}, shaker.Refused,
			standing{fails: 4, known: true}, nil},
		{"down, one answer", s23, standing{fails: 4, known: true}, shaker.Up,
			standing{passes: 1, known: true}, nil},
		{"down, the Passes-th answer brings it up", s23, standing{passes: 1, known: true}, shaker.Up,
			standing{passes: 2, known: true, healthy: true}, &Transition{Up: true, N: 2}},
		{"down, a failure resets passes", s23, standing{passes: 1, known: true}, shaker.Refused,
			standing{fails: 1, known: true}, nil},
		{"rejoin answered, down before", s23, standing{known: true, rejoin: true}, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, &Transition{Up: true, Rejoin: true, N: 1}},
		{"rejoin answered, up before", s23, standing{known: true, healthy: true, rejoin: true}, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, &Transition{Up: true, Rejoin: true, N: 1}},
		{"rejoin failed, up before: down at once", s23, standing{known: true, healthy: true, rejoin: true}, shaker.Refused,
			standing{fails: 1, known: true}, &Transition{Rejoin: true, N: 1}},
		{"rejoin before any result is a rejoin, not a first", s23, standing{healthy: true, rejoin: true}, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, &Transition{Up: true, Rejoin: true, N: 1}},
		{"passes 1: one answer brings it up", s11, standing{fails: 9, known: true}, shaker.Up,
			standing{passes: 1, known: true, healthy: true}, &Transition{Up: true, N: 1}},
		{"fails 1: one failure takes it down", s11, standing{passes: 9, known: true, healthy: true}, shaker.Timeout,
			standing{fails: 1, known: true}, &Transition{N: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			now, tr, ok := step(tt.was, tt.s, tt.o)
			if now != tt.now {
				t.Errorf("standing %+v, want %+v", now, tt.now)
			}
			switch {
			case tt.tr == nil && (ok || tr != Transition{}):
				t.Errorf("transition %v %+v, want none", ok, tr)
			case tt.tr != nil && (!ok || tr != *tt.tr):
				// the rest of the transition is the caller's: zero here
				t.Errorf("transition %v %+v, want %+v", ok, tr, *tt.tr)
			}
			// the same input, the same output
			if now2, tr2, ok2 := step(tt.was, tt.s, tt.o); now2 != now || tr2 != tr || ok2 != ok {
				t.Errorf("a second step of the same input gave %+v %+v %v", now2, tr2, ok2)
			}
		})
	}
}
