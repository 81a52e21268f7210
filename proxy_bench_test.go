//go:build linux

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
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
	for _, n := range []int{10, 1000, 10000} {
		ports := map[string]string{
			"static": fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
			"shaker": fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b)),
		}
		loadPolicyProxy(b, be, n, nil, map[string]map[string]any{
			ports["static"]: {},
			ports["shaker"]: {"load_balancing": map[string]any{
				"selection_policy": map[string]any{"policy": "shaker", "interval": "1s"},
			}},
		})
		// measure once every address has its first result
		awaitProbes(b, n, func() int {
			probed := 0
			for _, c := range reg.Checkers() {
				if c.Probes() > 0 {
					probed++
				}
			}
			return probed
		})
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

// loadPolicyProxy loads a Caddy config of one server per entry of servers
// (listen address: reverse_proxy settings), each proxying to the same n
// static upstreams, 127.x.y.z addresses on the port of be (which listens
// on 0.0.0.0), and the shaker app's settings app, if any. Above 1,000
// upstreams each side dials a new backend connection per request
// (keep-alive off), since one kept per upstream would pass the fd limit
// (both ends are in this process).
func loadPolicyProxy(b *testing.B, be *backend, n int, app map[string]any, servers map[string]map[string]any) {
	b.Helper()
	port := be.port()
	ups := make([]map[string]string, n)
	for i := range ups {
		ups[i] = map[string]string{"dial": fmt.Sprintf("127.%d.%d.%d:%s", 1+i/62500, i/250%250, i%250+1, port)}
	}
	srvs := map[string]any{}
	for listen, proxy := range servers {
		proxy["upstreams"] = ups
		if n > 1000 {
			proxy["transport"] = map[string]any{"protocol": "http", "keep_alive": map[string]any{"enabled": false}}
		}
		srvs[fmt.Sprint("s", len(srvs))] = proxyServer(listen, proxy)
	}
	apps := map[string]any{"http": map[string]any{"servers": srvs}}
	if app != nil {
		apps["shaker"] = app
	}
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps":    apps,
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if err := caddy.Load(raw, true); err != nil {
		b.Fatal(err)
	}
}

