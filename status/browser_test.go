//go:build linux

package status_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-shaker/caddy-shaker" // the shaker app and `dynamic shaker`
	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/status"
)

// statusPassword's bcrypt hash (cost 4: the page reloads every second and
// each request checks it); user "admin".
const (
	statusPassword = "shaker"
	statusHash     = "$2a$04$LffASIle/41c.qVR7JrL3OYNsVVZ2lyzfmPcQBcP/sI05cY2HfblG"
)

// chromiumPath returns Debian's chromium, or skips (fails when
// SHAKER_REQUIRE_BROWSER is set, as .ci/run does).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	const msg = "needs a headless browser: Debian's chromium package (apt-get install chromium); .ci/run installs it"
	if os.Getenv("SHAKER_REQUIRE_BROWSER") != "" { // CI: a skip would hide the test
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// runChromium runs headless Chromium with args (a new profile each time),
// bounded in time, and returns its standard output. The browser and its
// children are in their own process group, killed by its id at the end.
func runChromium(t *testing.T, bin string, args ...string) []byte {
	t.Helper()
	home := t.TempDir()
	base := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + filepath.Join(home, "profile"),
		"--disable-dev-shm-usage", "--no-default-browser-check", "--disable-domain-reliability",
		"--disable-features=Translate,MediaRouter,OptimizationHints",
		"--hide-scrollbars", "--force-device-scale-factor=1",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.Command(bin, append(base, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+home)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	pgid := cmd.Process.Pid
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer syscall.Kill(-pgid, syscall.SIGKILL) // leftovers of the group, if any
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("chromium %v: %v\n%s", args, err, stderr.Bytes())
		}
	case <-ctx.Done():
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
		t.Fatalf("chromium %v: no exit within 90s\n%s", args, stderr.Bytes())
	}
	return stdout.Bytes()
}

