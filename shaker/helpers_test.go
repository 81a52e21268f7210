//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func newEngine(t testing.TB, opts Options) *Engine {
	t.Helper()
	e, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// probeCtx is a context for one blocking probe in tests.
func probeCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// holder is a done callback that holds the loop running it until release
// is closed, or within has passed (bounded, so that a failing test does
// not hang the loop); entered is closed once the loop is in it.
func holder(within time.Duration) (entered, release chan struct{}, done func(Result)) {
	entered, release = make(chan struct{}), make(chan struct{})
	return entered, release, func(Result) {
		close(entered)
		select {
		case <-release:
		case <-time.After(within):
		}
	}
}

// holdLoop holds the loop of addr in the callback of a probe of addr
// (holder), and returns once it is held, failing the test if it is not
// within that time; release, which the test's cleanup calls too, lets
// the loop go.
func holdLoop(t testing.TB, e *Engine, addr netip.AddrPort, within time.Duration) (release func()) {
	t.Helper()
	entered, ch, done := holder(within)
	release = sync.OnceFunc(func() { close(ch) })
	t.Cleanup(release)
	e.ProbeAsync(addr, within, done)
	select {
	case <-entered:
	case <-time.After(within):
		t.Fatalf("the callback of a probe of %v, to hold its loop, did not run in %v", addr, within)
	}
	return release
}
