//go:build linux

package testkit

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// SlowPath is a path on which a probe's answer arrives after connect() has
// returned, so that probes are answered while their sockets wait in epoll:
// two network namespaces of the test's own, A (the prober) and B (the
// backends), joined by a veth pair. The end in B has a tbf qdisc (this
// kernel has no netem) that the answers fill: B's SYN-ACKs queue there, up
// to its latency, and arrive in A later; those beyond it are dropped. A's
// end is not shaped, so a probe's RST reaches B at once.
//
// B takes every address of Prefix4 (a /24) and Prefix6 (a /64) as its own
// (a local route), so that a few listeners on the wildcard address give
// thousands of distinct addresses to probe. Neighbours are static: no ARP
// or neighbour discovery has to cross the full queue.
type SlowPath struct {
	A, B       string // the namespaces
	DevA, DevB string // the veth ends, in A and in B
}

// The addresses of a SlowPath: inside its namespaces only (198.18.0.0/15 is
// the benchmarking range, fd00::/8 unique local).
const (
	SlowAddrA4  = "198.18.9.1"
	SlowAddrB4  = "198.18.9.2"
	SlowPrefix4 = "198.18.10.0/24"
	SlowAddrA6  = "fd53:6b72::1"
	SlowAddrB6  = "fd53:6b72::2"
	SlowPrefix6 = "fd53:6b72:1::/64"
)

// The veth ends of every SlowPath: each is in a namespace of its own.
const slowDevA, slowDevB = "shk-a", "shk-b"

// Env is what a test passes a child test that it runs in namespace A of p
// (RunTest, TestCommand) for the child to know p and the address family
// to probe (ChildSlowPath): prefix_NS_A, prefix_NS_B and prefix_FAMILY.
func (p *SlowPath) Env(prefix string, family int) []string {
	return []string{prefix + "_NS_A=" + p.A, prefix + "_NS_B=" + p.B, prefix + "_FAMILY=" + strconv.Itoa(family)}
}

// ChildSlowPath is, in a child test, the SlowPath and the address family
// that its parent passed it under prefix (SlowPath.Env).
func ChildSlowPath(prefix string) (*SlowPath, int) {
	family, _ := strconv.Atoi(os.Getenv(prefix + "_FAMILY"))
	return &SlowPath{A: os.Getenv(prefix + "_NS_A"), B: os.Getenv(prefix + "_NS_B"), DevA: slowDevA, DevB: slowDevB}, family
}

// NewSlowPath creates a SlowPath whose tbf in B has the rate and latency
// given (tc's syntax: "2mbit", "700ms"). Its namespaces are deleted at the
// end of the test. It skips the test, saying what is missing, where this
// machine cannot.
func NewSlowPath(t testing.TB, rate, latency string) *SlowPath {
	t.Helper()
	p := &SlowPath{A: Netns(t, false, ""), B: Netns(t, false, ""), DevA: slowDevA, DevB: slowDevB}
	if _, err := exec.LookPath("tc"); err != nil {
		t.Skip("needs tc (Debian package iproute2)")
	}
	err := JoinVeth(VethEnd{NS: p.A, Dev: p.DevA, MAC: "02:5b:00:00:00:0a", Addrs: []string{SlowAddrA4 + "/30", SlowAddrA6 + "/64"}},
		VethEnd{NS: p.B, Dev: p.DevB, MAC: "02:5b:00:00:00:0b", Addrs: []string{SlowAddrB4 + "/30", SlowAddrB6 + "/64"}},
		SlowPrefix4, SlowPrefix6)
	if err != nil {
		t.Skip(err)
	}
	if out, err := exec.Command("ip", "netns", "exec", p.B, "tc", "qdisc", "add", "dev", p.DevB, "root",
		"tbf", "rate", rate, "burst", "1600", "latency", latency).CombinedOutput(); err != nil {
		t.Skipf("tc qdisc add dev %s root tbf: %v: %s", p.DevB, err, out)
	}
	return p
}

// VethEnd is one end of a veth pair that JoinVeth makes: its network
// namespace, its device and MAC address, and its addresses, each with its
// prefix length ("198.18.9.1/30").
type VethEnd struct {
	NS, Dev, MAC string
	Addrs        []string
}

