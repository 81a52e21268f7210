//go:build linux

package caddyshaker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestAdminReadOnly: /shaker/upstreams on the admin endpoint answers GET
// only; POST, PUT, DELETE and PATCH (with or without a body) get 405 and
// change neither the probed addresses nor the running config.
func TestAdminReadOnly(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 2)
	h.waitProbes(nil, 1, 5*time.Second)
	url := "http://" + h.admin + "/shaker/upstreams"
	config := func() string {
		resp, err := http.Get("http://" + h.admin + "/config/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	cfg0 := config()
	addrs0 := slices.Sorted(maps.Keys(h.statuses()))
	if len(addrs0) != 2 {
		t.Fatalf("probed %v, want the 2 backends", addrs0)
	}
	bodies := []string{"", `[]`, `[{"upstream":"127.0.0.2:1","address":"127.0.0.2:1","healthy":true}]`, `{"upstreams":["127.0.0.2:1"]}`}
	for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
		for _, body := range bodies {
			req, err := http.NewRequest(method, url, strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusMethodNotAllowed {
				t.Errorf("%s /shaker/upstreams %q: %s, want 405", method, body, resp.Status)
			}
		}
	}
	// below the endpoint there is nothing to change either
	req, _ := http.NewRequest(http.MethodDelete, url+"/"+h.backends[0].addr, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("DELETE %s: %s, want 404 or 405", req.URL.Path, resp.Status)
	}

	// a drain changes the address's admin state, not what is probed nor
	// the config
	if code, body := h.adminDo("POST", "/shaker/upstreams/"+h.backends[0].addr+"/drain"); code != 200 {
		t.Fatalf("drain: %d %s", code, body)
	}
	if cfg := config(); cfg != cfg0 {
		t.Errorf("a drain changed the config:\n%s\nto\n%s", cfg0, cfg)
	}
	h.setAdmin(h.backends[0], "ready")

	// GET works, and shows the same addresses, still probed
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("GET: %s %q, want 200 application/json", resp.Status, resp.Header.Get("Content-Type"))
	}
	st := h.waitProbes(h.statuses(), 2, 5*time.Second)
	if addrs := slices.Sorted(maps.Keys(st)); !slices.Equal(addrs, addrs0) {
		t.Errorf("probed addresses changed from %v to %v", addrs0, addrs)
	}
	for _, b := range h.backends {
		if s := st[b.addr]; !s.Healthy {
			t.Errorf("%s: %+v, want healthy", b.name, s)
		}
	}
	if cfg := config(); cfg != cfg0 {
		t.Errorf("config changed:\n%s\n%s", cfg0, cfg)
	}
}

// probeCounts returns the engine's count of finished probes and the sum
// of the checkers' counts; the difference only moves when something other
// than a checker probes (give or take one probe in flight per checker).
func probeCounts(t *testing.T) (engine, checkers uint64, n int) {
	t.Helper()
	e := engines.cur.Load()
	if e == nil {
		t.Fatal("no engine")
	}
	st := e.Stats()
	cs := reg.Checkers()
	for _, c := range cs {
		checkers += c.Probes()
	}
	return st.Total() - st.Closed, checkers, len(cs)
}

// checkOnly fails unless the admin API and the registry show exactly the
// addresses in want, and the engine probed nothing beyond the checkers'
// probes since the counts e0, c0.
func checkOnly(t *testing.T, h *harness, want []string, e0, c0 uint64) {
	t.Helper()
	slices.Sort(want)
	if got := slices.Sorted(maps.Keys(h.statuses())); !slices.Equal(got, want) {
		t.Errorf("admin API shows %v, want exactly %v", got, want)
	}
	if got := slices.Sorted(maps.Keys(probedAddrs())); !slices.Equal(got, want) {
		t.Errorf("registry probes %v, want exactly %v", got, want)
	}
	e1, c1, n := probeCounts(t)
	de, dc := int64(e1-e0), int64(c1-c0)
	if de-dc > int64(n) || dc-de > int64(n) {
		t.Errorf("engine finished %d probes, checkers counted %d (%d checkers): something else was probed", de, dc, n)
	}
}

