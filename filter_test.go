package caddyshaker

import (
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestInServiceRule: the one rule every integration uses, from a table.
func TestInServiceRule(t *testing.T) {
	up := Member{In: true, Ready: true}
	down := Member{Ready: true}
	drained := Member{}
	ramping := Member{In: true, Ready: true, Returned: 42}
	for _, tc := range []struct {
		name      string
		panic     float64
		slow      time.Duration
		ms        []Member
		draw      bool // what the draw answers for a ramping member
		want      []int
		wantPanic bool
	}{
		{name: "none", want: nil},
		{name: "all up", ms: []Member{up, up, up}, want: []int{0, 1, 2}},
		{name: "one down", ms: []Member{up, down, up}, want: []int{0, 2}},
		{name: "all down", ms: []Member{down, down}, want: nil},
		{name: "drained left out", ms: []Member{up, drained, up}, want: []int{0, 2}},
		{name: "above the threshold", panic: 0.5, ms: []Member{up, down, up}, want: []int{0, 2}},
		{name: "below the threshold: every ready one", panic: 0.5, ms: []Member{up, down, down, drained}, want: []int{0, 1, 2}, wantPanic: true},
		{name: "threshold counts ready only", panic: 0.5, ms: []Member{up, down, drained, drained}, want: []int{0}},
		{name: "all down, threshold", panic: 0.1, ms: []Member{down, down}, want: []int{0, 1}, wantPanic: true},
		{name: "ramping drawn in", slow: time.Second, ms: []Member{up, ramping}, draw: true, want: []int{0, 1}},
		{name: "ramping drawn out", slow: time.Second, ms: []Member{up, ramping}, draw: false, want: []int{0}},
		{name: "every one drawn out: all kept", slow: time.Second, ms: []Member{ramping, down, ramping}, draw: false, want: []int{0, 2}},
		{name: "no slow start: returned ignored", ms: []Member{up, ramping}, draw: false, want: []int{0, 1}},
		{name: "failing open: no draw", panic: 0.9, slow: time.Second, ms: []Member{ramping, down}, draw: false, want: []int{0, 1}, wantPanic: true},
	} {
		pc := ProbeConfig{PanicThreshold: tc.panic, SlowStart: caddy.Duration(tc.slow)}
		at := func(i int) Member { return tc.ms[i] }
		tl := pc.Count(len(tc.ms), at)
		draws := 0
		var got []int
		n := pc.Choose(len(tc.ms), at, tl, func(returned int64) bool {
			draws++
			if returned != 42 {
				t.Errorf("%s: draw for returned %d", tc.name, returned)
			}
			return tc.draw
		}, func(i int) { got = append(got, i) })
		if !slices.Equal(got, tc.want) || n != len(got) {
			t.Errorf("%s: kept %v (%d), want %v", tc.name, got, n, tc.want)
		}
		if tl.Panic != tc.wantPanic {
			t.Errorf("%s: panic %v, want %v", tc.name, tl.Panic, tc.wantPanic)
		}
		if len(got) > tl.Serving() {
			t.Errorf("%s: kept %d, more than Serving %d", tc.name, len(got), tl.Serving())
		}
		if tc.slow == 0 && draws != 0 {
			t.Errorf("%s: %d draws without slow start", tc.name, draws)
		}
	}
}
