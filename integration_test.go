//go:build linux

package caddyshaker

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

func TestIntegration(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	caddytest.ResetEvents()

	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]

	// (1) many probe intervals, no client traffic: nothing accepted
	st := h.waitProbes(nil, 20, 20*tInterval+2*time.Second)
	for _, b := range h.backends {
		s := st[b.addr]
		if !s.Healthy || s.LastError != "" || s.CheckedAt == nil || s.Upstream != b.addr {
			t.Errorf("%s: status %+v, want healthy", b.name, s)
		}
	}
	if n := h.probeAccepts(); n != 0 {
		t.Fatalf("(1) backends accepted %d connections from health probes alone", n)
	}
	if e := engines.cur.Load(); e == nil {
		t.Fatal("no engine")
	} else if d := e.Stats().MaxCloseDelay; d > 50*time.Millisecond {
		t.Errorf("engine MaxCloseDelay %v: probes close too late", d)
	}
	t.Logf("(1) %d probes per backend, 0 connections accepted", st[b1.addr].Probes)
	// the engine's startup self-check confirms it: probes here are half-open
	if es := h.awaitSelfCheck(); es.SelfCheck != checkOK || !es.HalfOpen {
		t.Fatalf("(1) self-check %q (%s), half_open %v: want ok, half-open", es.SelfCheck, es.SelfCheckError, es.HalfOpen)
	}
	h.checkMetrics("caddy_shaker_half_open 1")

	// (2) requests succeed and reach every backend
	seen := h.servedBy(60) // any answer but a 200 fails the test
	if len(seen) != 3 {
		t.Errorf("(2) requests reached %v, want all 3 backends", seen)
	}

	// (3) a stopped backend is marked down within interval x fails + timeout
	stopped := time.Now()
	b2.stop()
	bound := tInterval*tFails + tTimeout + tSlack
	down := waitFor(t, 5*time.Second, "b2 down", func() bool { return !h.statuses()[b2.addr].Healthy })
	t.Logf("(3) stopped backend marked down after %v (bound %v)", down, bound)
	if down > bound {
		t.Errorf("(3) marked down after %v, want <= %v", down, bound)
	}
	s := h.statuses()[b2.addr]
	if s.LastError != "refused" || s.Fails < tFails {
		t.Errorf("(3) status %+v, want last_error refused and fails >= %d", s, tFails)
	}
	waitEvent(t, "unhealthy", b2.addr, time.Second)
	_ = stopped
	h.checkMetrics(fmt.Sprintf(`caddy_shaker_upstream_healthy{address=%q} 0`, b2.addr),
		fmt.Sprintf(`caddy_shaker_upstream_healthy{address=%q} 1`, b1.addr),
		`caddy_shaker_probes_total{result="refused"}`,
		`caddy_shaker_probe_rtt_seconds_count`)
	if resp, err := http.Post("http://"+h.admin+"/shaker/upstreams", "application/json", nil); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /shaker/upstreams: %s, want 405", resp.Status)
	}
	for i := range 60 {
		code, body := h.get()
		if code != 200 || body == "b2" {
			t.Fatalf("(3) request %d after b2 marked down: %d %q", i, code, body)
		}
	}

	// (4) restarted, it is marked up after `passes` probes
	b2.start()
	before := h.statuses()[b2.addr].Probes
	up := waitFor(t, 5*time.Second, "b2 up", func() bool { return h.statuses()[b2.addr].Healthy })
	s = h.statuses()[b2.addr]
	t.Logf("(4) restarted backend marked up after %v (%d probes)", up, s.Probes-before)
	if s.Passes < tPasses {
		t.Errorf("(4) up with passes=%d, want >= %d", s.Passes, tPasses)
	}
	if got := s.Probes - before; got > tPasses+1 {
		t.Errorf("(4) up after %d probes, want %d", got, tPasses)
	}
	if bound := tInterval*tPasses + tSlack; up > bound {
		t.Errorf("(4) marked up after %v, want <= %v", up, bound)
	}
	waitEvent(t, "healthy", b2.addr, time.Second)

	// (5) config reloads while probing: nothing accepted, no fd or
	// goroutine growth, and a down backend stays down
	b3.stop()
	waitFor(t, 5*time.Second, "b3 down", func() bool { return !h.statuses()[b3.addr].Healthy })
	h.client.CloseIdleConnections()
	h.extraKnob++
	h.load(tInterval) // warm up whatever a reload creates once
	acc0 := h.probeAccepts()
	idle := http.DefaultTransport.(*http.Transport).CloseIdleConnections
	idle() // the admin API client's keep-alive connection
	fd0, g0 := testkit.CountFDs(t), runtime.NumGoroutine()
	probes0 := h.statuses()[b1.addr].Probes
	for i := range reloads {
		h.extraKnob++
		interval := tInterval
		if i%5 == 4 {
			interval = tInterval + time.Millisecond // new settings: new checkers inherit state
		}
		h.load(interval)
		if s := h.statuses()[b3.addr]; s.Healthy {
			t.Fatalf("(5) reload %d: stopped backend b3 looks up: %+v", i, s)
		}
		// let some probes run between reloads
		st := h.statuses()
		h.waitProbes(st, 1, 2*time.Second)
	}
	h.load(tInterval)
	if n := h.probeAccepts() - acc0; n != 0 {
		t.Errorf("(5) backends accepted %d connections during reloads", n)
	}
	if p := h.statuses()[b1.addr].Probes; p <= probes0 {
		t.Errorf("(5) probe count went from %d to %d: state lost at reload", probes0, p)
	}
	var fd1, g1 int
	waitFor(t, 5*time.Second, "fds and goroutines back to their count", func() bool {
		idle()
		fd1, g1 = testkit.CountFDs(t), runtime.NumGoroutine()
		return fd1 <= fd0 && g1 <= g0+1
	})
	t.Logf("(5) %d reloads: fds %d -> %d, goroutines %d -> %d, 0 accepted", reloads+1, fd0, fd1, g0, g1)
	if d := engines.cur.Load().Stats().MaxCloseDelay; d > 50*time.Millisecond {
		t.Errorf("engine MaxCloseDelay %v", d)
	}

	// no probe ever became a connection
	h.noLeakedProbes()
}

