//go:build linux

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// listSource is an upstream source for tests: it returns the dials of a
// named list that the test changes at will.
type listSource struct {
	List string `json:"list"`
}

var lists = struct {
	sync.Mutex
	m    map[string][]string
	fail map[string]bool
}{m: map[string][]string{}, fail: map[string]bool{}}

// setFailing makes the list's source answer with an error, or not.
func setFailing(name string, fail bool) {
	lists.Lock()
	lists.fail[name] = fail
	lists.Unlock()
}

func setList(name string, dials ...string) {
	lists.Lock()
	lists.m[name] = dials
	lists.Unlock()
}

func (listSource) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.upstreams.shaker_test_list",
		New: func() caddy.Module { return new(listSource) },
	}
}

func (s listSource) GetUpstreams(*http.Request) ([]*reverseproxy.Upstream, error) {
	lists.Lock()
	defer lists.Unlock()
	if lists.fail[s.List] {
		return nil, fmt.Errorf("list %s: failing, as the test asked", s.List)
	}
	var out []*reverseproxy.Upstream
	for _, d := range lists.m[s.List] {
		out = append(out, &reverseproxy.Upstream{Dial: d})
	}
	return out, nil
}

func init() { caddy.RegisterModule(listSource{}) }

func TestParseDial(t *testing.T) {
	for _, tc := range []struct {
		dial  string
		probe bool
		host  string
		ip    string
		port  uint16
	}{
		{"127.0.0.1:8080", true, "", "127.0.0.1", 8080},
		{"tcp/[::1]:443", true, "", "::1", 443},
		{"tcp4/10.0.0.1:80", true, "", "10.0.0.1", 80},
		{"Backend.Internal.:5432", true, "backend.internal", "", 5432},
		{"unix//run/app.sock", false, "", "", 0},
		{"udp/10.0.0.1:53", false, "", "", 0},
		{"{http.request.host}:80", false, "", "", 0},
		{"127.0.0.1", false, "", "", 0},
		{"127.0.0.1:0", false, "", "", 0},
		{"bad host:80", false, "", "", 0},
	} {
		d := parseDial(tc.dial)
		ip := ""
		if d.ip.IsValid() {
			ip = d.ip.String()
		}
		if d.probe != tc.probe || d.host != tc.host || ip != tc.ip || d.port != tc.port {
			t.Errorf("%q: probe %v host %q ip %q port %d; want %v %q %q %d",
				tc.dial, d.probe, d.host, ip, d.port, tc.probe, tc.host, tc.ip, tc.port)
		}
	}
}

// innerHarness is a harness whose shaker source wraps another source.
func innerHarness(t *testing.T, n int, inner map[string]any, extra map[string]any) *harness {
	h := newHarness(t, n)
	h.extra = map[string]any{"upstreams": nil, "inner": inner}
	for k, v := range extra {
		h.extra[k] = v
	}
	h.load(tInterval)
	return h
}

