//go:build linux && !shaker_fallback

package health

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// countingObserver counts probes, as the glue's metrics do, and closes
// reached once target of them have been seen.
type countingObserver struct {
	n       atomic.Int64
	target  atomic.Int64
	reached chan struct{}
}

func (o *countingObserver) Probed(shaker.Result) {
	if o.n.Add(1) == o.target.Load() {
		close(o.reached)
	}
}
func (o *countingObserver) Changed(Transition)       {}
func (o *countingObserver) LocalFailing(bool, error) {}
func (o *countingObserver) await(n int64) chan struct{} {
	o.reached = make(chan struct{})
	o.target.Store(o.n.Load() + n)
	return o.reached
}

// probeModes are the engine's probe modes the scheduled path is measured in;
// raw is skipped where raw sockets cannot be opened.
var probeModes = []shaker.Mode{shaker.ModeConnect, shaker.ModeRaw}

// scheduledPath is the scheduled path in steady state: addrs listeners on
// 127.0.0.1, each a Checker (jitter on) probed by Engine.Every at
// interval in mode, its result going through Checker.Observe to an
// observer that counts it. It returns the observer, once every address has
// been probed a few times.
func scheduledPath(tb testing.TB, mode shaker.Mode, addrs int, interval time.Duration) *countingObserver {
	tb.Helper()
	ls := testkit.NewListeners(tb, addrs, "tcp4", "127.0.0.1:0")
	if mode == shaker.ModeRaw {
		testkit.NeedRaw(tb)
	}
	e, err := shaker.New(shaker.Options{Loops: 1, Mode: mode})
	if err != nil {
		tb.Fatal(err)
	}
	r := NewRegistry()
	obs := &countingObserver{}
	r.SetObserver(obs)
	var ws []Want
	for i, l := range ls {
		ws = append(ws, Want{Addr: l.Addr, Name: fmt.Sprint("u", i), Settings: Settings{
			Interval: interval, Timeout: time.Second, Passes: 2, Fails: 3, JitterPercent: 5,
		}})
	}
	cs, _ := r.Acquire(ws)
	r.SetEngine(e)
	tb.Cleanup(func() {
		r.Release(ws)
		r.SetEngine(nil)
		e.Close()
		if a := ls.ProbeAccepts(tb); a != 0 {
			tb.Errorf("listeners accepted %d probes", a)
		}
	})
	warm := obs.await(int64(5 * addrs))
	r.Start(cs)
	<-warm
	return obs
}

// allocsPerProbe runs n probes on the scheduled path and returns the
// process's allocations per probe meanwhile.
func allocsPerProbe(obs *countingObserver, n int) float64 {
	done := obs.await(int64(n))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	<-done
	runtime.ReadMemStats(&after)
	return float64(after.Mallocs-before.Mallocs) / float64(n)
}

// BenchmarkScheduledProbe: the scheduled path (Engine.Every, then
// Checker.Observe and an observer) on loopback, 200 addresses at 10 ms,
// in connect and raw mode. It reports allocations per probe over the
// whole process: the loop's steady state allocates nothing, so the GC
// never charges it with assist work between a SYN-ACK and its close.
//
//	go test -run '^$' -bench ScheduledProbe ./health
func BenchmarkScheduledProbe(b *testing.B) {
	for _, mode := range probeModes {
		b.Run(mode.String(), func(b *testing.B) {
			obs := scheduledPath(b, mode, 200, 10*time.Millisecond)
			b.ResetTimer()
			perProbe := allocsPerProbe(obs, max(b.N, 1000))
			b.StopTimer()
			b.ReportMetric(perProbe, "allocs/probe")
		})
	}
}

// TestScheduledProbeNoAlloc: the scheduled path allocates nothing per
// probe in steady state, in either mode.
func TestScheduledProbeNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own")
	}
	for _, mode := range probeModes {
		t.Run(mode.String(), func(t *testing.T) {
			obs := scheduledPath(t, mode, 200, 10*time.Millisecond)
			perProbe := allocsPerProbe(obs, 20000)
			t.Logf("%.4f allocations per probe", perProbe)
			if perProbe > 0.05 {
				t.Fatalf("%.3f allocations per probe on the scheduled path, want 0", perProbe)
			}
		})
	}
}