// JoinVeth joins the namespaces of a and b with a veth pair, brings both
// ends up with their addresses and static neighbours (no ARP or neighbour
// discovery has to cross the link), and makes every address of each
// prefix b's own: a local route in b, and a route in a via b's address of
// the prefix's family. Its error names the command that failed and what
// it said.
func JoinVeth(a, b VethEnd, prefixes ...string) error {
	run := func(args ...string) error {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	// ip's flags for the family of s, an address with its prefix length
	family := func(s string) ([]string, error) {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("veth: %w", err)
		}
		if p.Addr().Is6() {
			return []string{"-6"}, nil
		}
		return []string{}, nil
	}
	ip := func(ns string, f []string, args ...string) error {
		return run(append(append([]string{"ip", "-n", ns}, f...), args...)...)
	}
	if err := run("ip", "link", "add", a.Dev, "address", a.MAC, "netns", a.NS, "type", "veth",
		"peer", "name", b.Dev, "address", b.MAC, "netns", b.NS); err != nil {
		return err
	}
	for _, c := range [][2]VethEnd{{a, b}, {b, a}} {
		end, peer := c[0], c[1]
		for _, addr := range end.Addrs {
			f, err := family(addr)
			if err != nil {
				return err
			}
			args := []string{"addr", "add", addr, "dev", end.Dev}
			if len(f) > 0 {
				args = append(args, "nodad")
			}
			if err := ip(end.NS, nil, args...); err != nil {
				return err
			}
		}
		if err := ip(end.NS, nil, "link", "set", end.Dev, "up"); err != nil {
			return err
		}
		for _, addr := range peer.Addrs {
			f, err := family(addr)
			if err != nil {
				return err
			}
			host, _, _ := strings.Cut(addr, "/")
			if err := ip(end.NS, f, "neigh", "replace", host, "lladdr", peer.MAC, "dev", end.Dev, "nud", "permanent"); err != nil {
				return err
			}
		}
	}
	for _, prefix := range prefixes {
		f, err := family(prefix)
		if err != nil {
			return err
		}
		via := ""
		for _, addr := range b.Addrs {
			if g, _ := family(addr); len(g) == len(f) {
				via, _, _ = strings.Cut(addr, "/")
			}
		}
		if via == "" {
			return fmt.Errorf("veth: %s has no address of the family of %s", b.Dev, prefix)
		}
		if err := ip(a.NS, f, "route", "add", prefix, "via", via); err != nil {
			return err
		}
		if err := ip(b.NS, f, "route", "add", "local", prefix, "dev", "lo"); err != nil {
			return err
		}
	}
	return nil
}

// SlowAddrs returns n distinct addresses of B's prefix (4 or 6) on the
// ports given, the ports varying fastest. It panics if they do not fit in
// the prefix (IPv4: 254 addresses on each port): A has no route to the
// rest, and their probes would fail at once (unreachable), not load the
// path.
func SlowAddrs(family, n int, ports []uint16) []netip.AddrPort {
	prefix := netip.MustParsePrefix(SlowPrefix4)
	if family == 6 {
		prefix = netip.MustParsePrefix(SlowPrefix6)
	}
	base := prefix.Addr()
	out := make([]netip.AddrPort, 0, n)
	ip := base.Next() // not the network's own address
	for len(out) < n {
		if !prefix.Contains(ip) {
			panic(fmt.Sprintf("testkit: %d addresses on %d ports do not fit in %v", n, len(ports), prefix))
		}
		for _, port := range ports {
			if len(out) == n {
				break
			}
			out = append(out, netip.AddrPortFrom(ip, port))
		}
		ip = ip.Next()
	}
	return out
}

// InNetns runs fn on a thread moved into network namespace ns: sockets fn
// makes are that namespace's, and /proc/thread-self/net shows its
// counters. The thread is moved back after fn; if it cannot be, it stays
// locked and exits with its goroutine.
func InNetns(tb testing.TB, ns string, fn func()) {
	tb.Helper()
	f, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	own, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		tb.Fatal(err)
	}
	defer own.Close()
	done := make(chan struct{})
	var failed error
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			failed = fmt.Errorf("setns %s: %v", ns, err)
			return
		}
		fn()
		if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err != nil {
			return // still locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
	}()
	<-done
	if failed != nil {
		tb.Fatal(failed)
	}
}