// TestDiscover: the upstreams of another source are probed from the moment
// they appear, filtered by health, and forgotten after they go.
func TestDiscover(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const forget = 300 * time.Millisecond
	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]
	setList("discover", b1.addr, b2.addr)
	h.extra = map[string]any{
		"upstreams":    nil,
		"inner":        map[string]any{"source": "shaker_test_list", "list": "discover"},
		"forget_after": forget.String(),
	}
	h.load(tInterval)

	// Probed without any request: the source polls the inner one.
	probed := func(addr string) bool { s, ok := h.statuses()[addr]; return ok && s.CheckedAt != nil }
	waitFor(t, 5*time.Second, "b1 and b2 probed", func() bool { return probed(b1.addr) && probed(b2.addr) })
	if _, ok := h.statuses()[b3.addr]; ok {
		t.Fatal("b3 probed before the source returned it")
	}
	if n := h.probeAccepts(); n != 0 {
		t.Fatalf("backends accepted %d connections from probes", n)
	}
	for range 20 {
		if code, body := h.get(); code != 200 || body == b3.name {
			t.Fatalf("request: %d %q, want 200 from b1 or b2", code, body)
		}
	}

	// A new upstream is probed from its first appearance.
	setList("discover", b1.addr, b2.addr, b3.addr)
	took := waitFor(t, 5*time.Second, "b3 probed", func() bool { return probed(b3.addr) })
	t.Logf("new upstream first probed %v after it appeared", took)

	// A stopped one is filtered out; no request fails after that.
	b2.stop()
	down := waitFor(t, 5*time.Second, "b2 down", func() bool { return !h.statuses()[b2.addr].Healthy })
	t.Logf("stopped backend marked down after %v", down)
	seen := h.servedBy(40) // any answer but a 200 fails the test
	if seen[b2.name] != 0 || seen[b1.name] == 0 || seen[b3.name] == 0 {
		t.Fatalf("requests reached %v, want b1 and b3 only", seen)
	}

	// A reload keeps the state: b2 does not look up.
	h.extraKnob++
	h.load(tInterval)
	if s := h.statuses()[b2.addr]; s.Healthy || s.CheckedAt == nil {
		t.Fatalf("after a reload b2 is %+v, want still down", s)
	}

	// One that the source stops returning is forgotten after forget_after.
	setList("discover", b2.addr, b3.addr)
	gone := waitFor(t, 5*time.Second, "b1 forgotten", func() bool { _, ok := h.statuses()[b1.addr]; return !ok })
	t.Logf("upstream gone from the source forgotten after %v (forget_after %v)", gone, forget)
	// The source last returned it at its last poll, up to an interval
	// before the list changed.
	if gone < forget-tInterval {
		t.Errorf("forgotten after %v, before forget_after %v", gone, forget)
	}
	// b2 stays down while the source returns it: the state is kept.
	if s := h.statuses()[b2.addr]; s.Healthy {
		t.Fatal("b2 looks up")
	}
	h.noLeakedProbes()
}

// loadInner loads a harness of one backend whose upstreams come from the
// inner source that inner makes of the backend's port; it skips in -short.
func loadInner(t *testing.T, inner func(port string) map[string]any) (*harness, *backend, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 1)
	b := h.backends[0]
	h.extra = map[string]any{"upstreams": nil, "inner": inner(b.port())}
	h.load(tInterval)
	return h, b, b.port()
}

// TestDiscoverHostName: an upstream given by name is resolved to all its
// addresses, each probed.
func TestDiscoverHostName(t *testing.T) {
	h, b, port := loadInner(t, func(port string) map[string]any {
		setList("hostname", "localhost:"+port)
		return map[string]any{"source": "shaker_test_list", "list": "hostname"}
	})
	waitFor(t, 5*time.Second, "localhost resolved and probed", func() bool {
		s, ok := h.statuses()[b.addr]
		return ok && s.CheckedAt != nil && s.Healthy && s.Upstream == "localhost:"+port
	})
}

// TestDiscoverASource: Caddy's own `a` source, whose upstreams Caddy never
// checks. localhost resolves to 127.0.0.1, and on some machines to ::1
// too; the backend listens on 127.0.0.1 only, so ::1, where it is
// returned, must be marked down and get no request.
func TestDiscoverASource(t *testing.T) {
	h, b, port := loadInner(t, func(port string) map[string]any {
		return map[string]any{"source": "a", "name": "localhost", "port": port}
	})
	var st map[string]Status
	waitFor(t, 5*time.Second, "localhost's addresses probed", func() bool {
		st = h.statuses()
		for _, s := range st {
			if s.CheckedAt == nil {
				return false
			}
		}
		return len(st) > 0
	})
	if !st[b.addr].Healthy {
		t.Fatalf("%s not up: %+v", b.addr, st)
	}
	if s, ok := st["[::1]:"+port]; ok && s.Healthy {
		t.Fatalf("[::1]:%s up, but nothing listens there", port)
	}
	for range 20 {
		if code, body := h.get(); code != 200 {
			t.Fatalf("request: %d %q", code, body)
		}
	}
	t.Logf("addresses: %d", len(st))
}

