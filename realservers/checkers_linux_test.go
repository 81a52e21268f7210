//go:build linux

package realservers

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The checkers: each one a process of its own, checking every server at
// probeInterval, reloaded by config and stopped with SIGTERM as an
// operator would.

// checker is a health checker under test.
type checker interface {
	name() string
	label() string
	// start starts it checking every server and returns once it runs.
	start(t *testing.T, servers []server)
	// reload reloads its config and returns once the reload is done.
	reload(t *testing.T)
	// verify fails the test unless it is checking every server (for the
	// checkers that can tell), and returns the checks it counted of each
	// server, by name; nil for a checker that does not count them.
	verify(t *testing.T, servers []server) (checks map[string]int64)
	// stop sends SIGTERM and returns once it has exited: the time it took.
	stop(t *testing.T) time.Duration
}

// The kinds of caddyChecker.
const (
	kindShaker   = "shaker"    // ./cmd/caddy, reverse_proxy with dynamic shaker
	kindCaddy    = "caddy"     // ./cmd/caddy, reverse_proxy with Caddy's own active checks
	kindShakerL4 = "shaker-l4" // l4/cmd/caddy, layer4 proxy with lb_policy shaker
	kindCaddyL4  = "caddy-l4"  // l4/cmd/caddy, layer4 proxy with caddy-l4's own active checks
)

// caddyChecker is Caddy with one server per backend in front of it: an HTTP
// server with a reverse_proxy (Caddy built from ./cmd/caddy), with the
// plugin (kindShaker) or with Caddy's own active health checks
// (kindCaddy); or a layer4 server with caddy-l4's proxy (Caddy built from
// l4/cmd/caddy), with the plugin's selection policy (kindShakerL4) or with
// caddy-l4's own active checks (kindCaddyL4). The plugin's kinds run with
// the shaker app's probe_mode set to mode ("": unset, the default, connect).
type caddyChecker struct {
	bin     string
	kind    string
	mode    string // the shaker app's probe_mode: "" or probeModeRaw
	admin   string
	cfg     []byte
	p       *proc
	hc      *http.Client
	proxies map[string]string // layer 4: server name -> the proxy's address in front of it
}

// probeModeRaw is the shaker app's probe_mode that sends each SYN on a raw
// socket (docs/configuration.md): the kernel resets every SYN-ACK itself.
const probeModeRaw = "raw"

// name is its kind, and "-raw" for the plugin in raw mode.
func (c *caddyChecker) name() string {
	if c.mode != "" {
		return c.kind + "-" + c.mode
	}
	return c.kind
}

// kindOf is c's kind: what it is as a checker, whatever its probe mode;
// "haproxy" for HAProxy.
func kindOf(c checker) string {
	if cc, ok := c.(*caddyChecker); ok {
		return cc.kind
	}
	return c.name()
}

// probeMode is the probe mode its engine must report: its mode, or the
// default, connect.
func (c *caddyChecker) probeMode() string {
	if c.mode != "" {
		return c.mode
	}
	return "connect"
}

// probes says whether it is the plugin, which counts its probes.
func (c *caddyChecker) probes() bool { return c.kind == kindShaker || c.kind == kindShakerL4 }

func (c *caddyChecker) label() string {
	v := strings.Fields(version(c.bin, "v2", "version"))
	ver := ""
	if len(v) > 0 {
		ver = " " + v[0]
	}
	// "dep	github.com/mholt/caddy-l4	v0.1.2	h1:..."
	l4 := "caddy-l4"
	if f := strings.Fields(version(c.bin, "github.com/mholt/caddy-l4", "build-info")); len(f) >= 3 {
		l4 += " " + f[2]
	}
	mode := ""
	if c.mode != "" {
		mode = fmt.Sprintf(", `probe_mode %s`", c.mode)
	}
	switch c.kind {
	case kindShaker:
		return fmt.Sprintf("caddy-shaker (Caddy%s, `dynamic shaker`, `interval %v`%s)", ver, probeInterval, mode)
	case kindShakerL4:
		return fmt.Sprintf("caddy-shaker (Caddy%s, %s `proxy`, `lb_policy shaker`, `interval %v`%s)", ver, l4, probeInterval, mode)
	case kindCaddyL4:
		return fmt.Sprintf("%s `proxy` (Caddy%s) `health_interval %v`", l4, ver, probeInterval)
	}
	return fmt.Sprintf("Caddy%s `health_uri /`, `health_interval %v`", ver, probeInterval)
}

