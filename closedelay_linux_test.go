//go:build linux

package caddyshaker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
	"github.com/caddy-shaker/caddy-shaker/status"
)

// The burst scenario of issue 15 inside Caddy: the shaker package's
// TestCloseDelayBursts (the bare engine's baseline) with Caddy probing the
// same 2,000 addresses (100 ms, 1.5 s timeout) across a SlowPath shaped on
// both ends (testkit.BurstRate: 15 Mbit/s, 8 with busy loops), while the
// admin API (/shaker/upstreams, /shaker/engine, /metrics) and the status
// page are read in a loop, idle and with a busy loop on every core. It
// asserts 0 accepted (past the kernel's window) and that the scenario was
// real; it logs the close delays, which on a shared machine are not Caddy's
// alone to keep.
const (
	cdHelperEnv = "CADDYSHAKER_CLOSEDELAY_HELPER" // idle or busy
	cdPathEnv   = "CADDYSHAKER_CD"                // the SlowPath's (SlowPath.Env)
	cdLatency   = "200ms"
	cdAddrs     = 2000
	cdPorts     = 8
	cdInterval  = "100ms"
	cdTimeout   = "1.5s"
	cdWarmup    = time.Second
	cdMeasure   = 3 * time.Second
	cdMaxReads  = 5000 // per reader, a bound on the loop
)

func TestCloseDelayBurstsInCaddy(t *testing.T) {
	if testing.Short() {
		t.Skip("namespaces and 20,000 probes a second")
	}
	for _, mode := range testkit.BurstModes(t) {
		for _, family := range []int{4, 6} {
			t.Run(fmt.Sprintf("%s/IPv%d", mode, family), func(t *testing.T) {
				rate := testkit.BurstRate(mode)
				p := testkit.NewSlowPath(t, rate, cdLatency)
				p.ShapeA(t, rate, cdLatency)
				env := append(p.Env(cdPathEnv, family), cdHelperEnv+"="+mode, "HOME="+t.TempDir())
				out := testkit.RunTest(t, p.A, "TestCloseDelayInCaddyHelper", env...)
				f := testkit.ResultsByName(out)["closedelay"]
				if len(f) != 12 {
					t.Fatalf("no RESULT closedelay line:\n%s", out)
				}
				u := func(i int) uint64 { v, _ := strconv.ParseUint(f[i], 10, 64); return v }
				up, epollUp, accepted, maxQueued, reads := u(0), u(1), u(3), u(5), u(11)
				t.Logf("Caddy, %s, IPv%d: worst close delay %s, p50 %s, p99 %s, p99.9 %s; %s probes/s, %d up (%d through epoll), %s timeouts; bursts: up to %s answers a look, %d packets queued in a tbf; %d reads of the admin API, /metrics and the status page; %d accepted",
					mode, family, f[6], f[7], f[8], f[9], f[10], up, epollUp, f[2], f[4], maxQueued, reads, accepted)
				testkit.BurstAccepted(t, accepted, fmt.Sprintf("Caddy, %s, IPv%d", mode, family))
				switch {
				case up == 0 || epollUp < up/2:
					t.Errorf("%d up, %d through epoll: the scenario did not take the epoll path", up, epollUp)
				case reads == 0:
					t.Error("nothing was read while probing")
				}
				testkit.BurstsSeen(t, int(u(4)), int(maxQueued))
			})
		}
	}
}

// cdConfig is loadConfig's proxy over ups at cdInterval and cdTimeout,
// with the admin API on the unix socket admin, and the status page served
// on the unix socket status.
func cdConfig(t testing.TB, ups []string, admin, status string) []byte {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(loadConfig(t, ups, cdInterval, 0), &cfg); err != nil {
		t.Fatal(err)
	}
	servers := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)
	rp := servers["p"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[1].(map[string]any)
	rp["dynamic_upstreams"].(map[string]any)["timeout"] = cdTimeout
	servers["s"] = map[string]any{
		"listen":          []string{"unix/" + status},
		"automatic_https": map[string]any{"disable": true},
		"routes":          []any{map[string]any{"handle": []any{map[string]any{"handler": "shaker_status"}}}},
	}
	cfg["admin"] = map[string]any{"listen": "unix/" + admin, "config": map[string]any{"persist": false}}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// unixClient is an HTTP client whose every request goes to socket.
func unixClient(socket string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		},
	}}
}

// get sends a GET of url with c, asking for accept ("": any).
func get(c *http.Client, url, accept string) (*http.Response, error) {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return nil, err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	return c.Do(req)
}