// TestShutdownLeavesNothing checks that stopping Caddy stops the engine,
// every checker and every goroutine, and that no backend accepted
// anything. Exactly: every fd and goroutine made since the test began is
// gone, but for Caddy's own that outlive caddy.Stop, each named below.
func TestShutdownLeavesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	fds0, err := fdTargets()
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	gs0 := goroutineStacks()
	h := newHarness(t, 2)
	h.waitProbes(nil, 5, 5*time.Second)
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if engines.cur.Load() != nil {
		t.Error("engine still running after caddy.Stop")
	}
	n := reg.Len()
	if n != 0 {
		t.Errorf("%d checkers left after caddy.Stop", n)
	}
	// counted past the kernel's window, while the backends still listen
	if a := probeAccepts(t, h.backends...); a != 0 {
		t.Errorf("backends accepted %d connections", a)
	}
	for _, b := range h.backends {
		b.stop()
	}
	// The test's own clients: h.client for the proxy, http.DefaultClient
	// (h.statuses) for the admin endpoint. Their connections' server ends
	// close once these do.
	h.client.CloseIdleConnections()
	http.DefaultClient.CloseIdleConnections()
	_, adminPort, _ := net.SplitHostPort(h.admin)
	port, _ := strconv.Atoi(adminPort)
	// Caddy's own, which caddy.Stop leaves running by design:
	//   - the admin endpoint: caddy.Stop stops the config's apps, and the
	//     admin server only goes with the process (caddy.exitProcess); its
	//     listener on h.admin and the goroutine serving it;
	//   - certmagic's lock-file keeper (keepLockfileFresh) of a storage
	//     lock Caddy took at start: it sees the lock released only when it
	//     next wakes, up to 5 s (lockFreshnessInterval) later.
	caddyFD := func(target string) bool { return isListener(target, port) }
	caddyNames := []string{
		"github.com/caddyserver/caddy/v2.replaceLocalAdminServer.func",
		"github.com/caddyserver/certmagic.keepLockfileFresh(",
	}
	caddyName := func(stack string) string {
		for _, name := range caddyNames {
			if strings.Contains(stack, name) {
				return strings.TrimSuffix(name, "(")
			}
		}
		return ""
	}
	caddyGoroutine := func(stack string) bool { return caddyName(stack) != "" }
	self := goroutineID()
	var fds, gs map[int]string
	left := func() bool {
		fds1, err := fdTargets()
		if err != nil {
			t.Fatal(err)
		}
		fds = newFDs(fds0, fds1)
		for fd, target := range fds {
			if caddyFD(target) {
				delete(fds, fd)
			}
		}
		gs = newGoroutines(gs0, goroutineStacks())
		for id, stack := range gs {
			if id == self || caddyGoroutine(stack) {
				delete(gs, id)
			}
		}
		return len(fds) == 0 && len(gs) == 0
	}
	// polled, not slept: goroutines of closed connections end on their own
	start := time.Now()
	for deadline := start.Add(10 * time.Second); !left(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("10 s after caddy.Stop, %d fds and %d goroutines made by the test are left\nfds:\n%s\ngoroutines:\n%s",
				len(fds), len(gs), describe(fds), describe(gs))
		}
	}
	var kept []string
	fds1, _ := fdTargets()
	for fd, target := range newFDs(fds0, fds1) {
		if caddyFD(target) {
			kept = append(kept, fmt.Sprintf("fd %d (%s, the admin listener)", fd, target))
		}
	}
	for id, stack := range newGoroutines(gs0, goroutineStacks()) {
		if id != self && caddyGoroutine(stack) {
			kept = append(kept, fmt.Sprintf("goroutine %d (%s)", id, caddyName(stack)))
		}
	}
	t.Logf("nothing of the test's left %v after caddy.Stop; Caddy's own: %s", time.Since(start).Round(time.Millisecond), strings.Join(kept, "; "))
}