// proxyAddr is the layer-4 proxy's address in front of server, or "" for
// an HTTP reverse proxy (no client of these servers speaks HTTP).
func (c *caddyChecker) proxyAddr(server string) string { return c.proxies[server] }

func (c *caddyChecker) start(t *testing.T, servers []server) {
	t.Helper()
	var apps map[string]any
	switch c.kind {
	case kindShaker, kindCaddy:
		apps = map[string]any{"http": map[string]any{"servers": c.httpServers(t, servers)}}
	case kindShakerL4, kindCaddyL4:
		apps = map[string]any{"layer4": map[string]any{"servers": c.l4Servers(t, servers)}}
	default:
		t.Fatalf("caddyChecker: no kind %q", c.kind)
	}
	if c.mode != "" {
		if !c.probes() {
			t.Fatalf("caddyChecker: probe_mode %q for %s, which has no shaker engine", c.mode, c.kind)
		}
		apps["shaker"] = map[string]any{"probe_mode": c.mode}
	}
	c.p, c.admin, c.cfg = startCaddy(t, "caddy-"+c.name(), c.bin, apps)
	c.hc = &http.Client{Timeout: 30 * time.Second}
}

// httpServers: one HTTP server per backend, a reverse_proxy to it.
func (c *caddyChecker) httpServers(t *testing.T, servers []server) map[string]any {
	srvs := map[string]any{}
	for _, s := range servers {
		h := map[string]any{"handler": "reverse_proxy"}
		if c.kind == kindShaker {
			h["dynamic_upstreams"] = map[string]any{
				"source":    "shaker",
				"upstreams": []string{s.target()},
				"interval":  probeInterval.String(),
				"timeout":   probeTimeout.String(),
			}
		} else {
			h["upstreams"] = []map[string]string{{"dial": s.target()}}
			h["health_checks"] = map[string]any{"active": map[string]any{
				"uri":      "/",
				"interval": probeInterval.String(),
				"timeout":  probeTimeout.String(),
			}}
		}
		srvs[s.name()] = map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))},
			"automatic_https": map[string]any{"disable": true},
			"routes":          []any{map[string]any{"handle": []any{h}}},
		}
	}
	return srvs
}

// l4Servers: one layer4 server per backend, a proxy to it, with the
// plugin's policy or caddy-l4's own active checks (a TCP connect, closed)
// at the same interval and timeout.
func (c *caddyChecker) l4Servers(t *testing.T, servers []server) map[string]any {
	srvs := map[string]any{}
	c.proxies = map[string]string{}
	for _, s := range servers {
		h := l4Proxy(c.kind == kindShakerL4, "", map[string]any{
			"interval": probeInterval.String(),
			"timeout":  probeTimeout.String(),
		}, s.target())
		addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
		c.proxies[s.name()] = addr
		srvs[s.name()] = map[string]any{
			"listen": []string{addr},
			"routes": []any{map[string]any{"handle": []any{h}}},
		}
	}
	return srvs
}

// l4Proxy is a caddy-l4 proxy handler to targets (one upstream each),
// checked by the plugin's selection policy with the probe settings in
// checks (shaker), or by caddy-l4's own active checks with those settings;
// selection by the policy named inner ("": caddy-l4's default, random).
func l4Proxy(shaker bool, inner string, checks map[string]any, targets ...string) map[string]any {
	var ups []any
	for _, a := range targets {
		ups = append(ups, map[string]any{"dial": []string{a}})
	}
	h := map[string]any{"handler": "proxy", "upstreams": ups}
	if shaker {
		sel := map[string]any{"policy": "shaker"}
		for k, v := range checks {
			sel[k] = v
		}
		if inner != "" {
			sel["inner"] = map[string]any{"policy": inner}
		}
		h["load_balancing"] = map[string]any{"selection": sel}
	} else {
		h["health_checks"] = map[string]any{"active": checks}
		if inner != "" {
			h["load_balancing"] = map[string]any{"selection": map[string]any{"policy": inner}}
		}
	}
	return h
}

