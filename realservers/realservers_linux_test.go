//go:build linux

package realservers

// TestRealServers: the product's claim on software people run. Real
// servers that log or count every connection they accept (PostgreSQL with
// log_connections, MariaDB's Connections and Aborted_connects and its
// max_connect_errors lockout, OpenSSH at LogLevel VERBOSE, nginx's access
// log and stub_status, Redis's total_connections_received) are checked
// every 100 ms by seven checkers in turn:
//
//	shaker         Caddy built from ./cmd/caddy with this plugin (dynamic shaker)
//	shaker-raw     the same, with the shaker app's `probe_mode raw`: each
//	               SYN sent on a raw socket, every SYN-ACK reset by the kernel
//	caddy          the same Caddy with its own active health checks (health_uri)
//	shaker-l4      Caddy built from l4/cmd/caddy: caddy-l4's `proxy` in front
//	               of each server, with this plugin's `lb_policy shaker`
//	shaker-l4-raw  the same, with `probe_mode raw`
//	caddy-l4       the same, with caddy-l4's own active checks (health_interval)
//	haproxy        HAProxy `mode tcp` with a plain `check` (a half-open TCP check)
//
// The layer-4 proxies (shaker-l4, shaker-l4-raw, caddy-l4, haproxy) also
// carry real clients: psql's SELECT 1 and redis-cli's PING through the
// proxy, which must work, and which the servers' counts leave out
// (clients_linux_test.go).
// Then failover through caddy-l4's proxy in front of two PostgreSQL
// servers, with the plugin and with caddy-l4's own checks (and HAProxy
// beside), is measured (failover_linux_test.go).
//
// Each checker runs three phases: its start and a phase of steady checks;
// a phase of forced config reloads (every 500 ms); SIGTERM, until it has
// exited and 500 ms more (past the kernel's 200 ms delayed-ACK timer, after
// which a socket left open with a SYN-ACK in hand becomes a connection).
// The test counts what every server logged or counted in every phase.
// It asserts that the plugin left nothing anywhere (both ways, in both
// probe modes: its admin API must show the mode asked for), that
// Caddy's and caddy-l4's checks, which connect, left something everywhere
// (so the counting works), and that HAProxy's half-open checks left
// nothing while running; and a control connection of the test's own must
// move each count by one first.
//
// Everything runs in a network namespace of the test's own (the test binary
// runs itself again there; root needed), so the servers' ports are private
// and the kernel's counters count only the checkers' work. MariaDB exempts
// loopback clients from its host cache, so it runs in a second namespace at
// 198.18.0.1, reached over a veth pair from 198.18.0.2.
//
// REALSERVERS_PHASE sets a phase's length (default 3s, as .ci/run runs it);
// the tables in docs/testing.md come from REALSERVERS_PHASE=20s.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

const (
	childEnv   = "REALSERVERS_CHILD"    // set in the test binary run in the namespace
	caddyEnv   = "REALSERVERS_CADDY"    // a caddy built from ./cmd/caddy
	caddyL4Env = "REALSERVERS_CADDY_L4" // a caddy built from l4/cmd/caddy (the nested module)
	phaseEnv   = "REALSERVERS_PHASE"    // length of a phase

	probeInterval = 100 * time.Millisecond
	probeTimeout  = 80 * time.Millisecond
	reloadEvery   = 500 * time.Millisecond
	// settle: after a checker exits, wait past the kernel's 200 ms
	// delayed-ACK timer and for the servers to write their logs.
	settle = 500 * time.Millisecond
)

// testEnv is what the servers share.
type testEnv struct {
	dir  string // temporary directory
	dbns string // MariaDB's network namespace
}

// phaseNames are the three phases of a checker's run.
var phaseNames = [3]string{"steady", "reloads", "SIGTERM"}

