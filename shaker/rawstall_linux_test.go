//go:build linux && !shaker_fallback

package shaker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The test only raw mode can pass (issue 17): a prober frozen with
// SIGSTOP while thousands of SYN-ACKs are on their way to it. The prober
// is a process of its own (the test binary run again in namespace A of a
// testkit.SlowPath); the listeners are this process's, in B, so that they
// go on accepting while the prober is frozen. B's tbf queues the
// SYN-ACKs for up to stallLatency: at the SIGSTOP, thousands of answered
// probes are in flight, and their answers arrive during the freeze.
//
// In connect mode each arriving SYN-ACK finds its socket in SYN-SENT; the
// kernel completes the handshake with its delayed ACK about 200 ms later,
// which the frozen loop cannot forestall by a close: the backend accepts.
// In raw mode no socket exists for the SYN-ACK's destination port, and
// A's kernel resets it in softirq whatever the prober is doing: 0
// accepted.

const (
	stallEnv = "SHAKER_STALL_HELPER" // the child's probe mode: raw or connect

	// The path and the load: 4,000 addresses (250 of B's IPv4 prefix on
	// each of 16 ports) every 500 ms, up to 8,000 probes a second and at
	// most 4,000 in flight, against a tbf that passes about 4,300
	// raw-mode IPv4 SYN-ACKs a second (58 bytes on the wire; connect
	// mode's carry more options) and queues up to 151,600 bytes of them
	// (rate x latency + burst): from 2,613 raw IPv4 SYN-ACKs to 1,612
	// connect-mode IPv6 ones; the rest it drops, and those probes time
	// out. The queue fills within a second. The timeout outlasts the
	// queue and is below the SYN's first retransmission (1 s).
	stallRate     = "2mbit"
	stallLatency  = "600ms"
	stallAddrs    = 4000
	stallPorts    = 16 // 250 addresses of B's IPv4 prefix on each
	stallInterval = 500 * time.Millisecond
	stallTimeout  = 900 * time.Millisecond

	// stallFor is how long the prober is frozen: longer than the queue's
	// latency and the kernel's delayed ACK together, so that every
	// answer queued at the SIGSTOP arrives, and is ACKed or reset,
	// while the prober is frozen.
	stallFor = time.Second

	// what makes the scenario real: SYN-ACKs queued in B's tbf at the
	// SIGSTOP
	stallMinQueued = 1500

	// rounds of each mode, for each family: raw mode must accept nothing
	// in every one; connect mode must accept in every one (one is
	// enough to show that the test bites)
	stallRawRounds     = 3
	stallConnectRounds = 1
)

// TestRawSurvivesStoppedProber: the prober is frozen (SIGSTOP) for 1 s
// with thousands of SYN-ACKs arriving, then resumed (SIGCONT), then
// stopped. Raw mode: 0 accepted in every round. Connect mode, the same
// scenario: the listeners accept connections in every round, which shows
// that the test bites.
func TestRawSurvivesStoppedProber(t *testing.T) {
	if testing.Short() {
		t.Skip("namespaces and up to 8,000 probes a second")
	}
	for _, family := range []int{4, 6} {
		t.Run(fmt.Sprintf("IPv%d", family), func(t *testing.T) {
			p := testkit.NewSlowPath(t, stallRate, stallLatency)
			ls, _ := testkit.SlowListeners(t, p.B, family, stallPorts, stallAddrs) // the child makes the addresses from the ports
			var ports []string
			for _, l := range ls {
				ports = append(ports, strconv.Itoa(int(l.Addr.Port())))
			}
			for _, c := range []struct {
				mode   Mode
				rounds int
			}{{ModeRaw, stallRawRounds}, {ModeConnect, stallConnectRounds}} {
				var total int64
				for round := 1; round <= c.rounds; round++ {
					what := fmt.Sprintf("IPv%d %v round %d", family, c.mode, round)
					r := stallRound(t, p, ls, family, c.mode, strings.Join(ports, ","), what)
					total += r.accepted
					switch {
					case c.mode == ModeRaw && r.accepted != 0:
						t.Errorf("%s: listeners accepted %d connections from a raw-mode prober", what, r.accepted)
					case c.mode == ModeConnect && r.accepted == 0:
						t.Errorf("%s: connect mode accepted nothing while frozen: the test does not bite", what)
					}
				}
				t.Logf("IPv%d %v: %d accepted in %d rounds", family, c.mode, total, c.rounds)
			}
		})
	}
}