// TestStatusPageBrowser runs Caddy in-process with the status page mounted
// behind basic_auth on a site whose proxies probe six backends, one of
// them stopped and one drained through the admin API, and loads the page
// in headless Chromium: the page, after reloading its data in place
// (JavaScript, through basic_auth), shows the stopped backend's address as
// down with its error, the drained one's admin state, and the right
// counts.
// It saves a screenshot; SHAKER_STATUS_SCREENSHOT=docs/status.png writes
// the one README shows (a relative path is from the repository's root).
func TestStatusPageBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	chromium := chromiumPath(t)
	if out, err := exec.Command(chromium, "--version").CombinedOutput(); err != nil {
		t.Skipf("chromium does not run: %v: %s", err, out)
	}

	// a history that fills in seconds
	status.SampleEvery(t, 100*time.Millisecond)

	var bs []string // the backends' addresses
	for i := range 6 {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
		bs = append(bs, srv.Listener.Addr().String())
		if i == 3 {
			srv.Close() // nothing listens there: refused
		} else {
			t.Cleanup(srv.Close)
		}
	}
	dead := bs[3]

	admin := fmt.Sprintf("localhost:%d", testkit.FreePort(t))
	site := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	caddyfile := fmt.Sprintf(`{
	admin %s
	auto_https off
}
http://%s {
	handle /shaker* {
		basic_auth {
			admin %s
		}
		shaker_status {
			refresh 1s
		}
	}
	handle /web* {
		reverse_proxy {
			dynamic shaker %s %s %s %s {
				interval 50ms
				timeout 40ms
			}
		}
	}
	handle /api* {
		reverse_proxy {
			dynamic shaker %s %s {
				interval 100ms
				timeout 40ms
			}
		}
	}
}
`, admin, site, statusHash, bs[0], bs[1], bs[2], dead, bs[4], bs[5])
	cfg, warn, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil || len(warn) > 0 {
		t.Fatalf("adapt: %v %v", err, warn)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("caddy.Load: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("caddy.Stop: %v", err)
		}
	})

	// every address probed, the dead one down, and a full RTT history
	for deadline := time.Now().Add(20 * time.Second); !fullHistory(status.CurrentStatuses(), dead); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out after 20s waiting for 6 addresses probed, one down, a full RTT history")
		}
	}

	client := &http.Client{Timeout: 10 * time.Second}

	// drain a live backend, so that the page has its Admin column: still
	// probed, still up, no new requests
	drained := bs[1]
	dresp, err := client.Post("http://"+admin+"/shaker/upstreams/"+drained+"/drain", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	dresp.Body.Close()
	if dresp.StatusCode != http.StatusOK {
		t.Fatalf("POST /shaker/upstreams/%s/drain: %s", drained, dresp.Status)
	}

	base := "http://" + site + "/shaker"
	get := func(user, accept string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("GET", base, nil)
		if user != "" {
			req.SetBasicAuth(user, statusPassword)
		}
		req.Header.Set("Accept", accept)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if resp := get("", "text/html"); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("without a password: %s, want 401", resp.Status)
	}
	resp := get("admin", "application/json")
	var doc struct {
		Summary   status.Summary `json:"summary"`
		Upstreams []struct {
			health.Status
			RTTHistory []*int64 `json:"rtt_history_us"`
		} `json:"upstreams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("JSON: %v", err)
	}
	if doc.Summary.Addresses != 6 || doc.Summary.Down != 1 || len(doc.Upstreams) != 6 {
		t.Errorf("JSON: summary %+v, %d upstreams", doc.Summary, len(doc.Upstreams))
	}
	if len(doc.Summary.AdminStates) != 1 || doc.Summary.AdminStates["drain"] != 1 {
		t.Errorf("JSON: admin_states %v, want drain: 1", doc.Summary.AdminStates)
	}
	for _, u := range doc.Upstreams {
		want := "ready"
		if u.Address == drained {
			want = "drain"
		}
		if u.AdminState != want || u.Health != map[bool]string{true: "down", false: "up"}[u.Address == dead] || u.Since == nil {
			t.Errorf("JSON: %s: admin_state %q, health %q, since %v", u.Address, u.AdminState, u.Health, u.Since)
		}
	}

	// The browser: the page as served, then reloaded in place by its
	// script every second (virtual time runs 4.5 s ahead, waiting for
	// the fetches).
	u := "http://admin:" + statusPassword + "@" + site + "/shaker"
	dom := string(runChromium(t, chromium, "--virtual-time-budget=4500", "--dump-dom", u))
	if !strings.Contains(dom, `id="live"`) {
		t.Fatalf("not the status page:\n%.2000s", dom)
	}
	if m := regexp.MustCompile(`data-refreshes="(\d+)"`).FindStringSubmatch(dom); m == nil {
		t.Errorf("no data-refreshes attribute")
	} else if n, _ := strconv.Atoi(m[1]); n < 1 {
		t.Errorf("the page did not reload its data (data-refreshes=%d); refresh-status: %s", n, between(dom, `id="refresh-status"`, "</span>"))
	}
	if s := between(dom, `id="refresh-status" role="status">`, "</span>"); s != "" {
		t.Errorf("refresh status: %q", s)
	}
	for key, want := range map[string]int{"addresses": 6, "up": 5, "down": 1, "failing": 0, "pending": 0, "upstreams": 6} {
		re := regexp.MustCompile(`data-count="` + key + `"[^>]*>\s*<span class="n">(\d+)</span>`)
		m := re.FindStringSubmatch(dom)
		if m == nil {
			t.Errorf("count %s not on the page", key)
			continue
		}
		if n, _ := strconv.Atoi(m[1]); n != want {
			t.Errorf("count %s: %d, want %d", key, n, want)
		}
	}
	if !regexp.MustCompile(`<span class="count admin"><span class="n">1</span> drain</span>`).MatchString(dom) {
		t.Errorf("no count of 1 drain")
	}
	if !strings.Contains(dom, `<th data-col="admin">`) {
		t.Errorf("no Admin column with an address drained")
	}
	rows := regexp.MustCompile(`(?s)<tr class="(\w+)">(.*?)</tr>`).FindAllStringSubmatch(dom, -1)
	if len(rows) != 6 {
		t.Errorf("%d rows, want 6", len(rows))
	}
	seen := 0
	for _, r := range rows {
		text := tagsRE.ReplaceAllString(r[2], " ")
		badge := strings.Contains(r[2], `<span class="badge admin">drain</span>`)
		if badge != strings.Contains(r[2], ">"+drained+"<") {
			t.Errorf("drain badge %v in the row %s", badge, strings.Join(strings.Fields(text), " "))
		}
		if !strings.Contains(r[2], `<td class="since"><time datetime=`) {
			t.Errorf("no since in the row %s", strings.Join(strings.Fields(text), " "))
		}
		if !strings.Contains(r[2], ">"+dead+"<") {
			if r[1] != "up" || strings.Contains(text, "refused") || !strings.Contains(r[2], "<path d=") {
				t.Errorf("live backend's row: class %q, %s", r[1], strings.Join(strings.Fields(text), " "))
			}
			continue
		}
		seen++
		if r[1] != "down" || !strings.Contains(text, " down ") || !strings.Contains(text, " refused ") {
			t.Errorf("the stopped backend's row does not say down, refused: class %q, %s", r[1], strings.Join(strings.Fields(text), " "))
		}
	}
	if seen != 1 {
		t.Errorf("the stopped backend %s: %d rows, want 1", dead, seen)
	}

	// the screenshot
	shot := os.Getenv("SHAKER_STATUS_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(t.TempDir(), "status.png")
	} else if !filepath.IsAbs(shot) { // from the repository's root, where the test ran before it moved here
		shot = filepath.Join("..", shot)
	}
	if shot, err = filepath.Abs(shot); err != nil {
		t.Fatal(err)
	}
	runChromium(t, chromium, "--virtual-time-budget=1500", "--window-size=1280,380", "--screenshot="+shot, u)
	png, err := os.ReadFile(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) || len(png) < 10000 {
		t.Errorf("screenshot %s: not a PNG of a page (%d bytes)", shot, len(png))
	}
	t.Logf("screenshot: %s (%d bytes)", shot, len(png))
}

// fullHistory: every address probed, the dead one down, and a full RTT
// history of each live one.
func fullHistory(list []health.Status, dead string) bool {
	if len(list) != 6 {
		return false
	}
	for i := range list {
		s := &list[i]
		if s.CheckedAt == nil || s.Healthy == (s.Address == dead) {
			return false
		}
		if s.Healthy && status.HistoryLen(s) < status.RTTHistoryLen {
			return false
		}
	}
	return true
}

var tagsRE = regexp.MustCompile(`<[^>]*>`)

// between returns the text of s between the first from and the next to.
func between(s, from, to string) string {
	i := strings.Index(s, from)
	if i < 0 {
		return ""
	}
	s = s[i+len(from):]
	if j := strings.Index(s, to); j >= 0 {
		return s[:j]
	}
	return s
}
