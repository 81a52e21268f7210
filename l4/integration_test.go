package shakerl4

import (
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/caddyhome"
)

// detect bounds how long an address takes to go down once it stops
// answering: interval x fails + timeout, with slack for a busy machine.
const detect = tInterval*tFails + tTimeout + 3*time.Second

// TestL4Integration runs caddy-l4's layer4 app and proxy handler with
// the shaker policy (inner round_robin) in front of two counting
// backends: probes alone leave no connection on them; a killed backend is
// never chosen once it is down; traffic returns when it comes back; a
// config reload keeps the health state (the backend still down is not
// chosen right after it, as it would be if it counted as not probed yet).
func TestL4Integration(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	h := newHarness(t)
	cfg := shakerProxy(map[string]any{"inner": map[string]any{"policy": "round_robin"}}, []string{b1.addr}, []string{b2.addr})
	h.load(cfg)

	// (1) many probe intervals, no client: the probes are answered
	h.waitProbes(20, 20*tInterval+5*time.Second, b1.addr, b2.addr)
	for _, b := range []*backend{b1, b2} {
		if st := h.statuses()[b.addr]; !st.Healthy || st.LastError != "" {
			t.Fatalf("(1) %s: %+v, want healthy", b.name, st)
		}
	}

	// (2) round robin over both
	if got := spread(h, 40); got["b1"] != 20 || got["b2"] != 20 {
		t.Fatalf("(2) connections answered %v, want 20 by each", got)
	}

	// (3) b1 killed: once it is down, never chosen
	before := eventCount("unhealthy", b1.addr)
	b1.stop()
	took := waitEvent(t, "unhealthy", b1.addr, before, detect)
	t.Logf("(3) b1 down %v after it stopped", took.Round(time.Millisecond))
	if got := spread(h, 100); got["b2"] != 100 {
		t.Fatalf("(3) b1 down: connections answered %v, want all 100 by b2", got)
	}

	// (4) b1 back: traffic returns to it
	before = eventCount("healthy", b1.addr)
	b1.start()
	waitEvent(t, "healthy", b1.addr, before, detect)
	if got := spread(h, 40); got["b1"] != 20 || got["b2"] != 20 {
		t.Fatalf("(4) b1 back: connections answered %v, want 20 by each", got)
	}

	// (5) b1 down again, then reloads: its state is kept, so it is not
	// chosen right after a reload
	before = eventCount("unhealthy", b1.addr)
	b1.stop()
	waitEvent(t, "unhealthy", b1.addr, before, detect)
	transitions := h.statuses()[b1.addr].Transitions
	for i := range 5 {
		h.load(cfg)
		if got := spread(h, 20); got["b2"] != 20 {
			t.Fatalf("(5) reload %d: connections answered %v right after it, want all 20 by b2", i, got)
		}
	}
	if st := h.statuses()[b1.addr]; st.Healthy || st.Transitions != transitions {
		t.Fatalf("(5) after the reloads b1 is %+v, want down with %d transitions (state kept)", st, transitions)
	}
	probes := h.statuses()[b2.addr].Probes

	// (6) nothing probes any more: no probe was accepted
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	empty := emptyAccepts(t, b1, b2)
	t.Logf("(6) b2 probed %d times; connections accepted without a byte: %v; client connections answered: b1 %d, b2 %d",
		probes, empty, b1.served.Load(), b2.served.Load())
	for name, n := range empty {
		if n != 0 {
			t.Errorf("(6) %s accepted %d connections that carried nothing: probes leaked", name, n)
		}
	}
}

