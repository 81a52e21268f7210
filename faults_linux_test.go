//go:build linux

package caddyshaker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The fault tests: a backend killed, its SYNs dropped, rejected with ICMP,
// hung with a full accept queue, and the prober itself out of file
// descriptors. Each case checks the reason the admin API reports, the time
// to detect, that no request fails once the address is marked down, and
// that the backend coming back is marked up after `passes` probes.
//
// Some cases need a process of their own: a backend to kill or stop, a
// network namespace for nftables rules, a lowered RLIMIT_NOFILE. The test
// binary runs itself again with faultsHelperEnv set, and TestFaultsHelper
// is the child's body.

// Probe settings of the fault tests.
const (
	fInterval = 100 * time.Millisecond
	fTimeout  = 80 * time.Millisecond
	// slack for scheduling under -race on a busy 2-core machine (and a
	// child process that polls the admin API)
	fSlack = 400 * time.Millisecond
	// requests sent through the proxy once the address is marked down
	fRequests = 30
)

const faultsHelperEnv = "CADDYSHAKER_FAULTS_HELPER"

// TestFaultsHelper is the body of the child processes of the fault tests.
func TestFaultsHelper(t *testing.T) {
	testkit.Child(t, faultsHelperEnv, "the fault tests", map[string]func(*testing.T){
		"backend": faultsBackendMain,
		"drop": func(t *testing.T) {
			faultsNftMain(t, "tcp dport %d drop", "timeout after "+fTimeout.String())
		},
		"icmp": func(t *testing.T) {
			faultsNftMain(t, "meta nfproto ipv4 tcp dport %d reject with icmp type host-unreachable", "unreachable")
		},
		"fdlimit":   faultsFDLimitMain,
		"deadhosts": faultsDeadHostsMain,
	})
}

// faultsBackendMain is a backend in a process of its own: an HTTP server
// on FAULTS_ADDR (127.0.0.1:0 for any port) with a listen backlog of
// FAULTS_BACKLOG, answering its name FAULTS_NAME. It prints "READY addr"
// once it listens, and exits when its stdin closes (the parent is gone).
func faultsBackendMain(t *testing.T) {
	ap, err := net.ResolveTCPAddr("tcp4", os.Getenv("FAULTS_ADDR"))
	if err != nil || !ap.IP.IsLoopback() {
		t.Fatalf("FAULTS_ADDR %q: want a loopback address (%v)", os.Getenv("FAULTS_ADDR"), err)
	}
	backlog, err := strconv.Atoi(os.Getenv("FAULTS_BACKLOG"))
	if err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		t.Fatal(err)
	}
	sa := &syscall.SockaddrInet4{Port: ap.Port}
	copy(sa.Addr[:], ap.IP.To4())
	// the port may be held briefly by the killed process: retry, bounded
	for i := 0; ; i++ {
		if err = syscall.Bind(fd, sa); err == nil || i == 200 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("bind %v: %v", ap, err)
	}
	if err := syscall.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "listener")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	name := os.Getenv("FAULTS_NAME")
	fmt.Printf("READY %s\n", ln.Addr())
	http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, name)
	}))
}

// childBackend is a backend running in a child process (faultsBackendMain),
// so that the test can kill it or stop it by pid.
type childBackend struct {
	t       *testing.T
	name    string
	addr    string
	backlog int
	cmd     *exec.Cmd
	out     *faultsOutput
}

// faultsOutput collects a child's output and reports its "READY addr" line.
type faultsOutput struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	ready chan string
	sent  bool
}

func (o *faultsOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	if !o.sent {
		lines := strings.Split(o.buf.String(), "\n")
		for _, line := range lines[:len(lines)-1] { // complete lines only
			if a, ok := strings.CutPrefix(line, "READY "); ok {
				o.ready <- strings.TrimSpace(a)
				o.sent = true
				break
			}
		}
	}
	return len(p), nil
}

