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

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// needRaw skips the test unless this process may open raw sockets (root
// or CAP_NET_RAW).
func needRaw(t testing.TB) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		t.Skipf("raw mode needs raw sockets (root or CAP_NET_RAW): %v", err)
	}
	unix.Close(fd)
}

// forModes runs f as subtests "connect" and "raw", the raw one skipped
// where raw sockets cannot be opened.
func forModes(t *testing.T, f func(t *testing.T, m Mode)) {
	t.Helper()
	for _, m := range []Mode{ModeConnect, ModeRaw} {
		t.Run(m.String(), func(t *testing.T) {
			if m == ModeRaw {
				needRaw(t)
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

// TestModeOutcomesLoopback: up, refused and timeout (a full accept queue),
// IPv4 and IPv6, in both modes: the same outcomes, the RTT of an up probe
// only, Stats counting each, nothing accepted. In raw mode no socket is
// counted and no close delay measured: there is nothing to close.
func TestModeOutcomesLoopback(t *testing.T) {
	forModes(t, func(t *testing.T, m Mode) {
		for _, lb := range loopbacks {
			t.Run(lb.name, func(t *testing.T) {
				l := testkit.NewListener(t, lb.network, "["+lb.ip+"]:0")
				closed := testkit.BoundNotListening(t, lb.ip)
				full := testkit.FullQueueListener(t, lb.ip)
				e := newEngine(t, modeOptions(t, m, Options{}, 64))
				checkMode(t, e, m)
				const probes = 20
				for i := 0; i < probes; i++ {
					r := e.Probe(probeCtx(t, 5*time.Second), l.Addr)
					if r.Err != nil || r.Outcome != Up || r.Addr != l.Addr {
						t.Fatalf("probe %d of listener %v: %+v, want up", i, l.Addr, r)
					}
					if r.RTT <= 0 || r.Duration <= 0 || r.RTT > r.Duration {
						t.Fatalf("probe %d: RTT %v, Duration %v: want 0 < RTT <= Duration", i, r.RTT, r.Duration)
					}
				}
				r := e.Probe(probeCtx(t, 5*time.Second), closed)
				if !errors.Is(r.Err, ErrRefused) || r.Outcome != Refused || r.RTT != 0 {
					t.Fatalf("probe of bound, not listening %v: %+v, want refused, no RTT", closed, r)
				}
				const timeout = 200 * time.Millisecond
				done := make(chan Result, 1)
				e.ProbeAsync(full, timeout, func(r Result) { done <- r })
				if r := <-done; !errors.Is(r.Err, ErrTimeout) || r.Outcome != Timeout || r.Duration < timeout {
					t.Fatalf("probe of full accept queue %v: %+v, want a timeout after %v", full, r, timeout)
				}
				s := e.Stats()
				if s.Up != probes || s.Refused != 1 || s.Timeout != 1 || s.Total() != probes+2 || s.InFlight != 0 {
					t.Fatalf("stats %+v: want %d up, 1 refused, 1 timeout, none in flight", s, probes)
				}
				if m == ModeRaw && (s.Sockets != 0 || s.MaxCloseDelay != 0 || s.CloseDelay.Count() != 0 || s.EpollUp != probes || s.MaxSockets != DefaultRawInFlight) {
					t.Fatalf("raw stats %+v: want no sockets, no close delays, every SYN-ACK read from the raw socket (%d), %d in flight at most", s, probes, DefaultRawInFlight)
				}
				if m == ModeConnect && s.MaxSockets != DefaultMaxSockets() {
					t.Fatalf("stats %+v: want MaxSockets %d", s, DefaultMaxSockets())
				}
				if n := l.ProbeAccepts(t); n != 0 {
					t.Fatalf("listener accepted %d probe connections", n)
				}
			})
		}
	})
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

// TestModeEvery: in both modes, schedules on many addresses and two loops
// probe again and again, every result up and for its own address; Stop
// ends a schedule while the others go on; a schedule of a closed port is
// refused; nothing is accepted.
func TestModeEvery(t *testing.T) {
	forModes(t, func(t *testing.T, m Mode) {
		ls := make(testkit.Listeners, 4)
		for i := range ls {
			ls[i] = testkit.NewListener(t, "tcp4", "0.0.0.0:0") // answers every 127.x.y.z
		}
		closed := testkit.BoundNotListening(t, "127.0.0.1")
		e := newEngine(t, modeOptions(t, m, Options{Loops: 2}, 64))
		checkMode(t, e, m)
		const n = 32
		cs := make([]*everyCounter, n)
		ss := make([]*Schedule, n)
		for i := range cs {
			cs[i] = newEveryCounter()
			ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(1 + i%4)}), ls[i%len(ls)].Addr.Port())
			ss[i] = e.Every(ap, Period{Interval: 10 * time.Millisecond, Timeout: time.Second, First: time.Duration(i) * time.Millisecond / 4}, cs[i].fn(0))
		}
		refused := newEveryCounter()
		rs := e.Every(closed, Period{Interval: 10 * time.Millisecond, Timeout: time.Second}, refused.fn(0))
		if s := e.Stats(); s.Scheduled != n+1 {
			t.Fatalf("stats %+v: want %d scheduled", s, n+1)
		}
		for _, c := range cs {
			c.wait(t, 5, 10*time.Second)
		}
		refused.wait(t, 3, 10*time.Second)
		rs.Stop()
		for i, c := range cs {
			c.mu.Lock()
			if c.up != c.n || c.last.Addr != ss[i].Addr() || c.last.RTT <= 0 {
				t.Errorf("schedule %d: %d of %d up, last result %+v for %v", i, c.up, c.n, c.last, ss[i].Addr())
			}
			c.mu.Unlock()
		}
		refused.mu.Lock()
		if refused.up != 0 || refused.last.Outcome != Refused {
			t.Errorf("schedule of a closed port: %d up, last result %+v; want refused", refused.up, refused.last)
		}
		refused.mu.Unlock()
		for i := 0; i < n; i += 2 {
			ss[i].Stop()
		}
		stopped := make([]int64, n)
		for i := 0; i < n; i += 2 {
			stopped[i] = cs[i].calls.Load()
		}
		for i := 1; i < n; i += 2 {
			cs[i].wait(t, cs[i].count()+5, 10*time.Second)
		}
		for i := 0; i < n; i += 2 {
			if got := cs[i].calls.Load(); got > stopped[i]+1 {
				t.Errorf("schedule %d: %d calls after Stop", i, got-stopped[i])
			}
		}
		if accepted := ls.ProbeAccepts(t); accepted != 0 {
			t.Fatalf("listeners accepted %d probe connections", accepted)
		}
		if st := e.Stats(); st.StartDelay.Count() == 0 || st.Up < 5*n || m == ModeRaw && (st.Sockets != 0 || st.MaxCloseDelay != 0) {
			t.Fatalf("stats %+v: want start delays, at least %d up, and in raw mode no socket nor close delay", st, 5*n)
		}
	})
}

// TestModeCloseWithProbesInFlight: in both modes, IPv4 and IPv6, Close
// aborts probes in flight (SYNs dropped by a full accept queue) and
// queued while others are being answered; every done runs once, the held
// ones with ErrClosed; nothing is in flight after; calls after Close get
// ErrClosed; the engine's file descriptors and goroutines are all gone,
// and in raw mode its source ports are free again; nothing is accepted.
func TestModeCloseWithProbesInFlight(t *testing.T) {
	forModes(t, func(t *testing.T, m Mode) {
		for _, lb := range loopbacks {
			t.Run(lb.name, func(t *testing.T) {
				ls := make(testkit.Listeners, 4)
				for i := range ls {
					ls[i] = testkit.NewListener(t, lb.network, "["+lb.ip+"]:0")
				}
				blackhole := testkit.FullQueueListener(t, lb.ip)
				opts := modeOptions(t, m, Options{MaxSockets: 1024}, 64)
				runtime.GC()
				fds0, gs0 := testkit.CountFDs(t), runtime.NumGoroutine()
				e, err := New(opts)
				if err != nil {
					t.Fatal(err)
				}
				checkMode(t, e, m)
				if m == ModeRaw {
					if n := testkit.CountFDs(t); n < fds0+opts.SourcePorts.Size() {
						t.Fatalf("%d fds open in raw mode, want at least %d more than %d: one per reserved port", n, opts.SourcePorts.Size(), fds0)
					}
					if err := wildcardListen(opts.SourcePorts.First); err == nil {
						t.Fatalf("listened on reserved source port %d while the engine runs", opts.SourcePorts.First)
					}
				}
				const held, answered, closeAfter = 500, 3000, 1000
				calls := make([]atomic.Int32, held+answered)
				var closedN, upN atomic.Int64
				closeNow := make(chan struct{})
				cb := func(i int) func(Result) {
					return func(r Result) {
						calls[i].Add(1)
						switch {
						case errors.Is(r.Err, ErrClosed):
							closedN.Add(1)
						case r.Err == nil:
							if upN.Add(1) == closeAfter {
								close(closeNow)
							}
						}
					}
				}
				for i := 0; i < held; i++ {
					e.ProbeAsync(blackhole, time.Minute, cb(answered+i))
				}
				for i := 0; i < answered; i++ {
					e.ProbeAsync(ls[i%len(ls)].Addr, time.Minute, cb(i))
				}
				select {
				case <-closeNow:
				case <-time.After(30 * time.Second):
					t.Fatalf("%d of %d probes up after 30 s, want %d before Close: %+v", upN.Load(), answered, closeAfter, e.Stats())
				}
				closed := make(chan struct{})
				go func() { e.Close(); close(closed) }()
				select {
				case <-closed:
				case <-time.After(30 * time.Second):
					t.Fatalf("Close did not return after 30 s: %+v", e.Stats())
				}
				for i := range calls {
					if n := calls[i].Load(); n != 1 {
						t.Fatalf("done of probe %d called %d times", i, n)
					}
				}
				if closedN.Load() < held {
					t.Fatalf("%d ErrClosed, want at least the %d held probes", closedN.Load(), held)
				}
				if s := e.Stats(); s.InFlight != 0 || s.Queued != 0 || s.Total() != held+answered {
					t.Fatalf("after Close: %+v; want none in flight or queued, %d results", s, held+answered)
				}
				var after Result
				e.ProbeAsync(ls[0].Addr, time.Second, func(r Result) { after = r })
				if !errors.Is(after.Err, ErrClosed) {
					t.Fatalf("ProbeAsync after Close: %v", after.Err)
				}
				if r := e.Probe(t.Context(), ls[0].Addr); !errors.Is(r.Err, ErrClosed) {
					t.Fatalf("Probe after Close: %v", r.Err)
				}
				if n := testkit.CountFDs(t); n != fds0 {
					t.Fatalf("%d fds open after Close, want %d", n, fds0)
				}
				if n := testkit.WaitGoroutines(gs0); n > gs0 {
					t.Fatalf("%d goroutines after Close, want %d", n, gs0)
				}
				if m == ModeRaw {
					for p := opts.SourcePorts.First; p <= opts.SourcePorts.Last; p++ {
						if err := wildcardListen(p); err != nil {
							t.Fatalf("source port %d still held after Close: %v", p, err)
						}
					}
				}
				if accepted := ls.ProbeAccepts(t); accepted != 0 {
					t.Fatalf("listeners accepted %d connections", accepted)
				}
			})
		}
	})
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
		if perRun != 0 {
			t.Errorf("AllocsPerRun: %v allocations per run of %d probes, want 0", perRun, probes)
		}
		if growth > maxGrowth {
			t.Errorf("%d allocations growing the engine's buffers in %d probes, more than %d: not a bounded growth", growth, (runs+1)*probes, maxGrowth)
		}
	})
}

// TestModeAddressForms: in both modes an IPv6 address with a zone (the
// interface, looked up by the caller) and an IPv4-mapped IPv6 address are
// probed, and answered, as the plain address is; a zone that names no
// interface fails that probe only.
func TestModeAddressForms(t *testing.T) {
	forModes(t, func(t *testing.T, m Mode) {
		l6 := testkit.NewListener(t, "tcp6", "[::1]:0")
		l4 := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
		closed6 := testkit.BoundNotListening(t, "::1")
		e := newEngine(t, modeOptions(t, m, Options{}, 64))
		for _, c := range []struct {
			addr netip.AddrPort
			want Outcome
		}{
			{netip.AddrPortFrom(l6.Addr.Addr().WithZone("lo"), l6.Addr.Port()), Up},
			{netip.AddrPortFrom(closed6.Addr().WithZone("lo"), closed6.Port()), Refused},
			{netip.AddrPortFrom(netip.AddrFrom16(l4.Addr.Addr().As16()), l4.Addr.Port()), Up},
		} {
			if r := e.Probe(probeCtx(t, 3*time.Second), c.addr); r.Outcome != c.want || r.Addr != c.addr {
				t.Errorf("probe of %v: %+v, want %v", c.addr, r, c.want)
			}
		}
		bad := netip.AddrPortFrom(l6.Addr.Addr().WithZone("nosuchif0"), l6.Addr.Port())
		if r := e.Probe(probeCtx(t, 3*time.Second), bad); r.Err == nil || !strings.Contains(r.Err.Error(), "nosuchif0") {
			t.Errorf("probe of %v: %+v, want an error naming the zone", bad, r)
		}
		if n := (testkit.Listeners{l4, l6}).ProbeAccepts(t); n != 0 {
			t.Fatalf("listeners accepted %d probe connections", n)
		}
	})
}

// TestModeStealth: in both modes, IPv4 and IPv6, 10,000 probes of 16 real
// listeners from 64 chains are all up, and none is accepted.
func TestModeStealth(t *testing.T) {
	const probes = 10000
	forModes(t, func(t *testing.T, m Mode) {
		for _, lb := range loopbacks {
			t.Run(lb.name, func(t *testing.T) {
				ls := make([]*testkit.Listener, 16)
				for i := range ls {
					ls[i] = testkit.NewListener(t, lb.network, "["+lb.ip+"]:0")
				}
				e := newEngine(t, modeOptions(t, m, Options{}, 64))
				if failed := chains(t, e, ls, 64, probes); failed != 0 {
					t.Fatalf("%d of %d probes failed: %+v", failed, probes, e.Stats())
				}
				if s := e.Stats(); s.Up != probes || s.Total() != probes {
					t.Fatalf("stats %+v: want %d up", s, probes)
				}
				if n := testkit.Listeners(ls).ProbeAccepts(t); n != 0 {
					t.Fatalf("listeners accepted %d of %d probes", n, probes)
				}
			})
		}
	})
}

// TestModeQueueBeyondCap: in both modes, probes beyond MaxSockets (in raw
// mode, the bound on probes in flight) wait, they do not fail: six probes
// that time out, staggered, and a hundred answered, never more than two
// in flight as each callback sees it.
func TestModeQueueBeyondCap(t *testing.T) {
	forModes(t, func(t *testing.T, m Mode) {
		l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
		slow := testkit.FullQueueListener(t, "127.0.0.1")
		e := newEngine(t, modeOptions(t, m, Options{Loops: 1, MaxSockets: 2, epollOnly: true}, 8))
		var wg sync.WaitGroup
		var up, timedOut, maxInFlight atomic.Int64
		watch := func() { // on the loop, between turns
			if n := int64(e.Stats().InFlight); n > maxInFlight.Load() {
				maxInFlight.Store(n)
			}
		}
		const slowN, fastN = 6, 100
		wg.Add(slowN + fastN)
		for i := 0; i < slowN; i++ {
			e.ProbeAsync(slow, time.Duration(i+1)*40*time.Millisecond, func(r Result) {
				watch()
				if r.Outcome == Timeout {
					timedOut.Add(1)
				}
				wg.Done()
			})
		}
		for i := 0; i < fastN; i++ {
			e.ProbeAsync(l.Addr, 5*time.Second, func(r Result) {
				watch()
				if r.Outcome == Up {
					up.Add(1)
				}
				wg.Done()
			})
		}
		wg.Wait() // bounded: every probe has its timeout
		if n := maxInFlight.Load(); n > 2 {
			t.Fatalf("%d in flight, the bound is 2", n)
		}
		if up.Load() != fastN || timedOut.Load() != slowN {
			t.Fatalf("%d up, %d timed out; want %d and %d", up.Load(), timedOut.Load(), fastN, slowN)
		}
		if n := l.ProbeAccepts(t); n != 0 {
			t.Fatalf("listener accepted %d probe connections", n)
		}
	})
}
