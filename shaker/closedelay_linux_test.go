//go:build linux && !shaker_fallback

package shaker

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The burst scenario of issue 15, on the bare engine: a testkit.SlowPath
// whose tbf (on both ends; 15 Mbit/s, 8 with busy loops: testkit.BurstRate)
// the probes' own traffic fills, 2,000 addresses probed every 100 ms (20,000
// probes/s) with a 1.5 s timeout, by Every with a callback that does what
// health's does (counts, returns the next interval). SYN-ACKs queue in the
// tbf and arrive in bursts after connect() has returned: every answer takes
// the epoll path, and closes on veth run the peer's network processing
// inline. The root package runs the same scenario inside Caddy
// (closedelay_linux_test.go there).
//
// The tests assert the promise (0 accepted, counted past the kernel's
// window) and that the scenario was real (answers through epoll, a queue
// in the tbf); they log the close delays (worst, p50, p99, p99.9 of
// Stats.CloseDelay) without asserting them: on a shared machine a timed
// assertion fails for reasons of its own.
const (
	burstEnv      = "SHAKER_BURST_HELPER" // the child's mode: idle, busy, slow
	burstPathEnv  = "SHAKER_BURST"        // the SlowPath's (SlowPath.Env)
	burstLatency  = "200ms"
	burstAddrs    = 2000
	burstPorts    = 8
	burstInterval = 100 * time.Millisecond
	burstTimeout  = 1500 * time.Millisecond
	burstWarmup   = time.Second
	burstMeasure  = 3 * time.Second

	// slowSpin is what the callback of the "slow" mode spins for, on
	// each probe: 20,000 a second make 1 s of callbacks a second, half
	// the machine, and a batch of 100 results 5 ms of them.
	slowSpin = 50 * time.Microsecond
)

// TestCloseDelayBursts: the burst scenario, IPv4 and IPv6, with the
// machine otherwise idle and with a busy loop on every core.
func TestCloseDelayBursts(t *testing.T) {
	for _, mode := range testkit.BurstModes(t) {
		for _, family := range []int{4, 6} {
			t.Run(fmt.Sprintf("%s/IPv%d", mode, family), func(t *testing.T) { runBurst(t, mode, family) })
		}
	}
}

// TestSlowCallbackCloseDelay: the burst scenario with a slow callback
// (slowSpin on every probe): callbacks run in slices between looks at
// epoll, so they do not hold an answered socket open for longer than a
// slice and one callback. Compare its delays with TestCloseDelayBursts's.
func TestSlowCallbackCloseDelay(t *testing.T) {
	testkit.BurstModes(t) // skips unless the burst scenarios run
	runBurst(t, "slow", 4)
}

// burstResult is what a child of the burst scenario measured.
type burstResult struct {
	up, epollUp, timeouts, accepted uint64
	maxReady, maxQueued             int
	worst, p50, p99, p999           time.Duration
	rate                            float64
	exact, apart                    uint64 // Engine.delayViews
}

func (r burstResult) String() string {
	return fmt.Sprintf("worst close delay %v, p50 %v, p99 %v, p99.9 %v; %.0f probes/s, %d up (%d through epoll), %d timeouts; bursts: up to %d answers a look, %d packets queued in a tbf; %d accepted",
		r.worst, r.p50, r.p99, r.p999, r.rate, r.up, r.epollUp, r.timeouts, r.maxReady, r.maxQueued, r.accepted)
}

func runBurst(t *testing.T, mode string, family int) {
	r, _ := burstChild(t, mode, family, ModeConnect, testkit.BurstRate(mode))
	testkit.BurstAccepted(t, r.accepted, fmt.Sprintf("bare engine, %s, IPv%d", mode, family))
	if r.up == 0 || r.epollUp < r.up/2 {
		t.Errorf("%d up, %d through epoll: the scenario did not take the epoll path", r.up, r.epollUp)
	}
	testkit.BurstsSeen(t, r.maxReady, r.maxQueued)
	if microClock() {
		checkDelayViews(t, r.exact, r.apart)
	}
}

// checkDelayViews fails unless the kernel's microsecond clock timed
// close delays (exact) and never put a SYN-ACK after the loop or the
// closer saw it (apart): on a path where the answers come through epoll,
// the clock the close delays are read from agrees with the loop's own.
func checkDelayViews(t *testing.T, exact, apart uint64) {
	t.Helper()
	if exact == 0 || apart != 0 {
		t.Errorf("close delays from the kernel's microsecond clock: %d; where it put the SYN-ACK after it was seen: %d (want some, and none)", exact, apart)
	}
}

// burstChild runs the burst scenario's child (TestCloseDelayBurstsHelper)
// in mode (idle, busy, slow) for family, its engine in probe mode pm, on a
// new SlowPath shaped at rate, and returns what it measured and how many
// of the burstAddrs addresses it saw up at least once.
func burstChild(t *testing.T, mode string, family int, pm Mode, rate string) (burstResult, int) {
	t.Helper()
	if testing.Short() {
		t.Skip("namespaces and 20,000 probes a second")
	}
	p := testkit.NewSlowPath(t, rate, burstLatency)
	p.ShapeA(t, rate, burstLatency)
	env := append(p.Env(burstPathEnv, family), burstEnv+"="+mode, "SHAKER_BURST_PROBE_MODE="+pm.String())
	out := testkit.RunTest(t, p.A, "TestCloseDelayBurstsHelper", env...)
	res := testkit.ResultsByName(out)
	f := res["burst"]
	if len(f) != 12 {
		t.Fatalf("no RESULT burst line:\n%s", out)
	}
	var r burstResult
	u := func(i int) uint64 { return u2(f[i]) }
	d := func(i int) time.Duration { v, _ := time.ParseDuration(f[i]); return v }
	r.up, r.epollUp, r.timeouts, r.accepted = u(0), u(1), u(2), u(3)
	r.maxReady, r.maxQueued = int(u(4)), int(u(5))
	r.worst, r.p50, r.p99, r.p999 = d(6), d(7), d(8), d(9)
	r.rate, _ = strconv.ParseFloat(f[10], 64)
	if v := res["views"]; len(v) == 2 {
		r.exact, r.apart = u2(v[0]), u2(v[1])
	}
	var seen int
	if s := res["seen"]; len(s) == 1 {
		seen, _ = strconv.Atoi(s[0])
	}
	t.Logf("bare engine, %s, IPv%d, %v mode: %v; %d of %d addresses seen up", mode, family, pm, r, seen, burstAddrs)
	return r, seen
}

