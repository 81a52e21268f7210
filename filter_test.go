package caddyshaker

import (
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/health"
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

// TestDrawOutAndKeepRamping: a policy's list keeps its ramping members
// (KeepRamping, with the end of the first ramp), and each choice draws
// them in or out (DrawOut); when the draws would leave out every member,
// none is left out. Members that returned far in the past are always in,
// those that return in the future never.
func TestDrawOutAndKeepRamping(t *testing.T) {
	const slow = time.Hour
	now := health.Now()
	pc := ProbeConfig{SlowStart: caddy.Duration(slow)}
	ms := []Member{
		{In: true, Ready: true},
		{In: true, Ready: true, Returned: now + int64(slow)}, // never drawn in
		{Ready: true},
		{In: true, Ready: true, Returned: now - int64(slow)/2},
	}
	at := func(i int) Member { return ms[i] }
	var kept []int
	var ramping []Ramp[int]
	end := pc.KeepRamping(len(ms), at, pc.Count(len(ms), at), func(i int, ramps bool) {
		kept = append(kept, i)
		if ramps {
			ramping = append(ramping, Ramp[int]{U: i, Returned: ms[i].Returned})
		}
	})
	if !slices.Equal(kept, []int{0, 1, 3}) || len(ramping) != 2 {
		t.Fatalf("kept %v, ramping %v: want 0, 1, 3 kept, 1 and 3 ramping", kept, ramping)
	}
	if want := ms[3].Returned + int64(slow); end != want {
		t.Errorf("first ramp ends at %d, want %d (member 3's)", end, want)
	}
	for range 100 {
		out := DrawOut(slow, ramping[:1], 3)
		if !slices.Equal(out, []int{1}) {
			t.Fatalf("drew out %v, want [1]", out)
		}
		if got := Without([]int{0, 1, 3}, out); !slices.Equal(got, []int{0, 3}) {
			t.Fatalf("without %v: %v", out, got)
		}
	}
	if out := DrawOut(slow, ramping[:1], 1); out != nil {
		t.Errorf("the only member drawn out: %v, want none left out", out)
	}
	if out := DrawOut[int](slow, nil, 3); out != nil {
		t.Errorf("no ramping member: drew out %v", out)
	}
}