func (o *faultsOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// startChildBackend starts a backend process on addr (127.0.0.1:0 for any
// port) and waits until it listens.
func startChildBackend(t *testing.T, name, addr string, backlog int) *childBackend {
	t.Helper()
	c := &childBackend{t: t, name: name, addr: addr, backlog: backlog}
	c.start()
	t.Cleanup(c.kill)
	return c
}

func (c *childBackend) start() {
	c.t.Helper()
	cmd, err := testkit.TestCommand(context.Background(), "", "TestFaultsHelper", faultsHelperEnv+"=backend", "FAULTS_ADDR="+c.addr,
		"FAULTS_NAME="+c.name, "FAULTS_BACKLOG="+strconv.Itoa(c.backlog))
	if err != nil {
		c.t.Fatal(err)
	}
	out := &faultsOutput{ready: make(chan string, 1)}
	cmd.Stdout, cmd.Stderr = out, out
	if _, err := cmd.StdinPipe(); err != nil { // closed when we exit: the child then exits
		c.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.cmd, c.out = cmd, out
	select {
	case a := <-out.ready:
		c.addr = a
	case <-time.After(20 * time.Second):
		c.kill()
		c.t.Fatalf("backend process %s did not listen within 20s:\n%s", c.name, out)
	}
}

// signal sends sig to the backend process, by pid.
func (c *childBackend) signal(sig syscall.Signal) {
	c.t.Helper()
	if err := syscall.Kill(c.cmd.Process.Pid, sig); err != nil {
		c.t.Fatalf("kill -%v %d: %v", sig, c.cmd.Process.Pid, err)
	}
}

// kill stops the backend process with SIGKILL, by pid, and reaps it.
func (c *childBackend) kill() {
	if c.cmd == nil {
		return
	}
	syscall.Kill(c.cmd.Process.Pid, syscall.SIGKILL)
	c.cmd.Wait()
	c.cmd = nil
}

// loadFaults loads the harness's config with the fault tests' settings.
func loadFaults(h *harness) {
	h.t.Helper()
	if h.extra == nil {
		h.extra = map[string]any{}
	}
	h.extra["timeout"] = fTimeout.String()
	h.load(fInterval)
}

// faultResult is what one fault case measured.
type faultResult struct {
	down, up   time.Duration
	reason     string
	upProbes   uint64
	downProbes uint64
}

// runFault checks one fault on victim, with other up beside it: inject
// makes the fault and returns the time it took effect; heal ends it and
// returns the time the backend is back. It asserts the reason reported,
// the time to detect, that no request fails once victim is marked down,
// and that victim is marked up again after `passes` probes (counted from
// the end of heal if slowHeal, else from its start).
func runFault(t testing.TB, h *harness, victim, other *backend, reason string, inject, heal func() time.Time, slowHeal bool) faultResult {
	t.Helper()
	waitFor(t, 10*time.Second, "both backends up, probed twice", func() bool {
		st := adminStatuses(t, h.admin)
		for _, b := range []*backend{victim, other} {
			if s := st[b.addr]; !s.Healthy || s.Probes < 2 || s.Timeout != fTimeout.String() {
				return false
			}
		}
		return true
	})
	// the proxy reaches both
	seen := map[string]bool{}
	for i := 0; i < 50 && len(seen) < 2; i++ {
		code, body := h.get()
		if code != 200 {
			t.Fatalf("request before the fault: %d %q", code, body)
		}
		seen[body] = true
	}
	if !seen[victim.name] || !seen[other.name] {
		t.Fatalf("requests before the fault reached %v, want %s and %s", seen, victim.name, other.name)
	}

	var r faultResult
	before := adminStatuses(t, h.admin)[victim.addr].Probes
	t0 := inject()
	waitFor(t, 10*time.Second, victim.name+" marked down", func() bool { return !adminStatuses(t, h.admin)[victim.addr].Healthy })
	r.down = time.Since(t0)
	s := adminStatuses(t, h.admin)[victim.addr]
	r.reason, r.downProbes = s.LastError, s.Probes-before
	bound := fInterval*tFails + fTimeout + fSlack
	t.Logf("%s: marked down %v after the fault (bound %v), %d probes, reason %q", victim.name, r.down, bound, r.downProbes, s.LastError)
	if s.LastError != reason {
		t.Errorf("last_error %q, want %q", s.LastError, reason)
	}
	if s.Fails < tFails {
		t.Errorf("down with fails=%d, want >= %d", s.Fails, tFails)
	}
	if r.down > bound {
		t.Errorf("marked down %v after the fault, want <= interval x fails + timeout + slack = %v", r.down, bound)
	}
	for i := range fRequests {
		if code, body := h.get(); code != 200 || body != other.name {
			t.Fatalf("request %d after %s was marked down: %d %q, want 200 from %s", i, victim.name, code, body, other.name)
		}
	}

	before = adminStatuses(t, h.admin)[victim.addr].Probes
	t1 := heal()
	if slowHeal {
		// counted from here: a restarted process takes a while to
		// listen, and probes are refused until then
		before = adminStatuses(t, h.admin)[victim.addr].Probes
	}
	waitFor(t, 10*time.Second, victim.name+" marked up", func() bool { return adminStatuses(t, h.admin)[victim.addr].Healthy })
	r.up = time.Since(t1)
	s = adminStatuses(t, h.admin)[victim.addr]
	r.upProbes = s.Probes - before
	bound = fInterval*tPasses + fTimeout + fSlack
	t.Logf("%s: back, marked up %v later (bound %v) after %d probes", victim.name, r.up, bound, r.upProbes)
	if s.Passes < tPasses || s.LastError != "" {
		t.Errorf("up with passes=%d last_error %q, want passes >= %d and no error", s.Passes, s.LastError, tPasses)
	}
	// a probe in flight when the backend came back may still fail; with
	// slowHeal, one may have passed before the count started
	if r.upProbes > tPasses+1 || (!slowHeal && r.upProbes < tPasses) {
		t.Errorf("marked up after %d probes, want %d (or one more)", r.upProbes, tPasses)
	}
	if r.up > bound {
		t.Errorf("marked up %v after the backend came back, want <= interval x passes + timeout + slack = %v", r.up, bound)
	}
	return r
}

// TestFaultKilledBackend: a backend process killed with SIGKILL is marked
// down as refused (its kernel answers RST); restarted on the same port, it
// is marked up again.
func TestFaultKilledBackend(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	child := startChildBackend(t, "child", "127.0.0.1:0", 128)
	h := newHarness(t, 1)
	victim := &backend{t: t, name: "child", addr: child.addr}
	h.backends = append(h.backends, victim)
	loadFaults(h)
	r := runFault(t, h, victim, h.backends[0], "refused",
		func() time.Time {
			child.signal(syscall.SIGKILL)
			t0 := time.Now()
			child.kill() // reap it
			return t0
		},
		func() time.Time {
			child.start() // same port
			if child.addr != victim.addr {
				t.Fatalf("restarted on %s, want %s", child.addr, victim.addr)
			}
			return time.Now()
		}, true)
	t.Logf("killed (SIGKILL): down after %v, %q; restarted: up after %v, %d probes", r.down, r.reason, r.up, r.upProbes)
}

// TestFaultStoppedBackend: a backend process stopped with SIGSTOP answers
// SYNs from its kernel until its accept queue is full (backlog 1: two
// connections the test makes); then the kernel drops SYNs and it is
// marked down by timeout. SIGCONT: it accepts the queued connections, the
// queue drains, and it is marked up again.
func TestFaultStoppedBackend(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	child := startChildBackend(t, "child", "127.0.0.1:0", 1)
	h := newHarness(t, 1)
	victim := &backend{t: t, name: "child", addr: child.addr}
	h.backends = append(h.backends, victim)
	loadFaults(h)
	var fillers []net.Conn
	t.Cleanup(func() {
		for _, c := range fillers {
			c.Close()
		}
	})
	r := runFault(t, h, victim, h.backends[0], "timeout after "+fTimeout.String(),
		func() time.Time {
			child.signal(syscall.SIGSTOP)
			// Only once the process is really stopped does the queue
			// stay full: before that, it may still accept.
			waitFor(t, 5*time.Second, "child stopped", func() bool { return testkit.ProcState(t, child.cmd.Process.Pid) == 'T' })
			// Fill the accept queue: connections complete until it is
			// full (the kernel's own count, from /proc/net/tcp), then
			// the kernel drops SYNs.
			start := time.Now()
			for acceptQueue(t, victim.addr) <= child.backlog {
				if len(fillers) == 8 {
					t.Fatalf("the accept queue of a stopped process with backlog %d took %d connections", child.backlog, len(fillers))
				}
				c, err := net.DialTimeout("tcp", victim.addr, 2*time.Second)
				if err != nil {
					break // dropped: full
				}
				fillers = append(fillers, c)
				start = time.Now()
			}
			t.Logf("accept queue full after %d connections (%d queued)", len(fillers), acceptQueue(t, victim.addr))
			return start
		},
		func() time.Time {
			child.signal(syscall.SIGCONT)
			return time.Now()
		}, false)
	if len(fillers) == 0 {
		t.Errorf("no connection was queued before SYNs were dropped")
	}
	t.Logf("stopped (SIGSTOP), accept queue full: down after %v, %q; SIGCONT: up after %v, %d probes", r.down, r.reason, r.up, r.upProbes)
}

// faultsNftMain runs in a network namespace of the test's own: Caddy with
// two backends; an nftables rule (rule, with %d the port) on the second
// one, which must then be marked down with reason; the rule deleted, it
// must come back. It prints its measures as RESULT lines.
func faultsNftMain(t *testing.T, rule, reason string) {
	h := newHarness(t, 2)
	loadFaults(h)
	b1, b2 := h.backends[0], h.backends[1]
	port := b2.port()
	nft := func(stdin string, args ...string) {
		cmd := exec.Command("nft", args...)
		cmd.Stdin = strings.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft %v: %v: %s", args, err, out)
		}
	}
	r := runFault(t, h, b2, b1, reason,
		func() time.Time {
			p, _ := strconv.Atoi(port)
			t0 := time.Now() // the rule takes effect while nft runs
			nft(fmt.Sprintf("table inet faults {\n chain in {\n  type filter hook input priority 0; policy accept;\n  "+rule+"\n }\n}\n", p), "-f", "-")
			return t0
		},
		func() time.Time {
			t1 := time.Now()
			nft("", "delete", "table", "inet", "faults")
			return t1
		}, false)
	fmt.Printf("RESULT down %v %d %s\n", r.down, r.downProbes, r.reason)
	fmt.Printf("RESULT up %v %d\n", r.up, r.upProbes)
}

// TestFaultsNftables: in a network namespace of its own, SYNs to a
// backend dropped by nftables are marked down as a timeout, and an ICMP
// host-unreachable reject as unreachable; each comes back when the rule is
// deleted.
func TestFaultsNftables(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	for _, c := range []struct{ mode, reason string }{
		{"drop", "timeout after " + fTimeout.String()},
		{"icmp", "unreachable"},
	} {
		t.Run(c.mode, func(t *testing.T) {
			ns := testkit.Netns(t, true, "")
			out := testkit.RunTest(t, ns, "TestFaultsHelper", faultsHelperEnv+"="+c.mode)
			res := testkit.ResultsByName(out)
			down, up := res["down"], res["up"]
			if len(down) < 3 || len(up) < 2 {
				t.Fatalf("helper printed no results:\n%s", out)
			}
			if got := strings.Join(down[2:], " "); got != c.reason {
				t.Errorf("reason %q, want %q", got, c.reason)
			}
			t.Logf("%s: marked down after %s (%s probes), reason %q; rule deleted: up after %s (%s probes)",
				c.mode, down[0], down[1], strings.Join(down[2:], " "), up[0], up[1])
		})
	}
}

// faultsFDLimitMain runs in a child process: Caddy with two backends up
// and one hung (a full accept queue: its probes time out, and their
// sockets are closed rather than kept for reuse, so the engine runs out
// of its kept sockets too). Then the process runs out of file
// descriptors: RLIMIT_NOFILE is lowered below every fd Caddy holds and
// the fds under it are taken. Probes fail with ErrLocal, which counts
// neither way: every address keeps its state and its probe count. Then
// the fds are freed and probing goes on.
func faultsFDLimitMain(t *testing.T) {
	// fds opened first hold the low numbers: Caddy's, the engine's and the
	// backends' all lie above them, and a limit just above these makes
	// every fd the engine closes unusable again
	var low []*os.File
	t.Cleanup(func() {
		for _, f := range low {
			f.Close()
		}
	})
	for range 200 {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		low = append(low, f)
	}
	limit := uint64(low[len(low)-1].Fd()) + 1

	hungAP, fill := testkit.QueueListener(t, "127.0.0.1")
	hungAddr := hungAP.String()
	fill()
	h := newHarness(t, 2)
	b1, b2 := h.backends[0], h.backends[1]
	h.backends = append(h.backends, &backend{t: t, name: "hung", addr: hungAddr})
	// log at INFO: the parent looks for the lines on probes failing on
	// this host and working again
	h.extra = map[string]any{"timeout": fTimeout.String()}
	var cfg map[string]any
	if err := json.Unmarshal(h.config(fInterval), &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["logging"].(map[string]any)["logs"].(map[string]any)["default"].(map[string]any)["level"] = "INFO"
	// one loop: its few kept sockets serve every address, so once the
	// first probe fails with EMFILE every later one does (with more
	// loops, a loop whose addresses all answer keeps probing on its kept
	// socket, which is right, but not what this test watches)
	cfg["apps"].(map[string]any)["shaker"] = map[string]any{"loops": 1}
	raw, _ := json.Marshal(cfg)
	// the harness's first config started an engine with the default
	// loops: stop it, so that this config starts one with one loop
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(raw, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "two backends up, the hung one down", func() bool {
		st := adminStatuses(t, h.admin)
		return st[b1.addr].Healthy && st[b1.addr].Probes >= 2 &&
			st[b2.addr].Healthy && st[b2.addr].Probes >= 2 &&
			!st[hungAddr].Healthy && st[hungAddr].Probes >= 2
	})
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	h.client.CloseIdleConnections()
	failed := func() uint64 { st := engines.cur.Load().Stats(); return st.Local + st.Failed }

	// out of fds
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	lowered := orig
	lowered.Cur = limit
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
		t.Fatal(err)
	}
	var gaps []*os.File
	for range 1000 {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatal(err)
			}
			break
		}
		gaps = append(gaps, f)
	}
	f0 := failed()
	t0 := time.Now()
	// until the first failure, probes may still run on sockets the engine
	// kept; after it, every probe fails
	waitFor(t, 10*time.Second, "a probe failing with EMFILE", func() bool { return failed() > f0 })
	first := time.Since(t0)
	waitFor(t, 10*time.Second, "probes failing with EMFILE", func() bool { return failed() >= f0+6 })
	s1, f1 := adminStatuses(t, ""), failed()
	waitFor(t, 10*time.Second, "30 more probes failing", func() bool { return failed() >= f1+30 })
	s2, f2 := adminStatuses(t, ""), failed()
	held := time.Since(t0)
	for _, b := range []*backend{b1, b2} {
		if a, z := s1[b.addr], s2[b.addr]; !a.Healthy || !z.Healthy || z.Fails != 0 || z.Probes != a.Probes || z.LastError != "" {
			t.Errorf("%s at the fd limit: status %+v then %+v: want healthy, no failure counted, probe count unchanged", b.name, a, z)
		}
	}
	if s := s2[hungAddr]; s.Healthy {
		t.Errorf("hung backend looks up at the fd limit: %+v", s)
	}

	// fds free again
	for _, f := range gaps {
		f.Close()
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	waitFor(t, 10*time.Second, "probes counted again", func() bool {
		st := adminStatuses(t, h.admin)
		return st[b1.addr].Probes >= s2[b1.addr].Probes+2 && st[b2.addr].Probes >= s2[b2.addr].Probes+2
	})
	again := time.Since(t1)
	st := adminStatuses(t, h.admin)
	for _, b := range []*backend{b1, b2} {
		if !st[b.addr].Healthy {
			t.Errorf("%s down after the fds were freed: %+v", b.name, st[b.addr])
		}
	}
	if n := h.probeAccepts(); n != 0 {
		t.Errorf("backends accepted %d connections", n)
	}
	fmt.Printf("RESULT limit %d\n", limit)
	fmt.Printf("RESULT failing %v %d\n", first, f2-f0)
	fmt.Printf("RESULT held %v\n", held)
	fmt.Printf("RESULT recovered %v\n", again)
	fmt.Printf("RESULT healthy %v %v\n", st[b1.addr].Healthy, st[b2.addr].Healthy)
}