func TestDiscoverCaddyfile(t *testing.T) {
	got, err := adaptDynamic(t, `dynamic shaker {
		inner a my-service.internal 8080 {
			refresh 10s
		}
		interval 1s
		forget_after 30s
		max_discovered 500
	}`)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(got)
	want := `{"forget_after":30000000000,"inner":{"name":"my-service.internal","port":"8080","refresh":10000000000,"source":"a"},"interval":1000000000,"max_discovered":500,"source":"shaker"}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	for _, tc := range []struct{ block, want string }{
		{`dynamic shaker 127.0.0.1:80 {
			inner a localhost 80
		}`, "give one or the other"},
		{`dynamic shaker {
			inner shaker 127.0.0.1:80
		}`, "cannot wrap another shaker source"},
		{`dynamic shaker {
			inner nosuchsource x
		}`, "http.reverse_proxy.upstreams.nosuchsource"},
		{`dynamic shaker {
			inner a localhost 80
			inner a localhost 81
		}`, "inner already given"},
		{`dynamic shaker {
			source
		}`, "wrong argument count"},
		{`dynamic shaker {
			inner a localhost 80
			forget_after 0s
		}`, "forget_after '0s': must be positive"},
		{`dynamic shaker {
			inner a localhost 80
			max_discovered 0
		}`, "max_discovered '0'"},
		{`dynamic shaker {
			inner a localhost 80
			max_discovered many
		}`, "max_discovered 'many': not an integer"},
	} {
		_, err := adaptDynamic(t, tc.block)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.block, err, tc.want)
		}
	}
}

func TestDiscoverJSONErrors(t *testing.T) {
	for _, tc := range []struct{ dyn, want string }{
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"inner":{"source":"a","name":"localhost","port":"1"}}`, "give one or the other"},
		{`{"source":"shaker","inner":{"source":"shaker","upstreams":["127.0.0.1:1"]}}`, "cannot wrap another shaker source"},
		{`{"source":"shaker","inner":{"source":"nosuch"}}`, "nosuch"},
		{`{"source":"shaker","inner":{"source":"a","name":"localhost","port":"1"},"forget_after":"-1s"}`, "forget_after -1s"},
		{`{"source":"shaker","inner":{"source":"a","name":"localhost","port":"1"},"max_discovered":-5}`, "max_discovered -5: must not be negative"},
	} {
		err := validateProxy(t, `"dynamic_upstreams":`+tc.dyn)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.dyn, err, tc.want)
		}
	}
}

// BenchmarkGetUpstreamsDiscover: the per-request cost of filtering another
// source's upstreams (the inner source's own cost included).
func BenchmarkGetUpstreamsDiscover(b *testing.B) {
	r, _ := http.NewRequest("GET", "/", nil)
	for _, n := range []int{3, 100} {
		name := "bench" + strconv.Itoa(n)
		su, cs := sourceWith(n)
		table := map[string]*discovered{}
		var dials []string
		for i, c := range cs {
			addr := c.Addr().String()
			d := parseDial(addr)
			one := []*health.Checker{cs[i]}
			d.cs.Store(&one)
			d.lastSeen.Store(time.Now().UnixNano())
			table[addr] = d
			dials = append(dials, addr)
		}
		su.table.Store(&table)
		su.inner = listSource{List: name}
		setList(name, dials...)
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if ups, _ := su.GetUpstreams(r); len(ups) == 0 {
					b.Fatal("no upstreams")
				}
			}
		})
	}
}

