//go:build linux && !shaker_fallback

package shaker

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// forModes runs f as subtests "connect" and "raw", the raw one skipped
// where raw sockets cannot be opened.
func forModes(t *testing.T, f func(t *testing.T, m Mode)) {
	t.Helper()
	for _, m := range []Mode{ModeConnect, ModeRaw} {
		t.Run(m.String(), func(t *testing.T) {
			if m == ModeRaw {
				testkit.NeedRaw(t)
			}
			f(t, m)
		})
	}
}

// modeOptions are opts in mode m; in raw mode, with source ports of the
// test's own, that many (testkit.FreePorts), so that a port of the default
// range held by another process cannot fail the test
// (TestRawDefaultPortRange tests the default range).
func modeOptions(t *testing.T, m Mode, opts Options, ports int) Options {
	t.Helper()
	opts.Mode = m
	if m == ModeRaw && ports > 0 {
		first := testkit.FreePorts(t, ports)
		opts.SourcePorts = PortRange{first, first + uint16(ports) - 1}
	}
	return opts
}

// checkMode fails the test unless e runs in mode m, as every accessor
// says.
func checkMode(t *testing.T, e *Engine, m Mode) {
	t.Helper()
	if e.Mode() != m || e.Stats().Mode != m || e.RawError() != nil {
		t.Fatalf("engine in mode %v (Stats says %v, RawError %v), want %v", e.Mode(), e.Stats().Mode, e.RawError(), m)
	}
	if ports := e.SourcePorts(); (m == ModeRaw) != (ports.Size() > 0) {
		t.Fatalf("mode %v with source ports %v", m, ports)
	}
}

// The outcomes on a real path, in both modes: a prober in namespace A of a
// testkit.SlowPath (a veth pair; its tbf is far above what these probes
// send), backends in B. B has listeners on port 9000, nftables rules on
// other ports, forwarding on and reject routes for the prefixes A routes
// through it (so B's kernel sends the ICMP errors); A has reject routes of
// its own (a local failure, no packet sent).
const modeRuleset = `
table inet shaker_mode_test {
	set syn4 { type ipv4_addr . inet_service; flags dynamic, timeout; timeout 5m; }
	set syn6 { type ipv6_addr . inet_service; flags dynamic, timeout; timeout 5m; }
	counter first_syn { }
	chain in {
		type filter hook input priority 0; policy accept;
		tcp dport 9001 drop
		meta nfproto ipv4 tcp dport 9002 reject with icmp type host-unreachable
		meta nfproto ipv6 tcp dport 9002 reject with icmpv6 type addr-unreachable
		meta nfproto ipv4 tcp dport 9003 reject with icmp type net-unreachable
		meta nfproto ipv6 tcp dport 9003 reject with icmpv6 type no-route
		meta nfproto ipv4 tcp dport 9004 reject with icmp type admin-prohibited
		meta nfproto ipv6 tcp dport 9004 reject with icmpv6 type admin-prohibited
		meta nfproto ipv4 tcp dport 9005 reject with icmp type port-unreachable
		meta nfproto ipv6 tcp dport 9005 reject with icmpv6 type port-unreachable
		tcp dport 9006 reject with tcp reset
		# the first SYN of each flow (source address and port) is dropped,
		# its retransmission passes
		tcp dport 9007 tcp flags & (syn | ack) == syn ip saddr . tcp sport != @syn4 update @syn4 { ip saddr . tcp sport } counter name "first_syn" drop
		tcp dport 9007 tcp flags & (syn | ack) == syn ip6 saddr . tcp sport != @syn6 update @syn6 { ip6 saddr . tcp sport } counter name "first_syn" drop
	}
}`

// modeCase is a probe of TestModeOutcomesInNetns and what it must find.
type modeCase struct {
	addr    string
	timeout time.Duration
	outcome Outcome
	errno   syscall.Errno
}

// icmpTimeout is the timeout of the probes answered with an ICMP error.
// On a veth pair the error of the first SYN can come back while connect()
// is still running (the peer's processing runs inline), and the kernel,
// the socket being locked, keeps it as a soft error that ends nothing
// (TcpExtLockDroppedIcmps): connect mode then sees only the error of the
// SYN retransmitted at 1 s (seen here for every IPv6 one). Raw mode sees
// the first.
const icmpTimeout = 2500 * time.Millisecond