// TestAllDown checks that with every backend down reverse_proxy answers
// 503, and that a backend never seen up is down from its first probe.
func TestAllDown(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 1)
	b := h.backends[0]
	b.stop()
	waitFor(t, 5*time.Second, "down", func() bool { return !h.statuses()[b.addr].Healthy })
	code, body := h.get()
	if code != http.StatusServiceUnavailable {
		t.Errorf("all down: got %d %q, want 503", code, strings.TrimSpace(body))
	}
}

// TestTimeoutMarksDown checks the timeout path: an up address whose
// accept queue fills up (the application hangs) drops SYNs; it goes down
// within interval x fails + timeout, with the reason "timeout after
// 100ms".
func TestTimeoutMarksDown(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	ap, fill := testkit.QueueListener(t, "127.0.0.1")
	addr := ap.String()
	h := newHarness(t, 1)
	hung := &backend{t: t, name: "hung", addr: addr}
	h.backends = append(h.backends, hung)
	h.load(tInterval)
	waitFor(t, 5*time.Second, "queue backend up", func() bool {
		s := h.statuses()[addr]
		return s.Healthy && s.Passes >= 1
	})
	fill()
	down := waitFor(t, 5*time.Second, "hung backend down", func() bool { return !h.statuses()[addr].Healthy })
	s := h.statuses()[addr]
	bound := tInterval*tFails + tTimeout + tSlack
	t.Logf("full accept queue: marked down after %v (bound %v): last_error %q", down, bound, s.LastError)
	if down > bound {
		t.Errorf("marked down after %v, want <= %v", down, bound)
	}
	if want := "timeout after " + tTimeout.String(); s.LastError != want {
		t.Errorf("last_error %q, want %q", s.LastError, want)
	}
	waitEvent(t, "unhealthy", addr, time.Second)
	for range 20 {
		if code, body := h.get(); code != 200 || body != "b1" {
			t.Fatalf("request: %d %q", code, body)
		}
	}
}

// TestHostnameAllAddresses checks that a host name is resolved to all
// its addresses and that each is probed and judged on its own: the name
// resolves to 127.0.0.1 and ::1, and the backend listens on 127.0.0.1 only.
func TestHostnameAllAddresses(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	if ln, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		ln.Close()
	}
	const name = "both.shaker-test.invalid"
	var answer atomic.Pointer[[]netip.Addr]
	answer.Store(&[]netip.Addr{netip.MustParseAddr("::1"), netip.MustParseAddr("127.0.0.1")})
	old := resolveFunc
	t.Cleanup(func() { resolveFunc = old }) // runs after Caddy stops
	resolveFunc = func(ctx context.Context, network, host string) ([]netip.Addr, error) {
		if host != name {
			return old(ctx, network, host)
		}
		return *answer.Load(), nil
	}
	h := newHarness(t, 1)
	b := h.backends[0]
	port := b.port()
	b.addr = name + ":" + port
	h.extra = map[string]any{"resolve_interval": "20ms"}
	h.load(tInterval)
	v4, v6 := "127.0.0.1:"+port, "[::1]:"+port
	waitFor(t, 5*time.Second, "both addresses probed, ::1 down", func() bool {
		st := h.statuses()
		s4, ok4 := st[v4]
		s6, ok6 := st[v6]
		return ok4 && ok6 && s4.Healthy && !s6.Healthy && s4.CheckedAt != nil &&
			s4.Upstream == b.addr && s6.Upstream == b.addr && s6.LastError == "refused"
	})
	for range 20 {
		if code, body := h.get(); code != 200 || body != "b1" {
			t.Fatalf("request: %d %q", code, body)
		}
	}

	// re-resolution: the name moves to 127.0.0.2 (nothing listens there)
	answer.Store(&[]netip.Addr{netip.MustParseAddr("127.0.0.2")})
	v2 := "127.0.0.2:" + port
	waitFor(t, 5*time.Second, "re-resolved to 127.0.0.2 only, down", func() bool {
		st := h.statuses()
		_, ok4 := st[v4]
		_, ok6 := st[v6]
		s2, ok2 := st[v2]
		return !ok4 && !ok6 && ok2 && !s2.Healthy
	})
	if code, _ := h.get(); code != http.StatusServiceUnavailable {
		t.Errorf("name moved to a dead address: got %d, want 503", code)
	}
}