// TestOnlyConfiguredProbed: the engine probes the configured upstreams
// (at the `port` given, when one is), the addresses an inner source
// returns that can be probed (TCP host:port, not a Unix socket, UDP or a
// placeholder), and nothing else; an upstream removed by a reload, or
// forgotten by discovery, stops being probed at once and leaves the admin
// list.
func TestOnlyConfiguredProbed(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 3)
	b1, b2, b3 := h.backends[0], h.backends[1], h.backends[2]
	waitCheckDone(t) // the self-check's probes of its own listener are not counted below
	e0, c0, _ := probeCounts(t)
	h.waitProbes(nil, 5, 5*time.Second)
	checkOnly(t, h, []string{b1.addr, b2.addr, b3.addr}, e0, c0)

	// A reload without b3: it leaves the list, its checker stops.
	old := probedAddrs()[b3.addr]
	if len(old) != 1 {
		t.Fatalf("%d checkers for b3", len(old))
	}
	h.backends = h.backends[:2]
	h.extraKnob++
	h.load(tInterval)
	if _, ok := h.statuses()[b3.addr]; ok {
		t.Fatal("b3 still listed after the reload that removed it")
	}
	count := old[0].Probes
	after := count()
	e0, c0, _ = probeCounts(t)
	h.waitProbes(h.statuses(), 5, 5*time.Second) // 5 intervals of the others
	if n := count(); n > after+1 {               // one may have been in flight
		t.Errorf("b3 probed %d times after it was removed", n-after)
	}
	checkOnly(t, h, []string{b1.addr, b2.addr}, e0, c0)

	// With `port`, the upstreams are probed at that port only.
	port, _ := strconv.Atoi(b3.port())
	h.extra = map[string]any{"port": port}
	h.load(tInterval)
	e0, c0, _ = probeCounts(t)
	waitFor(t, 5*time.Second, "probes at the port given", func() bool {
		s, ok := h.statuses()[b3.addr]
		return ok && s.Probes >= 3
	})
	checkOnly(t, h, []string{b3.addr}, e0, c0)

	// Discovered: only what the inner source returns, and only what can
	// be probed.
	setList("security", b1.addr, "unix//run/shaker-test.sock", "udp/127.0.0.1:53", "{http.request.host}:80", "127.0.0.1:0")
	h.extra = map[string]any{
		"upstreams":    nil,
		"inner":        map[string]any{"source": "shaker_test_list", "list": "security"},
		"forget_after": "100ms",
	}
	h.load(tInterval)
	e0, c0, _ = probeCounts(t)
	waitFor(t, 5*time.Second, "b1 discovered and probed", func() bool {
		s, ok := h.statuses()[b1.addr]
		return ok && s.Probes >= 3
	})
	checkOnly(t, h, []string{b1.addr}, e0, c0)
	setList("security", b2.addr)
	waitFor(t, 5*time.Second, "b1 forgotten, b2 probed", func() bool {
		st := h.statuses()
		_, has1 := st[b1.addr]
		return !has1 && st[b2.addr].Probes >= 3
	})
	e0, c0, _ = probeCounts(t)
	waitFor(t, 5*time.Second, "more probes of b2", func() bool { return h.statuses()[b2.addr].Probes >= 6 })
	checkOnly(t, h, []string{b2.addr}, e0, c0)

	if n := probeAccepts(t, b1, b2, b3); n != 0 {
		t.Errorf("backends accepted %d connections", n)
	}
}

// secHelperEnv makes the test binary, run again as a child, the
// unprivileged prober of TestUnprivilegedProbes.
const secHelperEnv = "SHAKER_SECURITY_HELPER"

// TestUnprivilegedProbes: nothing needs privilege. The test binary runs
// again as user nobody (uid 65534), with no capabilities (no CAP_NET_RAW:
// it checks that a raw socket is refused), and probes a listener of this
// process with the engine, then through the plugin in Caddy: every probe
// is answered, and the listener accepts nothing. It needs root to start
// a child as another user.
func TestUnprivilegedProbes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a child process as user nobody (uid 65534); CI runs as root")
	}
	// a listener that never calls accept() until the child is done
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)

	out := runAsNobody(t, "probes", "SHAKER_SECURITY_ADDR="+addr)
	res := testkit.ResultsByName(out)
	checkPrivileges(t, res)
	if r := res["engine"]; len(r) != 3 || r[0] != "20" || r[1] != "20" {
		t.Fatalf("child engine probes (sent, up, max close delay): %v, want 20 of 20 up", r)
	}
	if r := res["caddy"]; len(r) != 2 || r[1] != "true" {
		t.Fatalf("child Caddy (probes, healthy): %v, want healthy", r)
	}
	// Every probe's socket is closed (the child has exited): a probe
	// that had become a connection would be waiting in the accept queue,
	// past the kernel's delayed-ACK window.
	testkit.WaitWindow(netip.MustParseAddrPort(addr))
	accepted := 0
	for {
		nfd, _, err := syscall.Accept(fd)
		if err != nil {
			if !errors.Is(err, syscall.EAGAIN) {
				t.Fatal(err)
			}
			break
		}
		syscall.Close(nfd)
		accepted++
	}
	if accepted != 0 {
		t.Fatalf("the listener had %d connections to accept", accepted)
	}
}