var modeCases = []modeCase{
	{"198.18.10.1:9000", time.Second, Up, 0},
	{"[fd53:6b72:1::1]:9000", time.Second, Up, 0},
	{"198.18.10.1:9008", time.Second, Refused, 0}, // nothing listens: B's kernel resets
	{"[fd53:6b72:1::1]:9008", time.Second, Refused, 0},
	{"198.18.10.1:9006", time.Second, Refused, 0}, // nft's reset
	{"[fd53:6b72:1::1]:9006", time.Second, Refused, 0},
	{"198.18.10.1:9001", 300 * time.Millisecond, Timeout, 0}, // dropped
	{"[fd53:6b72:1::1]:9001", 300 * time.Millisecond, Timeout, 0},
	// ICMP errors made by nft's reject in B
	{"198.18.10.1:9002", icmpTimeout, Unreachable, syscall.EHOSTUNREACH},
	{"[fd53:6b72:1::1]:9002", icmpTimeout, Unreachable, syscall.EHOSTUNREACH},
	{"198.18.10.1:9003", icmpTimeout, Unreachable, syscall.ENETUNREACH},
	{"[fd53:6b72:1::1]:9003", icmpTimeout, Unreachable, syscall.ENETUNREACH},
	{"198.18.10.1:9004", icmpTimeout, Unreachable, syscall.EHOSTUNREACH}, // code 13, filtered
	{"[fd53:6b72:1::1]:9004", icmpTimeout, Failed, syscall.EACCES},
	{"198.18.10.1:9005", icmpTimeout, Refused, 0}, // port unreachable: as connect() reads it
	{"[fd53:6b72:1::1]:9005", icmpTimeout, Refused, 0},
	// ICMP errors from B's routes: it forwards for A
	{"198.18.11.1:80", icmpTimeout, Unreachable, syscall.EHOSTUNREACH},
	{"[fd53:6b72:2::1]:80", icmpTimeout, Unreachable, syscall.ENETUNREACH},
	{"198.18.12.1:80", icmpTimeout, Unreachable, syscall.EHOSTUNREACH},
	{"[fd53:6b72:3::1]:80", icmpTimeout, Failed, syscall.EACCES},
	// A's own routes: no packet leaves
	{"198.18.13.1:80", time.Second, Unreachable, syscall.EHOSTUNREACH},
	{"[fd53:6b72:4::1]:80", time.Second, Unreachable, syscall.EHOSTUNREACH},
	{"198.18.14.1:80", time.Second, Failed, syscall.EACCES},
	{"[fd53:6b72:5::1]:80", time.Second, Failed, syscall.EACCES},
	// the first SYN dropped: answered after the retransmission at 1 s
	{"198.18.10.1:9007", 2500 * time.Millisecond, Up, 0},
	{"[fd53:6b72:1::1]:9007", 2500 * time.Millisecond, Up, 0},
}

// modeHelperEnv is set, to the mode, in the child of
// TestModeOutcomesInNetns.
const modeHelperEnv = "SHAKER_MODE_HELPER"

