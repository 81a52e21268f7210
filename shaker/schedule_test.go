//go:build linux && !shaker_fallback

package shaker

import (
	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// everyCounter counts a schedule's results and lets a test wait for them.
type everyCounter struct {
	mu    sync.Mutex
	n     int
	up    int
	cond  *sync.Cond
	last  Result
	calls atomic.Int64
}

func newEveryCounter() *everyCounter {
	c := &everyCounter{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *everyCounter) fn(next time.Duration) func(Result) time.Duration {
	return func(r Result) time.Duration {
		c.calls.Add(1)
		c.mu.Lock()
		c.n++
		if r.Outcome == Up {
			c.up++
		}
		c.last = r
		c.mu.Unlock()
		c.cond.Broadcast()
		return next
	}
}

// count is the number of results so far.
func (c *everyCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// wait waits until the schedule has n results, or fails the test after
// within.
func (c *everyCounter) wait(t *testing.T, n int, within time.Duration) {
	t.Helper()
	timer := time.AfterFunc(within, func() { c.cond.Broadcast() })
	defer timer.Stop()
	deadline := time.Now().Add(within)
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.n < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d results after %v, want %d", c.n, within, n)
		}
		c.cond.Wait()
	}
}

// TestEvery: on every path, schedules on many addresses and both loops
// probe again and again, each result goes to its own callback, up, for
// its own address, with an RTT; a schedule of a closed port is refused;
// nothing is accepted; Stop ends a schedule while the others go on; and
// Stats counts the schedules (in raw mode, no socket nor close delay).
func TestEvery(t *testing.T) {
	forPaths(t, "", 64, func(t *testing.T, m Mode, opts Options) {
		ls := make([]*testkit.Listener, 8)
		for i := range ls {
			// on 0.0.0.0: it answers every 127.x.y.z
			ls[i] = testkit.NewListener(t, "tcp4", "0.0.0.0:0")
		}
		closed := testkit.BoundNotListening(t, "127.0.0.1")
		opts.Loops = 2
		e := newEngine(t, opts)
		checkMode(t, e, m)
		const n = 64
		cs := make([]*everyCounter, n)
		ss := make([]*Schedule, n)
		for i := range cs {
			cs[i] = newEveryCounter()
			// 127.0.0.x: distinct addresses, spread over the loops
			ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(1 + i%4)}), ls[i%len(ls)].Addr.Port())
			ss[i] = e.Every(ap, Period{Interval: 10 * time.Millisecond, Timeout: time.Second, First: time.Duration(i) * time.Millisecond / 8}, cs[i].fn(0))
		}
		refused := newEveryCounter()
		rs := e.Every(closed, Period{Interval: 10 * time.Millisecond, Timeout: time.Second}, refused.fn(0))
		if s := e.Stats(); s.Scheduled != n+1 || s.Loops != 2 {
			t.Fatalf("stats %+v: want %d scheduled on 2 loops", s, n+1)
		}
		for _, c := range cs {
			c.wait(t, 5, 10*time.Second)
		}
		refused.wait(t, 3, 10*time.Second)
		rs.Stop()
		for i, c := range cs {
			c.mu.Lock()
			if c.up != c.n || c.last.Addr != ss[i].Addr() || c.last.RTT <= 0 {
				t.Errorf("schedule %d: %d of %d up, last result %+v for %v", i, c.up, c.n, c.last, ss[i].Addr())
			}
			c.mu.Unlock()
		}
		refused.mu.Lock()
		if refused.up != 0 || refused.last.Outcome != Refused {
			t.Errorf("schedule of a closed port: %d up, last result %+v; want refused", refused.up, refused.last)
		}
		refused.mu.Unlock()
		// Stop half; the others go on, the stopped ones do not.
		for i := 0; i < n; i += 2 {
			ss[i].Stop()
			ss[i].Stop() // idempotent
		}
		if s := e.Stats(); s.Scheduled != n/2 {
			t.Fatalf("after Stop: %d scheduled, want %d", s.Scheduled, n/2)
		}
		// At most one call already under way may finish after Stop.
		stopped := make([]int64, n)
		for i := 0; i < n; i += 2 {
			stopped[i] = cs[i].calls.Load()
		}
		for i := 1; i < n; i += 2 {
			cs[i].wait(t, cs[i].count()+5, 10*time.Second)
		}
		for i := 0; i < n; i += 2 {
			if got := cs[i].calls.Load(); got > stopped[i]+1 {
				t.Errorf("schedule %d: %d calls after Stop", i, got-stopped[i])
			}
		}
		accepted := testkit.Listeners(ls).ProbeAccepts(t) // one wait for all
		if accepted != 0 {
			t.Fatalf("listeners accepted %d probe connections", accepted)
		}
		st := e.Stats()
		if st.StartDelay.Count() == 0 || st.Up < 5*n || m == ModeRaw && (st.Sockets != 0 || st.MaxCloseDelay != 0) {
			t.Fatalf("stats %+v: want start delays observed, at least %d up, and in raw mode no socket nor close delay", st, 5*n)
		}
	})
}