// TestCloseDelayBurstsHelper is the child of the burst tests, in
// namespace A of a SlowPath (testkit.ChildSlowPath).
func TestCloseDelayBurstsHelper(t *testing.T) {
	mode := os.Getenv(burstEnv)
	if mode == "" {
		t.Skip("only runs as a child of the burst tests")
	}
	p, family := testkit.ChildSlowPath(burstPathEnv)
	pm, err := ParseMode(os.Getenv("SHAKER_BURST_PROBE_MODE"))
	if err != nil {
		t.Fatal(err)
	}
	ls, addrs := burstListeners(t, p.B, family)
	index := make(map[netip.AddrPort]int, len(addrs))
	for i, a := range addrs {
		index[a] = i
	}
	seen := make([]atomic.Bool, len(addrs)) // up at least once
	if mode == "busy" {
		defer testkit.Hogs(t, runtime.NumCPU(), burstWarmup+burstMeasure+10*time.Second)()
	}
	e, err := New(Options{Mode: pm})
	if err != nil {
		t.Fatal(err)
	}
	if e.Mode() != pm {
		t.Fatalf("engine in mode %v, want %v", e.Mode(), pm)
	}
	var spin time.Duration
	if mode == "slow" {
		spin = slowSpin
	}
	var up, timeouts atomic.Uint64
	fn := func(r Result) time.Duration {
		switch r.Outcome {
		case Up:
			up.Add(1)
			if i, ok := index[r.Addr]; ok {
				seen[i].Store(true)
			}
		case Timeout:
			timeouts.Add(1)
		}
		for t0 := time.Now(); spin > 0 && time.Since(t0) < spin; {
		}
		return 0
	}
	var scheds []*Schedule
	for i, a := range addrs {
		first := time.Duration(i) * burstInterval / time.Duration(len(addrs))
		scheds = append(scheds, e.Every(a, Period{Interval: burstInterval, Timeout: burstTimeout, First: first}, fn))
	}
	r := measureBursts(t, p, func() Stats { return e.Stats() })
	for _, s := range scheds {
		s.Stop()
	}
	e.Close()
	p.Settle(t)
	r.accepted = uint64(ls.ProbeAcceptsIn(t, p.B))
	r.up, r.timeouts = up.Load(), timeouts.Load()
	fmt.Printf("RESULT burst %d %d %d %d %d %d %v %v %v %v %.0f %s\n", r.up, r.epollUp, r.timeouts, r.accepted,
		r.maxReady, r.maxQueued, r.worst, r.p50, r.p99, r.p999, r.rate, mode)
	n := 0
	for i := range seen {
		if seen[i].Load() {
			n++
		}
	}
	fmt.Printf("RESULT seen %d\n", n)
	exact, apart := e.delayViews()
	fmt.Printf("RESULT views %d %d\n", exact, apart)
}

// delayViews sums the loops' counts of close delays timed by the
// kernel's microsecond clock (exact) and of those where it put the
// SYN-ACK after the loop or the closer saw it, and was not used (apart).
func (e *Engine) delayViews() (exact, apart uint64) {
	for _, l := range e.loops {
		exact += l.exactDelays.Load()
		apart += l.viewsApart.Load()
	}
	return exact, apart
}

// u2 is s as a uint64, 0 if it is none.
func u2(s string) uint64 {
	v, _ := strconv.ParseUint(s, 10, 64)
	return v
}

// burstListeners starts burstPorts counting listeners on the wildcard
// address of family in namespace ns, and returns them and the burstAddrs
// addresses of the SlowPath's prefix that they answer.
func burstListeners(t testing.TB, ns string, family int) (testkit.Listeners, []netip.AddrPort) {
	t.Helper()
	return testkit.SlowListeners(t, ns, family, burstPorts, burstAddrs)
}

// measureBursts lets the scenario warm up, then samples the tbf's queue
// for the measuring window, and returns the engine's figures (stats reads
// them) at its end.
func measureBursts(t testing.TB, p *testkit.SlowPath, stats func() Stats) burstResult {
	t.Helper()
	time.Sleep(burstWarmup) // a window of probing, not a wait for an event
	st0 := stats()
	var r burstResult
	t0 := time.Now()
	for end := t0.Add(burstMeasure); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		r.maxQueued = max(r.maxQueued, testkit.Backlog(t, p.A, p.DevA), testkit.Backlog(t, p.B, p.DevB))
	}
	st := stats()
	r.rate = float64(st.Total()-st0.Total()) / time.Since(t0).Seconds()
	r.epollUp, r.maxReady, r.worst = st.EpollUp, st.MaxReady, st.MaxCloseDelay
	h := st.CloseDelay
	r.p50, r.p99, r.p999 = h.Quantile(0.5, CloseDelayBuckets), h.Quantile(0.99, CloseDelayBuckets), h.Quantile(0.999, CloseDelayBuckets)
	return r
}
