//go:build linux

package caddyshaker

import (
	"context"
	"flag"
	"os/exec"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// TestReloadsWhileProbing1000: 100 config reloads while 1,000 upstreams are
// probed: nothing accepted, every address keeps its checker (the same
// *health.Checker) and its state (health, since, transitions; probe counts
// go on), and fds and goroutines
// come back to where they were. Beside the 1,000 listeners, so that the
// state kept is not only "up since the start": 25 addresses refuse (down
// throughout), and 25 refused first and listen since (down, then up: one
// transition).
func TestReloadsWhileProbing1000(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	const n, reloads, downs, flips = 1000, 100, 25, 25
	l := testkit.NewListeners(t, n, "tcp4", "127.0.0.1:0")
	ups := l.Strings()
	var downAddrs []string
	for range downs {
		downAddrs = append(downAddrs, testkit.BoundNotListening(t, "127.0.0.1").String())
	}
	flipFDs := make([]int, flips)
	var flipAddrs []string
	for i := range flipFDs {
		fd, addr := testkit.BindLoopback(t, "127.0.0.1") // held: the port stays ours
		flipFDs[i] = fd
		flipAddrs = append(flipAddrs, addr.String())
	}
	all := append(append(append([]string(nil), ups...), downAddrs...), flipAddrs...)
	t.Cleanup(func() { caddy.Stop() })
	if err := caddy.Load(loadConfig(t, all, "200ms", 0), true); err != nil {
		t.Fatal(err)
	}
	statuses := func() map[string]Status { return byAddress(reg.Statuses()) }
	isDown := func(m map[string]Status, addrs []string) bool {
		for _, a := range addrs {
			if m[a].Health != "down" {
				return false
			}
		}
		return true
	}
	waitFor(t, 10*time.Second, "the refusing addresses down", func() bool {
		m := statuses()
		return isDown(m, downAddrs) && isDown(m, flipAddrs)
	})
	for _, fd := range flipFDs { // nobody accepts: a probe that became a connection stays queued
		if err := unix.Listen(fd, 128); err != nil {
			t.Fatal(err)
		}
	}
	var before map[string]Status
	waitFor(t, 10*time.Second, "every address probed, the flipped ones up", func() bool {
		before = statuses()
		for _, a := range all {
			if before[a].Probes == 0 || (before[a].Health == "down") != slices.Contains(downAddrs, a) {
				return false
			}
		}
		return true
	})
	for _, a := range flipAddrs {
		if s := before[a]; s.Transitions != 1 {
			t.Fatalf("%s: %d transitions after down, then up; want 1", a, s.Transitions)
		}
	}
	checkers := func() map[string]*health.Checker {
		m := make(map[string]*health.Checker, len(all))
		for _, c := range reg.Checkers() {
			m[c.Status().Address] = c
		}
		return m
	}
	// the checkers themselves: a new one would inherit the old one's
	// state (health.Registry.inheritLocked), so only its identity tells
	checkers0 := checkers()
	runtime.GC()
	fds0, gs0 := testkit.CountFDs(t), runtime.NumGoroutine()

	for i := 1; i <= reloads; i++ {
		if err := caddy.Load(loadConfig(t, all, "200ms", i), true); err != nil {
			t.Fatalf("reload %d: %v", i, err)
		}
	}
	// Each address probed again since: its checker still runs. Then each
	// has the state it had: a new checker would start unknown, with a new
	// since, no transitions and a probe count from 0.
	var after map[string]Status
	waitFor(t, 10*time.Second, "every address probed after the reloads", func() bool {
		after = statuses()
		for _, a := range all {
			if after[a].Probes <= before[a].Probes {
				return false
			}
		}
		return true
	})
	if got := len(after); got != len(all) {
		t.Fatalf("%d addresses probed after %d reloads, want %d", got, reloads, len(all))
	}
	lost, replaced := 0, 0
	checkers1 := checkers()
	for _, a := range all {
		if c0, c1 := checkers0[a], checkers1[a]; c0 == nil || c1 != c0 {
			if replaced++; replaced <= 10 {
				t.Errorf("%s: checker %p before the reloads, %p after: not the same checker", a, c0, c1)
			}
		}
		b, s := before[a], after[a]
		if s.Health != b.Health || s.Transitions != b.Transitions || b.Since == nil || s.Since == nil || !s.Since.Equal(*b.Since) {
			if lost++; lost <= 10 {
				t.Errorf("%s: %s since %v with %d transitions before the reloads, %s since %v with %d after: a new checker, or its state lost",
					a, b.Health, b.Since, b.Transitions, s.Health, s.Since, s.Transitions)
			}
		}
	}
	if lost > 0 || replaced > 0 {
		t.Fatalf("in %d reloads, %d of %d addresses lost their state and %d their checker", reloads, lost, len(all), replaced)
	}
	// fds and goroutines: back to the baseline (bounded wait for the
	// old configs' goroutines to finish).
	var fds, gs int
	waitFor(t, 10*time.Second, "fds and goroutines back to the baseline", func() bool {
		runtime.GC()
		fds, gs = testkit.CountFDs(t), runtime.NumGoroutine()
		return fds <= fds0 && gs <= gs0
	})
	t.Logf("%d reloads while probing %d upstreams: each kept its state (%d up, %d down, %d up after one transition); fds %d -> %d, goroutines %d -> %d",
		reloads, len(all), n, downs, flips, fds0, fds, gs0, gs)
	if a := l.ProbeAccepts(t); a != 0 {
		t.Fatalf("listeners accepted %d connections", a)
	}
	for i, fd := range flipFDs { // their accept queue (tcpi_unacked on a listener)
		if info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err != nil {
			t.Fatal(err)
		} else if info.Unacked != 0 {
			t.Fatalf("%s: %d connections in the accept queue", flipAddrs[i], info.Unacked)
		}
	}
}

// BenchmarkLoad10k probes 10,000 addresses (listeners on 127.0.0.1) at a
// 1 s interval for the benchmark time, first alone, then with both cores
// kept busy by two shell busy-loops beside it. It reports the CPU the
// process spent per probe and as a share of one core, the heap per
// address, the worst delay between a SYN-ACK and its close, and fails if
// any listener accepted a connection.
//
//	go test -run '^$' -bench Load10k -benchtime 10s .
func BenchmarkLoad10k(b *testing.B) {
	const n = 10000
	l := testkit.NewListeners(b, n, "tcp4", "127.0.0.1:0")
	for _, hog := range []bool{false, true} {
		name := "idle"
		if hog {
			name = "cores-busy"
		}
		b.Run(name, func(b *testing.B) {
			if hog {
				for range 2 {
					ctx, cancel := context.WithCancel(context.Background())
					cmd := exec.CommandContext(ctx, "sh", "-c", "while :; do :; done")
					if err := cmd.Start(); err != nil {
						b.Skipf("no sh for the CPU hog: %v", err)
					}
					b.Cleanup(func() { cancel(); cmd.Wait() })
				}
			}
			runtime.GC()
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			if err := caddy.Load(loadConfig(b, l.Strings(), "1s", 0), true); err != nil {
				b.Fatal(err)
			}
			defer caddy.Stop()
			// one full round first: every address has a checker
			waitFor(b, 30*time.Second, "every address probed", func() bool { return engineProbes() >= n })
			runtime.GC()
			runtime.ReadMemStats(&m1)
			b.ResetTimer()
			p0, cpu0, t0 := engineProbes(), testkit.CPUTime(), time.Now()
			// -benchtime as a duration; 10 s otherwise (it is not a
			// loop of b.N operations: the probes run on their own)
			d := 10 * time.Second
			if bt := benchTime(); bt > 0 {
				d = bt
			}
			time.Sleep(d)
			probes, cpu, wall := engineProbes()-p0, testkit.CPUTime()-cpu0, time.Since(t0)
			b.StopTimer()
			e := engines.cur.Load()
			worst := e.Stats().MaxCloseDelay
			b.ReportMetric(float64(probes)/wall.Seconds(), "probes/s")
			b.ReportMetric(float64(cpu.Microseconds())/float64(probes), "cpu-us/probe")
			b.ReportMetric(100*cpu.Seconds()/wall.Seconds(), "%core")
			b.ReportMetric(float64(m1.HeapAlloc-m0.HeapAlloc)/n, "heap-B/address")
			b.ReportMetric(float64(worst.Microseconds())/1000, "worst-close-ms")
			if a := l.ProbeAccepts(b); a != 0 {
				b.Fatalf("listeners accepted %d connections", a)
			}
		})
	}
}

// benchTime is the -benchtime flag's duration, if it is one.
func benchTime() time.Duration {
	if f := flagLookup("test.benchtime"); f != "" {
		if d, err := time.ParseDuration(f); err == nil {
			return d
		}
	}
	return 0
}

func flagLookup(name string) string {
	if f := flag.Lookup(name); f != nil {
		return f.Value.String()
	}
	return ""
}