// awaitProbes polls done (first results have no event) until it reaches
// n, for at most 30 s.
func awaitProbes(b *testing.B, n int, done func() int) {
	b.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for got := done(); got < n; got = done() {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d addresses probed in 30 s", got, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// BenchmarkRawProxy measures what the engine's raw mode costs the proxy's
// own traffic: requests/s through Caddy's reverse_proxy with `lb_policy
// shaker` (interval 1s) to 10, 1,000 and 10,000 static upstreams, with the
// shaker app's probe_mode raw and connect, side by side in one run, in
// mirrored quads (connect, raw, raw, connect), rawProxyQuads of them. Each
// side loads its config after caddy.Stop, so that the engine restarts in
// the side's mode (and raw mode's sockets are gone on the connect side),
// and is measured once every address has been probed. Every raw TCP
// socket gets a copy of each TCP packet the host receives, which its BPF
// filter then drops; here the clients' requests to Caddy and Caddy's to
// the backend all go over TCP on loopback, so each of their packets passes
// the raw engine's socket. Caddy dials a new backend connection per request
// (keep-alive off, at every n), so that each request is a dozen packets or
// more, the handshake's included.
//
// It prints, per number of upstreams, the ratio of raw to connect
// requests/s (of the sides' mean rates, and the median of the quads'
// ratios) and of the process's CPU per request (client, Caddy, backend and
// probes are all in it; on a shared machine it moves less than
// requests/s, which follow the CPU the process gets), and the probes made
// meanwhile. It fails if a probe became a connection to the backend.
//
//	go test -run '^$' -bench RawProxy -benchtime 1s .
func BenchmarkRawProxy(b *testing.B) {
	testkit.NeedRaw(b)
	be := startBackend(b, "wild", "0.0.0.0:0")
	for _, n := range []int{10, 1000, 10000} {
		listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(b))
		var sides []rawProxySide
		for q := 0; q < rawProxyQuads; q++ {
			for _, raw := range []bool{false, true, true, false} {
				sides = append(sides, rawProxySide{raw: raw})
			}
		}
		for i := range sides {
			side := &sides[i]
			mode := shaker.ModeConnect
			if side.raw {
				mode = shaker.ModeRaw
			}
			loadPolicyProxy(b, be, n, map[string]any{"probe_mode": mode.String()}, map[string]map[string]any{listen: {
				"load_balancing": map[string]any{"selection_policy": map[string]any{"policy": "shaker", "interval": "1s"}},
				// a new backend connection per request at every n: idle
				// ones kept per upstream would pile up over the sides'
				// restarts past the fd limit
				"transport": map[string]any{"protocol": "http", "keep_alive": map[string]any{"enabled": false}},
			}})
			e := engines.cur.Load()
			if e == nil {
				b.Fatal("no engine after loading the config")
			}
			if e.Mode() != mode {
				b.Fatalf("probe_mode %v: the engine runs in mode %v", mode, e.Mode())
			}
			awaitProbes(b, n, func() int { return int(e.Stats().Total()) })
			b.Run(fmt.Sprintf("n=%d/%v", n, mode), func(b *testing.B) {
				// each run's last call: the testing package calls a run's
				// function more than once (b.N = 1 first), and only its
				// last call is measured
				p0, cpu0, t0 := e.Stats().Total(), testkit.CPUTime(), time.Now()
				side.rate = requestRate(b, "http://"+listen+"/")
				side.cpu, side.requests = testkit.CPUTime()-cpu0, b.N
				side.probes = float64(e.Stats().Total()-p0) / time.Since(t0).Seconds()
				b.ReportMetric(float64(side.cpu.Microseconds())/float64(b.N), "cpu-us/req")
			})
			caddy.Stop()
		}
		// printed, not logged: a parent benchmark's log is not shown
		fmt.Println(rawProxySummary(n, sides))
	}
	if n := be.empty.Load(); n != 0 {
		b.Errorf("%d connections without a request", n)
	}
}

// rawProxyQuads is how many mirrored quads (connect, raw, raw, connect)
// BenchmarkRawProxy runs per number of upstreams: many short ones, so
// that the load of other work on the machine, which moves over seconds,
// falls on both sides alike.
const rawProxyQuads = 4

// rawProxySide is one side's run in BenchmarkRawProxy.
type rawProxySide struct {
	raw      bool
	rate     float64 // requests/s
	requests int     // b.N of its measured call
	cpu      time.Duration
	probes   float64 // probes/s meanwhile
}

// rawProxySummary is the line BenchmarkRawProxy prints for n upstreams:
// raw over connect, requests/s (the mean of each side's rate, and the
// median of the quads' ratios) and CPU per request (pooled).
func rawProxySummary(n int, sides []rawProxySide) string {
	type sum struct {
		rate, probes float64
		k, requests  int
		cpu          time.Duration
	}
	sums := func(ss []rawProxySide) (raw, conn sum) {
		for _, s := range ss {
			t := &conn
			if s.raw {
				t = &raw
			}
			t.rate += s.rate
			t.probes += s.probes
			t.k++
			t.requests += s.requests
			t.cpu += s.cpu
		}
		return raw, conn
	}
	var quads []float64
	for q := 0; q+4 <= len(sides); q += 4 {
		r, c := sums(sides[q : q+4])
		quads = append(quads, (r.rate/float64(r.k))/(c.rate/float64(c.k)))
	}
	slices.Sort(quads)
	median := 0.0
	if len(quads) > 0 {
		median = (quads[(len(quads)-1)/2] + quads[len(quads)/2]) / 2
	}
	r, c := sums(sides)
	rate := func(t sum) float64 { return t.rate / float64(max(t.k, 1)) }
	cpu := func(t sum) float64 { return float64(t.cpu.Microseconds()) / float64(max(t.requests, 1)) }
	return fmt.Sprintf("n=%d: raw / connect = %.3f req/s (median of %d quads %.3f, from %.3f to %.3f; %.0f vs %.0f req/s), %.3f CPU per request (%.1f vs %.1f us); probes/s %.0f raw, %.0f connect",
		n, rate(r)/rate(c), len(quads), median, quads[0], quads[len(quads)-1], rate(r), rate(c),
		cpu(r)/cpu(c), cpu(r), cpu(c), r.probes/float64(max(r.k, 1)), c.probes/float64(max(c.k, 1)))
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
