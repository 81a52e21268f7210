//go:build linux

package realservers

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// Failover through caddy-l4's proxy, with real PostgreSQL: a proxy in
// front of two PostgreSQL servers, a primary (started here) and a standby
// (the suite's), with the `first` selection policy (the shaker's `inner`,
// or caddy-l4's own), so that every connection goes to the primary while
// it is in service: a connection that fails is one the checker has not
// yet taken the primary out for, not a random draw. One setup at a time:
// the primary stops (SIGINT to its postmaster: a fast shutdown), and a
// client starts psql's `SELECT inet_server_port()` through the proxy
// every failoverPace; failover is the time from the stop to the start of the
// last connection that did not land on the standby. A run ends after
// failoverSteady connections in a row on the standby, or at the setup's
// bound. The figures are logged (a measurement, not a timed assertion);
// the test asserts that the client reached the primary through the proxy
// before the stop, and that with checks every probeInterval the proxy
// failed over within the bound.

const (
	failoverPace     = 50 * time.Millisecond
	failoverSteady   = 20  // connections in a row on the standby that end a run
	failoverInFlight = 100 // connections at a time, at most
)

// failoverSetup is one proxy to measure.
type failoverSetup struct {
	name   string
	kind   string         // kindShakerL4, kindCaddyL4 or "haproxy"
	checks map[string]any // the policy's probe settings, or caddy-l4's health_checks.active
	bound  time.Duration
	must   bool // must fail over within bound
}

// failoverFigure is what one setup measured.
type failoverFigure struct {
	setup    failoverSetup
	failover time.Duration // from the stop to the start of the last connection that failed
	within   bool          // every connection landed on the standby, failoverSteady in a row, within bound
	// next: from the stop to the start of the connection after the last
	// that failed (the first of the run on the standby): failover was
	// between failover and next (a psql run is tens of milliseconds)
	next             time.Duration
	failed, attempts int
	slowest          time.Duration
}

func testFailover(t *testing.T, env *testEnv, servers []server) {
	var standby *postgres
	for _, s := range servers {
		if pg, ok := s.(*postgres); ok {
			standby = pg
		}
	}
	if standby == nil {
		t.Skipf("PostgreSQL is not installed (Debian package %s)", debianPackage["postgres"])
	}
	if _, err := findBin("psql"); err != nil {
		t.Skipf("%v: Debian package postgresql-client is not installed (a dependency of postgresql)", err)
	}
	bin, err := findPostgres()
	if err != nil {
		t.Fatal(err)
	}
	bin, data, cred := initPostgres(t, env, bin, "pgprimary")
	port := testkit.FreePort(t)
	primary := fmt.Sprintf("127.0.0.1:%d", port)
	starts := 0
	startPrimary := func() *proc {
		starts++
		return runPostgres(t, bin, data, cred, port, filepath.Join(env.dir, fmt.Sprintf("primary.%d.log", starts)))
	}

	interval := map[string]any{"interval": probeInterval.String(), "timeout": probeTimeout.String()}
	setups := []failoverSetup{
		{fmt.Sprintf("shaker-l4, `interval %v` (`fails 3`, its default)", probeInterval), kindShakerL4, interval, 10 * time.Second, true},
		{fmt.Sprintf("shaker-l4, `interval %v`, `fails 1`", probeInterval), kindShakerL4,
			map[string]any{"interval": probeInterval.String(), "timeout": probeTimeout.String(), "fails": 1}, 10 * time.Second, true},
		{fmt.Sprintf("caddy-l4, `health_interval %v` (`health_fall 1`, its default)", probeInterval), kindCaddyL4, interval, 10 * time.Second, true},
		{"caddy-l4, defaults (`health_interval 30s`, `health_timeout 5s`, `health_fall 1`)", kindCaddyL4, map[string]any{}, 40 * time.Second, false},
		{fmt.Sprintf("HAProxy `mode tcp`, `check inter %v` (`fall 3`, its default), the standby a `backup`", probeInterval), "haproxy", nil, 10 * time.Second, true},
	}
	var figures []failoverFigure
	for _, su := range setups {
		if su.kind == "haproxy" {
			if _, err := findBin("haproxy"); err != nil {
				t.Logf("%s: skipped: %v (Debian package haproxy)", su.name, err)
				continue
			}
		}
		pg := startPrimary()
		figures = append(figures, measureFailover(t, su, pg, primary, standby.addr))
	}

	var b strings.Builder
	fmt.Fprintf(&b, "| setup | failover: last connection failed / next started (on the standby) | connections failed | slowest connection |\n|---|---:|---:|---:|\n")
	for _, f := range figures {
		fo := fmt.Sprintf("%v / %v", f.failover.Round(time.Millisecond), f.next.Round(time.Millisecond))
		if !f.within {
			fo = fmt.Sprintf("not within %v", f.setup.bound)
		}
		fmt.Fprintf(&b, "| %s | %s | %d of %d | %v |\n", f.setup.name, fo, f.failed, f.attempts, f.slowest.Round(time.Millisecond))
	}
	t.Logf("Failover through a layer-4 proxy (caddy-l4's from l4/cmd/caddy, `first` selection; HAProxy, the second a `backup`) "+
		"in front of two PostgreSQL servers: the first stops (a fast shutdown); a psql `SELECT inet_server_port()` through the proxy started every %v; failover is "+
		"from the stop to the last connection not answered by the second (%d in a row end a run):\n\n%s",
		failoverPace, failoverSteady, b.String())
}

