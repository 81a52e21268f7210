package caddyshaker

import (
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestWatchCloseDelay: a warning when the worst SYN-ACK-to-close delay
// passes the threshold, again only when it grows, none below it.
func TestWatchCloseDelay(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	logger := zap.New(core)
	var worst atomic.Int64
	var reads atomic.Int64
	stats := func() shaker.Stats {
		reads.Add(1)
		return shaker.Stats{MaxCloseDelay: time.Duration(worst.Load())}
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		watchCloseDelay(stats, func() *zap.Logger { return logger }, stop, time.Millisecond, 50*time.Millisecond)
	}()
	// waitReads waits until the watcher has read the stats n more times.
	waitReads := func(n int64) {
		target := reads.Load() + n
		waitFor(t, 5*time.Second, "watcher reads", func() bool { return reads.Load() >= target })
	}
	for _, step := range []struct {
		worst time.Duration
		warns int
	}{
		{10 * time.Millisecond, 0},  // below the threshold
		{50 * time.Millisecond, 0},  // at it
		{80 * time.Millisecond, 1},  // past it: warn
		{80 * time.Millisecond, 1},  // no change: no new warning
		{70 * time.Millisecond, 1},  // (cannot shrink in the engine; ignored)
		{150 * time.Millisecond, 2}, // worse: warn again
	} {
		worst.Store(int64(step.worst))
		waitReads(2)
		if got := logs.Len(); got != step.warns {
			t.Fatalf("worst %v: %d warnings, want %d", step.worst, got, step.warns)
		}
	}
	close(stop)
	<-done
	last := logs.All()[logs.Len()-1]
	if last.ContextMap()["worst_synack_to_close"] != 150*time.Millisecond {
		t.Fatalf("warning fields %v", last.ContextMap())
	}
}