// TestModeOutcomesInNetns: every outcome over a veth pair, IPv4 and IPv6,
// with real ICMP and ICMPv6 errors (from nftables' reject and from the
// peer's routes) and local route failures, is the same in both modes, and
// what connect() makes of it; the first SYN dropped, a probe is answered
// after the retransmission, with its RTT that of the retransmitted SYN in
// raw mode; nothing is accepted.
func TestModeOutcomesInNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("namespaces and 2.5 s probes")
	}
	p := testkit.NewSlowPath(t, "100mbit", "100ms")
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Skipf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "exec", p.B, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
		// no rate limit on B's errors; not icmp_ratelimit=0 for IPv4:
		// that zeroes the tokens of the peer that ip_error's own limit
		// (a forwarded packet's) spends too
		"net.ipv4.icmp_ratemask=0", "net.ipv6.icmp.ratelimit=0")
	for _, r := range []struct{ ns, prefix, via, kind string }{
		{p.A, "198.18.11.0/24", testkit.SlowAddrB4, ""},
		{p.A, "198.18.12.0/24", testkit.SlowAddrB4, ""},
		{p.A, "fd53:6b72:2::/64", testkit.SlowAddrB6, ""},
		{p.A, "fd53:6b72:3::/64", testkit.SlowAddrB6, ""},
		{p.B, "198.18.11.0/24", "", "unreachable"},
		{p.B, "198.18.12.0/24", "", "prohibit"},
		{p.B, "fd53:6b72:2::/64", "", "unreachable"},
		{p.B, "fd53:6b72:3::/64", "", "prohibit"},
		{p.A, "198.18.13.0/24", "", "unreachable"},
		{p.A, "198.18.14.0/24", "", "prohibit"},
		{p.A, "fd53:6b72:4::/64", "", "unreachable"},
		{p.A, "fd53:6b72:5::/64", "", "prohibit"},
	} {
		if r.via != "" {
			run("ip", "-n", r.ns, "route", "add", r.prefix, "via", r.via)
		} else {
			run("ip", "-n", r.ns, "route", "add", r.kind, r.prefix)
		}
	}
	cmd := exec.Command("ip", "netns", "exec", p.B, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(modeRuleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("nftables in %s: %v: %s", p.B, err, out)
	}
	ls := testkit.Listeners{
		testkit.ListenIn(t, p.B, "tcp4", "0.0.0.0:9000"),
		testkit.ListenIn(t, p.B, "tcp6", "[::]:9000"),
		testkit.ListenIn(t, p.B, "tcp4", "0.0.0.0:9007"),
		testkit.ListenIn(t, p.B, "tcp6", "[::]:9007"),
	}
	retrans := 0
	for _, c := range modeCases {
		if strings.HasSuffix(c.addr, ":9007") {
			retrans++
		}
	}
	dropped := 0
	forModes(t, func(t *testing.T, m Mode) {
		out := testkit.RunTest(t, p.A, "TestModeHelper", modeHelperEnv+"="+m.String())
		res := testkit.ResultsByName(out)
		if f := res["mode"]; len(f) != 1 || f[0] != m.String() {
			t.Fatalf("child ran in mode %v, want %v:\n%s", f, m, out)
		}
		for _, c := range modeCases {
			f := res[c.addr]
			if len(f) != 4 {
				t.Errorf("%s: no result:\n%s", c.addr, out)
				continue
			}
			errno, _ := strconv.Atoi(f[1])
			d, _ := time.ParseDuration(f[2])
			rtt, _ := time.ParseDuration(f[3])
			if f[0] != c.outcome.String() || syscall.Errno(errno) != c.errno {
				t.Errorf("%s: %s, errno %d (%v); want %v, errno %d (%v)", c.addr, f[0], errno, syscall.Errno(errno), c.outcome, c.errno, c.errno)
			}
			if c.outcome == Up && (rtt <= 0 || rtt > d) {
				t.Errorf("%s: up with RTT %v in %v: want 0 < RTT <= Duration", c.addr, rtt, d)
			}
			if strings.HasSuffix(c.addr, ":9007") && c.outcome == Up {
				// answered after the engine's (or the kernel's) first
				// retransmission: the first SYN was dropped
				if d < time.Duration(synRTO) {
					t.Errorf("%s: answered after %v, before the first retransmission at %v", c.addr, d, time.Duration(synRTO))
				}
				if m == ModeRaw && rtt > d/2 {
					t.Errorf("%s: RTT %v of %v: want the retransmitted SYN's round trip, not the first SYN's", c.addr, rtt, d)
				}
			}
		}
		t.Logf("%v:\n%s", m, out)
		dropped += retrans
		if n := nftPackets(t, p.B, "first_syn"); n != dropped {
			t.Errorf("nft dropped %d first SYNs so far, want %d: one per probe of port 9007", n, dropped)
		}
	})
	if n := ls.ProbeAcceptsIn(t, p.B); n != 0 {
		t.Fatalf("listeners in %s accepted %d probe connections", p.B, n)
	}
}

// nftPackets is the packet count of the named counter of the table of
// modeRuleset, in namespace ns.
func nftPackets(t *testing.T, ns, name string) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "counter", "inet", "shaker_mode_test", name).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list counter %s: %v: %s", name, err, out)
	}
	f := strings.Fields(string(out))
	for i := range f {
		if f[i] == "packets" && i+1 < len(f) {
			n, err := strconv.Atoi(f[i+1])
			if err != nil {
				break
			}
			return n
		}
	}
	t.Fatalf("nft list counter %s: %q", name, out)
	return 0
}

// TestModeHelper is the child of TestModeOutcomesInNetns, in namespace A:
// it probes every address of modeCases at once, in the mode
// $SHAKER_MODE_HELPER names, and prints a line per result:
// RESULT addr outcome errno duration rtt.
func TestModeHelper(t *testing.T) {
	name := os.Getenv(modeHelperEnv)
	if name == "" {
		t.Skip("only runs as a child of TestModeOutcomesInNetns")
	}
	m, err := ParseMode(name)
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(Options{Mode: m})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	fmt.Printf("RESULT mode %v\n", e.Mode())
	results := make([]Result, len(modeCases))
	var wg sync.WaitGroup
	wg.Add(len(modeCases))
	for i, c := range modeCases {
		e.ProbeAsync(netip.MustParseAddrPort(c.addr), c.timeout, func(r Result) { results[i] = r; wg.Done() })
	}
	wg.Wait() // bounded: every probe has its timeout
	for i, c := range modeCases {
		r := results[i]
		var errno syscall.Errno
		errors.As(r.Err, &errno)
		fmt.Printf("RESULT %s %v %d %v %v\n", c.addr, r.Outcome, int(errno), r.Duration, r.RTT)
	}
}

// wildcardListen listens on [::]:port (IPv4 too) and closes at once.
func wildcardListen(port uint16) error {
	ln, err := net.Listen("tcp", net.JoinHostPort("::", strconv.Itoa(int(port))))
	if err != nil {
		return err
	}
	return ln.Close()
}