// runAsNobody runs the test binary again as user nobody (uid 65534), with
// no capabilities, as TestHelperUnprivileged with secHelperEnv set to mode
// and env added, bounded to 60 s; it returns the child's output, and fails
// the test if the child fails. It needs root; where the child cannot be
// started (a root that may not switch users, a noexec temporary
// directory), it skips the test.
func runAsNobody(t *testing.T, mode string, env ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a child process as user nobody (uid 65534); CI runs as root")
	}
	// The go test binary sits in a directory only root may enter: copy it
	// where nobody may run it.
	dir, err := os.MkdirTemp("", "shaker-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	home := filepath.Join(dir, "home")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(home, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "shaker.test")
	if err := copyFile(self, bin); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, testkit.TestArgs("TestHelperUnprivileged")...)
	cmd.Dir = home
	cmd.Env = append([]string{
		secHelperEnv + "=" + mode,
		"HOME=" + home, "XDG_CONFIG_HOME=" + home, "XDG_DATA_HOME=" + home, "PATH=/usr/bin:/bin",
	}, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start a child as user nobody: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child as nobody: %v\n%s", err, out.String())
	}
	t.Logf("child:\n%s", out.String())
	return out.String()
}

// checkPrivileges fails the test unless the child's results
// (printPrivileges) say it ran as nobody, with no capabilities, refused a
// raw socket.
func checkPrivileges(t *testing.T, res map[string][]string) {
	t.Helper()
	if r := res["ids"]; len(r) != 2 || r[0] != "65534" || r[1] != "65534" {
		t.Fatalf("child uid, euid %v: want 65534 65534", r)
	}
	if r := res["caps"]; len(r) != 2 || r[0] != "0000000000000000" || r[1] != "0000000000000000" {
		t.Fatalf("child CapEff, CapPrm %v: want none", r)
	}
	if r := res["rawsocket"]; len(r) != 1 || r[0] != "EPERM" {
		t.Fatalf("child raw socket: %v, want EPERM (no CAP_NET_RAW)", r)
	}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// TestHelperUnprivileged is the child of the tests that run as nobody
// (runAsNobody); it prints RESULT lines. secHelperEnv says which: probes
// (TestUnprivilegedProbes) or rawmode (TestRawModeNeedsCapNetRaw).
func TestHelperUnprivileged(t *testing.T) {
	testkit.Child(t, secHelperEnv, "TestUnprivilegedProbes and TestRawModeNeedsCapNetRaw", map[string]func(*testing.T){
		"probes":  helperUnprivilegedProbes,
		"rawmode": helperRawModeNoCap,
	})
}

// printPrivileges prints the child's uid and euid (RESULT ids), its
// effective and permitted capabilities (RESULT caps), and whether it may
// open a raw socket (RESULT rawsocket).
func printPrivileges(t *testing.T) {
	fmt.Printf("RESULT ids %d %d\n", os.Getuid(), os.Geteuid())
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	caps := map[string]string{}
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			caps[k] = strings.TrimSpace(v)
		}
	}
	fmt.Printf("RESULT caps %s %s\n", caps["CapEff"], caps["CapPrm"])
	if fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP); err == nil {
		syscall.Close(fd)
		fmt.Println("RESULT rawsocket allowed")
	} else if errors.Is(err, syscall.EPERM) {
		fmt.Println("RESULT rawsocket EPERM")
	} else {
		fmt.Printf("RESULT rawsocket %v\n", err)
	}
}