func phaseLength(t *testing.T) time.Duration {
	t.Helper()
	s := os.Getenv(phaseEnv)
	if s == "" {
		return 3 * time.Second
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < time.Second || d > 5*time.Minute {
		t.Fatalf("%s=%q: want a duration from 1s to 5m", phaseEnv, s)
	}
	return d
}

func TestRealServers(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		realServersMain(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs in a network namespace of its own, and runs servers as their own users (CI runs as root)")
	}
	for tool, pkg := range map[string]string{"ip": "iproute2", "mount": "mount", "sh": "dash"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian package %s)", tool, pkg)
		}
	}
	var found []string
	for _, spec := range serverSpecs {
		if _, err := spec.find(); err == nil {
			found = append(found, spec.name)
		}
	}
	if len(found) == 0 {
		t.Skip("none of the servers is installed (Debian packages postgresql, mariadb-server, openssh-server, nginx, redis-server; .ci/run installs them)")
	}
	phaseLength(t) // fail early on a bad value

	bin := os.Getenv(caddyEnv)
	if bin == "" {
		if _, err := exec.LookPath("go"); err != nil {
			t.Skip("needs go, to build ./cmd/caddy")
		}
		bin = filepath.Join(t.TempDir(), "caddy")
		cmd := exec.Command("go", "build", "-o", bin, "github.com/caddy-shaker/caddy-shaker/cmd/caddy")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	}
	// Caddy with caddy-l4 and the layer-4 policy: built in the nested
	// module l4/, which this package (the root module) does not import.
	l4bin := os.Getenv(caddyL4Env)
	if l4bin == "" {
		l4bin = filepath.Join(t.TempDir(), "caddy-l4")
		cmd := exec.Command("go", "build", "-o", l4bin, "./cmd/caddy")
		cmd.Dir = filepath.Join("..", "l4")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cd l4 && go build ./cmd/caddy: %v\n%s", err, out)
		}
	}

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	timeout := 20 * time.Minute
	if dl, ok := t.Deadline(); ok {
		timeout = time.Until(dl) - 10*time.Second
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-5*time.Second))
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, self, "-test.run=^TestRealServers$", "-test.v", "-test.count=1",
		"-test.timeout="+timeout.String())
	cmd.Env = append(os.Environ(), childEnv+"=1", caddyEnv+"="+bin, caddyL4Env+"="+l4bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("in a network namespace of its own:\n%s", out)
	if err != nil {
		t.Fatalf("the suite in its namespace: %v", err)
	}
	if strings.Contains(string(out), "--- SKIP: TestRealServers ") {
		t.Skip("skipped in its namespace; the output above says why")
	}
	if !strings.Contains(string(out), "--- PASS: TestRealServers ") {
		t.Fatal("the suite in its namespace did not pass")
	}
}

// dbNamespace creates MariaDB's network namespace and a veth pair to it:
// mariadbAddr there, checkersAddr here.
func dbNamespace(t *testing.T) string {
	t.Helper()
	ns := testkit.Netns(t, false, "")
	for _, args := range [][]string{
		{"link", "add", "rsv0", "type", "veth", "peer", "name", "rsv1", "netns", ns},
		{"addr", "add", checkersAddr + "/30", "dev", "rsv0"},
		{"link", "set", "rsv0", "up"},
		{"-n", ns, "addr", "add", mariadbAddr + "/30", "dev", "rsv1"},
		{"-n", ns, "link", "set", "rsv1", "up"},
	} {
		run(t, nil, "ip", args...)
	}
	return ns
}

// result is what one checker left behind.
type result struct {
	c       checker
	delta   [3]map[string]int64 // per phase: "server/metric" -> count
	blocked map[string]bool     // per server with a host cache: blocked at the end
	checks  [2]int64            // the checks it counted itself, by the end of phases 1 and 2
	counts  bool                // whether it counts them
	// its count of checks of the servers on loopback, read just before
	// and just after the snapshots that end phases 1 and 2 (the kernel's
	// count is read between the two)
	loopback [2][2]int64
	reloads  int
	exit     time.Duration // from SIGTERM to its exit
	// queries: the client queries that worked through its layer-4 proxy
	// per phase, by server; proxied: it is such a proxy
	queries [3]map[string]int64
	proxied bool
}