// measureFailover runs one setup: a proxy in front of the primary (pg,
// running) and the standby; the client reaches the primary through it;
// then the primary stops.
func measureFailover(t *testing.T, su failoverSetup, pg *proc, primary, standby string) failoverFigure {
	t.Helper()
	_, primaryPort, _ := net.SplitHostPort(primary)
	_, standbyPort, _ := net.SplitHostPort(standby)
	// stopped by the end of the setup however it ends: the next one starts
	// it again on the same port
	defer func() {
		if _, err := pg.stop(syscall.SIGINT, 30*time.Second); err != nil {
			t.Errorf("stopping the primary: %v", err)
		}
	}()
	f := failoverFigure{setup: su}
	addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	var p *proc
	var admin string
	if su.kind == "haproxy" {
		p = startHAProxyFailover(t, addr, primary, standby)
	} else {
		p, admin, _ = startCaddy(t, "caddy-failover", os.Getenv(caddyL4Env), map[string]any{
			"layer4": map[string]any{"servers": map[string]any{"pg": map[string]any{
				"listen": []string{addr},
				"routes": []any{map[string]any{"handle": []any{l4Proxy(su.kind == kindShakerL4, "first", su.checks, primary, standby)}}},
			}}},
		})
	}
	defer func() {
		if _, err := p.stop(syscall.SIGTERM, 30*time.Second); err != nil {
			t.Errorf("%s: %v\n%s", su.name, err, p.tail())
		}
	}()
	if su.kind == kindShakerL4 {
		// the plugin's first probes: both up
		hc := &http.Client{Timeout: 5 * time.Second}
		waitFor(t, 10*time.Second, su.name+": both servers probed and up", func() bool {
			up := 0
			for _, u := range shakerUpstreams(t, hc, admin) {
				if (u.Address == primary || u.Address == standby) && u.Healthy && u.Probes > 0 {
					up++
				}
			}
			return up == 2
		})
	}
	// Before the stop: the client reaches the primary through the proxy.
	for range 3 {
		out, err := psql(t, addr, "SELECT inet_server_port()")
		if err == nil && out != primaryPort {
			err = fmt.Errorf("answered by the server on port %s, not the primary's %s", out, primaryPort)
		}
		if err != nil {
			t.Errorf("%s: before the stop: %v", su.name, err)
			return f
		}
	}

	t0 := time.Now()
	if err := pg.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	// A connection starts every failoverPace whether or not the ones
	// before it are done (a slow one, as HAProxy's retries make, holds
	// back no other), at most failoverInFlight at a time. Launching stops
	// once the attempts done so far, in order, end with failoverSteady on
	// the standby.
	type attempt struct {
		start time.Duration // from the stop
		took  time.Duration
		done  bool
		good  bool // answered by the standby
	}
	var (
		mu       sync.Mutex
		attempts []*attempt
		wg       sync.WaitGroup
	)
	slots := make(chan struct{}, failoverInFlight)
	// steadyTail: the attempts at the end of the done ones (all those
	// before them done too) that were good, in a row
	steadyTail := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, a := range attempts {
			if !a.done {
				break
			}
			if a.good {
				n++
			} else {
				n = 0
			}
		}
		return n
	}
	for n := 0; steadyTail() < failoverSteady; n++ {
		at := t0.Add(time.Duration(n) * failoverPace)
		if at.Sub(t0) > su.bound {
			break
		}
		time.Sleep(time.Until(at)) // pacing the client, not waiting for an event
		slots <- struct{}{}
		a := &attempt{start: time.Since(t0)}
		mu.Lock()
		attempts = append(attempts, a)
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			begin := time.Now()
			out, err := psql(t, addr, "SELECT inet_server_port()")
			mu.Lock()
			defer mu.Unlock()
			a.took, a.done, a.good = time.Since(begin), true, err == nil && out == standbyPort
		}()
	}
	wg.Wait()
	tail := 0
	bad := -1
	for i, a := range attempts {
		f.attempts++
		f.slowest = max(f.slowest, a.took)
		if a.good {
			tail++
		} else {
			f.failed++
			tail = 0
			bad = i
		}
	}
	f.within = tail >= failoverSteady
	if bad >= 0 {
		f.failover = attempts[bad].start
	}
	if bad+1 < len(attempts) {
		f.next = attempts[bad+1].start
	}
	if !f.within && su.must {
		t.Errorf("%s: not every connection through the proxy landed on the standby (%d in a row) within %v of the stop",
			su.name, failoverSteady, su.bound)
	}
	t.Logf("%s: failover %v to %v, %d of %d connections failed, within %v: %v", su.name, f.failover, f.next, f.failed, f.attempts, su.bound, f.within)
	return f
}

