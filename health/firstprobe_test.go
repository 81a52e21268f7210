//go:build linux

package health

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// probeTimes is an Observer that records when each address had its first
// and second results, and closes done once every address has had two.
type probeTimes struct {
	mu     sync.Mutex
	want   int
	at     map[netip.AddrPort][]time.Time
	up     map[netip.AddrPort]bool // the first result's
	done   chan struct{}
	closed bool
}

func newProbeTimes(want int) *probeTimes {
	return &probeTimes{want: want, at: map[netip.AddrPort][]time.Time{}, up: map[netip.AddrPort]bool{}, done: make(chan struct{})}
}

func (p *probeTimes) Probed(res shaker.Result) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	ts := p.at[res.Addr]
	if len(ts) >= 2 {
		return
	}
	if len(ts) == 0 {
		p.up[res.Addr] = res.Outcome == shaker.Up
	}
	p.at[res.Addr] = append(ts, now)
	if !p.closed && len(p.at) == p.want {
		for _, ts := range p.at {
			if len(ts) < 2 {
				return
			}
		}
		p.closed = true
		close(p.done)
	}
}
func (p *probeTimes) Changed(Transition)       {}
func (p *probeTimes) LocalFailing(bool, error) {}

// TestFirstProbesAtOnce: new addresses, live and dead, are all probed at
// once (not spread over the interval), so none counts as up unprobed for
// longer than a round trip or the timeout; their second probes are
// spread over the interval, so that they do not stay in one burst.
func TestFirstProbesAtOnce(t *testing.T) {
	const (
		live, dead = 12, 4
		interval   = time.Second
	)
	l := testkit.NewListener(t, "tcp4", "0.0.0.0:0") // answers on every 127.x.y.z
	closed := testkit.FreePort(t)                    // nothing listens there
	_, r := engineRegistry(t)
	obs := newProbeTimes(live + dead)
	r.SetObserver(obs)
	set := Settings{Interval: interval, Timeout: 200 * time.Millisecond, Passes: 1, Fails: 1}
	var ws []Want
	for i := range live + dead {
		port := l.Addr.Port()
		if i >= live {
			port = uint16(closed)
		}
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}), port)
		ws = append(ws, Want{Addr: a, Name: a.String(), Settings: set})
	}
	cs, fresh := r.Acquire(ws)
	defer r.Release(ws)
	start := time.Now()
	r.Start(fresh)
	select {
	case <-obs.done:
	case <-time.After(20 * time.Second):
		t.Fatal("not every address had two results in 20 s")
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	var lastFirst time.Duration
	firstSecond, lastSecond := time.Duration(1<<62), time.Duration(0)
	for i, w := range ws {
		ts := obs.at[w.Addr]
		lastFirst = max(lastFirst, ts[0].Sub(start))
		firstSecond, lastSecond = min(firstSecond, ts[1].Sub(start)), max(lastSecond, ts[1].Sub(start))
		if wantUp := i < live; obs.up[w.Addr] != wantUp {
			t.Errorf("%v: first result up=%v, want %v", w.Addr, obs.up[w.Addr], wantUp)
		}
		if ts[1].Sub(ts[0]) > interval+interval/2 {
			t.Errorf("%v: second probe %v after the first, want at most about the interval %v", w.Addr, ts[1].Sub(ts[0]), interval)
		}
	}
	t.Logf("%d addresses: every first result within %v of Start; second results from %v to %v (interval %v)",
		len(ws), lastFirst, firstSecond, lastSecond, interval)
	// generous bounds: a loaded 2-core machine under -race
	if lastFirst > interval/4 {
		t.Errorf("last first result %v after Start, want them all at once (well within %v)", lastFirst, interval/4)
	}
	if spread := lastSecond - firstSecond; spread < interval/2 {
		t.Errorf("second probes spread over %v, want most of the interval %v", spread, interval)
	}
	for i, c := range cs {
		if i >= live && c.Healthy() {
			t.Errorf("%v: dead, still healthy after its probes", c.Addr())
		}
	}
	if n := l.ProbeAccepts(t); n != 0 && shaker.HalfOpen() { // the fallback connects in full
		t.Fatalf("the listener accepted %d probe connections", n)
	}
}

