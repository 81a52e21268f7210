//go:build linux

package caddyshaker

import (
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// sourceOn returns a source over n addresses 10.0.0.x:8080 of registry r
// (never given an engine: nothing is probed), all up.
func sourceOn(r *health.Registry, n int) (*Upstreams, []*health.Checker) {
	su := &Upstreams{sourceState: new(sourceState), logger: zap.NewNop()}
	ws := make([]health.Want, n)
	for i := range n {
		ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 8080)
		ws[i] = health.Want{Addr: ap, Name: ap.String(), Settings: health.Settings{
			Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1,
		}}
	}
	cs, _ := r.Acquire(ws)
	es := make([]entry, n)
	for i, c := range cs {
		setHealthy(c, true)
		es[i] = entry{dial: ws[i].Addr.String(), c: c}
	}
	su.snap.Store(&es)
	return su, cs
}

func dials(t *testing.T, su *Upstreams) map[string]bool {
	t.Helper()
	r, _ := http.NewRequest("GET", "/", nil)
	ups, err := su.GetUpstreams(r)
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]bool, len(ups))
	for _, u := range ups {
		m[u.Dial] = true
	}
	return m
}

// TestAdminStateFiltersUpstreams: drained and maintained addresses are
// left out, and panic_threshold neither counts them nor fails open to
// them.
func TestAdminStateFiltersUpstreams(t *testing.T) {
	r := health.NewRegistry()
	su, cs := sourceOn(r, 4)
	if _, err := r.SetAdminState(cs[0].Addr(), health.Drain); err != nil {
		t.Fatal(err)
	}
	if _, err := r.SetAdminState(cs[1].Addr(), health.Maint); err != nil {
		t.Fatal(err)
	}
	got := dials(t, su)
	if len(got) != 2 || !got["10.0.0.2:8080"] || !got["10.0.0.3:8080"] {
		t.Fatalf("drain 0, maint 1: %v", got)
	}
	// 1 of the 2 ready addresses up: 50%, not below a threshold of 0.5
	// (counting the drained and maintained ones would make it 25%)
	su.PanicThreshold = 0.5
	setHealthy(cs[3], false)
	if got := dials(t, su); len(got) != 1 || !got["10.0.0.2:8080"] || su.failOpen.on.Load() {
		t.Fatalf("threshold 0.5, 1 of 2 ready up: %v (panic %v)", got, su.failOpen.on.Load())
	}
	// none of the ready ones up: fail open to the ready ones only
	setHealthy(cs[2], false)
	if got := dials(t, su); len(got) != 2 || !got["10.0.0.2:8080"] || !got["10.0.0.3:8080"] || !su.failOpen.on.Load() {
		t.Fatalf("threshold 0.5, none ready up: %v (panic %v)", got, su.failOpen.on.Load())
	}
	// back to ready
	su.PanicThreshold = 0
	setHealthy(cs[2], true)
	setHealthy(cs[3], true)
	r.SetAdminState(cs[0].Addr(), health.Ready)
	if got := dials(t, su); len(got) != 3 || !got["10.0.0.0:8080"] {
		t.Fatalf("ready again: %v", got)
	}
}

// TestSlowStartShare: an address back in service is in a share of the
// results that grows linearly over slow_start; one that has served since
// its first result, always; and when the draw leaves out every address,
// they are all returned rather than none.
func TestSlowStartShare(t *testing.T) {
	const slow = time.Second
	now := health.Now() + int64(time.Hour) // far enough from 0 for every el below
	share := func(el time.Duration) float64 {
		in := 0
		const n = 20000
		for range n {
			if slowStartDraw(now-int64(el), now, slow) {
				in++
			}
		}
		return float64(in) / n
	}
	for _, tc := range []struct {
		el     time.Duration
		lo, hi float64
	}{
		{0, 0, 0},
		{100 * time.Millisecond, 0.07, 0.13},
		{500 * time.Millisecond, 0.45, 0.55},
		{900 * time.Millisecond, 0.87, 0.93},
		{slow, 1, 1},
		{time.Hour, 1, 1},
	} {
		if got := share(tc.el); got < tc.lo || got > tc.hi {
			t.Errorf("%v into a %v slow start: in %.3f of the calls, want %.2f-%.2f", tc.el, slow, got, tc.lo, tc.hi)
		}
	}
	if !slowStartDraw(0, now, slow) {
		t.Error("an address that never came back is always in")
	}

	r := health.NewRegistry()
	su, cs := sourceOn(r, 2)
	su.SlowStart = caddy.Duration(1000 * time.Hour)
	// both back in service just now: the draw leaves both out nearly
	// always, and then both are returned
	for _, c := range cs {
		setHealthy(c, false)
		setHealthy(c, true)
	}
	for range 100 {
		if got := dials(t, su); len(got) != 2 {
			t.Fatalf("both ramping from 0: %v, want both rather than none", got)
		}
	}
	// one ramping, the other not: the ramping one is (nearly) never in
	r2 := health.NewRegistry()
	su2, cs2 := sourceOn(r2, 2)
	su2.SlowStart = caddy.Duration(1000 * time.Hour)
	setHealthy(cs2[0], false)
	setHealthy(cs2[0], true)
	for range 100 {
		if got := dials(t, su2); got["10.0.0.0:8080"] || !got["10.0.0.1:8080"] {
			t.Fatalf("one ramping from 0 for 1000h: %v", got)
		}
	}
}