// TestDiscoverForgetsWhileFailing: an upstream is forgotten forget_after
// after the source last returned it, even when the source's polls keep
// failing from then on.
func TestDiscoverForgetsWhileFailing(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	const forget = 200 * time.Millisecond
	h := newHarness(t, 1)
	b1 := h.backends[0]
	setList("failing", b1.addr)
	t.Cleanup(func() { setFailing("failing", false) })
	h.extra = map[string]any{
		"upstreams":    nil,
		"inner":        map[string]any{"source": "shaker_test_list", "list": "failing"},
		"forget_after": forget.String(),
	}
	h.load(tInterval)
	waitFor(t, 5*time.Second, "b1 probed", func() bool { return h.statuses()[b1.addr].Probes >= 2 })
	setFailing("failing", true)
	gone := waitFor(t, 5*time.Second, "b1 forgotten while the source fails", func() bool {
		_, ok := h.statuses()[b1.addr]
		return !ok
	})
	t.Logf("forgotten %v after the source began to fail (forget_after %v)", gone, forget)
	if len(probedAddrs()) != 0 {
		t.Fatalf("still probed: %v", probedAddrs())
	}
	// When the source answers again, the upstream is found again.
	setFailing("failing", false)
	waitFor(t, 5*time.Second, "b1 found again", func() bool { return h.statuses()[b1.addr].Probes >= 1 })
}

// TestMaxDiscovered: past max_discovered, new upstreams are not probed
// (requests still reach them), and one warning says so until forgetting
// makes room.
func TestMaxDiscovered(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]
	setList("max", b1.addr, b2.addr, b3.addr)
	h.extra = map[string]any{
		"upstreams":      nil,
		"inner":          map[string]any{"source": "shaker_test_list", "list": "max"},
		"max_discovered": 2,
		"forget_after":   "100ms",
	}
	h.load(tInterval)
	waitFor(t, 5*time.Second, "b1 and b2 probed", func() bool {
		st := h.statuses()
		return st[b1.addr].Probes >= 3 && st[b2.addr].Probes >= 3
	})
	if _, ok := h.statuses()[b3.addr]; ok {
		t.Fatal("b3 probed past max_discovered 2")
	}
	seen := map[string]int{}
	for range 60 {
		_, body := h.get()
		seen[body]++
	}
	if seen[b3.name] == 0 {
		t.Errorf("requests reached %v: b3, not probed, should get its share", seen)
	}
	// Room made: b1 leaves the source, b3 is probed.
	setList("max", b2.addr, b3.addr)
	waitFor(t, 5*time.Second, "b1 forgotten, b3 probed", func() bool {
		st := h.statuses()
		_, has1 := st[b1.addr]
		return !has1 && st[b3.addr].Probes >= 1
	})
	if n := h.probeAccepts(); n > int64(60) {
		t.Errorf("%d connections accepted for 60 requests", n)
	}
	h.noLeakedProbes()
}

// TestMaxDiscoveredWarnsOnce: the warning comes once each time the cap is
// met, not once per poll.
func TestMaxDiscoveredWarnsOnce(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	su := &Upstreams{MaxDiscovered: 3, ForgetAfter: caddy.Duration(time.Hour), logger: zap.New(core)}
	su.sourceState = new(sourceState)
	empty := map[string]*discovered{}
	su.table.Store(&empty)
	dials := func(from, to int) []string {
		var out []string
		for i := from; i < to; i++ {
			out = append(out, fmt.Sprintf("unix//run/shaker-test-%d.sock", i)) // not probed: no engine needed
		}
		return out
	}
	capped := func() int { return logs.FilterMessageSnippet("max_discovered reached").Len() }
	su.discover(dials(0, 5))
	su.discover(dials(0, 8))
	if n := len(*su.table.Load()); n != 3 {
		t.Fatalf("%d upstreams kept, want max_discovered 3", n)
	}
	if n := capped(); n != 1 {
		t.Fatalf("%d warnings after two polls over the cap, want 1", n)
	}
	// Forgotten: room again; meeting the cap again warns again.
	for _, d := range *su.table.Load() {
		d.lastSeen.Store(time.Now().Add(-2 * time.Hour).UnixNano())
	}
	su.forget()
	if n := len(*su.table.Load()); n != 0 {
		t.Fatalf("%d upstreams left after forgetting all", n)
	}
	su.discover(dials(10, 14))
	if n := capped(); n != 2 {
		t.Fatalf("%d warnings, want 2: one per time the cap is met", n)
	}
	e := logs.FilterMessageSnippet("max_discovered reached").All()[1].ContextMap()
	if e["max_discovered"] != int64(3) || e["not_probed"] != int64(1) {
		t.Errorf("warning fields %v", e)
	}
}

