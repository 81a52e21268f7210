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

// caddyChecker is Caddy built from ./cmd/caddy with one HTTP server per
// backend, each a reverse_proxy to it: with the plugin (shaker) or with
// Caddy's own active health checks.
type caddyChecker struct {
	bin    string
	shaker bool
	admin  string
	cfg    []byte
	p      *proc
	hc     *http.Client
}

func (c *caddyChecker) name() string {
	if c.shaker {
		return "shaker"
	}
	return "caddy"
}

func (c *caddyChecker) label() string {
	v := strings.Fields(version(c.bin, "v2", "version"))
	ver := ""
	if len(v) > 0 {
		ver = " " + v[0]
	}
	if c.shaker {
		return fmt.Sprintf("caddy-shaker (Caddy%s, `dynamic shaker`, `interval %v`)", ver, probeInterval)
	}
	return fmt.Sprintf("Caddy%s `health_uri /`, `health_interval %v`", ver, probeInterval)
}

func (c *caddyChecker) start(t *testing.T, servers []server) {
	t.Helper()
	dir := t.TempDir()
	c.admin = fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	c.hc = &http.Client{Timeout: 30 * time.Second}
	srvs := map[string]any{}
	for _, s := range servers {
		h := map[string]any{"handler": "reverse_proxy"}
		if c.shaker {
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
	cfg, err := json.Marshal(map[string]any{
		"admin": map[string]any{"listen": c.admin},
		"apps":  map[string]any{"http": map[string]any{"servers": srvs}},
	})
	if err != nil {
		t.Fatal(err)
	}
	c.cfg = cfg
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	c.p = startProc(t, "caddy-"+c.name(), filepath.Join(dir, "caddy.log"), dir, nil, syscall.SIGKILL,
		c.bin, "run", "--config", path)
	waitFor(t, 60*time.Second, "Caddy's admin endpoint answers", func() bool {
		if c.p.exited() {
			t.Fatalf("caddy exited: %v\n%s", c.p.err, c.p.tail())
		}
		r, err := c.hc.Get("http://" + c.admin + "/config/")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	})
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

// verify, for the plugin: the admin API shows every server up, probed.
func (c *caddyChecker) verify(t *testing.T, servers []server) map[string]int64 {
	t.Helper()
	if !c.shaker {
		return nil
	}
	r, err := c.hc.Get("http://" + c.admin + "/shaker/upstreams")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	var st []struct {
		Address   string `json:"address"`
		Healthy   bool   `json:"healthy"`
		Probes    int64  `json:"probes"`
		LastError string `json:"last_error"`
	}
	if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
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

func (c *caddyChecker) stop(t *testing.T) time.Duration {
	t.Helper()
	d, err := c.p.stop(syscall.SIGTERM, 30*time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, c.p.tail())
	}
	return d
}

// haproxyChecker is HAProxy in master-worker mode with one `listen`
// section per backend and a plain `check`: reloaded with SIGUSR2 (a new
// worker; the old one stops softly), stopped with SIGTERM.
type haproxyChecker struct {
	bin  string
	dir  string
	p    *proc
	done int // reloads done
}

func (c *haproxyChecker) name() string { return "haproxy" }

func (c *haproxyChecker) label() string {
	v := strings.Fields(version(c.bin, "version", "-v"))
	if len(v) >= 3 {
		ver, _, _ := strings.Cut(v[2], "-")
		return fmt.Sprintf("HAProxy %s `check inter %v`", ver, probeInterval)
	}
	return fmt.Sprintf("HAProxy `check inter %v`", probeInterval)
}

func (c *haproxyChecker) start(t *testing.T, servers []server) {
	t.Helper()
	c.dir = t.TempDir()
	var b strings.Builder
	fmt.Fprintf(&b, `global
	nbthread 1
	stats socket %s/stats.sock mode 600 level admin

defaults
	mode tcp
	timeout connect 1s
	timeout client 10s
	timeout server 10s
	timeout check %dms
`, c.dir, probeTimeout.Milliseconds())
	for _, s := range servers {
		fmt.Fprintf(&b, "\nlisten %s\n\tbind 127.0.0.1:%d\n\tserver s %s check inter %dms\n",
			s.name(), testkit.FreePort(t), s.target(), probeInterval.Milliseconds())
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