// startHAProxyFailover runs HAProxy in front of the primary and the
// standby (a `backup` server: used only while the primary is down), both
// checked every probeInterval, HAProxy's defaults otherwise (fall 3,
// rise 2, retries 3 to the same server, no redispatch); and returns once
// its stats socket shows both up.
func startHAProxyFailover(t *testing.T, addr, primary, standby string) *proc {
	t.Helper()
	bin, err := findBin("haproxy")
	if err != nil {
		t.Fatal(err)
	}
	h := &haproxyChecker{bin: bin, dir: t.TempDir()}
	cfg := filepath.Join(h.dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, fmt.Appendf([]byte(testkit.HAProxyConfig(h.dir, 0, probeTimeout)), `
listen pg
	bind %s
	server primary %s check inter %dms
	server standby %s check inter %dms backup
`, addr, primary, probeInterval.Milliseconds(), standby, probeInterval.Milliseconds()), 0o644); err != nil {
		t.Fatal(err)
	}
	h.p = startProc(t, "haproxy-failover", filepath.Join(h.dir, "haproxy.log"), h.dir, nil, syscall.SIGKILL,
		bin, "-W", "-db", "-f", cfg)
	waitFor(t, 30*time.Second, "HAProxy: both servers UP", func() bool {
		if h.p.exited() {
			t.Fatalf("haproxy exited: %v\n%s", h.p.err, h.p.tail())
		}
		rows, err := h.stat()
		if err != nil || len(rows) == 0 {
			return false
		}
		col := map[string]int{}
		for i, n := range rows[0] {
			col[n] = i
		}
		up := 0
		for _, r := range rows[1:] {
			if len(r) > col["status"] && r[col["pxname"]] == "pg" && (r[col["svname"]] == "primary" || r[col["svname"]] == "standby") &&
				r[col["status"]] == "UP" {
				up++
			}
		}
		return up == 2
	})
	return h.p
}