// stallResult is one round of TestRawSurvivesStoppedProber.
type stallResult struct {
	queued   int   // SYN-ACKs in B's tbf at the SIGSTOP
	resets   int64 // B's EmbryonicRsts from the SIGSTOP on
	accepted int64 // connections the listeners accepted in the round
	up       int64 // the child's up results
}

// stallRound runs one child prober in mode, freezes it at a full queue,
// resumes it, stops it, and counts what the listeners accepted.
func stallRound(t *testing.T, p *testkit.SlowPath, ls testkit.Listeners, family int, mode Mode, ports, what string) stallResult {
	t.Helper()
	start := time.Now()
	before := ls.SoFar() // flushed by the previous round's ProbeAcceptsIn
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd, err := testkit.TestCommand(ctx, p.A, "TestRawStallHelper", stallEnv+"="+mode.String(),
		"SHAKER_STALL_FAMILY="+strconv.Itoa(family), "SHAKER_STALL_PORTS="+ports)
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out := newChildOutput()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var pid int
	defer func() { // on a failure: never leave the child frozen or running
		select {
		case err := <-exited:
			exited <- err
		default:
			if pid != 0 {
				syscall.Kill(pid, syscall.SIGCONT)
			}
			cmd.Process.Kill()
			<-exited
		}
	}()
	select {
	case pid = <-out.ready:
	case err := <-exited:
		exited <- err
		t.Fatalf("%s: child exited before it was probing: %v\n%s", what, err, out)
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: child not probing after 20 s\n%s", what, out)
	}
	if pid < 0 {
		t.Skipf("%s: %s", what, out.skip)
	}

	// Wait, boundedly, for the queue of answers to fill.
	var queued, most int
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if queued = testkit.Backlog(t, p.B, p.DevB); queued >= stallMinQueued {
			break
		}
		most = max(most, queued)
		if time.Now().After(deadline) {
			t.Fatalf("%s: B's tbf never held %d SYN-ACKs in 15 s (at most %d); listeners accepted %d meanwhile\n%s",
				what, stallMinQueued, most, ls.SoFar()-before, out)
		}
	}
	resets0, _ := testkit.NetnsCounters(t, p.B)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); testkit.ProcState(t, pid) != 'T'; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: child %d not stopped 2 s after SIGSTOP", what, pid)
		}
	}
	atStop := ls.SoFar() - before
	time.Sleep(stallFor) // the freeze itself: the scenario, not a wait for an event
	duringStop := ls.SoFar() - before - atStop
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stdin.Close() // the child stops its schedules and closes its engine
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("%s: child: %v\n%s", what, err, out)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: child still running 30 s after it was told to stop\n%s", what, out)
	}
	settle := p.Settle(t)
	r := stallResult{queued: queued, accepted: ls.ProbeAcceptsIn(t, p.B) - before}
	resets, _ := testkit.NetnsCounters(t, p.B)
	r.resets = resets - resets0
	res := testkit.ResultsByName(out.String())["stall"]
	if len(res) != 3 {
		t.Fatalf("%s: no RESULT stall line\n%s", what, out)
	}
	r.up, _ = strconv.ParseInt(res[0], 10, 64)
	t.Logf("%s: %d SYN-ACKs queued at the SIGSTOP; accepted %d before it, %d (unflushed) during the %v freeze, %d in all past the kernel's window (%v to settle); %d embryonic resets from the SIGSTOP on; child: %s up, %s timeouts, engine mode %s; round took %v",
		what, queued, atStop, duringStop, stallFor, r.accepted, settle.Round(time.Millisecond), r.resets, res[0], res[1], res[2],
		time.Since(start).Round(time.Millisecond))
	if res[2] != mode.String() {
		t.Fatalf("%s: the child's engine ran in mode %s", what, res[2])
	}
	// Each answer queued at the SIGSTOP reached A during the freeze and
	// was either reset by A's kernel or completed by it (accepted):
	// fewer would mean the answers were not in flight, and the round
	// proved nothing.
	if r.resets+r.accepted < int64(queued)/2 {
		t.Errorf("%s: %d embryonic resets and %d accepts from the SIGSTOP on, want at least half the %d SYN-ACKs queued at it: the scenario was not real",
			what, r.resets, r.accepted, queued)
	}
	return r
}

