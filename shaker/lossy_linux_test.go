//go:build linux && !shaker_fallback

package shaker

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The lossy path: two network namespaces of the test's own, A (the
// prober) and B (the listeners), joined by a veth pair with a tbf qdisc on
// both ends (this kernel has no netem). tbf queues packets beyond its rate
// and drops them beyond its latency, so at full probe rate SYN-ACKs arrive
// after connect() has returned (the epoll path) and some SYNs are dropped
// and retransmitted a second later.

const (
	lossyEnv   = "SHAKER_LOSSY_HELPER" // the child's ns B, when set
	lossyAddrA = "198.18.7.1"          // benchmarking range, inside our namespaces only
	lossyAddrB = "198.18.7.2"
)

// lossyPath creates the two namespaces and the veth pair between them and
// returns their names. It skips, saying why, where this machine cannot.
func lossyPath(t *testing.T) (nsA, nsB string) {
	t.Helper()
	nsA = testkit.Netns(t, false, "")
	nsB = testkit.Netns(t, false, "")
	if _, err := exec.LookPath("tc"); err != nil {
		t.Skip("needs tc (Debian package iproute2)")
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Skipf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "link", "add", "shk-a", "netns", nsA, "type", "veth", "peer", "name", "shk-b", "netns", nsB)
	run("ip", "-n", nsA, "addr", "add", lossyAddrA+"/30", "dev", "shk-a")
	run("ip", "-n", nsB, "addr", "add", lossyAddrB+"/30", "dev", "shk-b")
	run("ip", "-n", nsA, "link", "set", "shk-a", "up")
	run("ip", "-n", nsB, "link", "set", "shk-b", "up")
	for _, end := range [][2]string{{nsA, "shk-a"}, {nsB, "shk-b"}} {
		run("ip", "netns", "exec", end[0], "tc", "qdisc", "add", "dev", end[1], "root",
			"tbf", "rate", "2mbit", "burst", "3000", "latency", "100ms")
	}
	return nsA, nsB
}

// TestCloseDelayOnLossyPath: on a path that delays and drops SYNs, the
// close delay is measured from the SYN-ACK's arrival. A probe whose first
// SYN was lost and whose retransmission was answered a second later reads
// as a late close if the delay is taken from the SYN's time plus the RTT;
// it must not (the RTT times delays only where the first SYN was
// answered, and the test checks that it did time some). Nothing is
// accepted. The test fails unless at least one probe was answered after
// a retransmitted SYN: the helper probes in phases until one was
// (lossyPhases at most).
func TestCloseDelayOnLossyPath(t *testing.T) {
	if testing.Short() {
		t.Skip("namespaces and 6 to 30 s of probes")
	}
	nsA, nsB := lossyPath(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", nsA, self, "-test.run=^TestLossyHelper$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), lossyEnv+"="+nsB)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("helper: %v\n%s", err, out.String())
	}
	var up, timeouts, retrans, retransUp, accepted, phases int64
	var worst, naive time.Duration
	var exact, apart uint64
	for _, line := range strings.Split(out.String(), "\n") {
		f := strings.Fields(line)
		if len(f) == 4 && f[0] == "RESULT" && f[1] == "views" {
			exact, apart = u2(f[2]), u2(f[3])
		}
		if len(f) == 9 && f[0] == "RESULT" {
			up, _ = strconv.ParseInt(f[1], 10, 64)
			timeouts, _ = strconv.ParseInt(f[2], 10, 64)
			retrans, _ = strconv.ParseInt(f[3], 10, 64)
			retransUp, _ = strconv.ParseInt(f[4], 10, 64)
			worst, _ = time.ParseDuration(f[5])
			naive, _ = time.ParseDuration(f[6])
			accepted, _ = strconv.ParseInt(f[7], 10, 64)
			phases, _ = strconv.ParseInt(f[8], 10, 64)
		}
	}
	t.Logf("lossy path: %d phases; %d up, %d of them after a retransmitted SYN; %d timeouts; %d SYNs retransmitted; worst close delay %v (from SYN + RTT it would read %v); %d accepted; %d delays timed by the kernel's microsecond clock, %d where it disagreed",
		phases, up, retransUp, timeouts, retrans, worst, naive, accepted, exact, apart)
	switch {
	case up == 0:
		t.Fatalf("no probe answered:\n%s", out.String())
	case retransUp == 0:
		t.Fatalf("no probe answered after a retransmitted SYN in %d phases (%d SYNs retransmitted): the case is not exercised\n%s",
			phases, retrans, out.String())
	case accepted != 0:
		t.Fatalf("listeners accepted %d probe connections", accepted)
	case worst >= 150*time.Millisecond:
		t.Fatalf("worst close delay %v: a false alarm (or a real late close) on a lossy path", worst)
	case naive < lossyRetransmitted-200*time.Millisecond:
		// the probes answered late must read late from SYN + RTT: else
		// the case above did not test what it says
		t.Fatalf("%d probes answered after %v, yet SYN + RTT reads only %v", retransUp, lossyRetransmitted, naive)
	}
	if microClock() {
		checkDelayViews(t, exact, apart)
	}
}