// fdLogLinesMax is how many "probes failing on this host" (and "working
// again") lines TestFaultFDLimit accepts for one episode of fd exhaustion:
// one each way, not one per failed probe. (A probe that had its socket
// before the fds ran out must not count as "working again".)
const fdLogLinesMax = 1

// TestFaultFDLimit: the engine at its fd limit (RLIMIT_NOFILE lowered in a
// child process running Caddy): probes fail with a clear error that counts
// against no backend, every address keeps its state, the log says so once
// (and once that probes work again), and probing recovers when fds are
// free again.
func TestFaultFDLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	out := testkit.RunTest(t, "", "TestFaultsHelper", faultsHelperEnv+"=fdlimit")
	res := testkit.ResultsByName(out)
	if len(res["failing"]) < 2 || len(res["recovered"]) < 1 {
		t.Fatalf("helper printed no results:\n%s", out)
	}
	var failing, again []string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "probes failing on this host") {
			failing = append(failing, line)
		}
		if strings.Contains(line, "probes working again on this host") {
			again = append(again, line)
		}
	}
	// One line each way, not one per failed probe (dozens here).
	if len(failing) < 1 || len(failing) > fdLogLinesMax {
		t.Errorf("log lines on probes failing on this host: %d, want 1 (at most %d):\n%s",
			len(failing), fdLogLinesMax, strings.Join(failing, "\n"))
	}
	for _, l := range failing {
		if !strings.Contains(l, "too many open files") {
			t.Errorf("log line does not name the error (EMFILE, too many open files): %s", l)
		}
	}
	if len(again) < 1 || len(again) > fdLogLinesMax {
		t.Errorf("log lines on probes working again: %d, want 1 (at most %d):\n%s", len(again), fdLogLinesMax, strings.Join(again, "\n"))
	}
	if len(failing) > 1 {
		t.Logf("known: the log said it %d times: a probe in flight when the fds ran out ended normally in between "+
			"and counted as probes working again", len(failing))
	}
	t.Logf("fd limit %s: first probe failure %s after the fds ran out, %s probes failed (ErrLocal, counted neither way) over %s; fds freed: probes counted again after %s; backends healthy: %s",
		res["limit"][0], res["failing"][0], res["failing"][1], res["held"][0], res["recovered"][0], strings.Join(res["healthy"], " "))
	if failing != nil {
		t.Logf("log: %s", failing[0])
	}
}

// acceptQueue is the length of the accept queue of the listener on addr
// (an IPv4 address), as the kernel counts it: rx_queue of its LISTEN line
// in /proc/net/tcp.
func acceptQueue(t *testing.T, addr string) int {
	ap := netip.MustParseAddrPort(addr)
	a4 := ap.Addr().As4()
	want := fmt.Sprintf("%02X%02X%02X%02X:%04X", a4[3], a4[2], a4[1], a4[0], ap.Port())
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		// sl local_address rem_address st tx_queue:rx_queue ...
		if len(f) < 5 || f[1] != want || f[3] != "0A" {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseUint(rx, 16, 32)
		if err != nil {
			t.Fatalf("/proc/net/tcp: %q", line)
		}
		return int(n)
	}
	t.Fatalf("no listener on %s in /proc/net/tcp", addr)
	return 0
}
