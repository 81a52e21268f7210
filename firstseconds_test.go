//go:build linux

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The requests of TestFirstSecondsFailures: at a fixed rate from the
// moment the config load returns, each with a bounded time, at most
// fsWorkers at once.
const (
	fsRate     = 200 // requests a second
	fsFor      = 3 * time.Second
	fsWorkers  = 32
	fsInterval = 2 * time.Second // both checkers': the default of ours
	fsTimeout  = time.Second     // both checkers'
)

// fsBackend is the live backends: one HTTP server on 0.0.0.0, which
// answers on every 127.x.y.z, so that one listener is as many live
// addresses as wanted. It counts the health checks Caddy's active checker
// makes (on /health), and the connections that never carried a request:
// what a half-open probe that became a connection looks like.
type fsBackend struct {
	port    int
	accepts atomic.Int64
	health  atomic.Int64
	empty   atomic.Int64
}

func startFSBackend(t *testing.T) *fsBackend {
	t.Helper()
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Skipf("listen on 0.0.0.0: %v", err)
	}
	b := &fsBackend{port: ln.Addr().(*net.TCPAddr).Port}
	var active sync.Map
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/health" {
				b.health.Add(1)
			}
			io.WriteString(w, "ok")
		}),
		ConnState: func(c net.Conn, s http.ConnState) {
			switch s {
			case http.StateActive:
				active.Store(c, true)
			case http.StateClosed, http.StateHijacked:
				if _, ok := active.LoadAndDelete(c); !ok {
					b.empty.Add(1)
				}
			}
		},
	}
	go srv.Serve(testkit.CountAccepts(ln, &b.accepts))
	t.Cleanup(func() { srv.Close() })
	return b
}

// fsUpstreams is n upstreams of which every tenth (from the tenth) is
// dead, or the last of 3: live ones on the backend's port, dead ones on a
// loopback port nothing listens on. live is the live ones alone.
func fsUpstreams(n, deadPort int, b *fsBackend) (all, live []string) {
	for i := range n {
		dead := n <= 3 && i == n-1 || n > 3 && i%10 == 9
		port := b.port
		if dead {
			port = deadPort
		}
		u := fmt.Sprintf("127.7.%d.%d:%d", i>>8, i&255, port)
		all = append(all, u)
		if !dead {
			live = append(live, u)
		}
	}
	return all, live
}

// fsConfig proxies listen to ups, checked by our dynamic shaker source
// (side "shaker") or by Caddy's own active health checks (side "caddy"),
// both at fsInterval and fsTimeout.
func fsConfig(t *testing.T, side, listen string, ups []string) []byte {
	rp := map[string]any{"handler": "reverse_proxy"}
	switch side {
	case "shaker":
		rp["dynamic_upstreams"] = map[string]any{
			"source": "shaker", "upstreams": ups,
			"interval": fsInterval.String(), "timeout": fsTimeout.String(),
		}
	case "caddy":
		list := make([]any, len(ups))
		for i, u := range ups {
			list[i] = map[string]any{"dial": u}
		}
		rp["upstreams"] = list
		rp["health_checks"] = map[string]any{"active": map[string]any{
			"uri": "/health", "interval": fsInterval.String(), "timeout": fsTimeout.String(),
		}}
	}
	b, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"p": map[string]any{
			"listen":          []string{listen},
			"automatic_https": map[string]any{"disable": true},
			"routes":          []any{map[string]any{"handle": []any{rp}}},
		}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fsResult is what the requests of one run met.
type fsResult struct {
	sent, failed, skipped int
	fails                 []time.Duration // when each failed request was sent, from the load
}

func (r fsResult) String() string {
	if r.failed == 0 {
		return fmt.Sprintf("%d of %d failed", r.failed, r.sent)
	}
	return fmt.Sprintf("%d of %d failed, sent from %v to %v", r.failed, r.sent,
		r.fails[0].Round(time.Millisecond), r.fails[len(r.fails)-1].Round(time.Millisecond))
}

// fire sends GET url at fsRate for fsFor from now, at most fsWorkers at
// once (a tick with every worker busy is skipped and counted), and counts
// the answers that are not 2xx.
func fire(url string) fsResult {
	tr := &http.Transport{MaxIdleConnsPerHost: fsWorkers}
	defer tr.CloseIdleConnections()
	client := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	start := time.Now()
	tick := time.NewTicker(time.Second / fsRate)
	defer tick.Stop()
	sem := make(chan struct{}, fsWorkers)
	var (
		mu  sync.Mutex
		res fsResult
		wg  sync.WaitGroup
	)
	for n := 0; n < int(fsFor*fsRate/time.Second); n++ {
		at := time.Since(start)
		select {
		case sem <- struct{}{}:
		default:
			res.skipped++
			<-tick.C
			continue
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			ok := false
			if resp, err := client.Get(url); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				ok = resp.StatusCode/100 == 2
			}
			mu.Lock()
			res.sent++
			if !ok {
				res.failed++
				res.fails = append(res.fails, at)
			}
			mu.Unlock()
		}()
		<-tick.C
	}
	wg.Wait()
	sort.Slice(res.fails, func(i, j int) bool { return res.fails[i] < res.fails[j] })
	return res
}

