//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// Some cases need a process of their own: a network namespace with
// nftables rules, or a lowered RLIMIT_NOFILE. The test binary runs itself
// again with SHAKER_TEST_HELPER set; TestHelperProcess is then the child's
// body, and prints its results as "RESULT ..." lines.

const helperEnv = "SHAKER_TEST_HELPER"

func TestHelperProcess(t *testing.T) {
	testkit.Child(t, helperEnv, "the tests that need a process of their own", map[string]func(*testing.T){
		"probe":  helperProbe,
		"emfile": helperEMFILE,
		"rsts":   helperRSTs,
	})
}

// helperProbe probes each address of SHAKER_PROBE_ADDRS once, with a
// listener on SHAKER_LISTEN, and prints one line per result:
// RESULT addr outcome errno.
func helperProbe(t *testing.T) {
	if a := os.Getenv("SHAKER_LISTEN"); a != "" {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
	}
	timeout, err := time.ParseDuration(os.Getenv("SHAKER_PROBE_TIMEOUT"))
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for _, s := range strings.Split(os.Getenv("SHAKER_PROBE_ADDRS"), ",") {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		r := e.Probe(ctx, netip.MustParseAddrPort(s))
		cancel()
		var errno syscall.Errno
		errors.As(r.Err, &errno)
		fmt.Printf("RESULT %s %s %d\n", s, outcome(r.Err), int(errno))
	}
}

func outcome(err error) string {
	switch {
	case err == nil:
		return "up"
	case errors.Is(err, ErrRefused):
		return "refused"
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrUnreachable):
		return "unreachable"
	case errors.Is(err, ErrClosed):
		return "closed"
	}
	return "error"
}

// helperEMFILE runs probes with no file descriptor left, then with fds free
// again, and prints the counts of each outcome.
func helperEMFILE(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	e, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	run := func(n int) (up, emfile, other int64) {
		var wg sync.WaitGroup
		var u, m, o atomic.Int64
		wg.Add(n)
		for i := 0; i < n; i++ {
			e.ProbeAsync(addr, 5*time.Second, func(r Result) {
				switch {
				case r.Err == nil:
					u.Add(1)
				case errors.Is(r.Err, syscall.EMFILE) && errors.Is(r.Err, ErrLocal):
					m.Add(1)
				default:
					o.Add(1)
					fmt.Printf("OTHER %v\n", r.Err)
				}
				wg.Done()
			})
		}
		wg.Wait()
		return u.Load(), m.Load(), o.Load()
	}
	// Lower the limit, then use up every fd left under it.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	lim.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	var fillers []*os.File
	for len(fillers) < 1000 {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatal(err)
			}
			break
		}
		fillers = append(fillers, f)
	}
	up, emfile, other := run(200)
	fmt.Printf("RESULT low %d %d %d\n", up, emfile, other)
	// Free them: probing goes on.
	for _, f := range fillers {
		f.Close()
	}
	up, emfile, other = run(200)
	fmt.Printf("RESULT freed %d %d %d\n", up, emfile, other)
}

// helperRSTs probes a listener of its own, inline and through epoll, and
// prints for each path how many probes were up, how much the namespace's
// TcpExt EmbryonicRsts counter grew, and how many connections the listener
// accepted: RESULT path up rsts accepted.
func helperRSTs(t *testing.T) {
	const probes = 1000
	for _, path := range paths {
		l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
		e, err := New(path.opts)
		if err != nil {
			t.Fatal(err)
		}
		before := testkit.TCPExt(t, "EmbryonicRsts")
		up := 0
		for i := 0; i < probes; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if e.Probe(ctx, l.Addr).Err == nil {
				up++
			}
			cancel()
		}
		e.Close()
		rsts := testkit.TCPExt(t, "EmbryonicRsts") - before
		fmt.Printf("RESULT %s %d %d %d\n", path.name, up, rsts, l.ProbeAccepts(t))
	}
}

