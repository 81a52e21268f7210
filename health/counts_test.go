package health

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// tally counts the checkers by their Status, the slow way the running
// counts must agree with.
func tally(r *Registry) Counts {
	var out Counts
	for _, c := range r.Checkers() {
		s := c.Status()
		h := Unknown
		switch s.Health {
		case "up":
			h = Up
		case "down":
			h = Down
		}
		a, err := ParseAdminState(s.AdminState)
		if err != nil {
			panic(err)
		}
		out[h][a]++
	}
	return out
}

func checkCounts(t *testing.T, r *Registry, step string, want Counts) {
	t.Helper()
	got := r.Counts()
	if slow := tally(r); got != slow {
		t.Fatalf("%s: running counts %v, but the statuses say %v", step, got, slow)
	}
	if got != want {
		t.Fatalf("%s: counts %v, want %v", step, got, want)
	}
}

// TestCounts: the running counts follow every change of health and admin
// state, a checker that inherits another's state, and release.
func TestCounts(t *testing.T) {
	r := NewRegistry()
	set := Settings{Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 2}
	a := netip.MustParseAddrPort("127.0.0.1:1")
	b := netip.MustParseAddrPort("127.0.0.2:1")
	ws := []Want{{a, set, "a"}, {b, set, "b"}}
	cs, _ := r.Acquire(ws)
	checkCounts(t, r, "acquired", Counts{Unknown: {Ready: 2}})
	cs[0].Observe(up)
	cs[1].Observe(refused)
	checkCounts(t, r, "first results", Counts{Up: {Ready: 1}, Down: {Ready: 1}})
	cs[0].Observe(refused) // fails 2: still up
	checkCounts(t, r, "one failure", Counts{Up: {Ready: 1}, Down: {Ready: 1}})
	cs[0].Observe(refused)
	checkCounts(t, r, "down", Counts{Down: {Ready: 2}})
	cs[1].Observe(up)
	checkCounts(t, r, "b up", Counts{Up: {Ready: 1}, Down: {Ready: 1}})

	// another checker of b, with other settings, inherits its health
	set2 := set
	set2.Timeout = 2 * time.Second
	w2 := Want{b, set2, "b"}
	r.Acquire([]Want{w2})
	checkCounts(t, r, "second checker of b", Counts{Up: {Ready: 2}, Down: {Ready: 1}})

	if _, err := r.SetAdminState(b, Drain); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, r, "b drained", Counts{Up: {Drain: 2}, Down: {Ready: 1}})
	if _, err := r.SetAdminState(b, Maint); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, r, "b in maintenance", Counts{Unknown: {Maint: 2}, Down: {Ready: 1}})
	cs[1].Observe(up) // a result in maintenance says nothing
	checkCounts(t, r, "result in maintenance", Counts{Unknown: {Maint: 2}, Down: {Ready: 1}})
	if _, err := r.SetAdminState(b, Ready); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, r, "b back, waiting for its first result", Counts{Unknown: {Ready: 2}, Down: {Ready: 1}})
	cs[1].Observe(up)
	checkCounts(t, r, "b rejoined", Counts{Unknown: {Ready: 1}, Up: {Ready: 1}, Down: {Ready: 1}})

	r.Release([]Want{w2})
	checkCounts(t, r, "second checker released", Counts{Up: {Ready: 1}, Down: {Ready: 1}})
	r.Acquire(ws[:1]) // a second reference: releasing one keeps it
	r.Release(ws)
	checkCounts(t, r, "b released", Counts{Down: {Ready: 1}})
	cs[0].Observe(up) // a result as it stops
	r.Release(ws[:1])
	checkCounts(t, r, "all released", Counts{})
	cs[0].Observe(up) // a result after it stopped
	checkCounts(t, r, "a result after release", Counts{})
	if n := r.Addresses(); n != 0 {
		t.Fatalf("addresses %d after release", n)
	}
}

// TestCountsConcurrent: results, admin states and releases racing each
// other leave the running counts equal to the statuses.
func TestCountsConcurrent(t *testing.T) {
	r := NewRegistry()
	set := Settings{Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1}
	var ws []Want
	for i := range 50 {
		ws = append(ws, Want{netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(i)}), 1), set, fmt.Sprint(i)})
	}
	cs, _ := r.Acquire(ws)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 2000 {
				c := cs[(i*7+g)%len(cs)]
				switch (i + g) % 5 {
				case 0, 1:
					c.Observe(up)
				case 2, 3:
					c.Observe(refused)
				default:
					_, _ = r.SetAdminState(c.Addr(), AdminState((i/5+g)%3))
				}
			}
		})
	}
	wg.Wait()
	got := r.Counts()
	if slow := tally(r); got != slow || got.Total() != int64(len(ws)) {
		t.Fatalf("running counts %v (total %d), statuses %v", got, got.Total(), slow)
	}
	r.Release(ws)
	if got := r.Counts(); got != (Counts{}) {
		t.Fatalf("after release: %v", got)
	}
}

// BenchmarkCounts reads the running counts at 1,000,000 checkers: what a
// scrape costs at any scale.
func BenchmarkCounts(b *testing.B) {
	r := NewRegistry()
	set := Settings{Interval: 10 * time.Second, Timeout: time.Second, Passes: 2, Fails: 3}
	ws := make([]Want, 1_000_000)
	for i := range ws {
		ws[i] = Want{netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, byte(i >> 16), byte(i >> 8), byte(i)}), 80), set, "x"}
	}
	r.Acquire(ws)
	b.ResetTimer()
	for b.Loop() {
		if c := r.Counts(); c.Total() != int64(len(ws)) {
			b.Fatal(c)
		}
	}
}

// TestCountsNoAlloc: keeping the counts allocates nothing on the engine's
// loop, where Observe runs: results that change no state, and results
// that move the checker between classes without a transition (the fails
// counted while up).
func TestCountsNoAlloc(t *testing.T) {
	c := testChecker(t, 1, 3)
	c.Observe(up)
	i := 0
	allocs := testing.AllocsPerRun(1000, func() {
		if i++; i%3 == 0 {
			c.Observe(up)
		} else {
			c.Observe(refused) // fails 1 and 2 of 3: still up
		}
	})
	if allocs != 0 {
		t.Fatalf("%.2f allocations per result", allocs)
	}
	if got := c.r.Counts(); got != (Counts{Up: {Ready: 1}}) {
		t.Fatalf("counts %v", got)
	}
}

// TestParseHealth: Status.Health's names parse back to the health they
// name, and nothing else parses.
func TestParseHealth(t *testing.T) {
	want := map[string]Health{"unknown": Unknown, "up": Up, "down": Down}
	for name, h := range want {
		got, err := ParseHealth(name)
		if err != nil || got != h || got.String() != name {
			t.Errorf("ParseHealth(%q) = %v, %v; want %v", name, got, err, h)
		}
	}
	for _, bad := range []string{"", "Up", "healthy", "pending"} {
		if _, err := ParseHealth(bad); err == nil {
			t.Errorf("ParseHealth(%q): no error", bad)
		}
	}
}
