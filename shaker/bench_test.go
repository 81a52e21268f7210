//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"runtime"
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

// BenchmarkProbeAsync: 64 chains re-armed from done. Run with -benchmem:
// the steady state allocates nothing per probe.
func BenchmarkProbeAsync(b *testing.B) {
	for _, path := range paths {
		b.Run(path.name, func(b *testing.B) { benchmarkProbeAsync(b, path.opts) })
	}
}

func benchmarkProbeAsync(b *testing.B, opts Options) {
	ls := make([]*testkit.Listener, 16)
	for i := range ls {
		ls[i] = testkit.NewListener(b, "tcp4", "127.0.0.1:0")
	}
	e := newEngine(b, opts)
	chains(b, e, ls, 64, 10000) // warm up: slots, heap, queue at full size
	b.ReportAllocs()
	b.ResetTimer()
	if f := chains(b, e, ls, 64, b.N); f != 0 {
		b.Fatalf("%d probes failed", f)
	}
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
// nothing per probe (the chains' own setup is a few dozen allocations).
func TestProbeAsyncNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own")
	}
	for _, path := range paths {
		t.Run(path.name, func(t *testing.T) { testProbeAsyncNoAlloc(t, path.opts) })
	}
}

func testProbeAsyncNoAlloc(t *testing.T, opts Options) {
	ls := []*testkit.Listener{testkit.NewListener(t, "tcp4", "127.0.0.1:0")}
	e := newEngine(t, opts)
	chains(t, e, ls, 64, 5000)
	const probes = 20000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	chains(t, e, ls, 64, probes)
	runtime.ReadMemStats(&after)
	perProbe := float64(after.Mallocs-before.Mallocs) / probes
	t.Logf("%.4f allocations per probe", perProbe)
	if perProbe > 0.05 {
		t.Fatalf("%.3f allocations per probe on the ProbeAsync path, want 0", perProbe)
	}
}
