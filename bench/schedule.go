//go:build linux

package main

// Scheduled checks (-addresses, the shaker checker): the plugin as users
// run it, a Caddy child built from ./cmd/caddy whose `dynamic shaker`
// source probes every address at an interval, beside HAProxy checking the
// same addresses at the same interval. With -addresses larger than
// -listeners, the listeners bind 0.0.0.0 (they answer every 127.x.y.z) and
// the addresses are spread over 127.0.0.0/8 and the listeners' ports.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// expandAddrs returns n addresses over the listeners' ports: address i is
// port i mod len(ports) on 127.a.b.c with a.b.c = i / len(ports) + 1.
func expandAddrs(ls []netip.AddrPort, n int) []netip.AddrPort {
	out := make([]netip.AddrPort, n)
	for i := range out {
		k := i/len(ls) + 1
		ip := netip.AddrFrom4([4]byte{127, byte(k >> 16), byte(k >> 8), byte(k)})
		out[i] = netip.AddrPortFrom(ip, ls[i%len(ls)].Port())
	}
	return out
}

// shakerChecker: Caddy with this plugin, one reverse_proxy whose dynamic
// shaker source probes every address at interval (shaker; shaker-raw with
// the shaker app's probe_mode raw).
type shakerChecker struct {
	child
	bin      string
	interval time.Duration
	loops    int
	mode     string // the shaker app's probe_mode; "" leaves the default (connect)
	admin    string
	port     int          // its HTTP server's, with the status page on /shaker-status
	reads    *windowReads // the window's reads (reading.go)
	// onWindowEnd, if set, runs after each measured window, while the
	// child still runs (the bench reads its heap then).
	onWindowEnd func()
}

func (k *shakerChecker) start(addrs []netip.AddrPort) error {
	name := "shaker"
	if k.mode != "" {
		name += "-" + k.mode // shaker-raw
	}
	dir, port, err := k.prepare(name)
	if err != nil {
		return err
	}
	k.port = port
	aport, err := testkit.LoopbackPort()
	if err != nil {
		return err
	}
	k.admin = fmt.Sprintf("127.0.0.1:%d", aport)
	ups := make([]string, len(addrs))
	for i, a := range addrs {
		ups[i] = a.String()
	}
	apps := map[string]any{"http": map[string]any{"servers": map[string]any{"bench": map[string]any{
		"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
		"automatic_https": map[string]any{"disable": true},
		"routes": append(statusRoute(), map[string]any{"handle": []any{map[string]any{
			"handler": "reverse_proxy",
			"dynamic_upstreams": map[string]any{
				"source":    "shaker",
				"upstreams": ups,
				"interval":  k.interval.String(),
				"timeout":   "1s",
			},
		}}}),
	}}}}
	app := map[string]any{}
	if k.loops > 0 {
		app["loops"] = k.loops
	}
	if k.mode != "" {
		app["probe_mode"] = k.mode
	}
	if len(app) > 0 {
		apps["shaker"] = app
	}
	cfg := map[string]any{
		"admin":   map[string]any{"listen": k.admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps":    apps,
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	path := dir + "/caddy.json"
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return err
	}
	return k.run(dir, k.bin, "run", "--config", path)
}

func (k *shakerChecker) stop() error { return k.signal(syscall.SIGTERM) }

// heapAfterGC asks the child's admin endpoint for a heap profile after a
// GC (net/http/pprof's gc=1) and returns its live heap (HeapAlloc).
func (k *shakerChecker) heapAfterGC() (int64, error) {
	c := http.Client{Timeout: 60 * time.Second}
	resp, err := c.Get("http://" + k.admin + "/debug/pprof/heap?gc=1&debug=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 1<<30))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "# HeapAlloc = "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("no HeapAlloc in the heap profile of %s", k.admin)
}

// metric reads one value of the child's Prometheus metrics.
func (k *shakerChecker) metric(name string) (float64, error) {
	c := http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get("http://" + k.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("no metric %s", name)
}

// statusRoute is the route of the status page on /shaker-status, unless
// -read-status is 0: the page's RTT sampler reads every address every 5 s
// while it is configured, read or not.
func statusRoute() []any {
	if *readStatusEvery <= 0 {
		return nil
	}
	return []any{map[string]any{
		"match":  []any{map[string]any{"path": []string{"/shaker-status"}}},
		"handle": []any{map[string]any{"handler": "shaker_status"}},
	}}
}

// windowStart starts reading the child as operators do (reading.go).
func (k *shakerChecker) windowStart() {
	k.reads = startReads(readTotalOf(k.name), k.cmd.Process.Pid, map[string]string{
		"metrics": "http://" + k.admin + "/metrics",
		"status":  fmt.Sprintf("http://127.0.0.1:%d/shaker-status", k.port),
	}, map[string]time.Duration{"metrics": *readMetricsEvery, "status": *readStatusEvery})
}

// windowEnd ends the window's reads, then runs onWindowEnd, if set, after
// a measured window.
func (k *shakerChecker) windowEnd() {
	if k.reads != nil {
		k.reads.end()
		k.reads = nil
	}
	if k.onWindowEnd != nil {
		k.onWindowEnd()
	}
}
