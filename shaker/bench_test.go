//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// chains runs n probes against addrs with c chains of ProbeAsync, each
// re-armed from its done callback, and waits for them. Apart from the
// chains' setup it allocates nothing per probe.
func chains(b testing.TB, e *Engine, addrs []*testkit.Listener, c, n int) (failed int64) {
	var started atomic.Int64
	var fails atomic.Int64
	var wg sync.WaitGroup
	wg.Add(c)
	for i := 0; i < c; i++ {
		var done func(Result)
		next := func() bool {
			k := started.Add(1)
			if k > int64(n) {
				return false
			}
			e.ProbeAsync(addrs[int(k)%len(addrs)].Addr, 5*time.Second, done)
			return true
		}
		done = func(r Result) {
			if r.Err != nil {
				fails.Add(1)
			}
			if !next() {
				wg.Done()
			}
		}
		if !next() {
			wg.Done()
		}
	}
	wg.Wait()
	return fails.Load()
}

// allPaths are paths and raw mode's (ModeRaw, whose answers always come
// through epoll), for the benchmarks and the allocation test; the raw one
// is skipped where raw sockets cannot be opened (see newPathEngine).
var allPaths = append(paths[:len(paths):len(paths)], struct {
	name string
	opts Options
}{"raw", Options{Mode: ModeRaw}})

// newPathEngine is newEngine for a path of allPaths: it skips a raw one
// where raw sockets cannot be opened.
func newPathEngine(t testing.TB, opts Options) *Engine {
	t.Helper()
	if opts.Mode == ModeRaw {
		testkit.NeedRaw(t)
	}
	return newEngine(t, opts)
}

// BenchmarkProbeAsync: 64 chains re-armed from done, in each path (inline,
// epoll, raw). Run with -benchmem: the steady state allocates nothing per
// probe.
//
//	go test -run '^$' -bench ProbeAsync -benchmem ./shaker
func BenchmarkProbeAsync(b *testing.B) {
	for _, path := range allPaths {
		b.Run(path.name, func(b *testing.B) { benchmarkProbeAsync(b, path.opts) })
	}
}

func benchmarkProbeAsync(b *testing.B, opts Options) {
	ls := make([]*testkit.Listener, 16)
	for i := range ls {
		ls[i] = testkit.NewListener(b, "tcp4", "127.0.0.1:0")
	}
	e := newPathEngine(b, opts)
	chains(b, e, ls, 64, 10000) // warm up: slots, heap, queue at full size
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := testkit.CPUTime()
	if f := chains(b, e, ls, 64, b.N); f != 0 {
		b.Fatalf("%d probes failed", f)
	}
	// user+sys of the process per probe: on loopback with the kernel's
	// work for both ends, as the bench command counts it
	b.ReportMetric(float64(testkit.CPUTime()-cpu0)/float64(b.N), "cpu-ns/op")
	b.StopTimer()
	accepted := testkit.Listeners(ls).ProbeAccepts(b) // one wait for all
	if accepted != 0 {
		b.Fatalf("listeners accepted %d probes", accepted)
	}
	b.ReportMetric(float64(e.Stats().MaxCloseDelay.Microseconds()), "max-close-delay-us")
}

// BenchmarkProbe: blocking Probe from parallel goroutines.
func BenchmarkProbe(b *testing.B) {
	l := testkit.NewListener(b, "tcp4", "127.0.0.1:0")
	e := newEngine(b, Options{})
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if r := e.Probe(ctx, l.Addr); r.Err != nil {
				b.Error(r.Err)
			}
			cancel()
		}
	})
}

// TestProbeAsyncNoAlloc: in steady state the ProbeAsync path allocates
// nothing per probe. The chains are built once, before the count, so that
// every allocation counted is the engine's: the test wants exactly 0 over
// 20,000 probes. The race detector allocates on its own, so it skips under
// -race; CI runs it without (.ci/run).
func TestProbeAsyncNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own; CI runs this test without -race")
	}
	for _, path := range allPaths {
		t.Run(path.name, func(t *testing.T) { testProbeAsyncNoAlloc(t, path.opts) })
	}
}

// reusableChains are c chains of ProbeAsync whose callbacks are made once,
// so that a run of them allocates nothing of its own.
type reusableChains struct {
	e       *Engine
	addrs   []netip.AddrPort
	started atomic.Int64
	n       atomic.Int64
	fails   atomic.Int64
	wg      sync.WaitGroup
	dones   []func(Result)
}

func newReusableChains(e *Engine, ls []*testkit.Listener, c int) *reusableChains {
	rc := &reusableChains{e: e, dones: make([]func(Result), c)}
	for _, l := range ls {
		rc.addrs = append(rc.addrs, l.Addr)
	}
	for i := range rc.dones {
		rc.dones[i] = func(r Result) {
			if r.Err != nil {
				rc.fails.Add(1)
			}
			if !rc.next(i) {
				rc.wg.Done()
			}
		}
	}
	return rc
}

