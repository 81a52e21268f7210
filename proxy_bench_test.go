//go:build linux

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

	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{
			"to": proxyServer(ports["to"], map[string]any{"upstreams": staticUps}),
			"dynamic_shaker": proxyServer(ports["dynamic_shaker"], map[string]any{"dynamic_upstreams": map[string]any{
				"source": "shaker", "upstreams": ups, "interval": "100ms", "timeout": "100ms",
			}}),
			"dynamic_a": proxyServer(ports["dynamic_a"], map[string]any{"dynamic_upstreams": map[string]any{
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
		b.Run(name, func(b *testing.B) { requestRate(b, "http://"+ports[name]+"/") })
	}
	for _, be := range backends {
		if n := be.empty.Load(); n != 0 {
			b.Errorf("%s: %d connections without a request", be.name, n)
		}
	}
}

// BenchmarkPolicyProxy measures requests/s through Caddy to the same
// static upstreams, with no checks and with `lb_policy shaker` (interval
// 1s), at 10, 1,000 and 10,000 upstreams: 127.x.y.z addresses that one
// listener on 0.0.0.0 answers. Both sides are servers of one Caddy config,
// so the probes run during both: what differs is the request path alone.
// The sides run in a mirrored order (static, shaker, shaker, static). At
// 10,000 upstreams both sides dial a new backend connection per request
// (keep-alive off), since one kept per upstream would pass the fd limit.
//
//	go test -run '^$' -bench PolicyProxy -benchtime 2s .
func BenchmarkPolicyProxy(b *testing.B) {
	be := startBackend(b, "wild", "0.0.0.0:0")
	_, port, _ := net.SplitHostPort(be.addr)
	for _, n := range []int{10, 1000, 10000} {
		ups := make([]map[string]string, n)
		for i := range ups {
			ups[i] = map[string]string{"dial": fmt.Sprintf("127.%d.%d.%d:%s", 1+i/62500, i/250%250, i%250+1, port)}
		}
		ports := map[string]string{
			"static": fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
			"shaker": fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
		}
		server := func(listen string, proxy map[string]any) map[string]any {
			proxy["handler"] = "reverse_proxy"
			proxy["upstreams"] = ups
			if n > 1000 {
				// a connection kept per upstream would pass the fd limit
				// (both ends are in this process): one per request, both sides
				proxy["transport"] = map[string]any{"protocol": "http", "keep_alive": map[string]any{"enabled": false}}
			}
			return proxyServer(listen, proxy)
		}
		cfg := map[string]any{
			"admin":   map[string]any{"disabled": true},
			"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
			"apps": map[string]any{"http": map[string]any{"servers": map[string]any{
				"static": server(ports["static"], map[string]any{}),
				"shaker": server(ports["shaker"], map[string]any{"load_balancing": map[string]any{
					"selection_policy": map[string]any{"policy": "shaker", "interval": "1s"},
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
		// measure once every address has its first result
		deadline := time.Now().Add(30 * time.Second)
		for probed := 0; probed < n; {
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d addresses probed in 30 s", probed, n)
			}
			time.Sleep(50 * time.Millisecond) // polled: first results have no event
			probed = 0
			for _, c := range reg.Checkers() {
				if c.Probes() > 0 {
					probed++
				}
			}
		}
		// each run's last rate: the testing package calls a run's function
		// more than once (b.N = 1 first), and only its last call is measured
		order := []string{"static", "shaker", "shaker", "static"}
		rates := make([]float64, len(order))
		for i, side := range order {
			b.Run(fmt.Sprintf("n=%d/%s", n, side), func(b *testing.B) {
				rates[i] = requestRate(b, "http://"+ports[side]+"/")
			})
		}
		if s, k := rates[0]+rates[3], rates[1]+rates[2]; s > 0 && k > 0 {
			// printed, not logged: a parent benchmark's log is not shown
			fmt.Printf("n=%d: shaker / static = %.3f (%.0f vs %.0f req/s, mean of 2 each)\n", n, k/s, k/2, s/2)
		}
		caddy.Stop()
	}
	if n := be.empty.Load(); n != 0 {
		b.Errorf("%d connections without a request", n)
	}
}

// requestRate sends b.N GET requests to url from 8 goroutines per CPU,
// fails on anything but a 200, and reports and returns the requests per
// second.
func requestRate(b *testing.B, url string) float64 {
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
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
	rate := float64(b.N) / time.Since(start).Seconds()
	b.ReportMetric(rate, "req/s")
	return rate
}

// proxyServer is an HTTP server of the proxy benchmarks: listen, no
// automatic HTTPS, one route to the reverse_proxy handler proxy.
func proxyServer(listen string, proxy map[string]any) map[string]any {
	proxy["handler"] = "reverse_proxy"
	return map[string]any{
		"listen":          []string{listen},
		"automatic_https": map[string]any{"disable": true},
		"routes":          []any{map[string]any{"handle": []any{proxy}}},
	}
}