// TestEveryDeadHostsFree: probes that wait for their timeout on a dead
// address (SYNs dropped: a full accept queue) hold no other schedule back,
// whatever their number.
func TestEveryDeadHostsFree(t *testing.T) {
	live := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	dead := testkit.FullQueueListener(t, "127.0.0.1")
	e := newEngine(t, Options{Loops: 1})
	const deadN = 2000
	var deadResults atomic.Int64
	firstDead := make(chan struct{})
	var once sync.Once
	for i := 0; i < deadN; i++ {
		s := e.Every(dead, Period{Interval: 10 * time.Millisecond, Timeout: 3 * time.Second}, func(r Result) time.Duration {
			deadResults.Add(1)
			once.Do(func() { close(firstDead) })
			return 0
		})
		t.Cleanup(s.Stop)
	}
	c := newEveryCounter()
	s := e.Every(live.Addr, Period{Interval: 5 * time.Millisecond, Timeout: time.Second}, c.fn(0))
	t.Cleanup(s.Stop)
	// Before the first dead probe times out (3 s), the live address must
	// have been probed again and again: at 5 ms, hundreds of times; ask
	// for 20.
	done := make(chan struct{})
	go func() {
		c.wait(t, 20, 30*time.Second)
		close(done)
	}()
	select {
	case <-done:
	case <-firstDead:
		n := c.count()
		t.Fatalf("a dead probe timed out before the live address had 20 results (it had %d): dead probes held it back", n)
	}
	if st := e.Stats(); st.InFlight < deadN/2 {
		t.Fatalf("%d in flight: want the dead probes waiting for their timeout", st.InFlight)
	}
	if n := live.ProbeAccepts(t); n != 0 {
		t.Fatalf("listener accepted %d probe connections", n)
	}
}

// TestEveryNextInterval: the callback's return sets the time to the next
// probe; Stop from the callback ends the schedule.
func TestEveryNextInterval(t *testing.T) {
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	e := newEngine(t, Options{Loops: 1})
	var n atomic.Int64
	stopped := make(chan struct{})
	var s *Schedule
	var mu sync.Mutex
	mu.Lock()
	s = e.Every(l.Addr, Period{Interval: time.Hour, Timeout: time.Second}, func(r Result) time.Duration {
		k := n.Add(1)
		if k == 5 {
			mu.Lock()
			s.Stop()
			mu.Unlock()
			close(stopped)
			return 0
		}
		return time.Millisecond // far below the hour of the period
	})
	mu.Unlock()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatalf("%d results in 10 s: the callback's 1 ms was not used", n.Load())
	}
	// A probe after Stop would show here; wait for another schedule's
	// several results to give it the chance.
	c := newEveryCounter()
	other := e.Every(l.Addr, Period{Interval: time.Millisecond}, c.fn(0))
	c.wait(t, 10, 10*time.Second)
	other.Stop()
	if k := n.Load(); k != 5 {
		t.Fatalf("%d results, want 5: the schedule went on after Stop from its callback", k)
	}
}

// TestEveryClose: Close stops every schedule (callbacks are not called
// with a Closed result), and Every after Close gives a stopped schedule.
func TestEveryClose(t *testing.T) {
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	dead := testkit.FullQueueListener(t, "127.0.0.1")
	e, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	var closedSeen atomic.Bool
	fn := func(r Result) time.Duration {
		if r.Outcome == Closed {
			closedSeen.Store(true)
		}
		return 0
	}
	c := newEveryCounter()
	e.Every(l.Addr, Period{Interval: time.Millisecond}, c.fn(0))
	for i := 0; i < 100; i++ {
		e.Every(dead, Period{Interval: time.Millisecond, Timeout: time.Minute}, fn)
	}
	c.wait(t, 3, 10*time.Second)
	e.Close()
	calls := c.calls.Load()
	if s := e.Stats(); s.Scheduled != 0 || s.InFlight != 0 || s.Sockets != 0 {
		t.Fatalf("after Close: %+v", s)
	}
	s := e.Every(l.Addr, Period{Interval: time.Millisecond}, c.fn(0))
	s.Stop()
	if closedSeen.Load() {
		t.Fatal("a callback was called with a Closed result")
	}
	if c.calls.Load() != calls {
		t.Fatal("a callback was called after Close")
	}
	if n := l.ProbeAccepts(t); n != 0 {
		t.Fatalf("listener accepted %d probe connections", n)
	}
}