// TestFirstSecondsFailures measures the failed requests of the first
// seconds after a start, and after a reload that adds upstreams, with
// some of them dead: ours (dynamic shaker) beside Caddy's own active
// health checks at the same interval and timeout. It logs the figures; it
// asserts only what noise cannot break: with ours no request fails once
// the first probes' timeout has passed (dead here means refused, known
// at once), and no probe became a connection.
//
// FIRSTSECONDS_SIZES=3,1000 (the default) picks the pool sizes.
func TestFirstSecondsFailures(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	sizes := []int{3, 1000}
	if s := os.Getenv("FIRSTSECONDS_SIZES"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n < 3 || n > 2000 {
				t.Fatalf("FIRSTSECONDS_SIZES: %q: want sizes from 3 to 2000", f)
			}
			sizes = append(sizes, n)
		}
	}
	b := startFSBackend(t)
	deadPort := testkit.FreePort(t) // nothing listens there
	t.Cleanup(func() { caddy.Stop() })
	type row struct {
		size, dead   int
		side, phase  string
		res          fsResult
		emptyConns   int64
		healthChecks int64
	}
	var rows []row
	for _, n := range sizes {
		all, live := fsUpstreams(n, deadPort, b)
		for _, side := range []string{"shaker", "caddy"} {
			for _, phase := range []string{"start", "reload"} {
				if err := caddy.Stop(); err != nil {
					t.Fatal(err)
				}
				listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
				url := "http://" + listen + "/"
				if phase == "reload" {
					// the live ones first, each checked once
					h0, a0 := b.health.Load(), engineProbes()
					if err := caddy.Load(fsConfig(t, side, listen, live), true); err != nil {
						t.Fatal(err)
					}
					waitFor(t, 10*time.Second, "a first check of every live upstream", func() bool {
						if side == "caddy" {
							return b.health.Load()-h0 >= int64(len(live))
						}
						return engineProbes()-a0 >= uint64(len(live))
					})
				}
				empty0, h0 := b.empty.Load(), b.health.Load()
				if err := caddy.Load(fsConfig(t, side, listen, all), true); err != nil {
					t.Fatal(err)
				}
				res := fire(url)
				rows = append(rows, row{n, len(all) - len(live), side, phase, res, b.empty.Load() - empty0, b.health.Load() - h0})
				r := rows[len(rows)-1]
				t.Logf("FIRSTSECONDS %4d upstreams, %3d dead, %-6s %-6s: %v (%d skipped); probe connections %d, HTTP health checks %d",
					r.size, r.dead, r.side, r.phase, r.res, r.res.skipped, r.emptyConns, r.healthChecks)
				if side != "shaker" {
					continue
				}
				if r.emptyConns != 0 {
					t.Errorf("%d upstreams, %s: %d probes became connections", n, phase, r.emptyConns)
				}
				if f := res.fails; len(f) > 0 && f[len(f)-1] > fsTimeout {
					t.Errorf("%d upstreams, %s: a request sent %v after the load failed, want none after the timeout %v",
						n, phase, f[len(f)-1], fsTimeout)
				}
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "failed requests in the first %v at %d/s (interval %v, timeout %v):\n", fsFor, fsRate, fsInterval, fsTimeout)
	fmt.Fprintf(&sb, "%-22s %-8s %-14s %-14s\n", "pool", "phase", "dynamic shaker", "caddy active")
	for i := 0; i+1 < len(rows); i++ {
		for j := i + 1; j < len(rows); j++ {
			a, c := rows[i], rows[j]
			if a.side == "shaker" && c.side == "caddy" && a.size == c.size && a.phase == c.phase {
				fmt.Fprintf(&sb, "%-22s %-8s %-14s %-14s\n", fmt.Sprintf("%d dead of %d", a.dead, a.size), a.phase,
					fmt.Sprintf("%d / %d", a.res.failed, a.res.sent), fmt.Sprintf("%d / %d", c.res.failed, c.res.sent))
			}
		}
	}
	t.Log(sb.String())
}