// TestInnerOldNames: the inner source's old names still work, with a
// deprecation warning: `source` in the Caddyfile adapts to what `inner`
// does, and "discover" in JSON is read as "inner" (refused beside it).
func TestInnerOldNames(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	old := deprecationLog
	deprecationLog = func() *zap.Logger { return zap.New(core) }
	t.Cleanup(func() { deprecationLog = old })
	adapt := func(sub string) string {
		got, err := adaptDynamic(t, "dynamic shaker {\n"+sub+" a my-service.internal 8080 {\nrefresh 10s\n}\ninterval 1s\n}")
		if err != nil {
			t.Fatalf("%s: %v", sub, err)
		}
		b, _ := json.Marshal(got)
		return string(b)
	}
	if n, o := adapt("inner"), adapt("source"); n != o || !strings.Contains(n, `"inner":{`) {
		t.Errorf("source adapts to %s, inner to %s: want the same, with \"inner\"", o, n)
	}
	if w := logs.FilterMessageSnippet("'source' subdirective is deprecated").All(); len(w) != 1 {
		t.Errorf("%d deprecation warnings for one source, want 1: %v", len(w), logs.All())
	}
	if _, err := adaptDynamic(t, "dynamic shaker {\ninner a x 80\nsource a y 80\n}"); err == nil || !strings.Contains(err.Error(), "source already given") {
		t.Errorf("inner and source: error %v, want source already given", err)
	}

	// JSON: discover is taken as inner, with a warning
	core, logs = observer.New(zap.WarnLevel)
	su := &Upstreams{DiscoverRaw: json.RawMessage(`{"source":"a","name":"x","port":"80"}`), logger: zap.New(core)}
	su.takeDiscover()
	if string(su.InnerRaw) != `{"source":"a","name":"x","port":"80"}` || su.DiscoverRaw != nil {
		t.Errorf("discover not taken as inner: inner %s, discover %s", su.InnerRaw, su.DiscoverRaw)
	}
	if w := logs.FilterMessageSnippet(`"discover" is deprecated`).All(); len(w) != 1 {
		t.Errorf("%d deprecation warnings, want 1: %v", len(w), logs.All())
	}
	for _, tc := range []struct{ dyn, want string }{
		{`{"source":"shaker","discover":{"source":"a","name":"localhost","port":"1"}}`, ""},
		{`{"source":"shaker","discover":{"source":"shaker","upstreams":["127.0.0.1:1"]}}`, "cannot wrap another shaker source"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"discover":{"source":"a","name":"localhost","port":"1"}}`, "give one or the other"},
		{`{"source":"shaker","inner":{"source":"a","name":"localhost","port":"1"},"discover":{"source":"a","name":"localhost","port":"2"}}`,
			`inner {"name":"localhost","port":"1","source":"a"} and discover {"name":"localhost","port":"2","source":"a"}: discover is inner's deprecated name`},
	} {
		err := validateProxy(t, `"dynamic_upstreams":`+tc.dyn)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.dyn, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s:\nerror %v\nwant  %q", tc.dyn, err, tc.want)
		}
	}
}

// TestDiscoverKeyStillProbes: a config with the old "discover" key
// probes the inner source's upstreams as one with "inner" does.
func TestDiscoverKeyStillProbes(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 1)
	b := h.backends[0]
	setList("old-key", b.addr)
	h.extra = map[string]any{"upstreams": nil, "discover": map[string]any{"source": "shaker_test_list", "list": "old-key"}}
	h.load(tInterval)
	waitFor(t, 5*time.Second, "the old key's upstream probed", func() bool { s, ok := h.statuses()[b.addr]; return ok && s.CheckedAt != nil })
	h.noLeakedProbes()
}