const (
	// lossyPhases bounds the helper's phases of probing (lossyPhase each,
	// plus the last probes' timeouts): about 30 s at most.
	lossyPhases = 4
	lossyPhase  = 4 * time.Second
	// lossyRetransmitted: a probe answered this long after its start had
	// its SYN retransmitted. The kernel's first retransmission is 1 s
	// after the SYN (the initial RTO); without a loss the round trip is at
	// most tbf's 100 ms latency each way plus the loop's turn.
	lossyRetransmitted = 900 * time.Millisecond
)

// TestLossyHelper is the child of TestCloseDelayOnLossyPath, in ns A. It
// probes at full rate for a phase, which overflows tbf's queue so that SYNs
// are dropped; the SYNs dropped near a phase's end are retransmitted onto a
// path that has gone quiet, and answered. It goes on phase after phase until
// a probe was answered after a retransmitted SYN, lossyPhases at most.
func TestLossyHelper(t *testing.T) {
	nsB := os.Getenv(lossyEnv)
	if nsB == "" {
		t.Skip("only runs as a child of TestCloseDelayOnLossyPath")
	}
	ls := listenIn(t, nsB, 8)
	e, err := New(Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	retrans0 := testkit.TCPExt(t, "TCPSynRetrans")
	var up, timeouts, retransUp atomic.Int64
	var naive atomic.Int64
	phases := 0
	for phases < lossyPhases && retransUp.Load() == 0 {
		phases++
		var wg sync.WaitGroup
		stop := time.Now().Add(lossyPhase)
		const chains = 512
		for i := 0; i < chains; i++ {
			wg.Add(1)
			var done func(Result)
			k := i
			done = func(r Result) {
				switch r.Outcome {
				case Up:
					up.Add(1)
					if r.Duration >= lossyRetransmitted {
						retransUp.Add(1)
					}
					if d := int64(r.Duration - r.RTT); d > naive.Load() {
						naive.Store(d)
					}
				case Timeout:
					timeouts.Add(1)
				}
				if time.Now().After(stop) || r.Outcome == Closed {
					wg.Done()
					return
				}
				k++
				e.ProbeAsync(ls[k%len(ls)].Addr, 3*time.Second, done)
			}
			e.ProbeAsync(ls[k%len(ls)].Addr, 3*time.Second, done)
		}
		// bounded: each chain ends with its first result after stop, and
		// every probe has a result within its 3 s timeout
		waited := make(chan struct{})
		go func() { wg.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(lossyPhase + 30*time.Second):
			t.Fatalf("phase %d: probes without a result 30 s after the phase: %+v", phases, e.Stats())
		}
	}
	st := e.Stats()
	e.Close()
	accepted := testkit.Listeners(ls).ProbeAccepts(t) // one wait for all
	fmt.Printf("RESULT %d %d %d %d %v %v %d %d\n", up.Load(), timeouts.Load(), testkit.TCPExt(t, "TCPSynRetrans")-retrans0,
		retransUp.Load(), st.MaxCloseDelay, time.Duration(naive.Load()), accepted, phases)
	exact, apart := e.delayViews()
	fmt.Printf("RESULT views %d %d\n", exact, apart)
}

// listenIn opens n counting listeners on lossyAddrB inside network
// namespace ns (testkit.ListenIn).
func listenIn(t *testing.T, ns string, n int) []*testkit.Listener {
	var ls []*testkit.Listener
	for range n {
		ls = append(ls, testkit.ListenIn(t, ns, "tcp4", net.JoinHostPort(lossyAddrB, "0")))
	}
	for _, l := range ls {
		if !l.Addr.Addr().Is4() || l.Addr.Addr() != netip.MustParseAddr(lossyAddrB) {
			t.Fatalf("listener on %v", l.Addr)
		}
	}
	return ls
}