// startCaddy runs bin with apps and an admin endpoint of its own, and
// returns once the admin endpoint answers: the process, the admin address
// and the config it loaded.
func startCaddy(t *testing.T, name, bin string, apps map[string]any) (*proc, string, []byte) {
	t.Helper()
	dir := t.TempDir()
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	cfg, err := json.Marshal(map[string]any{
		"admin": map[string]any{"listen": admin},
		"apps":  apps,
	})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	p := startProc(t, name, filepath.Join(dir, "caddy.log"), dir, nil, syscall.SIGKILL,
		bin, "run", "--config", path)
	hc := &http.Client{Timeout: 5 * time.Second}
	waitFor(t, 60*time.Second, name+": Caddy's admin endpoint answers", func() bool {
		if p.exited() {
			t.Fatalf("%s exited: %v\n%s", name, p.err, p.tail())
		}
		r, err := hc.Get("http://" + admin + "/config/")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	})
	return p, admin, cfg
}

// reload posts the same config to /load; Cache-Control: must-revalidate
// makes Caddy load it although it has not changed.
func (c *caddyChecker) reload(t *testing.T) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+c.admin+"/load", bytes.NewReader(c.cfg))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Cache-Control", "must-revalidate")
	r, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if r.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %s: %s", r.Status, b)
	}
}

// verify, for the plugin: the admin API shows every server up, probed,
// and the engine probing in the mode asked for (so that a raw checker
// cannot pass in connect mode), its self-check passed.
func (c *caddyChecker) verify(t *testing.T, servers []server) map[string]int64 {
	t.Helper()
	if !c.probes() {
		return nil
	}
	var eng engineState
	adminJSON(t, c.hc, c.admin, "/shaker/engine", &eng)
	if eng.ProbeMode != c.probeMode() || eng.SelfCheck != "ok" {
		t.Errorf("plugin (%s): GET /shaker/engine: probe_mode %q (want %q), self_check %q (want \"ok\"); raw_error %q, self_check_error %q",
			c.name(), eng.ProbeMode, c.probeMode(), eng.SelfCheck, eng.RawError, eng.SelfCheckError)
	}
	st := shakerUpstreams(t, c.hc, c.admin)
	checks := make(map[string]int64, len(servers))
	for _, s := range servers {
		found := false
		for _, u := range st {
			if u.Address != s.target() {
				continue
			}
			found = true
			checks[s.name()] += u.Probes
			if !u.Healthy || u.Probes == 0 {
				t.Errorf("plugin: %s (%s): healthy %v after %d probes (last error %q)", s.name(), s.target(), u.Healthy, u.Probes, u.LastError)
			}
		}
		if !found {
			t.Errorf("plugin: %s (%s) not in /shaker/upstreams: %+v", s.name(), s.target(), st)
		}
	}
	return checks
}

// upstreamState is an entry of the plugin's GET /shaker/upstreams.
type upstreamState struct {
	Address   string `json:"address"`
	Healthy   bool   `json:"healthy"`
	Probes    int64  `json:"probes"`
	LastError string `json:"last_error"`
}

// engineState is the part of the plugin's GET /shaker/engine read here.
type engineState struct {
	ProbeMode      string `json:"probe_mode"`
	RawError       string `json:"raw_error"`
	SelfCheck      string `json:"self_check"`
	SelfCheckError string `json:"self_check_error"`
}

// shakerUpstreams reads the plugin's GET /shaker/upstreams from admin.
func shakerUpstreams(t *testing.T, hc *http.Client, admin string) []upstreamState {
	t.Helper()
	var st []upstreamState
	adminJSON(t, hc, admin, "/shaker/upstreams", &st)
	return st
}

// adminJSON decodes the JSON that GET path on the admin endpoint admin
// answers into v.
func adminJSON(t *testing.T, hc *http.Client, admin, path string, v any) {
	t.Helper()
	r, err := hc.Get("http://" + admin + path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	if r.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(r.Body)
		t.Fatalf("GET %s: %s: %s", path, r.Status, b)
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
}

func (c *caddyChecker) stop(t *testing.T) time.Duration {
	t.Helper()
	d, err := c.p.stop(syscall.SIGTERM, 30*time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, c.p.tail())
	}
	return d
}