func realServersMain(t *testing.T) {
	phase := phaseLength(t)
	run(t, nil, "ip", "link", "set", "lo", "up")
	env := &testEnv{dir: t.TempDir()}

	var servers []server
	missing := map[string]error{}
	for _, spec := range serverSpecs {
		bin, err := spec.find()
		if err != nil {
			missing[spec.name] = err
			continue
		}
		if spec.name == "mariadb" {
			env.dbns = dbNamespace(t)
		}
		servers = append(servers, spec.start(t, env, bin))
	}

	// The control: one connection of the test's own moves each count as
	// it should, so a zero below means nothing came, not a broken count.
	for _, s := range servers {
		control(t, s)
	}

	checkers := []checker{
		&caddyChecker{bin: os.Getenv(caddyEnv), kind: kindShaker},
		&caddyChecker{bin: os.Getenv(caddyEnv), kind: kindShaker, mode: probeModeRaw},
		&caddyChecker{bin: os.Getenv(caddyEnv), kind: kindCaddy},
		&caddyChecker{bin: os.Getenv(caddyL4Env), kind: kindShakerL4},
		&caddyChecker{bin: os.Getenv(caddyL4Env), kind: kindShakerL4, mode: probeModeRaw},
		&caddyChecker{bin: os.Getenv(caddyL4Env), kind: kindCaddyL4},
	}
	haproxy, herr := findBin("haproxy")
	if herr == nil {
		checkers = append(checkers, &haproxyChecker{bin: haproxy})
	}
	var results []*result
	for _, c := range checkers {
		results = append(results, runChecker(t, c, servers, phase))
	}

	t.Logf("What each checker left behind, per phase: steady (its start and %v of checks every %v) / "+
		"reloads (%v, a forced config reload every %v) / SIGTERM (until it exited, and %v more):\n\n%s",
		phase, probeInterval, phase, reloadEvery, settle, table(servers, results))

	for _, spec := range serverSpecs {
		if err, ok := missing[spec.name]; ok {
			t.Run(spec.name, func(t *testing.T) {
				t.Skipf("%v: Debian package %s is not installed (.ci/run installs it)", err, debianPackage[spec.name])
			})
		}
	}
	for _, s := range servers {
		t.Run(s.name(), func(t *testing.T) { assertServer(t, s, results) })
	}
	t.Run("haproxy", func(t *testing.T) {
		if herr != nil {
			t.Skipf("%v: Debian package haproxy is not installed (.ci/run installs it)", herr)
		}
	})
	t.Run("checks", func(t *testing.T) { assertChecking(t, servers, results, phase) })
	for _, s := range servers {
		if _, ok := s.(queryable); !ok {
			continue
		}
		t.Run("clients/"+s.name(), func(t *testing.T) {
			c := clients[s.name()]
			if _, err := findBin(c[0]); err != nil {
				t.Skipf("%v: Debian package %s is not installed (a dependency of %s)", err, c[1], debianPackage[s.name()])
			}
			assertClients(t, s, results)
		})
	}
	t.Run("failover", func(t *testing.T) { testFailover(t, env, servers) })
}

// assertClients checks that every query a client ran through a layer-4
// proxy in front of s worked: clientQueries in the steady phase, one
// after each reload. (A query that failed was reported as it failed.)
func assertClients(t *testing.T, s server, results []*result) {
	for _, r := range results {
		_, isProxy := r.c.(proxier)
		if k := kindOf(r.c); k == kindShaker || k == kindCaddy || !isProxy {
			continue // HTTP reverse proxies: no client of s speaks HTTP
		}
		if !r.proxied {
			t.Errorf("%s: no layer-4 proxy in front of %s", r.c.name(), s.name())
			continue
		}
		if n := r.queries[0][s.name()]; n != clientQueries {
			t.Errorf("%s, steady: %d of %d queries through its proxy to %s worked", r.c.name(), n, clientQueries, s.name())
		}
		if n := r.queries[1][s.name()]; n != int64(r.reloads) {
			t.Errorf("%s, reloads: %d of %d queries through its proxy to %s (one after each reload) worked", r.c.name(), n, r.reloads, s.name())
		}
	}
}

