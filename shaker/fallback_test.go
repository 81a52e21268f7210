//go:build !linux || shaker_fallback

package shaker

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// The fallback engine, for systems without TCP_QUICKACK. On Linux these
// tests run with -tags shaker_fallback.

func listen(t *testing.T) (net.Listener, netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, ln.Addr().(*net.TCPAddr).AddrPort()
}

func TestFallbackOutcomes(t *testing.T) {
	if HalfOpen() {
		t.Fatal("HalfOpen() true for the fallback engine")
	}
	e, err := New(Options{MaxSockets: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	_, open := listen(t)
	ln, closed := listen(t)
	ln.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r := e.Probe(ctx, open); r.Err != nil || r.RTT <= 0 {
		t.Fatalf("open port: %+v", r)
	}
	if r := e.Probe(ctx, closed); !errors.Is(r.Err, ErrRefused) {
		t.Fatalf("closed port: %v, want ErrRefused", r.Err)
	}
	if r := e.Probe(ctx, netip.AddrPort{}); r.Err == nil {
		t.Fatal("invalid address: no error")
	}
	// Beyond the cap, probes queue and all complete.
	var wg sync.WaitGroup
	var mu sync.Mutex
	up := 0
	wg.Add(20)
	for i := 0; i < 20; i++ {
		e.ProbeAsync(open, time.Second, func(r Result) {
			mu.Lock()
			if r.Err == nil {
				up++
			}
			mu.Unlock()
			wg.Done()
		})
	}
	wg.Wait()
	if up != 20 {
		t.Fatalf("%d of 20 queued probes up", up)
	}
	if s := e.Stats(); s.Up != 21 || s.Refused != 1 || s.InFlight != 0 || s.Queued != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// TestFallbackSelfCheck: a full connect is accepted, and SelfCheck says so.
func TestFallbackSelfCheck(t *testing.T) {
	e, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.SelfCheck(context.Background()); !errors.Is(err, ErrNotHalfOpen) {
		t.Fatalf("SelfCheck with full-connect probes: %v, want ErrNotHalfOpen", err)
	}
}

func TestFallbackClose(t *testing.T) {
	e, err := New(Options{MaxSockets: 1})
	if err != nil {
		t.Fatal(err)
	}
	_, open := listen(t)
	var wg sync.WaitGroup
	calls := make([]int, 50)
	var mu sync.Mutex
	wg.Add(len(calls))
	for i := range calls {
		e.ProbeAsync(open, time.Second, func(r Result) {
			mu.Lock()
			calls[i]++
			mu.Unlock()
			wg.Done()
		})
	}
	e.Close()
	wg.Wait()
	for i, n := range calls {
		if n != 1 {
			t.Fatalf("done of probe %d called %d times", i, n)
		}
	}
	if r := e.Probe(context.Background(), open); !errors.Is(r.Err, ErrClosed) {
		t.Fatalf("Probe after Close: %v", r.Err)
	}
}

// TestFallbackScheduleNow: Now starts the next probe at once.
func TestFallbackScheduleNow(t *testing.T) {
	_, addr := listen(t)
	e, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	results := make(chan Result, 4)
	s := e.Every(addr, Period{Interval: time.Hour, First: time.Hour}, func(r Result) time.Duration {
		results <- r
		return 0
	})
	defer s.Stop()
	for i := 0; i < 2; i++ {
		// Now does nothing while a probe is in flight, and the last one is
		// until its callback has returned and re-armed the schedule,
		// which nothing signals: ask again, boundedly, until a result
		// comes (an hour's interval would bring none on its own)
		deadline := time.After(10 * time.Second)
		for got := false; !got; {
			s.Now()
			select {
			case r := <-results:
				if r.Err != nil {
					t.Fatal(r.Err)
				}
				got = true
			case <-time.After(20 * time.Millisecond):
			case <-deadline:
				t.Fatalf("no result %d within 10s of Now", i+1)
			}
		}
	}
}