// TestCloseDelayInCaddyHelper is the child of TestCloseDelayBurstsInCaddy,
// in namespace A of a SlowPath.
func TestCloseDelayInCaddyHelper(t *testing.T) {
	mode := os.Getenv(cdHelperEnv)
	if mode == "" {
		t.Skip("only runs as a child of TestCloseDelayBurstsInCaddy")
	}
	p, family := testkit.ChildSlowPath(cdPathEnv)
	ls, addrs := testkit.SlowListeners(t, p.B, family, cdPorts, cdAddrs)
	var ups []string
	for _, a := range addrs {
		ups = append(ups, a.String())
	}
	if mode == "busy" {
		defer testkit.Hogs(t, runtime.NumCPU(), cdWarmup+cdMeasure+10*time.Second)()
	}
	dir := t.TempDir()
	adminSock, statusSock := filepath.Join(dir, "admin.sock"), filepath.Join(dir, "status.sock")
	t.Cleanup(func() { caddy.Stop() })
	if err := caddy.Load(cdConfig(t, ups, adminSock, statusSock), true); err != nil {
		t.Fatal(err)
	}
	e := engines.cur.Load()
	if e == nil {
		t.Fatal("no engine")
	}

	// readers, one a URL, each bounded in reads and stopped at the end
	admin, status := unixClient(adminSock), unixClient(statusSock)
	readers := []struct {
		c           *http.Client
		url, accept string
	}{
		{admin, "http://admin/shaker/upstreams", ""}, {admin, "http://admin/shaker/engine", ""},
		{admin, "http://admin/metrics", ""}, {status, "http://status/", "text/html"}, {status, "http://status/", "application/json"},
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, readErrs sync.Map
	for _, rd := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := rd.url + " " + rd.accept
			n := 0
			for ; n < cdMaxReads; n++ {
				select {
				case <-stop:
					reads.Store(key, n)
					return
				default:
				}
				resp, err := get(rd.c, rd.url, rd.accept)
				if err != nil {
					readErrs.Store(key, err)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			reads.Store(key, n)
		}()
	}

	time.Sleep(cdWarmup) // a window of probing, not a wait for an event
	st0 := e.Stats()
	maxQueued := 0
	t0 := time.Now()
	for end := t0.Add(cdMeasure); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		maxQueued = max(maxQueued, testkit.Backlog(t, p.A, p.DevA), testkit.Backlog(t, p.B, p.DevB))
	}
	st := e.Stats()
	rate := float64(st.Total()-st0.Total()) / time.Since(t0).Seconds()
	close(stop)
	wg.Wait()
	total := 0
	reads.Range(func(k, v any) bool { total += v.(int); t.Logf("%v: %d reads", k, v); return true })
	readErrs.Range(func(k, v any) bool { t.Logf("%v: %v", k, v); return true })
	statusShowsCloseDelays(t, status, st)
	admin.CloseIdleConnections()
	status.CloseIdleConnections()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	p.Settle(t)
	accepted := ls.ProbeAcceptsIn(t, p.B)
	h := st.CloseDelay
	q := func(x float64) time.Duration { return h.Quantile(x, shaker.CloseDelayBuckets) }
	fmt.Printf("RESULT closedelay %d %d %d %d %d %d %v %v %v %v %.0f %d\n", st.Up, st.EpollUp, st.Timeout, accepted,
		st.MaxReady, maxQueued, st.MaxCloseDelay, q(0.5), q(0.99), q(0.999), rate, total)
}

// statusShowsCloseDelays checks that the status page, read after st was,
// shows the engine's close delays: in its JSON, at least st's count and
// worst, and in its HTML.
func statusShowsCloseDelays(t *testing.T, c *http.Client, st shaker.Stats) {
	t.Helper()
	var doc struct {
		CloseDelay *status.CloseDelays `json:"close_delay"`
	}
	resp, err := get(c, "http://status/", "application/json")
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&doc)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	worst := float64(st.MaxCloseDelay.Microseconds()) / 1000
	if d := doc.CloseDelay; d == nil || d.Count < st.CloseDelay.Count() || d.WorstMs < worst {
		t.Errorf("the status page's close_delay %+v, want at least %d closes and a worst of %v ms", d, st.CloseDelay.Count(), worst)
	}
	resp, err = get(c, "http://status/", "text/html")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Contains(body, []byte(`data-count="close-delay"`)) {
		t.Errorf("the status page's HTML shows no close delays:\n%.2000s", body)
	}
}