// TestL4MultiDial: an upstream with two dial addresses (caddy-l4 dials
// both and tees the stream) is out of service when one of them is down:
// every connection then goes to the other upstream, and the live dial of
// the first gets nothing. (b2 answers nothing: caddy-l4 v0.1.2 writes the
// answers of teed peers to the client from two goroutines at once, a data
// race of its own that -race reports.)
func TestL4MultiDial(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	b1, b2, b3 := startBackend(t, "b1"), startBackendSilent(t, "b2", true), startBackend(t, "b3")
	h := newHarness(t)
	h.load(shakerProxy(map[string]any{"inner": map[string]any{"policy": "round_robin"}}, []string{b1.addr, b2.addr}, []string{b3.addr}))
	h.waitProbes(3, detect, b1.addr, b2.addr, b3.addr)

	if got := spread(h, 20); got["b1"] != 10 || got["b3"] != 10 || b2.served.Load() != 10 {
		t.Fatalf("connections answered %v, b2 dialled %d times; want 10 by b1 (teed to b2 too) and 10 by b3", got, b2.served.Load())
	}

	before := eventCount("unhealthy", b2.addr)
	b2.stop()
	waitEvent(t, "unhealthy", b2.addr, before, detect)
	served := b1.served.Load()
	if got := spread(h, 40); got["b3"] != 40 {
		t.Fatalf("b2 down: connections answered %v, want all 40 by b3", got)
	}
	if n := b1.served.Load() - served; n != 0 {
		t.Fatalf("b2 down: b1, the other dial of its upstream, got %d connections", n)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	for name, n := range emptyAccepts(t, b1, b2, b3) {
		if n != 0 {
			t.Errorf("%s accepted %d connections that carried nothing: probes leaked", name, n)
		}
	}
}

// TestL4PassThrough: dial addresses that cannot be probed (a placeholder
// left for the connection, a Unix socket, UDP) are passed through with a
// warning that names them; a placeholder known at load ({env.*}) is
// replaced, as caddy-l4 replaces it, and probed.
func TestL4PassThrough(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	t.Setenv("SHAKER_L4_TEST_BACKEND", b2.addr)
	unprobed := []string{"{l4.vars.shaker_test_target}", "unix//tmp/shaker-l4-test-none.sock", "udp/127.0.0.1:9"}
	h := newHarness(t)
	h.load(shakerProxy(map[string]any{"inner": map[string]any{"policy": "first"}},
		[]string{b1.addr}, []string{"{env.SHAKER_L4_TEST_BACKEND}"}, unprobed[:1], unprobed[1:2], unprobed[2:]))
	h.waitProbes(3, detect, b1.addr, b2.addr)
	if got := spread(h, 5); got["b1"] != 5 {
		t.Fatalf("connections answered %v, want all 5 by b1 (first)", got)
	}
	l := h.logged("cannot be probed")
	if l == nil {
		t.Fatalf("no warning for the dial addresses that cannot be probed; logged: %v", h.logs())
	}
	if l["level"] != "warn" {
		t.Errorf("logged at %v, want warn", l["level"])
	}
	var dials []string
	for _, d := range l["dials"].([]any) {
		dials = append(dials, d.(string))
	}
	if !slices.Equal(dials, unprobed) {
		t.Errorf("warning names %v, want %v", dials, unprobed)
	}
	if st := h.statuses(); len(st) != 2 {
		t.Errorf("addresses probed: %v, want only b1 and b2 (%s, %s)", st, b1.addr, b2.addr)
	}
}

// TestL4FailedDialProbesNow: with lb_try_duration, caddy-l4 calls Select
// again for the same connection after a failed dial; the upstream this
// policy chose before for that connection is then probed at once, and the
// connection is answered by the other upstream (round robin goes on to
// it). The probes go to another
// port (port), a live one, so that the probes' schedule cannot take the
// upstream down first: the failed dial alone is what asks for the probe.
func TestL4FailedDialProbesNow(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	b1, b2, probed := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "probed")
	_, port, _ := net.SplitHostPort(probed.addr)
	h := newHarness(t)
	h.level = "DEBUG" // the probe asked for is logged at debug
	cfg := shakerProxy(map[string]any{
		"inner": map[string]any{"policy": "round_robin"},
	}, []string{b1.addr}, []string{b2.addr})
	cfg["load_balancing"].(map[string]any)["selection"].(map[string]any)["port"], _ = strconv.Atoi(port)
	lb := cfg["load_balancing"].(map[string]any)
	lb["try_duration"], lb["try_interval"] = "2s", "10ms"
	h.load(cfg)
	if got := spread(h, 2); got["b1"] != 1 || got["b2"] != 1 {
		t.Fatalf("connections answered %v, want one by each", got)
	}
	b1.stop()
	// round robin chooses b1 for one of these two: its dial fails, and
	// the retry goes on to b2
	if got := spread(h, 2); got["b2"] != 2 {
		t.Fatalf("b1 stopped: connections answered %v, want both by b2 (one after a retry)", got)
	}
	var l map[string]any
	waitFor(t, 5*time.Second, "the probe of the failed upstream logged", func() bool {
		l = h.logged("probing the upstream now")
		return l != nil
	})
	if l["upstream"] != b1.addr {
		t.Errorf("probe now logged for %v, want b1 (%s): %v", l["upstream"], b1.addr, l)
	}
	for _, other := range h.logs() {
		if s, _ := other["msg"].(string); strings.Contains(s, "probing the upstream now") && other["upstream"] != b1.addr {
			t.Errorf("probe now for %v: only b1 failed", other["upstream"])
		}
	}
}

// TestL4ProbeAcceptsCompared runs the same scenario (two backends, no
// clients, the same interval) with the shaker policy and with caddy-l4's
// own active checks, and counts the connections each leaves on the
// backends: none for the probes, one per check for caddy-l4's. With both
// configured, a warning says that both run.
func TestL4ProbeAcceptsCompared(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const (
		interval = 100 * time.Millisecond
		run      = 3 * time.Second
	)
	count := func(name string, proxy func(b1, b2 *backend) map[string]any) int64 {
		b1, b2 := startBackend(t, name+"-b1"), startBackend(t, name+"-b2")
		h := newHarness(t)
		h.load(proxy(b1, b2))
		time.Sleep(run) // the scenario: this long with no client
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, v := range emptyAccepts(t, b1, b2) {
			n += v
		}
		t.Logf("%s: %d connections accepted by 2 backends in %v, interval %v", name, n, run, interval)
		return n
	}
	ours := count("shaker", func(b1, b2 *backend) map[string]any {
		return shakerProxy(map[string]any{"interval": interval.String()}, []string{b1.addr}, []string{b2.addr})
	})
	theirs := count("caddy-l4 health_interval", func(b1, b2 *backend) map[string]any {
		return map[string]any{
			"handler":       "proxy",
			"upstreams":     upstreamsJSON([]string{b1.addr}, []string{b2.addr}),
			"health_checks": map[string]any{"active": map[string]any{"interval": interval.String()}},
		}
	})
	if ours != 0 {
		t.Errorf("the shaker probes left %d connections on the backends, want 0", ours)
	}
	if theirs == 0 {
		t.Errorf("caddy-l4's own checks left no connection: the comparison measures nothing")
	}

	// both configured: a warning at load
	b1 := startBackend(t, "both-b1")
	h := newHarness(t)
	cfg := shakerProxy(nil, []string{b1.addr})
	cfg["health_checks"] = map[string]any{"active": map[string]any{"interval": "1s"}}
	h.load(cfg)
	if h.logged("active health checks") == nil {
		t.Errorf("no warning that caddy-l4's active checks run too; logged: %v", h.logs())
	}
}

// TestMain runs the tests with Caddy's autosave and storage out of the
// home directory, and stops Caddy at the end.
func TestMain(m *testing.M) {
	code := caddyhome.Main(m)
	_ = caddy.Stop()
	os.Exit(code)
}