// helperUnprivilegedProbes is TestUnprivilegedProbes's child.
func helperUnprivilegedProbes(t *testing.T) {
	printPrivileges(t)
	addr := netip.MustParseAddrPort(os.Getenv("SHAKER_SECURITY_ADDR"))
	e, err := shaker.New(shaker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	up := 0
	for range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r := e.Probe(ctx, addr)
		cancel()
		if r.Err == nil {
			up++
		} else {
			fmt.Printf("probe error: %v\n", r.Err)
		}
	}
	st := e.Stats()
	e.Close()
	fmt.Printf("RESULT engine 20 %d %v\n", up, st.MaxCloseDelay)

	// the plugin, in Caddy, the same way
	cfg := fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
		"logging":{"logs":{"default":{"level":"ERROR"}}},
		"apps":{"http":{"servers":{"p":{"listen":["127.0.0.1:0"],"automatic_https":{"disable":true},
		"routes":[{"handle":[{"handler":"reverse_proxy","dynamic_upstreams":{
			"source":"shaker","upstreams":[%q],"interval":"10ms","timeout":"1s"}}]}]}}}}}`, addr)
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatalf("caddy.Load as nobody: %v", err)
	}
	defer caddy.Stop()
	var s Status
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if l := reg.Statuses(); len(l) == 1 {
			s = l[0]
			if s.Probes >= 5 {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	if s.LastError != "" {
		fmt.Printf("last error: %s\n", s.LastError)
	}
	fmt.Printf("RESULT caddy %d %v\n", s.Probes, s.Healthy && s.Probes >= 5 && s.LastError == "")
}

// TestRequestPlaceholderRefused: a wrapped source whose configuration holds
// a placeholder that only a request fills is refused at load, in JSON and
// in the Caddyfile (whose {header.*} shorthand is a request placeholder
// too): it would let any client choose what the proxy probes. Global
// placeholders, the same for every request, load.
func TestRequestPlaceholderRefused(t *testing.T) {
	load := func(dyn string) error { return validateProxy(t, `"dynamic_upstreams":`+dyn) }
	for _, tc := range []struct{ dyn, ph, field string }{
		{`{"source":"shaker","inner":{"source":"a","name":"{http.request.header.X-Target}","port":"9"},"forget_after":"100ms"}`,
			"{http.request.header.X-Target}", "name"},
		{`{"source":"shaker","inner":{"source":"a","name":"backend.internal","port":"{http.request.uri.query.p}"}}`,
			"{http.request.uri.query.p}", "port"},
		{`{"source":"shaker","inner":{"source":"srv","name":"x-{http.vars.tenant}.internal"}}`,
			"{http.vars.tenant}", "name"},
		{`{"source":"shaker","inner":{"source":"multi","sources":[{"source":"a","name":"ok.internal","port":"80"},{"source":"a","name":"{http.request.host}","port":"80"}]}}`,
			"{http.request.host}", "sources[1].name"},
	} {
		err := load(tc.dyn)
		if err == nil {
			t.Errorf("%s: loaded", tc.dyn)
			continue
		}
		for _, want := range []string{tc.ph, fmt.Sprintf("%q", tc.field), "clients would choose what this proxy probes"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s:\nerror %q\nwant it to say %s", tc.dyn, err, want)
			}
		}
	}
	// The same from the Caddyfile, with its shorthand.
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":8080 {\n\treverse_proxy {\n\t\tdynamic shaker {\n\t\t\tsource a {header.X-Target} 9\n\t\t}\n\t}\n}\n"), nil)
	if err != nil {
		t.Fatalf("adapt: %v", err) // refused at load, not by the adapter
	}
	var c caddy.Config
	if err := json.Unmarshal(out, &c); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&c); err == nil || !strings.Contains(err.Error(), "{http.request.header.X-Target}") {
		t.Errorf("Caddyfile source a {header.X-Target}: error %v, want it refused naming {http.request.header.X-Target}", err)
	}
	// Global placeholders and escaped braces load.
	t.Setenv("SHAKER_TEST_BACKEND", "localhost")
	for _, dyn := range []string{
		`{"source":"shaker","inner":{"source":"a","name":"{env.SHAKER_TEST_BACKEND}","port":"9"}}`,
		`{"source":"shaker","inner":{"source":"a","name":"{system.hostname}","port":"9"}}`,
		`{"source":"shaker","inner":{"source":"a","name":"localhost","port":"9","refresh":"1m"},"resolve_timeout":"1s"}`,
	} {
		if err := load(dyn); err != nil {
			t.Errorf("%s: %v", dyn, err)
		}
	}
}

func TestPlaceholderKeys(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"plain.internal", nil},
		{"{a}", []string{"a"}},
		{"x{a}y{b.c}z", []string{"a", "b.c"}},
		{`\{a}`, nil},
		{`{a\}b}`, []string{`a\}b`}},
		{"{unclosed", nil},
		{"{a}{", []string{"a"}},
	} {
		if got := placeholderKeys(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("placeholderKeys(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// headerSource is an upstream source for tests that reads a request
// directly, as a third-party module could, with no placeholder to refuse:
// it returns a fixed list, plus the X-Target header's value when a request
// has one.
type headerSource struct {
	List string `json:"list"`
}

func (headerSource) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.upstreams.shaker_test_header",
		New: func() caddy.Module { return new(headerSource) },
	}
}

func (s headerSource) GetUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	out, _ := listSource{List: s.List}.GetUpstreams(r)
	if v := r.Header.Get("X-Target"); v != "" {
		out = append(out, &reverseproxy.Upstream{Dial: v})
	}
	return out, nil
}

func init() { caddy.RegisterModule(headerSource{}) }

// TestRequestsCannotAddTargets: with an inner source that returns what each
// request asks for, 10,000 requests with distinct X-Target values (every one
// a loopback address with no listener) leave the probed set as the
// source's own poll found it. The requests still go where the source says
// (the source is the user's; probing is ours), and Caddy itself keeps a
// record of every dynamic host it dialled: so the heap is compared with the
// same flood through the inner source alone, side by side.
func TestRequestsCannotAddTargets(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 2)
	b1, b2 := h.backends[0], h.backends[1]
	setList("header", b1.addr, b2.addr)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	const requests = 10000
	// flood sends requests with targets 127.<net>.x.y:1, never listened
	// on (the proxy's dial is refused), and returns how much the heap grew.
	flood := func(net, n int) int64 {
		send := func(from, to int) {
			var wg sync.WaitGroup
			next := make(chan int)
			for range 8 {
				wg.Go(func() {
					for i := range next {
						req, _ := http.NewRequest("GET", "http://"+h.proxy+"/", nil)
						req.Header.Set("X-Target", fmt.Sprintf("127.%d.%d.%d:1", net, i/250, i%250+1))
						if resp, err := h.client.Do(req); err == nil {
							io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
						}
					}
				})
			}
			deadline := time.Now().Add(2 * time.Minute)
			for i := from; i < to && time.Now().Before(deadline); i++ {
				next <- i
			}
			close(next)
			wg.Wait()
		}
		send(0, 200) // warm pools and caches before the heap is read
		before := heap()
		start := time.Now()
		send(200, 200+n)
		grew := int64(heap()) - int64(before)
		t.Logf("%d requests in %v; heap grew %+d bytes", n, time.Since(start).Round(time.Millisecond), grew)
		return grew
	}

	// The inner source alone: Caddy's own cost of the flood.
	h.handler = map[string]any{"dynamic_upstreams": map[string]any{"source": "shaker_test_header", "list": "header"}}
	h.load(tInterval)
	base := flood(1, requests)

	// Wrapped by shaker.
	h.handler = nil
	h.extra = map[string]any{
		"upstreams":    nil,
		"inner":        map[string]any{"source": "shaker_test_header", "list": "header"},
		"forget_after": "100ms",
	}
	h.load(tInterval)
	waitFor(t, 5*time.Second, "b1 and b2 probed", func() bool {
		st := h.statuses()
		return st[b1.addr].Probes >= 2 && st[b2.addr].Probes >= 2
	})
	want := []string{b1.addr, b2.addr}
	slices.Sort(want)
	probed := func() []string { return slices.Sorted(maps.Keys(probedAddrs())) }
	if got := probed(); !slices.Equal(got, want) {
		t.Fatalf("probed %v before the requests, want %v", got, want)
	}
	wrapped := flood(2, requests)
	if got := probed(); !slices.Equal(got, want) {
		t.Fatalf("after %d requests with distinct targets, %d addresses probed, want %v", requests, len(got), want)
	}
	// 10,000 discovered upstreams with their checkers would take several
	// MB more than Caddy's own record of the hosts.
	if wrapped > base+512<<10 {
		t.Errorf("heap grew by %d bytes over %d requests through shaker, %d through the inner source alone", wrapped, requests, base)
	}
	resolved.Lock()
	names := len(resolved.m)
	resolved.Unlock()
	if names != 0 {
		t.Errorf("%d host names kept for lookups; want none", names)
	}
	// (no noLeakedProbes here: with 8 clients at once, Go's transport in
	// Caddy may dial a backend connection that an idle one then serves
	// first, so a connection without a request is no sign of a probe;
	// the probes' own stealth is asserted elsewhere)
	_ = h
}