// TestStopAndReloadWhileProbing loads and stops Caddy, and reloads it,
// while 40 addresses are probed every 5 ms (8,000 probes/s): probes in
// flight at a stop are aborted and their sockets closed at once, so no
// listener ever accepts a connection.
func TestStopAndReloadWhileProbing(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const n = 40
	var accepted atomic.Int64
	var ups []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				accepted.Add(1)
				c.Close()
			}
		}()
		ups = append(ups, ln.Addr().String())
	}
	cfg := func() []byte { // a new proxy port each time: each Load is a real reload
		b, _ := json.Marshal(map[string]any{
			"admin":   map[string]any{"disabled": true},
			"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
			"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"p": map[string]any{
				"listen":          []string{fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))},
				"automatic_https": map[string]any{"disable": true},
				"routes": []any{map[string]any{"handle": []any{map[string]any{
					"handler": "reverse_proxy",
					"dynamic_upstreams": map[string]any{
						"source": "shaker", "upstreams": ups, "interval": "5ms", "timeout": "5ms",
					},
				}}}},
			}}}},
		})
		return b
	}
	probes := func() uint64 {
		if e := engines.cur.Load(); e != nil {
			return e.Stats().Total()
		}
		return 0
	}
	for range 10 {
		if err := caddy.Load(cfg(), true); err != nil {
			t.Fatal(err)
		}
		// a reload in the middle of the probing
		waitFor(t, 5*time.Second, "probes", func() bool { return probes() > 2*n })
		if err := caddy.Load(cfg(), true); err != nil {
			t.Fatal(err)
		}
		p0 := probes()
		waitFor(t, 5*time.Second, "probes after reload", func() bool { return probes() > p0+2*n })
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		if engines.cur.Load() != nil {
			t.Fatal("engine running after Stop")
		}
	}
	// a leaked probe would be accepted about 200 ms after its SYN-ACK
	// (the kernel's delayed ACK): give it the time to show, bounded
	deadline := time.Now().Add(400 * time.Millisecond)
	for time.Now().Before(deadline) && accepted.Load() == 0 {
		time.Sleep(20 * time.Millisecond)
	}
	if a := accepted.Load(); a != 0 {
		t.Fatalf("listeners accepted %d connections", a)
	}
}