// childOutput collects a child's output, and reports its "READY pid"
// line (or "SKIP why", as pid -1) on ready.
type childOutput struct {
	mu    sync.Mutex
	b     strings.Builder
	pw    *io.PipeWriter
	ready chan int
	skip  string
}

func newChildOutput() *childOutput {
	pr, pw := io.Pipe()
	o := &childOutput{pw: pw, ready: make(chan int, 1)}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			o.mu.Lock()
			o.b.WriteString(line + "\n")
			o.mu.Unlock()
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "READY":
				pid, _ := strconv.Atoi(f[1])
				o.ready <- pid
			case len(f) > 0 && f[0] == "SKIP":
				o.mu.Lock()
				o.skip = line
				o.mu.Unlock()
				o.ready <- -1
			}
		}
		io.Copy(io.Discard, pr)
	}()
	return o
}

func (o *childOutput) Write(b []byte) (int, error) { return o.pw.Write(b) }

func (o *childOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// childMode is the probe mode of a child process, named by the
// environment variable env; unset, the test is not running as a child of
// parent (the tests that run it), and skips.
func childMode(t *testing.T, env, parent string) Mode {
	t.Helper()
	name := os.Getenv(env)
	if name == "" {
		t.Skip("only runs as a child of " + parent)
	}
	mode, err := ParseMode(name)
	if err != nil {
		t.Fatal(err)
	}
	return mode
}

// TestRawStallHelper is the child of TestRawSurvivesStoppedProber, in
// namespace A: it probes stallAddrs addresses of B's prefix on the ports
// of $SHAKER_STALL_PORTS in the probe mode $SHAKER_STALL_HELPER, says
// "READY pid" once probing, and stops when its standard input closes:
// RESULT stall up timeouts mode.
func TestRawStallHelper(t *testing.T) {
	mode := childMode(t, stallEnv, "TestRawSurvivesStoppedProber")
	family, _ := strconv.Atoi(os.Getenv("SHAKER_STALL_FAMILY"))
	var ports []uint16
	for _, s := range strings.Split(os.Getenv("SHAKER_STALL_PORTS"), ",") {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil {
			t.Fatalf("SHAKER_STALL_PORTS: %v", err)
		}
		ports = append(ports, uint16(p))
	}
	e, err := New(Options{Mode: mode})
	if errors.Is(err, ErrRawUnavailable) {
		fmt.Printf("SKIP %v\n", err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	var up, timeouts atomic.Int64
	fn := func(r Result) time.Duration {
		switch r.Outcome {
		case Up:
			up.Add(1)
		case Timeout:
			timeouts.Add(1)
		}
		return 0
	}
	addrs := testkit.SlowAddrs(family, stallAddrs, ports)
	scheds := make([]*Schedule, len(addrs))
	for i, a := range addrs {
		first := time.Duration(i) * stallInterval / time.Duration(len(addrs))
		scheds[i] = e.Every(a, Period{Interval: stallInterval, Timeout: stallTimeout, First: first}, fn)
	}
	fmt.Printf("READY %d\n", os.Getpid())
	io.Copy(io.Discard, os.Stdin) // until the parent closes it (or dies)
	for _, s := range scheds {
		s.Stop()
	}
	e.Close()
	fmt.Printf("RESULT stall %d %d %s\n", up.Load(), timeouts.Load(), e.Mode())
}
