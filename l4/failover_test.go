package shakerl4

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestL4Failover measures failover through the layer-4 proxy: one of two
// backends stops (its port then refuses), and clients connect one after
// another, every 5 ms; failover is the time from the stop to the last
// connection that was not answered by the other backend. It is measured
// for the shaker policy and for caddy-l4's own active checks, at their
// defaults and at the same interval, and with lb_try_duration (caddy-l4
// retries a failed dial: clients then see latency, not failures). The
// figures are logged, not asserted: each run only has to end within its
// bound.
func TestL4Failover(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement through the proxy, up to a minute")
	}
	const (
		pace   = 5 * time.Millisecond
		steady = 200 // consecutive connections answered by b2 that end a run
	)
	shaker := func(sel map[string]any, lb map[string]any) func(b1, b2 *backend) map[string]any {
		return func(b1, b2 *backend) map[string]any {
			s := map[string]any{"policy": "shaker"}
			for k, v := range sel {
				s[k] = v
			}
			l := map[string]any{"selection": s}
			for k, v := range lb {
				l[k] = v
			}
			return map[string]any{"handler": "proxy", "upstreams": upstreamsJSON([]string{b1.addr}, []string{b2.addr}), "load_balancing": l}
		}
	}
	own := func(active map[string]any, lb map[string]any) func(b1, b2 *backend) map[string]any {
		return func(b1, b2 *backend) map[string]any {
			p := map[string]any{"handler": "proxy", "upstreams": upstreamsJSON([]string{b1.addr}, []string{b2.addr}),
				"health_checks": map[string]any{"active": active}}
			if lb != nil {
				p["load_balancing"] = lb
			}
			return p
		}
	}
	var figures []string
	retry := map[string]any{"try_duration": "5s"} // try_interval: caddy-l4's default, 250ms
	for _, tc := range []struct {
		name   string
		probed bool // shaker: wait for the first probes, time the down event
		bound  time.Duration
		proxy  func(b1, b2 *backend) map[string]any
	}{
		{"shaker, defaults (interval 2s, fails 3, timeout 1s)", true, 15 * time.Second, shaker(nil, nil)},
		{"shaker, interval 200ms (fails 3)", true, 5 * time.Second, shaker(map[string]any{"interval": "200ms"}, nil)},
		{"shaker, interval 200ms, fails 1", true, 5 * time.Second, shaker(map[string]any{"interval": "200ms", "fails": 1}, nil)},
		{"shaker, defaults, lb_try_duration 5s", true, 15 * time.Second, shaker(nil, retry)},
		{"caddy-l4, defaults (health_interval 30s, fall 1, timeout 5s)", false, 40 * time.Second, own(map[string]any{}, nil)},
		{"caddy-l4, health_interval 200ms (fall 1)", false, 5 * time.Second, own(map[string]any{"interval": "200ms"}, nil)},
		{"caddy-l4, defaults, lb_try_duration 5s", false, 40 * time.Second, own(map[string]any{}, retry)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
			h := newHarness(t)
			h.load(tc.proxy(b1, b2))
			defer caddy.Stop()
			if tc.probed {
				h.waitProbes(1, 5*time.Second, b1.addr, b2.addr)
			}
			if got := spread(h, 20); got[""] != 0 {
				t.Fatalf("before the stop: connections answered %v", got)
			}
			before := eventCount("unhealthy", b1.addr)
			b1.stop()
			t0 := time.Now()
			var last time.Time
			var slowest, down time.Duration
			fails, conns, ok := 0, 0, 0
			for ok < steady && time.Since(t0) < tc.bound {
				start := time.Now()
				name, _ := through(h.proxy)
				if d := time.Since(start); d > slowest {
					slowest = d
				}
				conns++
				if name == "b2" {
					ok++
				} else {
					ok, fails, last = 0, fails+1, start
				}
				if down == 0 && tc.probed && eventCount("unhealthy", b1.addr) > before {
					down = time.Since(t0)
				}
				time.Sleep(pace) // the clients' pace
			}
			if ok < steady {
				t.Fatalf("not every connection answered by b2 %v after the stop", tc.bound)
			}
			failover := time.Duration(0)
			if fails > 0 {
				failover = last.Sub(t0)
			}
			downS := "-"
			if down > 0 {
				downS = down.Round(time.Millisecond).String()
			}
			t.Logf("failover %v; connections failed %d of %d; slowest connection %v; b1 down (event) after %s",
				failover.Round(time.Millisecond), fails, conns, slowest.Round(time.Millisecond), downS)
			figures = append(figures, fmt.Sprintf("| %s | %v | %d of %d | %v |", tc.name, failover.Round(time.Millisecond), fails, conns, slowest.Round(time.Millisecond)))
		})
	}
	t.Logf("\n| setup | failover | connections failed | slowest connection |\n|---|---|---|---|\n%s", strings.Join(figures, "\n"))
}
