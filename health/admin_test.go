//go:build linux

package health

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestAdminStates: drain keeps probing and tracking health but takes the
// address out of service; maint stops the probes and makes the health
// unknown; ready after maint probes at once and serves only once that
// probe answers. The state belongs to the address: a checker made for it
// later (a reload with other settings) takes it too, and it is forgotten
// when the address is no longer probed.
func TestAdminStates(t *testing.T) {
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	e, r := engineRegistry(t)
	set := Settings{Interval: 5 * time.Millisecond, Timeout: time.Second, Passes: 1, Fails: 1}
	w := Want{Addr: l.Addr, Name: "b", Settings: set}
	cs, fresh := r.Acquire([]Want{w})
	defer func() { r.Release([]Want{w}) }()
	r.Start(fresh)
	c := cs[0]
	waitProbes := func(n uint64) {
		t.Helper()
		start := c.Probes()
		deadline := time.Now().Add(10 * time.Second)
		for c.Probes() < start+n {
			if time.Now().After(deadline) {
				t.Fatalf("%d probes in 10s, want %d", c.Probes()-start, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitProbes(1)
	if !c.InService() || c.Status().Health != "up" || c.Status().AdminState != "ready" {
		t.Fatalf("at start: %+v", c.Status())
	}

	if prev, err := r.SetAdminState(l.Addr, Drain); err != nil || prev != Ready {
		t.Fatalf("drain: %v, %v", prev, err)
	}
	waitProbes(3) // probes go on
	if c.InService() || !c.Healthy() || c.Status().Health != "up" || c.Status().AdminState != "drain" {
		t.Fatalf("drained: in service %v, %+v", c.InService(), c.Status())
	}

	// a new checker of the address (other settings) is drained too
	set2 := set
	set2.Timeout = 2 * time.Second
	w2 := Want{Addr: l.Addr, Name: "b", Settings: set2}
	cs2, _ := r.Acquire([]Want{w2})
	if cs2[0].AdminState() != Drain {
		t.Fatalf("a checker made after drain: %v", cs2[0].AdminState())
	}
	r.Release([]Want{w2})

	if prev, _ := r.SetAdminState(l.Addr, Maint); prev != Drain {
		t.Fatalf("maint: previous %v", prev)
	}
	st := c.Status()
	if c.Healthy() || c.InService() || st.Health != "unknown" || st.AdminState != "maint" || st.Since == nil {
		t.Fatalf("maint: %+v", st)
	}
	// no probes: a probe of another address on the engine has its result
	// after any probe of c that could still start
	n := c.Probes()
	for range 3 {
		if res := e.Probe(t.Context(), l.Addr); res.Err != nil {
			t.Fatal(res.Err)
		}
	}
	if got := c.Probes(); got > n+1 { // one in flight at the change may end
		t.Fatalf("maint: %d probes after it", got-n)
	}
	if c.ProbeNow() {
		t.Fatal("ProbeNow in maintenance")
	}

	if prev, _ := r.SetAdminState(l.Addr, Ready); prev != Maint {
		t.Fatalf("ready: previous %v", prev)
	}
	waitProbes(1)
	st = c.Status()
	if !c.InService() || st.Health != "up" || st.AdminState != "ready" || c.ReturnedAt() == 0 {
		t.Fatalf("ready after maint: in service %v returned %d %+v", c.InService(), c.ReturnedAt(), st)
	}
	if st.Transitions != 0 {
		t.Errorf("up before maint and after: %d transitions, want 0", st.Transitions)
	}
	if n := l.ProbeAccepts(t); n != 0 {
		t.Fatalf("listener accepted %d probe connections", n)
	}

	if _, err := r.SetAdminState(netip.MustParseAddrPort("127.0.0.1:1"), Drain); !errors.Is(err, ErrNotProbed) {
		t.Fatalf("an address not probed: %v", err)
	}
	if _, err := r.SetAdminState(l.Addr, AdminState(7)); err == nil {
		t.Fatal("AdminState(7) accepted")
	}
	// forgotten once the address is no longer probed
	r.SetAdminState(l.Addr, Drain)
	r.Release([]Want{w})
	cs, _ = r.Acquire([]Want{w})
	if cs[0].AdminState() != Ready {
		t.Fatalf("after the address was dropped and added again: %v", cs[0].AdminState())
	}
}

// engineRegistry returns a registry probing with an engine of its own,
// both closed at the end of the test.
func engineRegistry(t *testing.T) (*shaker.Engine, *Registry) {
	t.Helper()
	e, err := shaker.New(shaker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := NewRegistry()
	r.SetEngine(e)
	t.Cleanup(func() {
		r.SetEngine(nil)
		e.Close()
	})
	return e, r
}

// TestSinceAndTransitions: since is set by the first result and each
// change; transitions count changes, not the first result.
func TestSinceAndTransitions(t *testing.T) {
	c := testChecker(t, 1, 1)
	if st := c.Status(); st.Since != nil || st.Transitions != 0 || st.Health != "unknown" {
		t.Fatalf("before any result: %+v", st)
	}
	c.Observe(up)
	first := *c.Status().Since
	c.Observe(up)
	if st := c.Status(); !st.Since.Equal(first) || st.Transitions != 0 || st.Health != "up" {
		t.Fatalf("up twice: %+v", st)
	}
	if c.ReturnedAt() != 0 {
		t.Fatal("first result counted as a return into service")
	}
	c.Observe(refused)
	c.Observe(refused)
	st := c.Status()
	if st.Transitions != 1 || st.Health != "down" || st.Since.Before(first) {
		t.Fatalf("down: %+v", st)
	}
	c.Observe(up)
	if st := c.Status(); st.Transitions != 2 || st.Health != "up" || c.ReturnedAt() == 0 {
		t.Fatalf("up again: returned %d, %+v", c.ReturnedAt(), st)
	}
}

// TestProbeNowLimited: however many requests fail, a probe is asked for
// once per fast_interval at most; none without a schedule.
func TestProbeNowLimited(t *testing.T) {
	c := testChecker(t, 1, 1)
	if c.ProbeNow() {
		t.Fatal("ProbeNow without a schedule")
	}
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	_, r := engineRegistry(t)
	w := Want{Addr: l.Addr, Name: "b", Settings: Settings{Interval: time.Hour, FastInterval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1}}
	cs, fresh := r.Acquire([]Want{w})
	defer r.Release([]Want{w})
	r.Start(fresh) // the first probe at once
	deadline := time.Now().Add(10 * time.Second)
	for cs[0].Probes() < 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if !cs[0].ProbeNow() {
		t.Fatal("first ProbeNow refused")
	}
	for cs[0].Probes() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if cs[0].Probes() != 2 {
		t.Fatalf("%d probes after ProbeNow, want 2", cs[0].Probes())
	}
	for range 100 {
		if cs[0].ProbeNow() {
			t.Fatal("ProbeNow within fast_interval of the last one")
		}
	}
}

func TestParseAdminState(t *testing.T) {
	for _, a := range []AdminState{Ready, Drain, Maint} {
		if got, err := ParseAdminState(a.String()); err != nil || got != a {
			t.Errorf("%v: %v, %v", a, got, err)
		}
	}
	if _, err := ParseAdminState("disable"); err == nil || err.Error() != `admin state "disable": must be ready, drain or maint` {
		t.Errorf("disable: %v", err)
	}
}

// TestMaintIgnoresLateResult: a result that arrives as maintenance starts
// (the loop was already running the callback) changes nothing.
func TestMaintIgnoresLateResult(t *testing.T) {
	c := testChecker(t, 1, 1)
	c.Observe(up)
	if _, err := c.r.SetAdminState(c.addr, Maint); err != nil {
		t.Fatal(err)
	}
	c.Observe(refused)
	if st := c.Status(); st.Transitions != 0 || st.Health != "unknown" || st.Probes != 1 {
		t.Fatalf("a result after maint: %+v", st)
	}
}