// control makes the test's own connection to s and waits until each count
// it must move has moved; then checks that it moved by exactly one.
func control(t *testing.T, s server) {
	t.Helper()
	before := s.read(t)
	s.touch(t)
	var now map[string]int64
	waitFor(t, 10*time.Second, s.name()+": the control connection is counted", func() bool {
		now = s.read(t)
		for _, m := range s.metrics() {
			if m.control != ctlNone && now[m.key]-before[m.key] < 1 {
				return false
			}
		}
		return true
	})
	time.Sleep(settle) // anything more it would log about that connection
	now = s.read(t)
	for _, m := range s.metrics() {
		d := now[m.key] - before[m.key]
		switch m.control {
		case ctlOne:
			if d != 1 {
				t.Errorf("%s: one connection of the test's own moved %s by %d, want 1", s.name(), m.key, d)
			}
		case ctlNone:
			if d != 0 {
				t.Errorf("%s: one connection of the test's own moved %s by %d, want 0", s.name(), m.key, d)
			}
		}
	}
	if hc, ok := s.(hostCache); ok {
		hc.flushHosts(t)
	}
}

// snapshot reads every server's counts and this namespace's TcpExt
// EmbryonicRsts (one per half-open check of a server on loopback: the
// server's kernel got the checker's RST for a half-made connection).
func snapshot(t *testing.T, servers []server) map[string]int64 {
	t.Helper()
	m := map[string]int64{"kernel/embryonic": testkit.TCPExt(t, "EmbryonicRsts")}
	for _, s := range servers {
		for k, v := range s.read(t) {
			m[s.name()+"/"+k] = v
		}
	}
	return m
}

func diff(a, b map[string]int64) map[string]int64 {
	d := map[string]int64{}
	for k, v := range b {
		d[k] = v - a[k]
	}
	return d
}

// runChecker runs c's three phases against every server.
func runChecker(t *testing.T, c checker, servers []server, phase time.Duration) *result {
	t.Helper()
	r := &result{c: c, blocked: map[string]bool{}}
	for p := range r.queries {
		r.queries[p] = map[string]int64{}
	}
	for _, s := range servers {
		if hc, ok := s.(hostCache); ok {
			hc.flushHosts(t)
		}
	}

	// Steady: its start, and a phase of checks. The phases are windows
	// in which nothing is awaited: what the servers count is the result.
	// A layer-4 proxy gets clientQueries real queries through it, spread
	// over the phase.
	s0 := snapshot(t, servers)
	c.start(t, servers)
	t0 := time.Now()
	for n := 1; n <= clientQueries; n++ {
		time.Sleep(time.Until(t0.Add(time.Duration(n) * phase / (clientQueries + 1))))
		if r.proxied = queryThrough(t, c, servers, r.queries[0]); !r.proxied {
			break
		}
	}
	time.Sleep(time.Until(t0.Add(phase)))
	before := c.verify(t, servers)
	s1 := snapshot(t, servers)
	after := c.verify(t, servers)
	r.counts = after != nil
	r.checks[0] = sum(after, servers, false)
	r.loopback[0] = [2]int64{sum(before, servers, true), sum(after, servers, true)}

	// Reloads, forced, every reloadEvery; a layer-4 proxy gets a real
	// query through it after each.
	t1 := time.Now()
	for n := 1; time.Duration(n)*reloadEvery < phase; n++ {
		time.Sleep(time.Until(t1.Add(time.Duration(n) * reloadEvery)))
		c.reload(t)
		r.reloads++
		if r.proxied {
			queryThrough(t, c, servers, r.queries[1])
		}
	}
	time.Sleep(time.Until(t1.Add(phase)))
	before = c.verify(t, servers)
	s2 := snapshot(t, servers)
	after = c.verify(t, servers)
	r.checks[1] = sum(after, servers, false)
	r.loopback[1] = [2]int64{sum(before, servers, true), sum(after, servers, true)}

	// SIGTERM while it checks, until it has exited and settle more.
	r.exit = c.stop(t)
	time.Sleep(settle)
	s3 := snapshot(t, servers)
	for _, s := range servers {
		if hc, ok := s.(hostCache); ok {
			r.blocked[s.name()] = hc.blocked(t)
		}
	}
	r.delta = [3]map[string]int64{diff(s0, s1), diff(s1, s2), diff(s2, s3)}
	t.Logf("%s: %v", c.name(), r.delta)
	return r
}