// TestAdminDrainMaintReady: through Caddy's admin API, a drained address
// gets no new requests while its probes go on; one in maintenance gets
// neither requests nor probes and its health is unknown; both survive
// config reloads; ready brings them back. The API's errors are exact, each
// change is one event, and no backend accepts a probe.
func TestAdminDrainMaintReady(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]
	h.waitProbes(nil, 1, 5*time.Second)

	// errors
	for _, tc := range []struct {
		method, path string
		code         int
		want         string
	}{
		{"GET", "/shaker/upstreams/" + b1.addr + "/drain", 405, "use POST"},
		{"PUT", "/shaker/upstreams/" + b1.addr + "/drain", 405, "use POST"},
		{"POST", "/shaker/upstreams/" + b1.addr, 405, "use GET"},
		{"POST", "/shaker/upstreams/" + b1.addr + "/disable", 400, `unknown action \"disable\": must be drain, maint or ready`},
		{"POST", "/shaker/upstreams/127.0.0.1:1/drain", 404, "address 127.0.0.1:1 is not probed"},
		{"POST", "/shaker/upstreams/[::1]:1/maint", 404, "address [::1]:1 is not probed"},
		{"POST", "/shaker/upstreams/backend.internal:80/drain", 400, `address \"backend.internal:80\"`},
		{"GET", "/shaker/upstreams/127.0.0.1:1", 404, "not probed"},
	} {
		code, body := h.adminDo(tc.method, tc.path)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("%s %s: %d %s, want %d with %q", tc.method, tc.path, code, body, tc.code, tc.want)
		}
	}
	if code, body := h.adminDo("GET", "/shaker/upstreams/"+b1.addr); code != 200 || !strings.Contains(body, `"admin_state":"ready"`) {
		t.Errorf("GET %s: %d %s", b1.addr, code, body)
	}

	seen := len(caddytest.Events()) // events of earlier tests

	// drain b1: no new requests, probes go on
	h.setAdmin(b1, "drain")
	waitEvent(t, "admin_state_changed", b1.addr, 5*time.Second)
	before := h.statuses()
	got := h.servedBy(60)
	if got["b1"] != 0 || got["b2"] == 0 || got["b3"] == 0 {
		t.Fatalf("b1 drained: requests went to %v", got)
	}
	after := h.waitProbes(before, 3, 5*time.Second)
	if s := after[b1.addr]; !s.Healthy || s.Health != "up" || s.AdminState != "drain" {
		t.Fatalf("drained b1: %+v", s)
	}
	h.setAdmin(b1, "drain") // no change: 200 and no second event

	// maint b2: no requests, no probes, health unknown
	s := h.setAdmin(b2, "maint")
	if s.Healthy || s.Health != "unknown" {
		t.Fatalf("b2 in maintenance: %+v", s)
	}
	n2, n3 := h.statuses()[b2.addr].Probes, h.statuses()[b3.addr].Probes
	// b3 probed 5 more times: b2 would have been too, were it probed
	waitFor(t, 5*time.Second, "5 probes of b3", func() bool { return h.statuses()[b3.addr].Probes >= n3+5 })
	if p := h.statuses()[b2.addr].Probes; p > n2+1 { // one in flight at the change may end
		t.Fatalf("b2 in maintenance: %d probes since", p-n2)
	}
	if got := h.servedBy(30); got["b3"] != 30 {
		t.Fatalf("b1 drained, b2 in maintenance: requests went to %v", got)
	}

	// both survive a reload
	h.extraKnob++
	h.load(tInterval)
	st := h.statuses()
	if st[b1.addr].AdminState != "drain" || st[b2.addr].AdminState != "maint" || st[b3.addr].AdminState != "ready" {
		t.Fatalf("after a reload: %s %s %s", st[b1.addr].AdminState, st[b2.addr].AdminState, st[b3.addr].AdminState)
	}
	if got := h.servedBy(30); got["b3"] != 30 {
		t.Fatalf("after a reload: requests went to %v", got)
	}

	// ready: back into service; b2 after its first probe
	h.setAdmin(b1, "ready")
	h.setAdmin(b2, "ready")
	waitFor(t, 5*time.Second, "b2 up after maintenance", func() bool { return h.statuses()[b2.addr].Health == "up" })
	waitFor(t, 5*time.Second, "requests to every backend", func() bool {
		got := h.servedBy(30)
		return got["b1"] > 0 && got["b2"] > 0 && got["b3"] > 0
	})
	changes := 0
	for _, e := range caddytest.Events()[seen:] {
		if e.Name == "admin_state_changed" && (e.Host == b1.addr || e.Host == b2.addr) {
			changes++
		}
	}
	if changes != 4 {
		t.Errorf("%d admin_state_changed events for b1 and b2, want 4 (drain, maint, ready, ready)", changes)
	}
	h.noLeakedProbes()
}

