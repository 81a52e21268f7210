//go:build linux

package realservers

import (
	"fmt"
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

// Failover through caddy-l4's proxy, with real PostgreSQL: a proxy in
// front of two PostgreSQL servers, a primary (started here) and a standby
// (the suite's), with the `first` selection policy (the shaker's `inner`,
// or caddy-l4's own), so that every connection goes to the primary while
// it is in service: a connection that fails is one the checker has not
// yet taken the primary out for, not a random draw. One setup at a time:
// the primary stops (SIGINT to its postmaster: a fast shutdown), and a
// client runs psql's `SELECT inet_server_port()` through the proxy every
// failoverPace; failover is the time from the stop to the start of the
// last connection that did not land on the standby. A run ends after
// failoverSteady connections in a row on the standby, or at the setup's
// bound. The figures are logged (a measurement, not a timed assertion);
// the test asserts that the client reached the primary through the proxy
// before the stop, and that with checks every probeInterval the proxy
// failed over within the bound.

const (
	failoverPace   = 50 * time.Millisecond
	failoverSteady = 20 // connections in a row on the standby that end a run
)

// failoverSetup is one proxy to measure.
type failoverSetup struct {
	name   string
	shaker bool           // the plugin's policy; else caddy-l4's own active checks
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
		{fmt.Sprintf("shaker-l4, `interval %v` (`fails 3`, its default)", probeInterval), true, interval, 10 * time.Second, true},
		{fmt.Sprintf("shaker-l4, `interval %v`, `fails 1`", probeInterval), true,
			map[string]any{"interval": probeInterval.String(), "timeout": probeTimeout.String(), "fails": 1}, 10 * time.Second, true},
		{fmt.Sprintf("caddy-l4, `health_interval %v` (`health_fall 1`, its default)", probeInterval), false, interval, 10 * time.Second, true},
		{"caddy-l4, defaults (`health_interval 30s`, `health_timeout 5s`, `health_fall 1`)", false, map[string]any{}, 40 * time.Second, false},
	}
	var figures []failoverFigure
	for _, su := range setups {
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
	t.Logf("Failover through caddy-l4's proxy (Caddy from l4/cmd/caddy, `first` selection) in front of two PostgreSQL "+
		"servers: the first stops (a fast shutdown); psql `SELECT inet_server_port()` through the proxy every %v; failover is "+
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
	f := failoverFigure{setup: su}
	addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	p, admin, _ := startCaddy(t, "caddy-failover", os.Getenv(caddyL4Env), map[string]any{
		"layer4": map[string]any{"servers": map[string]any{"pg": map[string]any{
			"listen": []string{addr},
			"routes": []any{map[string]any{"handle": []any{l4Proxy(su.shaker, "first", su.checks, primary, standby)}}},
		}}},
	})
	defer func() {
		if _, err := p.stop(syscall.SIGTERM, 30*time.Second); err != nil {
			t.Errorf("%s: %v\n%s", su.name, err, p.tail())
		}
	}()
	if su.shaker {
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
	var lastBad time.Time
	inRow := 0
	afterBad := true // the connection before this one failed (or none yet)
	for n := 0; ; n++ {
		start := t0.Add(time.Duration(n) * failoverPace)
		if start.Sub(t0) > su.bound {
			break
		}
		if d := time.Until(start); d > 0 {
			time.Sleep(d) // pacing the client, not waiting for an event
		} else {
			start = time.Now()
		}
		out, err := psql(t, addr, "SELECT inet_server_port()")
		if d := time.Since(start); d > f.slowest {
			f.slowest = d
		}
		f.attempts++
		if err != nil || out != standbyPort {
			f.failed++
			lastBad = start
			inRow = 0
			afterBad = true
			continue
		}
		if afterBad {
			f.next = start.Sub(t0)
			afterBad = false
		}
		if inRow++; inRow >= failoverSteady {
			f.within = true
			break
		}
	}
	if !lastBad.IsZero() {
		f.failover = lastBad.Sub(t0)
	}
	if !f.within && su.must {
		t.Errorf("%s: not every connection through the proxy landed on the standby (%d in a row) within %v of the stop",
			su.name, failoverSteady, su.bound)
	}
	if _, err := pg.stop(syscall.SIGINT, 30*time.Second); err != nil {
		t.Errorf("stopping the second PostgreSQL: %v", err)
	}
	t.Logf("%s: failover %v to %v, %d of %d connections failed, within %v: %v", su.name, f.failover, f.next, f.failed, f.attempts, su.bound, f.within)
	return f
}
