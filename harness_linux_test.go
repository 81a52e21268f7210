//go:build linux

// The root's test harness: Caddy running in this process in front of
// backends that count what they accept, the waits the tests share, and
// the one way the tests read statuses (byAddress, over adminStatuses or
// the registry). What it shares with the l4 module's harness (loading a
// config, the admin API, the events recorder, waits) is in
// internal/caddytest. The files of tests that use it build on Linux only.

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// Probe settings of the integration tests.
const (
	tInterval = 50 * time.Millisecond
	tTimeout  = 40 * time.Millisecond // <= tInterval: the bound interval x fails + timeout holds
	tPasses   = 2
	tFails    = 3
	// slack for scheduling under -race on a busy 2-core machine
	tSlack = 150 * time.Millisecond
	// config reloads in test (5)
	reloads = 20
)

// backend is an HTTP server on 127.0.0.1 whose listener counts accept():
// a half-open probe must never reach it. A connection that was accepted
// but never carried a request is what a leaked probe looks like.
type backend struct {
	t    testing.TB
	name string
	addr string

	mu  sync.Mutex
	srv *http.Server
	ln  *testkit.Counted // while it serves

	accepts atomic.Int64 // connections accepted: count with probeAccepts
	served  atomic.Int64 // requests answered
	empty   atomic.Int64 // connections closed without a request
	fresh   sync.Map     // connections open that have not carried a request yet
}

// port is the port the backend listens on.
func (b *backend) port() string {
	_, port, _ := net.SplitHostPort(b.addr)
	return port
}

func startBackend(t testing.TB, name, addr string) *backend {
	t.Helper()
	b := &backend{t: t, name: name, addr: addr}
	b.start()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) start() {
	b.t.Helper()
	ln := caddytest.Relisten(b.t, "tcp", b.addr, "backend "+b.name)
	b.addr = ln.Addr().String()
	active := sync.Map{}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b.served.Add(1)
			io.WriteString(w, b.name)
		}),
		ConnState: func(c net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				b.fresh.Store(c, true)
			case http.StateActive:
				active.Store(c, true)
				b.fresh.Delete(c)
			case http.StateClosed, http.StateHijacked:
				b.fresh.Delete(c)
				if _, ok := active.LoadAndDelete(c); !ok {
					b.empty.Add(1)
				}
			}
		},
	}
	counted := testkit.CountAccepts(ln, &b.accepts)
	b.mu.Lock()
	b.srv, b.ln = srv, counted
	b.mu.Unlock()
	go srv.Serve(counted)
}

func (b *backend) stop() {
	b.mu.Lock()
	srv := b.srv
	b.srv, b.ln = nil, nil
	b.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// waitFor is caddytest.WaitFor: it polls cond every 2 ms until it holds
// or within has passed.
var waitFor = caddytest.WaitFor

// waitEvent waits until an event name with host has been recorded (by
// caddytest's recorder, which the harness's config subscribes).
func waitEvent(t testing.TB, name, host string, within time.Duration) {
	t.Helper()
	caddytest.WaitEvent(t, name, host, 0, within)
}

// harness is Caddy running in this process: a proxy with `dynamic
// shaker` in front of backends, admin on a free localhost port.
type harness struct {
	t         testing.TB
	admin     string
	proxy     string
	backends  []*backend
	client    *http.Client
	extraKnob int            // changes the config so that Load reloads
	extra     map[string]any // more fields of the shaker source
	handler   map[string]any // more fields of the reverse_proxy handler
	app       map[string]any // the shaker app's config (nil: none, the defaults)
	// policy, when set, replaces the shaker source with the handler's own
	// upstreams and the shaker selection policy with these more fields
	// ("retries" goes in load_balancing).
	policy map[string]any
}

func (h *harness) config(interval time.Duration) []byte {
	ups := make([]string, len(h.backends))
	for i, b := range h.backends {
		ups[i] = b.addr
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": h.admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level": "ERROR",
		}}},
		"apps": map[string]any{
			"events": caddytest.Subscribe("healthy", "unhealthy", "admin_state_changed"),
			"http": map[string]any{"servers": map[string]any{"proxy": map[string]any{
				"listen":          []string{h.proxy},
				"automatic_https": map[string]any{"disable": true},
				"routes": []any{map[string]any{"handle": []any{
					map[string]any{
						"handler": "headers",
						"response": map[string]any{"set": map[string]any{
							"X-Knob": []string{fmt.Sprint(h.extraKnob)},
						}},
					},
					map[string]any{
						"handler": "reverse_proxy",
						"dynamic_upstreams": map[string]any{
							"source":    "shaker",
							"upstreams": ups,
							"interval":  interval.String(),
							"timeout":   tTimeout.String(),
							"passes":    tPasses,
							"fails":     tFails,
						},
					},
				}}},
			}}},
		},
	}
	dyn := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)["proxy"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[1].(map[string]any)["dynamic_upstreams"].(map[string]any)
	for k, v := range h.extra {
		dyn[k] = v
	}
	rp := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)["proxy"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[1].(map[string]any)
	if h.policy != nil {
		delete(rp, "dynamic_upstreams")
		var static []any
		for _, u := range ups {
			static = append(static, map[string]any{"dial": u})
		}
		rp["upstreams"] = static
		sel := map[string]any{"policy": "shaker", "interval": interval.String(), "timeout": tTimeout.String(), "passes": tPasses, "fails": tFails}
		lb := map[string]any{"selection_policy": sel}
		for k, v := range h.policy {
			if k == "retries" {
				lb[k] = v
			} else {
				sel[k] = v
			}
		}
		rp["load_balancing"] = lb
	}
	for k, v := range h.handler {
		rp[k] = v
	}
	if h.app != nil {
		cfg["apps"].(map[string]any)["shaker"] = h.app
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		h.t.Fatal(err)
	}
	return b
}

