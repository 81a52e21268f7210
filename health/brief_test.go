package health

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestBrief: a checker's Brief and LastRTT say what its Status says,
// through its first result, a failure while up, down, maintenance and
// back, without allocating.
func TestBrief(t *testing.T) {
	c := testChecker(t, 1, 2)
	check := func(when string) {
		t.Helper()
		b, s := c.Brief(), c.Status()
		h, _ := ParseHealth(s.Health)
		a, _ := ParseAdminState(s.AdminState)
		if b.Checker != c || b.Name != s.Upstream || b.Addr.String() != s.Address || b.Health != h || b.AdminState != a ||
			b.Healthy != s.Healthy || b.Known != (s.CheckedAt != nil) || b.LastOK != (s.LastError == "") ||
			b.LastRTT.Microseconds() != s.LastRTTMicros || b.Probes != s.Probes || b.Transitions != s.Transitions ||
			(b.Since != 0) != (s.Since != nil) || s.Since != nil && b.Since != s.Since.UnixNano() ||
			s.CheckedAt != nil && b.CheckedAt != s.CheckedAt.UnixNano() || c.LastError() != s.LastError {
			t.Errorf("%s: brief %+v, status %+v", when, b, s)
		}
		rtt, ok := c.LastRTT()
		if want := s.Healthy && s.CheckedAt != nil && s.LastError == ""; ok != want || ok && rtt.Microseconds() != s.LastRTTMicros {
			t.Errorf("%s: LastRTT %v, %v; status %+v", when, rtt, ok, s)
		}
	}
	check("not probed")
	c.Observe(up)
	check("up")
	c.Observe(refused)
	check("up, failing")
	c.Observe(refused)
	check("down")
	if _, err := c.r.SetAdminState(c.Addr(), Maint); err != nil {
		t.Fatal(err)
	}
	check("maint")
	if _, err := c.r.SetAdminState(c.Addr(), Ready); err != nil {
		t.Fatal(err)
	}
	check("back from maint")
	c.Observe(up)
	check("up again")
	if n := testing.AllocsPerRun(100, func() { c.Brief(); c.LastRTT() }); n != 0 {
		t.Errorf("Brief and LastRTT: %v allocations", n)
	}
}

// TestTop: the rows a Top keeps are the first keep of the sorted rows.
func TestTop(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 5, 100, 1000} {
		xs := make([]int, n)
		for i := range xs {
			xs[i] = rng.IntN(50)
		}
		sorted := slices.Sorted(slices.Values(xs))
		for _, keep := range []int{0, 1, 3, 100, 2000} {
			top := NewTop(keep, n, cmp.Compare[int])
			for _, x := range xs {
				top.Add(x)
			}
			if got, want := top.Sorted(), sorted[:min(keep, n)]; !slices.Equal(got, want) {
				t.Errorf("n %d keep %d: %v, want %v", n, keep, got, want)
			}
		}
	}
}