// TestModeEveryNoAlloc: in both modes, in steady state the scheduled path
// (the timer heap, the probe, its answer, the callback and the re-arm)
// allocates nothing per probe: 64 schedules every 5 ms, 22,000 results
// counted, with the memory profile telling the engine's allocations from
// the runtime's and the test's (as TestProbeAsyncNoAlloc does). Unlike
// chains of ProbeAsync, schedules do not keep the number of probes in
// flight, or of results in a turn, at the warm-up's: a late turn (the
// machine is shared) finds more of them due than ever before, and a
// buffer of the engine (results, slots, the heap) grows to hold them.
// That growth is bounded by the number of schedules, so it is allowed up
// to maxGrowth allocations; any other allocation of the engine fails.
func TestModeEveryNoAlloc(t *testing.T) {
	// maxGrowth: a few buffers a loop, each doubling up to the 64
	// schedules' size, about 7 times.
	const maxGrowth = 64
	// maxOther: the runtime's and the test's own, at most.
	const maxOther = 32
	if raceEnabled {
		t.Skip("the race detector allocates on its own; CI runs this test without -race")
	}
	forModes(t, func(t *testing.T, m Mode) {
		ls := make([]*testkit.Listener, 16)
		for i := range ls {
			ls[i] = testkit.NewListener(t, "tcp4", "0.0.0.0:0")
		}
		e := newEngine(t, modeOptions(t, m, Options{}, 64))
		var n, target, fails atomic.Int64
		target.Store(-1)
		hit := make(chan struct{}, 1)
		fn := func(r Result) time.Duration {
			if r.Err != nil {
				fails.Add(1)
			}
			if n.Add(1) == target.Load() {
				select {
				case hit <- struct{}{}:
				default:
				}
			}
			return 0
		}
		const schedules, interval = 64, 5 * time.Millisecond
		for i := 0; i < schedules; i++ {
			ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(1 + i/len(ls))}), ls[i%len(ls)].Addr.Port())
			s := e.Every(ap, Period{Interval: interval, Timeout: 5 * time.Second, First: time.Duration(i) * interval / schedules}, fn)
			t.Cleanup(s.Stop)
		}
		timer := time.NewTimer(time.Hour)
		timer.Stop()
		timedOut := false
		// await waits for k more results, 30 s at most, allocating nothing.
		await := func(k int64) {
			target.Store(n.Load() + k)
			timer.Reset(30 * time.Second)
			select {
			case <-hit:
				timer.Stop()
			case <-timer.C:
				timedOut = true
			}
		}
		await(5000) // warm up: slots, heaps, buffers at full size
		if timedOut || fails.Load() != 0 {
			t.Fatalf("warm-up: %d results, %d failed; timed out %v", n.Load(), fails.Load(), timedOut)
		}
		defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
		runtime.MemProfileRate = 1
		runtime.GC()
		before := allocsByStack()
		const runs, probes = 10, 2000
		perRun := testing.AllocsPerRun(runs, func() { await(probes) })
		runtime.GC()
		after := allocsByStack()
		if timedOut || fails.Load() != 0 {
			t.Fatalf("%d results, %d failed; timed out %v", n.Load(), fails.Load(), timedOut)
		}
		var engine, growth, other int64
		for stack, k := range after {
			k -= before[stack]
			switch {
			case k == 0 || strings.Contains(stack, "shaker.allocsByStack\n"):
			case engineFrame(stack) && strings.Contains(stack, "runtime.growslice\n"):
				growth += k
				t.Logf("%d allocations growing a buffer of the engine, at:\n%s", k, stack)
			case engineFrame(stack):
				engine += k
				t.Errorf("%d allocations on the scheduled path (%d probes), at:\n%s", k, (runs+1)*probes, stack)
			default:
				other += k
				t.Logf("%d allocations not the engine's, at:\n%s", k, stack)
			}
		}
		t.Logf("%d results: %v allocations per run of %d (AllocsPerRun); %d by the engine, %d growing its buffers, %d by the runtime and the test",
			(runs+1)*probes, perRun, probes, engine, growth, other)
		// AllocsPerRun counts every allocation of the process over the
		// runs, a buffer's bounded growth (allowed, below) among them, so
		// it is only logged; the profile told them apart above. The
		// allocations that are not the engine's by their stack (the
		// runtime's, the test's) may be a few, not a number that grows
		// with the probes: the runtime allocating on the engine's behalf
		// would show there.
		if other > maxOther {
			t.Errorf("%d allocations in %d probes outside the engine's frames, more than %d", other, (runs+1)*probes, maxOther)
		}
		if growth > maxGrowth {
			t.Errorf("%d allocations growing the engine's buffers in %d probes, more than %d: not a bounded growth", growth, (runs+1)*probes, maxGrowth)
		}
	})
}
