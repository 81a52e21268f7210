package caddyshaker

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// BenchmarkProxy measures requests/s through Caddy to the same three
// backends, given with plain `to` (static upstreams), with `dynamic
// shaker`, and with Caddy's own unchecked dynamic upstreams (`dynamic
// multi` over `a` sources), side by side in one Caddy config (one server
// each). The sides run in a mirrored order (to, shaker, a, a, shaker, to)
// so that none always runs first or last.
//
//	go test -run '^$' -bench Proxy -benchtime 3s -count 2 .
func BenchmarkProxy(b *testing.B) {
	var backends []*backend
	var ups []string
	for i := range 3 {
		be := startBackend(b, fmt.Sprintf("b%d", i+1), "127.0.0.1:0")
		backends = append(backends, be)
		ups = append(ups, be.addr)
	}
	staticUps := make([]map[string]string, len(ups))
	for i, u := range ups {
		staticUps[i] = map[string]string{"dial": u}
	}
	ports := map[string]string{
		"to":             fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
		"dynamic_shaker": fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
		"dynamic_a":      fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
	}
	// Caddy's own dynamic upstreams, unchecked, for the cost of Caddy's
	// dynamic-upstream path itself: multi over one `a` source per
	// backend (an IP literal resolves to itself).
	var aSources []map[string]string
	for _, u := range ups {
		host, port, _ := net.SplitHostPort(u)
		aSources = append(aSources, map[string]string{"source": "a", "name": host, "port": port})
	}
	server := func(listen string, proxy map[string]any) map[string]any {
		proxy["handler"] = "reverse_proxy"
		return map[string]any{
			"listen":          []string{listen},
			"automatic_https": map[string]any{"disable": true},
			"routes":          []any{map[string]any{"handle": []any{proxy}}},
		}
	}
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{
			"to": server(ports["to"], map[string]any{"upstreams": staticUps}),
			"dynamic_shaker": server(ports["dynamic_shaker"], map[string]any{"dynamic_upstreams": map[string]any{
				"source": "shaker", "upstreams": ups, "interval": "100ms", "timeout": "100ms",
			}}),
			"dynamic_a": server(ports["dynamic_a"], map[string]any{"dynamic_upstreams": map[string]any{
				"source": "multi", "sources": aSources,
			}}),
		}}},
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if err := caddy.Load(raw, true); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { caddy.Stop() })

	// two rounds in opposite orders, so that neither side always runs
	// first (warm-up) or last (a hotter machine)
	order := []string{"to", "dynamic_shaker", "dynamic_a", "dynamic_a", "dynamic_shaker", "to"}
	for _, name := range order {
		b.Run(name, func(b *testing.B) {
			tr := &http.Transport{MaxIdleConnsPerHost: 256}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			url := "http://" + ports[name] + "/"
			b.SetParallelism(8)
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := client.Get(url)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
		})
	}
	for _, be := range backends {
		if n := be.empty.Load(); n != 0 {
			b.Errorf("%s: %d connections without a request", be.name, n)
		}
	}
}