// TestFirstProbesSpread checks that new addresses are all probed at once
// (an address not probed yet counts as up: a dead one would get requests
// until its first probe), and that from the second probe on they are
// spread over the interval, not sent in one burst.
func TestFirstProbesSpread(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := &harness{
		t:      t,
		admin:  fmt.Sprintf("localhost:%d", testkit.FreePort(t)),
		proxy:  fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		client: &http.Client{Timeout: 5 * time.Second},
	}
	for i := range 4 {
		h.backends = append(h.backends, startBackend(t, fmt.Sprintf("b%d", i+1), "127.0.0.1:0"))
	}
	// long enough that polling sees each address at one probe and at
	// two: the second probes come at 1/4, 2/4, 3/4 and 4/4 of it
	const interval = 2 * time.Second
	loaded := time.Now()
	h.load(interval)
	t.Cleanup(func() { caddy.Stop() })
	// the time of each address's first and second results
	firsts, seconds := map[string]time.Time{}, map[string]time.Time{}
	waitFor(t, 3*interval, "two probes of every address", func() bool {
		for addr, s := range h.statuses() {
			if s.CheckedAt == nil {
				continue
			}
			if _, ok := firsts[addr]; !ok && s.Probes == 1 {
				firsts[addr] = *s.CheckedAt
			}
			if _, ok := seconds[addr]; !ok && s.Probes == 2 {
				seconds[addr] = *s.CheckedAt
			}
		}
		return len(seconds) == len(h.backends)
	})
	span := func(m map[string]time.Time) (first, last time.Time) {
		for _, c := range m {
			if first.IsZero() || c.Before(first) {
				first = c
			}
			if c.After(last) {
				last = c
			}
		}
		return first, last
	}
	if len(firsts) != len(h.backends) {
		t.Fatalf("saw the first result of %d addresses of %d", len(firsts), len(h.backends))
	}
	_, lastFirst := span(firsts)
	firstSecond, lastSecond := span(seconds)
	t.Logf("first probes: all within %v of the load; second probes spread over %v", lastFirst.Sub(loaded), lastSecond.Sub(firstSecond))
	// generous: about 100 ms is the intent, on a busy 2-core machine
	if d := lastFirst.Sub(loaded); d > interval/4 {
		t.Errorf("last first probe %v after load, want them all at once", d)
	}
	if d := lastSecond.Sub(firstSecond); d < interval/2 || d > interval+tSlack {
		t.Errorf("second probes spread over %v, want about 3/4 of %v", d, interval)
	}
	h.noLeakedProbes()
}

// TestFastInterval: with a fast_interval, a stopped backend is marked down
// within interval + (fails-1) x fast_interval + timeout, far sooner than
// interval x fails; with a down_interval, a down backend is probed at that
// pace.
func TestFastInterval(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const interval, fast, down = 600 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond
	h := newHarness(t, 2)
	h.extra = map[string]any{"fast_interval": fast.String(), "down_interval": down.String()}
	h.load(interval)
	b := h.backends[0]
	h.waitProbes(nil, 1, 5*time.Second)

	b.stop()
	took := waitFor(t, 10*time.Second, "backend down", func() bool { return !h.statuses()[b.addr].Healthy })
	bound := interval + (tFails-1)*fast + tTimeout + tSlack
	t.Logf("marked down after %v (bound %v; without fast_interval up to %v)", took, bound, interval*tFails+tTimeout)
	if took > bound {
		t.Errorf("marked down after %v, want <= %v", took, bound)
	}
	// Down: probed every down_interval, not every interval.
	before := h.statuses()
	start := time.Now()
	after := h.waitProbes(before, 5, 5*time.Second)
	per := time.Since(start) / time.Duration(after[b.addr].Probes-before[b.addr].Probes)
	t.Logf("while down: a probe every %v (down_interval %v, interval %v)", per, down, interval)
	if per >= interval/2 {
		t.Errorf("while down: a probe every %v, want about down_interval %v", per, down)
	}
	if s := h.statuses()[b.addr]; s.FastInterval != fast.String() || s.DownInterval != down.String() {
		t.Errorf("admin API: fast_interval %q down_interval %q", s.FastInterval, s.DownInterval)
	}
	if n := h.probeAccepts(); n != 0 {
		t.Fatalf("backends accepted %d connections", n)
	}
}

// TestPanicThresholdFailsOpen: when the probes say every address is down
// but the backends serve (here: the probes go to a closed port), the
// default answers 503 and panic_threshold sends the requests on.
func TestPanicThresholdFailsOpen(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	closed := testkit.FreePort(t) // nothing listens there
	h := newHarness(t, 2)
	h.extra = map[string]any{"port": closed}
	h.load(tInterval)
	// Both upstreams are probed at one address, 127.0.0.1 at the closed
	// port: one checker.
	allDown := func() bool {
		st := h.statuses()
		for _, s := range st {
			if s.Healthy {
				return false
			}
		}
		return len(st) == 1
	}
	waitFor(t, 5*time.Second, "every address down", allDown)
	if code, body := h.get(); code != http.StatusServiceUnavailable {
		t.Fatalf("default, all down: %d %q, want 503", code, body)
	}

	h.extra["panic_threshold"] = 0.5
	h.load(tInterval)
	for range 10 {
		if code, body := h.get(); code != 200 {
			t.Fatalf("panic_threshold 0.5, all down: %d %q, want the backends' 200", code, body)
		}
	}
	if !allDown() {
		t.Fatal("a reload made a down address look up")
	}
}