// haproxyChecker is HAProxy in master-worker mode with one `listen`
// section per backend (`mode tcp`, a layer-4 proxy) and a plain `check`:
// reloaded with SIGUSR2 (a new worker; the old one stops softly), stopped
// with SIGTERM.
type haproxyChecker struct {
	bin     string
	dir     string
	p       *proc
	done    int               // reloads done
	proxies map[string]string // server name -> its listen section's address
}

func (c *haproxyChecker) proxyAddr(server string) string { return c.proxies[server] }

func (c *haproxyChecker) name() string { return "haproxy" }

func (c *haproxyChecker) label() string {
	v := strings.Fields(version(c.bin, "version", "-v"))
	if len(v) >= 3 {
		ver, _, _ := strings.Cut(v[2], "-")
		return fmt.Sprintf("HAProxy %s `mode tcp`, `check inter %v`", ver, probeInterval)
	}
	return fmt.Sprintf("HAProxy `mode tcp`, `check inter %v`", probeInterval)
}

func (c *haproxyChecker) start(t *testing.T, servers []server) {
	t.Helper()
	c.dir = t.TempDir()
	var b strings.Builder
	b.WriteString(testkit.HAProxyConfig(c.dir, 0, probeTimeout))
	c.proxies = map[string]string{}
	for _, s := range servers {
		addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
		c.proxies[s.name()] = addr
		fmt.Fprintf(&b, "\nlisten %s\n\tbind %s\n\tserver s %s check inter %dms\n",
			s.name(), addr, s.target(), probeInterval.Milliseconds())
	}
	cfg := filepath.Join(c.dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	c.p = startProc(t, "haproxy", filepath.Join(c.dir, "haproxy.log"), c.dir, nil, syscall.SIGKILL,
		c.bin, "-W", "-db", "-f", cfg)
	waitFor(t, 30*time.Second, "HAProxy's stats socket answers", func() bool {
		if c.p.exited() {
			t.Fatalf("haproxy exited: %v\n%s", c.p.err, c.p.tail())
		}
		_, err := c.stat()
		return err == nil
	})
}

// stat reads `show stat` from the stats socket.
func (c *haproxyChecker) stat() ([][]string, error) {
	conn, err := net.DialTimeout("unix", c.dir+"/stats.sock", 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "show stat\n"); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(conn)
	if err != nil {
		return nil, err
	}
	r := csv.NewReader(bytes.NewReader(bytes.TrimPrefix(b, []byte("# "))))
	r.FieldsPerRecord = -1
	return r.ReadAll()
}

// reload sends SIGUSR2 to the master and waits until it says the new
// worker loaded.
func (c *haproxyChecker) reload(t *testing.T) {
	t.Helper()
	if err := c.p.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	c.done++
	waitFor(t, 30*time.Second, "HAProxy reloads", func() bool {
		if c.p.exited() {
			t.Fatalf("haproxy exited: %v\n%s", c.p.err, c.p.tail())
		}
		return strings.Count(c.p.output(), "Loading success") >= c.done+1
	})
}

// verify: every server is UP by a layer-4 check.
func (c *haproxyChecker) verify(t *testing.T, servers []server) map[string]int64 {
	t.Helper()
	rows, err := c.stat()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) == 0 {
		t.Fatal("show stat: nothing")
	}
	col := map[string]int{}
	for i, n := range rows[0] {
		col[n] = i
	}
	for _, s := range servers {
		found := false
		for _, r := range rows[1:] {
			if len(r) <= col["check_status"] || r[col["pxname"]] != s.name() || r[col["svname"]] != "s" {
				continue
			}
			found = true
			// "* L4OK": the last check passed and another one is running
			if r[col["status"]] != "UP" || strings.TrimPrefix(r[col["check_status"]], "* ") != "L4OK" {
				t.Errorf("haproxy: %s: status %s, check %s", s.name(), r[col["status"]], r[col["check_status"]])
			}
		}
		if !found {
			t.Errorf("haproxy: %s not in show stat", s.name())
		}
	}
	return nil // show stat has no count of checks
}

func (c *haproxyChecker) stop(t *testing.T) time.Duration {
	t.Helper()
	d, err := c.p.stop(syscall.SIGTERM, 30*time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, c.p.tail())
	}
	return d
}