// TestFirstProbesPaced: a Start of many new addresses paces their first
// probes at the engine's Burst; a Start right after queues behind it.
func TestFirstProbesPaced(t *testing.T) {
	closed := uint16(testkit.FreePort(t)) // probes are refused at once
	wants := func(n int, base byte, set Settings) []Want {
		ws := make([]Want, n)
		for i := range ws {
			a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, base, byte(i >> 8), byte(i)}), closed)
			ws[i] = Want{Addr: a, Name: fmt.Sprint(a), Settings: set}
		}
		return ws
	}
	e, r := engineRegistry(t)
	set := Settings{Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1}
	b := e.Burst(set.Timeout)
	if b.Size < 1000 {
		t.Skipf("engine of %d sockets: too few for this test", 2*b.Size)
	}
	step := time.Duration(float64(time.Second) / b.Rate)
	ws := wants(1000, 1, set)
	_, fresh := r.Acquire(ws)
	defer r.Release(ws)
	before := Now()
	r.Start(fresh)
	after := Now()
	// the slots of 1000 first probes at the rate
	window := 1000 * step
	r.mu.Lock()
	next := r.pace.next
	r.mu.Unlock()
	if got := time.Duration(next - before); got < window || got > window+time.Duration(after-before) {
		t.Errorf("pacing free %v after Start, want %v (1000 at %v/s)", got, window, b.Rate)
	}

	// a second Start goes after the first one's slots (but for its
	// first address, whose spread slot is at once)
	ws2 := wants(10, 2, set)
	_, fresh2 := r.Acquire(ws2)
	defer r.Release(ws2)
	r.Start(fresh2)
	r.mu.Lock()
	next2 := r.pace.next
	r.mu.Unlock()
	if got, want := time.Duration(next2-next), 9*step; got < want {
		t.Errorf("second Start: pacing moved on by %v, want at least %v", got, want)
	}
}

// TestPacer: at most Rate a second, and at most Size within any Timeout.
func TestPacer(t *testing.T) {
	b := shaker.Burst{Rate: 1000, Size: 10, Timeout: time.Second} // 1 ms apart; 10 a second
	var p pacer
	const now = int64(time.Hour)
	var slots []time.Duration
	for range 25 {
		s := p.slot(now, b)
		p.take(s, b)
		slots = append(slots, time.Duration(s-now))
	}
	ms := time.Millisecond
	for i, s := range slots {
		want := time.Duration(i) * ms // the first 10 at the rate
		if i >= 10 {
			// then one every 100 ms: the (i-10)th after the first
			// 10 left the window of a timeout
			want = time.Duration(i-9) * 100 * ms
		}
		if s != want {
			t.Fatalf("slot %d at %v, want %v (all %v)", i, s, want, slots)
		}
	}
	// after a quiet timeout, a full burst again
	later := now + int64(10*time.Second)
	for i := range 10 {
		s := p.slot(later, b)
		p.take(s, b)
		if want := later + int64(i)*int64(ms); s != want {
			t.Fatalf("after a pause: slot %d at %v, want %v", i, time.Duration(s-later), time.Duration(want-later))
		}
	}
}

// TestFirstProbeSlots: a new checker's first probe goes at its paced slot
// or its spread slot, whichever is sooner; its second where the spread
// puts it, never more than an interval after the first.
func TestFirstProbeSlots(t *testing.T) {
	const iv = time.Second
	ms := time.Millisecond
	for _, c := range []struct {
		slot, spread  time.Duration
		first, second time.Duration
		paced         bool
	}{
		{0, 0, 0, iv, true},                          // the first of a Start: at once, then an interval
		{16 * ms, 500 * ms, 16 * ms, 484 * ms, true}, // paced; the second at the spread
		{0, 999 * ms, 0, 999 * ms, true},
		{600 * ms, 500 * ms, 500 * ms, iv, false}, // the rate is too low: the spread, as before
		{500 * ms, 500 * ms, 500 * ms, iv, true},
		{2 * iv, 0, 0, iv, false}, // queued behind another Start: the first still at once
	} {
		first, second, paced := firstProbe(c.slot, c.spread, iv)
		if first != c.first || second != c.second || paced != c.paced {
			t.Errorf("firstProbe(%v, %v): %v, %v, %v; want %v, %v, %v", c.slot, c.spread, first, second, paced, c.first, c.second, c.paced)
		}
	}
}