// TestSlowStartRamp: with slow_start, a backend that comes back gets a
// share of requests that grows over the ramp, measured by its own count of
// requests served, in thirds of the ramp.
func TestSlowStartRamp(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const ramp = 3 * time.Second
	h := newHarness(t, 2)
	h.extra = map[string]any{"slow_start": ramp.String()}
	h.load(tInterval)
	b1 := h.backends[0]
	h.waitProbes(nil, 1, 5*time.Second)
	b1.stop()
	waitFor(t, 5*time.Second, "b1 down", func() bool { return !h.statuses()[b1.addr].Healthy })
	b1.start()
	waitFor(t, 5*time.Second, "b1 up", func() bool { return h.statuses()[b1.addr].Healthy })
	back := *h.statuses()[b1.addr].Since // when it came back: the ramp's start
	// requests over the ramp and as long again after it, counted by thirds
	// of the ramp from its start
	var n, b1n [6]int
	deadline := back.Add(2 * ramp)
	for sent := 0; time.Now().Before(deadline) && sent < 200000; sent++ {
		code, body := h.get()
		at := time.Since(back)
		if code != 200 {
			t.Fatalf("request: %d %q", code, body)
		}
		i := int(at * 3 / ramp)
		if i >= len(n) {
			break
		}
		n[i]++
		if body == "b1" {
			b1n[i]++
		}
	}
	var share [6]float64
	for i := range n {
		if n[i] < 50 {
			t.Fatalf("only %d requests in sixth %d of the run: %v", n[i], i, n)
		}
		share[i] = float64(b1n[i]) / float64(n[i])
	}
	t.Logf("b1's share by thirds of a %v ramp: %.3f", ramp, share)
	// Random selection between two: b1's full share is 1/2; over the
	// ramp's thirds it averages 1/12, 3/12 and 5/12. Bounds are 4
	// standard deviations of each sixth's count, so that only a ramp
	// that is wrong fails.
	expect := [6]float64{1. / 12, 3. / 12, 5. / 12, 0.5, 0.5, 0.5}
	for i, p := range expect {
		sd := math.Sqrt(p * (1 - p) / float64(n[i]))
		if math.Abs(share[i]-p) > 4*sd+0.02 {
			t.Errorf("third %d of the ramp: b1's share %.3f of %d requests, want %.3f +- %.3f", i+1, share[i], n[i], p, 4*sd+0.02)
		}
	}
}

// TestFailedRequestProbes: a request that fails against an address, and is
// retried, gets that address probed at once and then at fast_interval, so
// it is marked down long before its interval would have.
func TestFailedRequestProbes(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const interval, fast = time.Minute, 20 * time.Millisecond
	h := newHarness(t, 2)
	h.extra = map[string]any{"fast_interval": fast.String()}
	h.handler = map[string]any{"load_balancing": map[string]any{"retries": 2}}
	h.load(interval)
	b1 := h.backends[0]
	// random selection may pick b1 again on every retry: a 502 is possible
	h.failedRequestProbes(interval, fast, 1000, func(code int, body string) error {
		if code != 502 && (code != 200 || body != "b2") {
			return fmt.Errorf("request: %d %q, want b2's 200 or a 502", code, body)
		}
		return nil
	})
	if s := h.statuses()[b1.addr]; s.LastError != "refused" {
		t.Errorf("b1: last error %q, want refused", s.LastError)
	}
	h.noLeakedProbes()
}