func newHarness(t testing.TB, nBackends int) *harness {
	t.Helper()
	return newHarnessApp(t, nBackends, nil)
}

// newHarnessApp is newHarness with app as the shaker app's config from
// the first load on (the engine starts with it).
func newHarnessApp(t testing.TB, nBackends int, app map[string]any) *harness {
	t.Helper()
	h := &harness{
		t:      t,
		app:    app,
		admin:  fmt.Sprintf("localhost:%d", testkit.FreePort(t)),
		proxy:  fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}},
	}
	for i := range nBackends {
		h.backends = append(h.backends, startBackend(t, fmt.Sprintf("b%d", i+1), "127.0.0.1:0"))
	}
	h.load(tInterval)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("caddy.Stop: %v", err)
		}
		h.client.CloseIdleConnections()
	})
	return h
}

func (h *harness) load(interval time.Duration) {
	h.t.Helper()
	caddytest.Load(h.t, h.config(interval))
}

// statuses reads GET /shaker/upstreams on h's admin endpoint, by address,
// retried across a reload (adminStatuses).
func (h *harness) statuses() map[string]Status {
	h.t.Helper()
	return adminStatuses(h.t, h.admin)
}

// adminStatuses reads GET /shaker/upstreams, by address. With admin "" it
// calls the admin handler directly: no connection, so it reads with no
// file descriptor left. Otherwise it asks admin over HTTP, retried
// boundedly across a reload (caddytest.Statuses).
func adminStatuses(t testing.TB, admin string) map[string]Status {
	t.Helper()
	if admin == "" {
		_, list, err := getUpstreams(t, "")
		if err != nil {
			t.Fatal(err)
		}
		return byAddress(list)
	}
	return caddytest.Statuses(t, admin)
}

// byAddress indexes statuses by address: the one way the tests turn the
// admin API's list or the registry's (byAddress(reg.Statuses())) into a
// map.
var byAddress = caddytest.ByAddress

// checkMetrics checks that the admin /metrics page has each line prefix.
func (h *harness) checkMetrics(prefixes ...string) {
	h.t.Helper()
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		h.t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, p := range prefixes {
		if !strings.Contains("\n"+string(body), "\n"+p) {
			h.t.Errorf("metrics: no line %q", p)
		}
	}
}