// TestAfterFirst: after a first probe sent early, the second goes at its
// spread slot, or sooner if the result asks for it (a short
// down_interval), but never in the past: a first probe that timed out
// moves its second on by whole intervals, so that the dead addresses of
// one Start are not probed in one burst ever after.
func TestAfterFirst(t *testing.T) {
	c := &Checker{set: Settings{Interval: time.Second}}
	ms := time.Millisecond
	for _, x := range []struct{ next, second, took, want time.Duration }{
		{time.Second, 0, 0, time.Second},              // not a first probe sent early
		{time.Second, 300 * ms, ms, 300 * ms},         // answered: at the spread
		{40 * ms, 300 * ms, ms, 40 * ms},              // down_interval sooner
		{2 * time.Second, 300 * ms, ms, 300 * ms},     // a longer down_interval: from the spread on
		{time.Second, 300 * ms, 500 * ms, 1300 * ms},  // timed out past the slot: the next one
		{time.Second, 300 * ms, 2500 * ms, 3300 * ms}, // a timeout of several intervals
		{40 * ms, 300 * ms, 500 * ms, 1300 * ms},      // a short down_interval would be past too
		{700 * ms, 300 * ms, 500 * ms, 700 * ms},      // a fast_interval not past: sooner
		{time.Second, time.Second, time.Second, 2 * time.Second},
	} {
		if got := c.afterFirst(x.next, x.second, x.took); got != x.want {
			t.Errorf("afterFirst(%v, %v, %v) = %v, want %v", x.next, x.second, x.took, got, x.want)
		}
	}
}

// TestFirstProbesLargePool measures how a Start of many new addresses
// sends their first probes: when the last one had its result, and the
// most started in any 10 ms. It runs only with HEALTH_FIRSTPROBE_N set
// (say 100000); HEALTH_FIRSTPROBE_SOCKETS sets the engine's max_sockets.
// Every address is on a loopback port nothing listens on: refused at once.
func TestFirstProbesLargePool(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("HEALTH_FIRSTPROBE_N"))
	if n <= 0 {
		t.Skip("set HEALTH_FIRSTPROBE_N to run")
	}
	if n > 1<<20 {
		t.Fatalf("HEALTH_FIRSTPROBE_N %d: at most %d", n, 1<<20)
	}
	sockets, _ := strconv.Atoi(os.Getenv("HEALTH_FIRSTPROBE_SOCKETS"))
	closed := uint16(testkit.FreePort(t))
	e, err := shaker.New(shaker.Options{MaxSockets: sockets})
	if err != nil {
		t.Fatal(err)
	}
	r := NewRegistry()
	r.SetEngine(e)
	defer func() {
		r.SetEngine(nil)
		e.Close()
	}()
	const bucket = 10 * time.Millisecond
	obs := &firstTimes{seen: make(map[netip.AddrPort]bool, n), want: n, done: make(chan struct{})}
	r.SetObserver(obs)
	set := Settings{Interval: 2 * time.Second, Timeout: time.Second, Passes: 1, Fails: 1}
	ws := make([]Want, n)
	for i := range ws {
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, byte(8 + i>>16), byte(i >> 8), byte(i)}), closed)
		ws[i] = Want{Addr: a, Name: a.String(), Settings: set}
	}
	_, fresh := r.Acquire(ws)
	defer r.Release(ws)
	obs.mu.Lock()
	obs.start = time.Now()
	obs.mu.Unlock()
	r.Start(fresh)
	took := time.Since(obs.start)
	select {
	case <-obs.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("%d first results of %d in 30 s", len(obs.seen), n)
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	peak, at := 0, 0
	for i, c := range obs.per {
		if c > peak {
			peak, at = c, i
		}
	}
	b := e.Burst(set.Timeout)
	t.Logf("%d new addresses (burst: %.0f/s, %d per %v; interval %v): Start took %v; last first result %v after it began; at most %d first probes sent in 10 ms (at %v), %.0f/s",
		n, b.Rate, b.Size, b.Timeout, set.Interval, took.Round(time.Millisecond), obs.last.Round(time.Millisecond), peak, time.Duration(at)*bucket, float64(peak)/bucket.Seconds())
}

// firstTimes is an Observer that counts first probes per 10 ms of their
// SYN's time.
type firstTimes struct {
	mu    sync.Mutex
	start time.Time
	seen  map[netip.AddrPort]bool
	per   []int
	last  time.Duration
	want  int
	done  chan struct{}
}

func (f *firstTimes) Probed(res shaker.Result) {
	d := time.Since(f.start)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seen[res.Addr] || len(f.seen) >= f.want {
		return
	}
	f.seen[res.Addr] = true
	i := int(max(d-res.Duration, 0) / (10 * time.Millisecond)) // by the SYN's time
	for len(f.per) <= i {
		f.per = append(f.per, 0)
	}
	f.per[i]++
	f.last = max(f.last, d)
	if len(f.seen) == f.want {
		close(f.done)
	}
}
func (f *firstTimes) Changed(Transition)       {}
func (f *firstTimes) LocalFailing(bool, error) {}