// sum adds up checks (from verify) over the servers, or over those on
// loopback only.
func sum(checks map[string]int64, servers []server, loopbackOnly bool) int64 {
	var n int64
	for _, s := range servers {
		if !loopbackOnly || onLoopback(s) {
			n += checks[s.name()]
		}
	}
	return n
}

func onLoopback(s server) bool { return strings.HasPrefix(s.target(), "127.") }

// assertServer checks what each checker left on s.
func assertServer(t *testing.T, s server, results []*result) {
	for _, r := range results {
		for p := range phaseNames {
			for _, m := range s.metrics() {
				n := r.delta[p][s.name()+"/"+m.key]
				switch kindOf(r.c) {
				case kindShaker, kindShakerL4:
					// The product's claim: nothing, in every phase.
					if n != 0 {
						t.Errorf("plugin (%s), %s: %s moved by %d, want 0", r.c.name(), phaseNames[p], m.label, n)
					}
				case "haproxy":
					// Half-open checks while it runs; what its hard stop
					// leaves is shown, not asserted.
					if p < 2 && n != 0 {
						t.Errorf("HAProxy, %s: %s moved by %d, want 0", phaseNames[p], m.label, n)
					}
				case kindCaddy:
					// Every HTTP check is a connection: the count must move.
					if p < 2 && m.connects && n <= 0 {
						t.Errorf("Caddy health_uri, %s: %s moved by %d, want more than 0", phaseNames[p], m.label, n)
					}
				case kindCaddyL4:
					// Every check is a connection, closed at once.
					if p < 2 && m.bare && n <= 0 {
						t.Errorf("caddy-l4's active checks, %s: %s moved by %d, want more than 0", phaseNames[p], m.label, n)
					}
				}
			}
		}
		if b, ok := r.blocked[s.name()]; ok {
			want := kindOf(r.c) == kindCaddy || kindOf(r.c) == kindCaddyL4 // they connect
			if b != want {
				t.Errorf("%s: %s blocked the checkers' host: %v, want %v", r.c.name(), s.label(), b, want)
			}
		}
	}
}

// selfCheckProbes is how many probes the plugin's engine sends to a
// listener of its own on 127.0.0.1 when it starts (shaker.SelfCheck; its
// selfCheckProbes): in this namespace, so the kernel counts them too.
const selfCheckProbes = 3

