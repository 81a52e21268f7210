package health

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// orderObserver records what it is told, in the order it is told.
type orderObserver struct {
	mu   sync.Mutex
	seen []string // "up", "down", "failing", "working"
	// gate, when not nil, holds the first call until it is closed;
	// entered is closed when that call has begun.
	gate, entered chan struct{}
	once          sync.Once
}

func (o *orderObserver) record(s string) {
	if o.gate != nil {
		o.once.Do(func() { close(o.entered); <-o.gate })
	}
	o.mu.Lock()
	o.seen = append(o.seen, s)
	o.mu.Unlock()
}

func (o *orderObserver) Probed(shaker.Result) {}

func (o *orderObserver) Changed(t Transition) {
	if t.Up {
		o.record("up")
	} else {
		o.record("down")
	}
}

func (o *orderObserver) LocalFailing(failing bool, _ error) {
	if failing {
		o.record("failing")
	} else {
		o.record("working")
	}
}

func (o *orderObserver) got() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.seen...)
}

var localErr = shaker.Result{Err: fmt.Errorf("socket: %w", errors.Join(syscall.EMFILE, shaker.ErrLocal)), Outcome: shaker.Local}

// flip feeds c results that flip its health n times, and this host's
// probes between failing and working at each flip, and returns what the
// observer must be told, in order.
func flip(t *testing.T, c *Checker, n int) []string {
	t.Helper()
	var want []string
	for i := range n {
		res, s := refused, "down"
		if i%2 == 1 {
			res, s = up, "up"
		}
		c.Observe(res)
		if c.Healthy() != (s == "up") {
			t.Fatalf("flip %d: healthy %v", i, c.Healthy())
		}
		want = append(want, s)
		c.Observe(localErr)
		if !c.r.LocalFailing() {
			t.Fatalf("flip %d: a local error did not count as failing", i)
		}
		want = append(want, "failing")
		// a result of a probe started after the local failure: working
		r := up
		if i%2 == 0 {
			r = refused
		}
		r.Duration = -time.Second // started after it, whatever the clock's grain
		c.Observe(r)
		if c.r.LocalFailing() {
			t.Fatalf("flip %d: still failing after a probe worked", i)
		}
		want = append(want, "working")
	}
	return want
}

// TestAnnounceInOrder: many flips of one checker, and of this host's
// probes failing and working, reach the observer in the order they
// happened, one call at a time. LocalFailing once ran on a goroutine per
// flip: "failing" and "working" came out in any order.
func TestAnnounceInOrder(t *testing.T) {
	c := testChecker(t, 1, 1)
	o := &orderObserver{}
	c.r.SetObserver(o)
	want := flip(t, c, 500)
	c.r.waitAnnounced()
	got := o.got()
	if len(got) != len(want) {
		t.Fatalf("observer told %d things, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("observer's call %d: %q, want %q (calls %d-%d: %v)", i, got[i], want[i], max(i-3, 0), i+3, got[max(i-3, 0):min(i+4, len(got))])
		}
	}
}

// TestAnnouncerStopsWithRegistry: SetEngine(nil), the registry's stop,
// returns only once the observer has been told everything queued before
// it, and the announcer goroutine has ended; it did not wait before.
func TestAnnouncerStopsWithRegistry(t *testing.T) {
	c := testChecker(t, 1, 1)
	r := c.r
	e, err := shaker.New(shaker.Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	r.SetEngine(e)
	o := &orderObserver{gate: make(chan struct{}), entered: make(chan struct{})}
	r.SetObserver(o)
	want := flip(t, c, 50)
	<-o.entered // the announcer is held in the observer's first call

	stopped := make(chan struct{})
	go func() {
		r.SetEngine(nil)
		close(stopped)
	}()
	// Not a synchronisation: the time SetEngine(nil) is given to return
	// wrongly, with the observer still being called.
	select {
	case <-stopped:
		t.Fatal("SetEngine(nil) returned while the announcer was still handing news to the observer")
	case <-time.After(100 * time.Millisecond):
	}
	close(o.gate)
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("SetEngine(nil) did not return once the observer was released")
	}
	if got := o.got(); len(got) != len(want) {
		t.Fatalf("after SetEngine(nil): observer told %d things, want %d", len(got), len(want))
	}
	r.qmu.Lock()
	running, queued := r.announcing, len(r.queue)
	r.qmu.Unlock()
	if running || queued != 0 {
		t.Fatalf("after SetEngine(nil): announcer running %v, %d queued", running, queued)
	}
}