// TestEveryBadArgs: a nil callback or a non-positive interval is a
// programming error.
func TestEveryBadArgs(t *testing.T) {
	e := newEngine(t, Options{})
	for name, f := range map[string]func(){
		"nil callback": func() { e.Every(netip.MustParseAddrPort("127.0.0.1:1"), Period{Interval: time.Second}, nil) },
		"zero interval": func() {
			e.Every(netip.MustParseAddrPort("127.0.0.1:1"), Period{}, func(Result) time.Duration { return 0 })
		},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
}

// TestOutcomeNames: every outcome has its name, used by metrics and logs;
// and the histograms' counter arrays fit their increasing bounds.
func TestOutcomeNames(t *testing.T) {
	want := []string{"up", "refused", "timeout", "unreachable", "local_error", "error", "closed"}
	for o := Outcome(0); o < numOutcomes; o++ {
		if o.String() != want[o] {
			t.Errorf("Outcome(%d) = %q, want %q", o, o.String(), want[o])
		}
	}
	if Outcome(99).String() != "outcome(99)" {
		t.Errorf("unknown outcome: %q", Outcome(99).String())
	}
	if len(StartDelayBuckets)+1 != numDelayBuckets {
		t.Fatalf("numDelayBuckets %d, want %d", numDelayBuckets, len(StartDelayBuckets)+1)
	}
	if len(CloseDelayBuckets)+1 != numCloseBuckets {
		t.Fatalf("numCloseBuckets %d, want %d", numCloseBuckets, len(CloseDelayBuckets)+1)
	}
	for _, bounds := range [][]time.Duration{StartDelayBuckets, CloseDelayBuckets} {
		for i := 1; i < len(bounds); i++ {
			if bounds[i] <= bounds[i-1] {
				t.Errorf("bucket bounds %v: not increasing at %d", bounds, i)
			}
		}
	}
}

// TestScheduleNow: Now starts a schedule's next probe at once, however far
// its due time, and the schedule goes on; on a stopped schedule it does
// nothing.
func TestScheduleNow(t *testing.T) {
	for _, path := range paths {
		t.Run(path.name, func(t *testing.T) {
			l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
			e := newEngine(t, path.opts)
			c := newEveryCounter()
			s := e.Every(l.Addr, Period{Interval: time.Hour, Timeout: time.Second, First: time.Hour}, c.fn(0))
			for i := 1; i <= 3; i++ {
				s.Now()
				c.wait(t, i, 10*time.Second)
			}
			// Twice in one turn of the loop: one probe. The loop is held
			// in a one-off probe's callback (same address, so same loop)
			// while Now is called twice, so both land before its next turn.
			release := holdLoop(t, e, l.Addr, 10*time.Second)
			s.Now()
			s.Now()
			release()
			c.wait(t, 4, 10*time.Second)
			// Then a blocking probe on the same loop, and until nothing is
			// in flight: a second probe from the second Now would have
			// started by then, and its result would be counted.
			if r := e.Probe(t.Context(), l.Addr); r.Err != nil {
				t.Fatal(r.Err)
			}
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
				if st := e.Stats(); st.InFlight == 0 && st.Queued == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("probes still in flight after 10 s: %+v", e.Stats())
				}
			}
			if got, total := c.count(), e.Stats().Total(); got != 4 || total != 6 {
				t.Errorf("Now twice in one turn: %d results of the schedule and %d probes in all, want 4 and 6 (4 of the schedule and 2 one-off)", got, total)
			}
			if st := e.Stats(); st.Late != 0 {
				t.Errorf("%d probes counted late: a probe moved earlier is on time", st.Late)
			}
			s.Stop()
			calls := c.calls.Load()
			s.Now()
			// a one-off probe after Now has its result only once the loop
			// has taken Now in: a stopped schedule must not have probed
			if r := e.Probe(t.Context(), l.Addr); r.Err != nil {
				t.Fatal(r.Err)
			}
			if got := c.calls.Load(); got != calls {
				t.Errorf("%d calls after Stop and Now", got-calls)
			}
			if n := l.ProbeAccepts(t); n != 0 {
				t.Fatalf("listener accepted %d probe connections", n)
			}
		})
	}
}