// ListenIn starts a counting listener (see Listen) inside network
// namespace ns, closed at the end of the test. One on a wildcard address
// has Addr set to the loopback address of its family: that reaches it
// from inside ns, and its sentinel connections use it (Go refuses to dial
// [::]).
func ListenIn(tb testing.TB, ns, network, address string) *Listener {
	tb.Helper()
	var l *Listener
	var err error
	InNetns(tb, ns, func() { l, err = Listen(network, address) })
	if err != nil {
		tb.Fatalf("listen %s %s in %s: %v", network, address, ns, err)
	}
	if l.Addr.Addr().IsUnspecified() {
		lo := netip.IPv6Loopback()
		if l.Addr.Addr().Is4() {
			lo = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		l.Addr = netip.AddrPortFrom(lo, l.Addr.Port())
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// NetnsCounters reads TcpExt EmbryonicRsts and Tcp PassiveOpens of network
// namespace ns (see KernelCounters).
func NetnsCounters(tb testing.TB, ns string) (resets, opens int64) {
	tb.Helper()
	var err error
	InNetns(tb, ns, func() {
		resets, err = ProcNetField("/proc/thread-self/net/netstat", "TcpExt:", "EmbryonicRsts")
		if err == nil {
			opens, err = ProcNetField("/proc/thread-self/net/snmp", "Tcp:", "PassiveOpens")
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	return resets, opens
}

// Backlog is the number of packets queued in the root qdisc of dev in
// network namespace ns, from tc -s -j.
func Backlog(tb testing.TB, ns, dev string) int {
	tb.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev, "root").Output()
	if err != nil {
		tb.Fatalf("tc -s qdisc show dev %s: %v", dev, err)
	}
	var qs []struct {
		Kind string `json:"kind"`
		Qlen int    `json:"qlen"`
	}
	if err := json.Unmarshal(out, &qs); err != nil || len(qs) == 0 {
		tb.Fatalf("tc -s -j qdisc show dev %s: %q: %v", dev, out, err)
	}
	return qs[0].Qlen
}

// Settle waits, boundedly (10 s), until nothing more can become a
// connection on p after the prober stopped: B's answer queue has drained,
// then the kernel's delayed-ACK window (about 200 ms; 300 ms here) has
// passed since, then B's EmbryonicRsts and PassiveOpens have been still
// for 100 ms. A socket the prober leaked sends its ACK at the end of that
// window and is accepted: counting accepts earlier would miss it. It
// returns how long it waited.
func (p *SlowPath) Settle(tb testing.TB) time.Duration {
	tb.Helper()
	start := time.Now()
	deadline := start.Add(10 * time.Second)
	for Backlog(tb, p.B, p.DevB) > 0 {
		if time.Now().After(deadline) {
			tb.Fatalf("qdisc of %s never drained", p.DevB)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The kernel's window: a timer, not an event we could wait on.
	time.Sleep(300 * time.Millisecond)
	r0, o0 := NetnsCounters(tb, p.B)
	for {
		time.Sleep(100 * time.Millisecond)
		r, o := NetnsCounters(tb, p.B)
		if r == r0 && o == o0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			tb.Fatalf("counters of %s never still: EmbryonicRsts %d -> %d, PassiveOpens %d -> %d", p.B, r0, r, o0, o)
		}
		r0, o0 = r, o
	}
}

// ProbeAcceptsIn is ProbeAccepts for listeners made in network namespace
// ns (ListenIn): it waits out the kernel's window (Window: the half-made
// connections of another namespace cannot be seen from here, so a path
// with added delay should be drained first, as SlowPath.Settle does), then
// makes their sentinel connections from inside ns.
func (ls Listeners) ProbeAcceptsIn(tb testing.TB, ns string) int64 {
	tb.Helper()
	WaitWindow()
	var err error
	InNetns(tb, ns, func() {
		for _, l := range ls {
			if err = l.Flush(); err != nil {
				return
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	return ls.SoFar()
}

// SoFar is how many connections the listeners have accepted up to now,
// with no flush and no wait: for a message, or after ProbeAcceptsIn's
// flush; never an assertion's count on its own.
func (ls Listeners) SoFar() int64 {
	var n int64
	for _, l := range ls {
		n += l.accepted()
	}
	return n
}

// ShapeA puts a tbf qdisc of the rate and latency given on A's end too,
// so that the prober's own SYNs and RSTs queue there: with both ends
// shaped, the probes fill the link both ways, as on a busy bridge.
func (p *SlowPath) ShapeA(t testing.TB, rate, latency string) {
	t.Helper()
	args := []string{"ip", "netns", "exec", p.A, "tc", "qdisc", "add", "dev", p.DevA, "root",
		"tbf", "rate", rate, "burst", "1600", "latency", latency}
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Skipf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// SlowListeners starts ports counting listeners on the wildcard address of
// family (4 or 6) in namespace ns (ListenIn), and returns them and addrs
// addresses of the SlowPath's prefix that they answer (SlowAddrs), as the
// scenarios on a SlowPath set them up.
func SlowListeners(tb testing.TB, ns string, family, ports, addrs int) (Listeners, []netip.AddrPort) {
	tb.Helper()
	network, wild := "tcp4", "0.0.0.0:0"
	if family == 6 {
		network, wild = "tcp6", "[::]:0"
	}
	var ls Listeners
	var ps []uint16
	for range ports {
		l := ListenIn(tb, ns, network, wild)
		ls = append(ls, l)
		ps = append(ps, l.Addr.Port())
	}
	return ls, SlowAddrs(family, addrs, ps)
}
