package health

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// testChecker returns a checker driven by hand: it is never given to
// Start, so no engine probes it.
func testChecker(t *testing.T, passes, fails int) *Checker {
	t.Helper()
	r := NewRegistry()
	w := Want{Addr: netip.MustParseAddrPort("127.0.0.1:1"), Name: "x:1", Settings: Settings{
		Interval: time.Hour, Timeout: time.Second, Passes: passes, Fails: fails,
	}}
	cs, _ := r.Acquire([]Want{w})
	t.Cleanup(func() { r.Release([]Want{w}) })
	return cs[0]
}

var (
	up      = shaker.Result{RTT: 42 * time.Microsecond, Outcome: shaker.Up}
	refused = shaker.Result{Err: shaker.ErrRefused, Outcome: shaker.Refused}
)

func TestCheckerTransitions(t *testing.T) {
	c := testChecker(t, 2, 3)
	if !c.Healthy() {
		t.Fatal("not probed yet: want up")
	}
	steps := []struct {
		res  shaker.Result
		want bool
	}{
		{refused, false}, // first result decides
		{up, false},
		{up, true}, // passes 2
		{refused, true},
		{refused, true},
		{up, true}, // resets the fails
		{refused, true},
		{refused, true},
		{refused, false}, // fails 3
		{up, false},
		{refused, false},
		{up, false},
		{up, true},
	}
	for i, s := range steps {
		c.Observe(s.res)
		if got := c.Healthy(); got != s.want {
			t.Fatalf("step %d (%v): healthy=%v, want %v", i, s.res.Err, got, s.want)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.passes != 2 || c.fails != 0 || c.probes != uint64(len(steps)) || c.lastRTT != up.RTT {
		t.Errorf("counters: passes %d fails %d probes %d rtt %v", c.passes, c.fails, c.probes, c.lastRTT)
	}
}

func TestCheckerFirstUp(t *testing.T) {
	c := testChecker(t, 2, 1)
	c.Observe(up)
	if !c.Healthy() {
		t.Fatal("first answer: want up")
	}
	c.Observe(refused)
	if c.Healthy() {
		t.Fatal("fails 1: want down after one failure")
	}
}

func TestCheckerIgnoresClosedAndStopped(t *testing.T) {
	c := testChecker(t, 1, 1)
	c.Observe(shaker.Result{Err: shaker.ErrClosed, Outcome: shaker.Closed})
	if !c.Healthy() || c.known {
		t.Fatal("ErrClosed changed the state")
	}
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.Observe(refused)
	if !c.Healthy() {
		t.Fatal("a stopped checker took a result")
	}
}

func TestCheckerIgnoresLocalErrors(t *testing.T) {
	c := testChecker(t, 1, 1)
	c.Observe(up)
	local := shaker.Result{Err: fmt.Errorf("socket: %w", errors.Join(syscall.EMFILE, shaker.ErrLocal)), Outcome: shaker.Local}
	for range 5 {
		c.Observe(local)
	}
	if !c.Healthy() || c.fails != 0 || c.probes != 1 {
		t.Fatalf("local errors counted against the backend: healthy=%v fails=%d", c.Healthy(), c.fails)
	}
	c.Observe(refused)
	if c.Healthy() {
		t.Fatal("fails 1: want down")
	}
}

func TestReason(t *testing.T) {
	for _, tc := range []struct {
		o    shaker.Outcome
		err  error
		want string
	}{
		{shaker.Up, nil, ""},
		{shaker.Refused, shaker.ErrRefused, "refused"},
		{shaker.Timeout, shaker.ErrTimeout, "timeout after 250ms"},
		{shaker.Unreachable, fmt.Errorf("wrapped: %w", shaker.ErrUnreachable), "unreachable"},
		{shaker.Failed, errors.New("socket: too many open files"), "socket: too many open files"},
		{shaker.Local, syscall.EMFILE, syscall.EMFILE.Error()},
	} {
		if got := Reason(tc.o, tc.err, 250*time.Millisecond); got != tc.want {
			t.Errorf("Reason(%v, %v) = %q, want %q", tc.o, tc.err, got, tc.want)
		}
	}
}

// TestRegistrySharesAndInherits checks that one key is one checker, that
// new settings for a known address inherit its state, and that release
// forgets a checker only with its last reference.
func TestRegistrySharesAndInherits(t *testing.T) {
	r := NewRegistry()
	set := Settings{Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1}
	addr := netip.MustParseAddrPort("127.0.0.1:2")
	a := []Want{{addr, set, "x:2"}}
	c1, fresh := r.Acquire(a)
	if len(fresh) != 1 {
		t.Fatalf("fresh %d", len(fresh))
	}
	c2, fresh := r.Acquire([]Want{{addr, set, "y:2"}})
	if len(fresh) != 0 || c1[0] != c2[0] {
		t.Fatal("same key: want the same checker")
	}
	c := c1[0]
	c.Observe(refused)
	if c.Healthy() {
		t.Fatal("want down")
	}
	set2 := set
	set2.Interval = 2 * time.Hour
	c3, fresh := r.Acquire([]Want{{addr, set2, "x:2"}})
	if len(fresh) != 1 || c3[0].Healthy() || c3[0].Probes() != 1 {
		t.Fatalf("new settings: want a new checker that inherits down; healthy=%v", c3[0].Healthy())
	}
	if got := len(r.Statuses()); got != 2 {
		t.Errorf("statuses: %d", got)
	}
	r.Release(a)
	if r.Len() != 2 {
		t.Fatal("released with a reference left")
	}
	if st := c.Status(); st.Upstream != "y:2" {
		t.Errorf("after x:2 left, reported as %q, want y:2", st.Upstream)
	}
	r.Release([]Want{{addr, set, "y:2"}, {addr, set2, "x:2"}})
	if r.Len() != 0 || len(r.checkers) != 0 {
		t.Fatalf("left: %d checkers, %d addresses", r.Len(), len(r.checkers))
	}
	if !c.stopped {
		t.Fatal("last release did not stop the checker")
	}
}

// TestCheckerIntervals: fast_interval while an address changes state,
// down_interval while it is down, interval otherwise.
func TestCheckerIntervals(t *testing.T) {
	const interval, fast, down = time.Hour, time.Minute, 10 * time.Minute
	c := testChecker(t, 2, 3)
	c.set.FastInterval, c.set.DownInterval = fast, down
	next := func() time.Duration {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.nextIntervalLocked()
	}
	if got := next(); got != interval {
		t.Fatalf("not probed yet: %v, want the interval", got)
	}
	for i, s := range []struct {
		res  shaker.Result
		want time.Duration
	}{
		{up, interval},  // up, steady
		{refused, fast}, // up, 1 fail: changing
		{refused, fast}, // up, 2 fails
		{refused, down}, // down (fails 3)
		{refused, down}, // down, steady
		{up, fast},      // down, 1 pass: changing
		{refused, down}, // down again, steady
		{up, fast},      // down, 1 pass
		{up, interval},  // up (passes 2)
		{refused, fast}, // up, 1 fail
		{up, interval},  // up, steady again
	} {
		c.Observe(s.res)
		if got := next(); got != s.want {
			t.Fatalf("step %d (%v): next probe after %v, want %v", i, s.res.Err, got, s.want)
		}
	}
	// Unset, both are the interval.
	c2 := testChecker(t, 2, 3)
	for _, r := range []shaker.Result{up, refused, refused, refused, up} {
		c2.Observe(r)
		c2.mu.Lock()
		got := c2.nextIntervalLocked()
		c2.mu.Unlock()
		if got != interval {
			t.Fatalf("without fast/down intervals: %v, want %v", got, interval)
		}
	}
}
