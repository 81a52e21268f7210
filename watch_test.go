//go:build linux

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
		watchEngine(stats, func() *zap.Logger { return logger }, stop, time.Millisecond, 50*time.Millisecond)
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

// TestWatchLateness: one warning when probes start running late (however
// long the episode lasts), one info line when they are on time again, and
// again for a new episode.
func TestWatchLateness(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	logger := zap.New(core)
	var late atomic.Uint64
	var lateNow atomic.Bool // while set, each check finds new late probes
	var reads atomic.Int64
	stats := func() shaker.Stats {
		reads.Add(1)
		if lateNow.Load() {
			late.Add(5)
		}
		return shaker.Stats{Late: late.Load(), Lag: 300 * time.Millisecond, Overdue: 7, Loops: 2}
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		watchEngine(stats, func() *zap.Logger { return logger }, stop, time.Millisecond, 50*time.Millisecond)
	}()
	waitReads := func(n int64) {
		target := reads.Load() + n
		waitFor(t, 5*time.Second, "watcher reads", func() bool { return reads.Load() >= target })
	}
	count := func(msg string) int { return logs.FilterMessage(msg).Len() }
	const warnMsg = "probes starting late: addresses are probed less often than configured and failures are seen later; " +
		"give Caddy more CPU, raise loops (one per core), raise max_sockets if it is reached, or probe less often"
	waitReads(2)
	if logs.Len() != 0 {
		t.Fatalf("on time: %d log lines", logs.Len())
	}
	// An episode: late probes in several checks in a row.
	lateNow.Store(true)
	waitReads(5)
	lateNow.Store(false)
	if n := count(warnMsg); n != 1 {
		t.Fatalf("one episode: %d warnings, want 1", n)
	}
	w := logs.FilterMessage(warnMsg).All()[0]
	if w.ContextMap()["overdue"] != int64(7) || w.ContextMap()["lag"] != 300*time.Millisecond {
		t.Fatalf("warning fields %v", w.ContextMap())
	}
	// On time again.
	waitReads(3)
	if n := count("probes on time again"); n != 1 {
		t.Fatalf("after the episode: %d on-time lines, want 1", n)
	}
	// A second episode.
	lateNow.Store(true)
	waitReads(3)
	lateNow.Store(false)
	close(stop)
	<-done
	if n := count(warnMsg); n != 2 {
		t.Fatalf("two episodes: %d warnings, want 2", n)
	}
}
