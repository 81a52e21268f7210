package caddyshaker

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// testChecker returns a checker driven by hand: its timer never fires
// during the test.
func testChecker(t *testing.T, passes, fails int) *checker {
	t.Helper()
	c := newChecker(checkKey{
		addr:     netip.MustParseAddrPort("127.0.0.1:1"),
		interval: time.Hour,
		timeout:  time.Second,
		passes:   passes,
		fails:    fails,
	})
	c.timer = time.AfterFunc(time.Hour, func() {})
	c.probeStart = time.Now()
	t.Cleanup(func() {
		c.mu.Lock()
		c.stopped = true
		c.timer.Stop()
		c.mu.Unlock()
	})
	return c
}

var (
	up      = shaker.Result{RTT: 42 * time.Microsecond}
	refused = shaker.Result{Err: shaker.ErrRefused}
)

func TestCheckerTransitions(t *testing.T) {
	c := testChecker(t, 2, 3)
	if !c.healthy.Load() {
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
		c.done(s.res)
		if got := c.healthy.Load(); got != s.want {
			t.Fatalf("step %d (%v): healthy=%v, want %v", i, s.res.Err, got, s.want)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.passes != 2 || c.fails != 0 || c.probesTotal != uint64(len(steps)) || c.lastRTT != up.RTT {
		t.Errorf("counters: passes %d fails %d probes %d rtt %v", c.passes, c.fails, c.probesTotal, c.lastRTT)
	}
}

func TestCheckerFirstUp(t *testing.T) {
	c := testChecker(t, 2, 1)
	c.done(up)
	if !c.healthy.Load() {
		t.Fatal("first answer: want up")
	}
	c.done(refused)
	if c.healthy.Load() {
		t.Fatal("fails 1: want down after one failure")
	}
}

func TestCheckerIgnoresClosedAndStopped(t *testing.T) {
	c := testChecker(t, 1, 1)
	c.done(shaker.Result{Err: shaker.ErrClosed})
	if !c.healthy.Load() || c.known {
		t.Fatal("ErrClosed changed the state")
	}
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.done(refused)
	if !c.healthy.Load() {
		t.Fatal("a stopped checker took a result")
	}
}

func TestCheckerIgnoresLocalErrors(t *testing.T) {
	c := testChecker(t, 1, 1)
	c.done(up)
	local := shaker.Result{Err: fmt.Errorf("socket: %w", errors.Join(syscall.EMFILE, shaker.ErrLocal))}
	for range 5 {
		c.done(local)
	}
	if !c.healthy.Load() || c.fails != 0 || c.probesTotal != 1 {
		t.Fatalf("local errors counted against the backend: healthy=%v fails=%d", c.healthy.Load(), c.fails)
	}
	c.done(refused)
	if c.healthy.Load() {
		t.Fatal("fails 1: want down")
	}
}

func TestReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, ""},
		{shaker.ErrRefused, "refused"},
		{shaker.ErrTimeout, "timeout after 250ms"},
		{fmt.Errorf("wrapped: %w", shaker.ErrUnreachable), "unreachable"},
		{errors.New("socket: too many open files"), "socket: too many open files"},
		{syscall.EMFILE, syscall.EMFILE.Error()},
	} {
		if got := reason(tc.err, 250*time.Millisecond); got != tc.want {
			t.Errorf("reason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// TestRegistrySharesAndInherits checks that one key is one checker, that
// new settings for a known address inherit its state, and that release
// forgets a checker only with its last reference.
func TestRegistrySharesAndInherits(t *testing.T) {
	r := &registry{checkers: map[checkKey]*checker{}, byAddr: map[netip.AddrPort][]*checker{}}
	k := checkKey{addr: netip.MustParseAddrPort("127.0.0.1:2"), interval: time.Hour, timeout: time.Second, passes: 1, fails: 1}
	a := []want{{k, "x:2"}}
	c1, fresh := r.acquire(a)
	if len(fresh) != 1 {
		t.Fatalf("fresh %d", len(fresh))
	}
	c2, fresh := r.acquire([]want{{k, "y:2"}})
	if len(fresh) != 0 || c1[0] != c2[0] {
		t.Fatal("same key: want the same checker")
	}
	c := c1[0]
	c.timer = time.AfterFunc(time.Hour, func() {})
	defer c.timer.Stop()
	c.done(refused)
	if c.healthy.Load() {
		t.Fatal("want down")
	}
	k2 := k
	k2.interval = 2 * time.Hour
	c3, fresh := r.acquire([]want{{k2, "x:2"}})
	if len(fresh) != 1 || c3[0].healthy.Load() || c3[0].probesTotal != 1 {
		t.Fatalf("new settings: want a new checker that inherits down; healthy=%v", c3[0].healthy.Load())
	}
	if got := len(r.statuses()); got != 2 {
		t.Errorf("statuses: %d", got)
	}
	r.release(a)
	if len(r.checkers) != 2 {
		t.Fatal("released with a reference left")
	}
	r.release([]want{{k, "y:2"}, {k2, "x:2"}})
	if len(r.checkers) != 0 || len(r.byAddr) != 0 {
		t.Fatalf("left: %d checkers, %d addresses", len(r.checkers), len(r.byAddr))
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
	c.key.fastInterval, c.key.downInterval = fast, down
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
		c.done(s.res)
		if got := next(); got != s.want {
			t.Fatalf("step %d (%v): next probe after %v, want %v", i, s.res.Err, got, s.want)
		}
	}
	// Unset, both are the interval.
	c2 := testChecker(t, 2, 3)
	for _, r := range []shaker.Result{up, refused, refused, refused, up} {
		c2.done(r)
		c2.mu.Lock()
		got := c2.nextIntervalLocked()
		c2.mu.Unlock()
		if got != interval {
			t.Fatalf("without fast/down intervals: %v, want %v", got, interval)
		}
	}
}