// TestEveryProbeResets: each probe's half-made connection is reset by an
// RST from the prober (the backend's kernel counts an embryonic reset),
// rather than left for the backend to time out; none is accepted. It runs
// in a network namespace of its own so that no other traffic moves the
// counter.
func TestEveryProbeResets(t *testing.T) {
	ns := testkit.Netns(t, false, "")
	res := runHelper(t, ns, "rsts")
	if len(res) != len(paths) {
		t.Fatalf("%d results, want %d", len(res), len(paths))
	}
	for _, r := range res {
		if r[1] != "1000" || r[2] != "1000" || r[3] != "0" {
			t.Errorf("%s path: %s of 1000 up, %s embryonic resets, %s accepted; want 1000, 1000, 0", r[0], r[1], r[2], r[3])
		}
	}
}

// runHelper runs the test binary as a helper, optionally inside network
// namespace ns, and returns its RESULT lines, split into fields.
func runHelper(t *testing.T, ns, mode string, env ...string) [][]string {
	t.Helper()
	out := testkit.RunTest(t, ns, "TestHelperProcess", append([]string{helperEnv + "=" + mode}, env...)...)
	t.Logf("helper %s:\n%s", mode, out)
	return testkit.Results(out)
}

// TestOutcomesInNetns: dropped SYNs time out, ICMP rejects are
// unreachable, with nftables rules in a namespace of the test's own.
func TestOutcomesInNetns(t *testing.T) {
	ns := testkit.Netns(t, true, `
table inet shaker_test {
	chain in {
		type filter hook input priority 0; policy accept;
		tcp dport 9001 drop
		meta nfproto ipv4 tcp dport 9002 reject with icmp type host-unreachable
		meta nfproto ipv4 tcp dport 9003 reject with icmp type net-unreachable
	}
}`)
	cases := []struct {
		addr, outcome string
		errno         syscall.Errno
	}{
		{"127.0.0.1:9000", "up", 0},
		{"127.0.0.1:9001", "timeout", 0},
		{"[::1]:9001", "timeout", 0},
		{"127.0.0.1:9002", "unreachable", syscall.EHOSTUNREACH},
		{"127.0.0.1:9003", "unreachable", syscall.ENETUNREACH},
		{"127.0.0.1:9004", "refused", 0},
	}
	var addrs []string
	for _, c := range cases {
		addrs = append(addrs, c.addr)
	}
	res := runHelper(t, ns, "probe",
		"SHAKER_LISTEN=127.0.0.1:9000",
		"SHAKER_PROBE_TIMEOUT=300ms",
		"SHAKER_PROBE_ADDRS="+strings.Join(addrs, ","))
	if len(res) != len(cases) {
		t.Fatalf("%d results, want %d", len(res), len(cases))
	}
	for i, c := range cases {
		got := res[i]
		errno, _ := strconv.Atoi(got[2])
		if got[0] != c.addr || got[1] != c.outcome || syscall.Errno(errno) != c.errno {
			t.Errorf("%s: got %s errno %d (%v), want %s errno %d (%v)",
				c.addr, got[1], errno, syscall.Errno(errno), c.outcome, c.errno, c.errno)
		}
	}
}

// TestFDLimit: at the fd limit, probes fail with an error that wraps
// EMFILE, and the engine goes on probing once fds are free again.
func TestFDLimit(t *testing.T) {
	res := runHelper(t, "", "emfile")
	if len(res) != 2 {
		t.Fatalf("%d results, want 2", len(res))
	}
	n := func(row []string, i int) int {
		v, err := strconv.Atoi(row[i])
		if err != nil {
			t.Fatalf("bad helper output %v", row)
		}
		return v
	}
	low, freed := res[0], res[1]
	if n(low, 2) != 200 {
		t.Fatalf("with no fd left: up %s, EMFILE %s, other %s: want 200 EMFILE", low[1], low[2], low[3])
	}
	if n(freed, 1) != 200 {
		t.Fatalf("with fds free again: up %s, EMFILE %s, other %s: want 200 up", freed[1], freed[2], freed[3])
	}
}