// assertChecking checks that the half-open checkers did check: the kernel
// saw their half-open checks of the servers on loopback (TcpExt
// EmbryonicRsts: one per check answered and reset), as many as the plugin
// counted itself; HAProxy, which counts none, at least a quarter of those
// due.
func assertChecking(t *testing.T, servers []server, results []*result, phase time.Duration) {
	loopback := 0
	for _, s := range servers {
		if onLoopback(s) {
			loopback++
		}
	}
	// HAProxy: a quarter of the checks due, for a busy machine
	least := int64(loopback) * int64(phase/probeInterval) / 4
	// The plugin: its own count of the phase is bracketed by its counts
	// read just before and just after each snapshot. Beyond that, each
	// address has at most one probe in flight, whose RST (counted by the
	// kernel) and result (counted by the plugin, after the RST is sent)
	// can fall on either side of a read: one per address at each end of
	// the phase.
	slack := 2 * int64(loopback)
	for _, r := range results {
		for p := range 2 {
			n := r.delta[p]["kernel/embryonic"]
			switch kindOf(r.c) {
			case kindShaker, kindShakerL4:
				// its checks from before the snapshot that ends the phase
				// since after the one that began it; and the widest
				var lo, hi int64
				if p == 0 {
					// from its start: nothing before; and the self-check
					lo = r.loopback[0][0] + selfCheckProbes
					hi = r.loopback[0][1] + selfCheckProbes
				} else {
					lo = r.loopback[p][0] - r.loopback[p-1][1]
					hi = r.loopback[p][1] - r.loopback[p-1][0]
				}
				t.Logf("plugin (%s), %s: %d half-open checks of %d servers on loopback seen by the kernel; it counted %d to %d", r.c.name(), phaseNames[p], n, loopback, lo, hi)
				if n < lo-slack || n > hi+slack {
					t.Errorf("plugin (%s), %s: %d half-open checks of %d servers on loopback seen by the kernel, but it counted %d to %d itself (give or take %d)",
						r.c.name(), phaseNames[p], n, loopback, lo, hi, slack)
				}
				if lo < least {
					t.Errorf("plugin (%s), %s: %d checks of %d servers on loopback, want at least %d (a quarter of those due)", r.c.name(), phaseNames[p], lo, loopback, least)
				}
			case "haproxy":
				if n < least {
					t.Errorf("%s, %s: %d half-open checks of %d servers on loopback, want at least %d",
						r.c.name(), phaseNames[p], n, loopback, least)
				}
			case kindCaddy, kindCaddyL4:
				// they connect in full: no half-made connection is reset
				if n != 0 {
					t.Errorf("%s, %s: %d half-open checks, want 0", r.c.label(), phaseNames[p], n)
				}
			}
		}
		if r.counts && (r.checks[0] == 0 || r.checks[1] <= r.checks[0]) {
			t.Errorf("%s counted %d checks after the steady phase and %d after the reloads", r.c.name(), r.checks[0], r.checks[1])
		}
	}
}

// table is the markdown table of what each checker left behind.
func table(servers []server, results []*result) string {
	var b strings.Builder
	b.WriteString("| server | what it counts |")
	for _, r := range results {
		fmt.Fprintf(&b, " %s |", r.c.label())
	}
	b.WriteString("\n|---|---|")
	for range results {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	cells := func(key string) {
		for _, r := range results {
			fmt.Fprintf(&b, " %d / %d / %d |", r.delta[0][key], r.delta[1][key], r.delta[2][key])
		}
		b.WriteString("\n")
	}
	for _, s := range servers {
		for _, m := range s.metrics() {
			fmt.Fprintf(&b, "| %s | %s |", s.label(), m.label)
			cells(s.name() + "/" + m.key)
		}
		if q, ok := queryClient(s); ok {
			fmt.Fprintf(&b, "| %s | client queries through the checker's layer-4 proxy (%s; their connections are not counted above) |", s.label(), q.queryLabel())
			for _, r := range results {
				if r.proxied {
					fmt.Fprintf(&b, " %d / %d / - |", r.queries[0][s.name()], r.queries[1][s.name()])
				} else {
					b.WriteString(" - |")
				}
			}
			b.WriteString("\n")
		}
		if _, ok := s.(hostCache); ok {
			fmt.Fprintf(&b, "| %s | checkers' host blocked at the end (`max_connect_errors = %d`) |", s.label(), maxConnectErrors)
			for _, r := range results {
				yes := "no"
				if r.blocked[s.name()] {
					yes = "**yes**"
				}
				fmt.Fprintf(&b, " %s |", yes)
			}
			b.WriteString("\n")
		}
	}
	b.WriteString("| kernel | half-open checks of the servers on loopback (TcpExt `EmbryonicRsts`) |")
	cells("kernel/embryonic")
	b.WriteString("| checker | checks it counted itself (the plugin's `GET /shaker/upstreams`) |")
	for _, r := range results {
		if r.counts {
			fmt.Fprintf(&b, " %d / %d / - |", r.checks[0], r.checks[1]-r.checks[0])
		} else {
			b.WriteString(" - |")
		}
	}
	b.WriteString("\n| checker | config reloads in the reload phase |")
	for _, r := range results {
		fmt.Fprintf(&b, " %d |", r.reloads)
	}
	b.WriteString("\n| checker | from SIGTERM to exit |")
	for _, r := range results {
		fmt.Fprintf(&b, " %v |", r.exit.Round(time.Millisecond))
	}
	b.WriteString("\n")
	return b.String()
}
