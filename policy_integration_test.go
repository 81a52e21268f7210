//go:build linux

package caddyshaker

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// TestPolicyIntegration: reverse_proxy with its own upstreams and
// `lb_policy shaker`, in Caddy, against real listeners that count
// accept()s: probes never reach an application; a stopped backend gets no
// request once it is down; traffic returns when it comes back; a reload
// keeps the state; drain works through the admin API as for `dynamic
// shaker`.
func TestPolicyIntegration(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]
	h.policy = map[string]any{"inner": map[string]any{"policy": "round_robin"}}
	h.load(tInterval)

	st := h.waitProbes(nil, 10, 10*tInterval+5*time.Second)
	for _, b := range h.backends {
		if s := st[b.addr]; !s.Healthy || s.Upstream != b.addr {
			t.Errorf("%s: %+v, want healthy, upstream %s", b.name, s, b.addr)
		}
	}
	if n := h.probeAccepts(); n != 0 {
		t.Fatalf("backends accepted %d connections from probes alone", n)
	}
	// round_robin over the three, as without the policy
	if got := h.servedBy(30); got["b1"] != 10 || got["b2"] != 10 || got["b3"] != 10 {
		t.Errorf("round_robin over three up: %v, want 10 each", got)
	}

	// A stopped backend: once down, it gets no request, and none fails.
	b2.stop()
	took := waitFor(t, 5*time.Second, "b2 down", func() bool { return !h.statuses()[b2.addr].Healthy })
	t.Logf("stopped backend marked down after %v", took)
	waitEvent(t, "unhealthy", b2.addr, 5*time.Second)
	if got := h.servedBy(40); got["b2"] != 0 || got["b1"] != 20 || got["b3"] != 20 {
		t.Errorf("b2 down: %v, want b1 and b3 20 each", got)
	}

	// Back: traffic returns.
	b2.start()
	waitFor(t, 5*time.Second, "b2 up again", func() bool { return h.statuses()[b2.addr].Healthy })
	if got := h.servedBy(30); got["b2"] != 10 {
		t.Errorf("b2 back: %v, want 10 each", got)
	}

	// A reload keeps the state: b3 stays down, without a request failing.
	b3.stop()
	waitFor(t, 5*time.Second, "b3 down", func() bool { return !h.statuses()[b3.addr].Healthy })
	before := h.statuses()[b3.addr]
	h.extraKnob++
	h.load(tInterval)
	after := h.statuses()[b3.addr]
	if after.Healthy || after.Since == nil || !after.Since.Equal(*before.Since) || after.Transitions != before.Transitions {
		t.Errorf("after a reload b3 is %+v, was %+v: want the same down state", after, before)
	}
	if got := h.servedBy(20); got["b3"] != 0 {
		t.Errorf("b3 down after the reload: %v", got)
	}

	// Drain through the admin API: no new requests, probes go on.
	h.setAdmin(b1, "drain")
	if got := h.servedBy(20); got["b1"] != 0 || got["b2"] != 20 {
		t.Errorf("b1 drained: %v, want all on b2", got)
	}
	h.setAdmin(b1, "ready")
	if got := h.servedBy(20); got["b1"] != 10 {
		t.Errorf("b1 ready: %v, want 10 each on b1 and b2", got)
	}
	h.checkMetrics(`caddy_shaker_upstream_healthy{address="` + b1.addr + `"`)
	h.noLeakedProbes()
}

// TestPolicyFailedRequestProbes: on a retry, Caddy calls the policy again
// for the same request; the upstream that failed is probed at once.
func TestPolicyFailedRequestProbes(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const interval, fast = time.Minute, 20 * time.Millisecond
	h := newHarness(t, 2)
	h.policy = map[string]any{"fast_interval": fast.String(), "retries": 2, "inner": map[string]any{"policy": "round_robin"}}
	h.load(interval)
	// round_robin retries on b2: every request succeeds
	h.failedRequestProbes(interval, fast, 100, func(code int, body string) error {
		if code != 200 || body != "b2" {
			return fmt.Errorf("request: %d %q, want b2's 200", code, body)
		}
		return nil
	})
	h.noLeakedProbes()
}

// TestPolicyPassThrough: upstreams that cannot be probed are handed on;
// those that can are probed, and the registry holds exactly those.
func TestPolicyPassThrough(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 2)
	b1, b2 := h.backends[0], h.backends[1]
	h.policy = map[string]any{"inner": map[string]any{"policy": "first"}}
	h.load(tInterval)
	// b1 by a placeholder-free dial, b2 behind a placeholder (not probed)
	h.handler = map[string]any{"upstreams": []any{
		map[string]any{"dial": "{http.request.header.X-None}" + b1.addr},
		map[string]any{"dial": b2.addr},
	}}
	h.load(tInterval)
	waitFor(t, 5*time.Second, "b2 probed", func() bool { return h.statuses()[b2.addr].Probes >= 3 })
	got := probedAddrs()
	if len(got) != 1 || got[b2.addr] == nil {
		t.Fatalf("probed %v, want only %s", got, b2.addr)
	}
	// the first upstream (not probed) serves: `first` picks it
	if code, body := h.get(); code != 200 || body != "b1" {
		t.Fatalf("request: %d %q, want b1 through the unprobed upstream", code, body)
	}
	// with b2 down, the unprobed one still serves
	a, _ := netip.ParseAddrPort(b2.addr)
	setAdminState(t, a, health.Drain)
	if code, body := h.get(); code != 200 || body != "b1" {
		t.Fatalf("request: %d %q", code, body)
	}
	h.noLeakedProbes()
}