func (rc *reusableChains) next(i int) bool {
	k := rc.started.Add(1)
	if k > rc.n.Load() {
		return false
	}
	rc.e.ProbeAsync(rc.addrs[int(k)%len(rc.addrs)], 5*time.Second, rc.dones[i])
	return true
}

// run runs n probes and waits for them; it returns how many failed.
func (rc *reusableChains) run(n int) int64 {
	rc.started.Store(0)
	rc.n.Store(int64(n))
	rc.fails.Store(0)
	rc.wg.Add(len(rc.dones))
	for i := range rc.dones {
		if !rc.next(i) {
			rc.wg.Done()
		}
	}
	rc.wg.Wait()
	return rc.fails.Load()
}

func testProbeAsyncNoAlloc(t *testing.T, opts Options) {
	ls := []*testkit.Listener{testkit.NewListener(t, "tcp4", "127.0.0.1:0")}
	e := newPathEngine(t, opts)
	rc := newReusableChains(e, ls, 64)
	if f := rc.run(5000); f != 0 { // warm up: slots, heap, queue at full size
		t.Fatalf("%d probes failed in the warm-up", f)
	}
	// Record every allocation, with its stack, so that the engine's own
	// are told from the runtime's: a GC empties the runtime's sudog
	// caches, and the next blocking wait (the test's WaitGroup.Wait)
	// allocates one (so does a loop's contended mutex); the background
	// scavenger grows its timer heap now and then, and so may a raw
	// loop's read deadline (it parks in the runtime's poller): a P's
	// timer heap, shared by every timer of the process, keeps its
	// capacity and grows only when that P holds more timers than it ever
	// has. Those are neither the engine's nor per probe (runtimeCache).
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1
	runtime.GC() // publishes the profile so far, and empties the caches before the warm-up run
	before := allocsByStack()
	const runs, probes = 10, 2000
	var failed int64
	// AllocsPerRun: one warm-up call, then runs calls counted; its figure
	// is the integer average, so 0 means fewer than one allocation in
	// each 2,000 probes, whoever made it.
	perRun := testing.AllocsPerRun(runs, func() { failed += rc.run(probes) })
	runtime.GC() // publishes the allocations of the runs
	after := allocsByStack()
	if failed != 0 {
		t.Fatalf("%d probes failed", failed)
	}
	var engine, other int64
	for stack, n := range after {
		n -= before[stack]
		if n == 0 || strings.Contains(stack, "shaker.allocsByStack\n") { // the first snapshot's own
			continue
		}
		if engineFrame(stack) && !runtimeCache(stack) {
			engine += n
			t.Errorf("%d allocations on the ProbeAsync path (%d probes), at:\n%s", n, (runs+1)*probes, stack)
		} else {
			other += n
			t.Logf("%d allocations not the engine's, at:\n%s", n, stack)
		}
	}
	t.Logf("%d probes: %v allocations per run of %d (AllocsPerRun); %d allocations by the engine, %d by the runtime and the test",
		(runs+1)*probes, perRun, probes, engine, other)
	if perRun != 0 {
		t.Errorf("AllocsPerRun: %v allocations per run of %d probes, want 0", perRun, probes)
	}
}

// allocsByStack is the memory profile so far (call runtime.GC first): the
// objects allocated at each stack, the stack as text.
func allocsByStack() map[string]int64 {
	n, _ := runtime.MemProfile(nil, true)
	recs := make([]runtime.MemProfileRecord, n+256)
	n, ok := runtime.MemProfile(recs, true)
	if !ok {
		panic("memory profile grew by more than 256 records between two calls")
	}
	m := make(map[string]int64, n)
	for _, r := range recs[:n] {
		var b strings.Builder
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			fmt.Fprintf(&b, "\t%s\n\t\t%s:%d\n", f.Function, f.File, f.Line)
			if !more {
				break
			}
		}
		m[b.String()] += r.AllocObjects
	}
	return m
}

// runtimeCache reports whether a stack from allocsByStack is the runtime
// refilling a cache of its own under an engine's call: a sudog (after a
// GC emptied the caches) or a P's timer heap growing.
func runtimeCache(stack string) bool {
	return strings.Contains(stack, "\truntime.acquireSudog\n") || strings.Contains(stack, "\truntime.(*timers).addHeap\n")
}

// engineFrame reports whether a stack from allocsByStack runs through the
// engine: a function of this package outside its tests. An allocation in
// a done callback (called by the engine) counts too.
func engineFrame(stack string) bool {
	_, self, _, _ := runtime.Caller(0)
	dir := filepath.Dir(self) + "/"
	for _, line := range strings.Split(stack, "\n") {
		file, _, _ := strings.Cut(strings.TrimSpace(line), ":")
		if strings.HasPrefix(file, dir) && !strings.Contains(file[len(dir):], "/") && !strings.HasSuffix(file, "_test.go") {
			return true
		}
	}
	return false
}