func (h *harness) get() (int, string) {
	resp, err := h.client.Get("http://" + h.proxy + "/")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// noLeakedProbes fails the test if a backend accepted a connection that
// never carried a request: what a probe that became a connection looks like,
// closed since or still open. It counts past the kernel's delayed-ACK window
// (probeAccepts), once client requests are done.
func (h *harness) noLeakedProbes() {
	h.t.Helper()
	h.probeAccepts() // wait out the window, flush the accept queues
	for _, b := range h.backends {
		open := 0
		b.fresh.Range(func(_, _ any) bool { open++; return true })
		if n := b.empty.Load(); n != 0 || open != 0 {
			h.t.Errorf("%s: %d connections closed without a request, %d open without one (leaked probes)", b.name, n, open)
		}
	}
}

// probeAccepts returns how many connections the backends have accepted in
// all (probeAccepts of h.backends).
func (h *harness) probeAccepts() int64 {
	h.t.Helper()
	return probeAccepts(h.t, h.backends...)
}

// probeAccepts returns how many connections bs have accepted in all,
// counted past the kernel's delayed-ACK window (testkit.ProbeAccepts: one
// wait for all) with the accept queues of those that serve flushed. A
// stopped backend accepts nothing more.
func probeAccepts(t testing.TB, bs ...*backend) int64 {
	t.Helper()
	var serving []testkit.Counter
	var n int64
	for _, b := range bs {
		b.mu.Lock()
		ln := b.ln
		b.mu.Unlock()
		if ln != nil {
			serving = append(serving, ln)
		} else {
			n += b.accepts.Load()
		}
	}
	return n + testkit.ProbeAccepts(t, serving...)
}

// waitProbes waits until every backend has at least n more probe results
// than in before.
func (h *harness) waitProbes(before map[string]Status, n uint64, within time.Duration) map[string]Status {
	h.t.Helper()
	var st map[string]Status
	waitFor(h.t, within, fmt.Sprintf("%d probes of every backend", n), func() bool {
		st = h.statuses()
		for _, b := range h.backends {
			if st[b.addr].Probes < before[b.addr].Probes+n {
				return false
			}
		}
		return true
	})
	return st
}

// adminDo sends method to Caddy's admin endpoint at path and returns the
// status code and body, retried across a reload (caddytest.AdminDo).
func (h *harness) adminDo(method, path string) (int, string) {
	h.t.Helper()
	return caddytest.AdminDo(h.t, h.admin, method, path)
}

// setAdmin posts an action for b's address and checks the answer: 200
// and the address's new state.
func (h *harness) setAdmin(b *backend, action string) Status {
	h.t.Helper()
	code, body := h.adminDo("POST", "/shaker/upstreams/"+b.addr+"/"+action)
	if code != 200 {
		h.t.Fatalf("POST %s/%s: %d %s", b.addr, action, code, body)
	}
	var list []Status
	if err := json.Unmarshal([]byte(body), &list); err != nil || len(list) != 1 {
		h.t.Fatalf("POST %s/%s: %q: %v", b.addr, action, body, err)
	}
	if list[0].AdminState != action || list[0].Address != b.addr {
		h.t.Fatalf("POST %s/%s: answered %+v", b.addr, action, list[0])
	}
	return list[0]
}

// servedBy sends n requests and counts the answers by backend name; any
// answer but a backend's 200 fails the test.
func (h *harness) servedBy(n int) map[string]int {
	h.t.Helper()
	m := make(map[string]int)
	for range n {
		code, body := h.get()
		if code != 200 {
			h.t.Fatalf("request: %d %q", code, body)
		}
		m[body]++
	}
	return m
}

// failedRequestProbes checks that a failed request gets its upstream
// probed at once, with h loaded with two backends, at interval and
// fast_interval fast, and retries: it stops b1 and sends requests, each
// answer checked by answer, until one went to b1, failed and was retried
// (at most maxRequests); then b1 must be down within 5 s, and requests go
// to b2 only. It logs how long the probe and the transition took.
func (h *harness) failedRequestProbes(interval, fast time.Duration, maxRequests int, answer func(code int, body string) error) {
	h.t.Helper()
	b1 := h.backends[0]
	// new addresses are first probed at once
	waitFor(h.t, 5*time.Second, "b1's first probe", func() bool { return h.statuses()[b1.addr].Probes > 0 })
	b1.stop()
	before := h.statuses()[b1.addr].Probes
	start := time.Now()
	for i := 0; h.statuses()[b1.addr].Probes == before; i++ {
		if i > maxRequests {
			h.t.Fatalf("%d requests and b1 not probed again", maxRequests)
		}
		if err := answer(h.get()); err != nil {
			h.t.Fatal(err)
		}
	}
	probed := time.Since(start)
	took := waitFor(h.t, 5*time.Second, "b1 down", func() bool { return !h.statuses()[b1.addr].Healthy })
	h.t.Logf("b1 probed %v after requests started failing on it, down %v later (interval %v, fast_interval %v)", probed, took, interval, fast)
	if got := h.servedBy(10); got["b2"] != 10 {
		h.t.Errorf("b1 down: requests went to %v", got)
	}
}

// awaitSelfCheck polls GET /shaker/engine until the engine's self-check
// is no longer pending (it takes about 250 ms), and returns the status.
func (h *harness) awaitSelfCheck() EngineStatus {
	h.t.Helper()
	var es EngineStatus
	waitFor(h.t, 10*time.Second, "the self-check to end (GET /shaker/engine)", func() bool {
		resp, err := http.Get("http://" + h.admin + "/shaker/engine")
		if err != nil {
			h.t.Fatal(err)
		}
		defer resp.Body.Close()
		es = EngineStatus{}
		if err := json.NewDecoder(resp.Body).Decode(&es); err != nil || resp.StatusCode != http.StatusOK {
			h.t.Fatalf("GET /shaker/engine: %s, %v", resp.Status, err)
		}
		return es.SelfCheck != checkPending
	})
	return es
}

// probedAddrs returns the addresses of the registry's checkers and their
// checkers.
func probedAddrs() map[string][]*health.Checker {
	out := map[string][]*health.Checker{}
	for _, c := range reg.Checkers() {
		out[c.Addr().String()] = append(out[c.Addr().String()], c)
	}
	return out
}

// loadConfig is a Caddy config with one reverse_proxy over ups, probed by
// dynamic shaker; knob changes the config so that loading it reloads.
func loadConfig(tb testing.TB, ups []string, interval string, knob int) []byte {
	b, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"p": map[string]any{
			"listen":          []string{"127.0.0.1:0"},
			"automatic_https": map[string]any{"disable": true},
			"routes": []any{map[string]any{"handle": []any{
				map[string]any{"handler": "headers", "response": map[string]any{"set": map[string]any{"X-Knob": []string{fmt.Sprint(knob)}}}},
				map[string]any{
					"handler": "reverse_proxy",
					"dynamic_upstreams": map[string]any{
						"source": "shaker", "upstreams": ups, "interval": interval, "timeout": "500ms",
					},
				},
			}}},
		}}}},
	})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func engineProbes() uint64 {
	if e := engines.cur.Load(); e != nil {
		return e.Stats().Total()
	}
	return 0
}
