//go:build linux && !shaker_fallback

package health

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestJitterInProbeTimings: a checker with jitter, probed by a real
// engine, has its probes come at varying times. Without jitter a probe
// never starts before its time, so no gap between two results would be
// much shorter than the interval: with 25% jitter about 3 gaps in 10 are
// below 0.9 x the interval. The lower bound is checked the way noise
// cannot break: the engine starts no probe before the sum of the
// intervals the checker returned for those before it, and each of those
// is at least 0.75 x the interval. (A bound on each gap alone would not
// hold: a probe that starts late, on a busy machine, and the next that
// starts on time, make a short gap.)
func TestJitterInProbeTimings(t *testing.T) {
	const (
		interval = 20 * time.Millisecond
		results  = 40
	)
	ln := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	e, err := shaker.New(shaker.Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	r := NewRegistry()
	w := Want{Addr: ln.Addr, Name: "jitter", Settings: Settings{
		Interval: interval, Timeout: time.Second, Passes: 1, Fails: 1, JitterPercent: 25,
	}}
	if err := w.Settings.Validate(); err != nil {
		t.Fatal(err)
	}
	cs, _ := r.Acquire([]Want{w})
	defer r.Release([]Want{w})
	c := cs[0]

	var (
		mu    sync.Mutex
		at    []time.Time     // when each result came
		ivs   []time.Duration // the interval the checker returned with it
		bad   []shaker.Result
		done  = make(chan struct{})
		start = time.Now() // before Every: the first probe is due after it
	)
	sched := e.Every(c.Addr(), shaker.Period{Interval: interval, Timeout: time.Second}, func(res shaker.Result) time.Duration {
		now := time.Now()
		next := c.Observe(res)
		mu.Lock()
		defer mu.Unlock()
		if len(at) < results {
			at, ivs = append(at, now), append(ivs, next)
			if res.Outcome != shaker.Up {
				bad = append(bad, res)
			}
			if len(at) == results {
				close(done)
			}
		}
		return next
	})
	select {
	case <-done:
	case <-time.After(time.Minute):
		mu.Lock()
		n := len(at)
		mu.Unlock()
		t.Fatalf("%d results in a minute, want %d", n, results)
	}
	sched.Stop()
	mu.Lock()
	defer mu.Unlock()
	if len(bad) > 0 {
		t.Fatalf("%d probes of a listening loopback port failed, the first: %v", len(bad), bad[0].Err)
	}

	var sum time.Duration // the least time from start to each probe
	short := 0
	var gaps []string
	for i := range at {
		if at[i].Before(start.Add(sum)) {
			t.Errorf("result %d came %v after the start, before the %v its probe was due", i, at[i].Sub(start), sum)
		}
		if ivs[i] < interval*3/4 || ivs[i] > interval*5/4 {
			t.Errorf("result %d: next probe after %v, want within %v ± 25%%", i, ivs[i], interval)
		}
		sum += ivs[i]
		if i > 0 {
			gap := at[i].Sub(at[i-1])
			gaps = append(gaps, gap.Round(100*time.Microsecond).String())
			if gap < interval*9/10 {
				short++
			}
		}
	}
	if short < 2 {
		t.Fatalf("%d of %d gaps between results below 0.9 x %v, want several (about 3 in 10): %s",
			short, len(gaps), interval, strings.Join(gaps, " "))
	}
	t.Logf("%d of %d gaps below 0.9 x %v: %s", short, len(gaps), interval, strings.Join(gaps, " "))
	if n := ln.ProbeAccepts(t); n != 0 {
		t.Fatalf("the listener accepted %d probe connections", n)
	}
}
