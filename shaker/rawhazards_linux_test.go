//go:build linux && !shaker_fallback

package shaker

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The hazards of raw mode (issue 17; docs/raw-hazards.md): what sits
// between a raw SYN and its answer and could make raw mode see wrong
// outcomes, or let a probe become a connection. Each test builds network
// namespaces of its own, probes from a child process (the test binary run
// again in the prober's namespace, so that connect mode's sockets are that
// namespace's too) in raw mode and in connect mode, and checks in both:
// every probe has the outcome its address should give, the backend's
// listeners accepted nothing, and each answered probe's half-made
// connection was reset (the backend's kernel counted an embryonic reset)
// rather than left to time out.

const (
	hazardEnv     = "SHAKER_HAZARD_HELPER" // the child's probe mode
	hazardLoops   = "SHAKER_HAZARD_LOOPS"  // the child's Options.Loops, if set
	hazardReps    = 100                    // probes of each address, all at once
	hazardTimeout = 2 * time.Second
	// hazardTimeoutEnv, if set, is the child's probe timeout instead
	hazardTimeoutEnv = "SHAKER_HAZARD_TIMEOUT"

	// a pair of namespaces: P (the prober) and B (the backend)
	hazardP4, hazardB4 = "198.18.42.1", "198.18.42.2"
	hazardP6, hazardB6 = "fd53:6b72:42::1", "fd53:6b72:42::2"

	// the port a listener answers on in B, and one nothing listens on
	hazardUp, hazardRefused = 80, 81
)

// hazardModes are the probe modes each hazard runs in: raw, the one under
// test, and connect, to compare.
var hazardModes = []Mode{ModeRaw, ModeConnect}

// hazardRun runs a command that sets the namespaces up; it skips the test,
// saying why, where this machine cannot.
func hazardRun(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Skipf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// hazardLink joins namespaces x and y by a veth pair, devX in x and devY
// in y, and gives each end its addresses (CIDR; IPv6 ones without DAD).
// Neighbours are static: a fresh veth link loses the first neighbour
// solicitation, and IPv6 probes would wait a second for the next one.
func hazardLink(t *testing.T, x, devX string, addrsX []string, y, devY string, addrsY []string) {
	t.Helper()
	const macX, macY = "02:5b:00:00:01:0a", "02:5b:00:00:01:0b" // one link per pair of namespaces
	hazardRun(t, "ip", "link", "add", devX, "address", macX, "netns", x, "type", "veth",
		"peer", "name", devY, "address", macY, "netns", y)
	for _, end := range []struct {
		ns, dev, peerMAC string
		addrs, peer      []string
	}{{x, devX, macY, addrsX, addrsY}, {y, devY, macX, addrsY, addrsX}} {
		for _, a := range end.addrs {
			args := []string{"ip", "-n", end.ns, "addr", "add", a, "dev", end.dev}
			if strings.Contains(a, ":") {
				args = append(args, "nodad")
			}
			hazardRun(t, args...)
		}
		hazardRun(t, "ip", "-n", end.ns, "link", "set", end.dev, "up")
		for _, a := range end.peer {
			ip, _, _ := strings.Cut(a, "/")
			hazardRun(t, "ip", "-n", end.ns, "neigh", "replace", ip, "lladdr", end.peerMAC, "dev", end.dev, "nud", "permanent")
		}
	}
}

// hazardPair creates P and B (each with nftables ruleset loaded, if
// any) joined by a veth pair, p0 in P and b0 in B, with the hazardP and
// hazardB addresses.
func hazardPair(t *testing.T, rulesP, rulesB string) (p, b string) {
	t.Helper()
	p = testkit.Netns(t, rulesP != "", rulesP)
	b = testkit.Netns(t, rulesB != "", rulesB)
	hazardLink(t, p, "p0", []string{hazardP4 + "/24", hazardP6 + "/64"}, b, "b0", []string{hazardB4 + "/24", hazardB6 + "/64"})
	return p, b
}

// hazardBackend is hazardPair for family (4 or 6), with a listener in B
// on its hazardB address, and the cases upAndRefused of that address.
func hazardBackend(t *testing.T, family int, rulesP, rulesB string) (p, b string, ls testkit.Listeners, cases []hazardCase) {
	t.Helper()
	p, b = hazardPair(t, rulesP, rulesB)
	ip := hazardB4
	if family == 6 {
		ip = hazardB6
	}
	return p, b, hazardListener(t, b, ip), upAndRefused(ip)
}

// hazardListener starts a counting listener on address (an IP of ns)
// port hazardUp in namespace ns.
func hazardListener(t *testing.T, ns, address string) testkit.Listeners {
	t.Helper()
	ip := netip.MustParseAddr(address)
	network := "tcp4"
	if ip.Is6() {
		network = "tcp6"
	}
	return testkit.Listeners{testkit.ListenIn(t, ns, network, netip.AddrPortFrom(ip, hazardUp).String())}
}

// hazardCase is an address to probe and the outcome every probe of it
// must have.
type hazardCase struct {
	addr netip.AddrPort
	want Outcome
}

// upAndRefused are the cases of a backend at ip: its listener's port up,
// the other refused.
func upAndRefused(ip string) []hazardCase {
	a := netip.MustParseAddr(ip)
	return []hazardCase{{netip.AddrPortFrom(a, hazardUp), Up}, {netip.AddrPortFrom(a, hazardRefused), Refused}}
}

// hazardResult is what one child prober did, and what the backend saw.
type hazardResult struct {
	up       int   // probes up
	resets   int64 // the backend's EmbryonicRsts meanwhile
	cookies  int64 // the backend's SyncookiesSent meanwhile
	answers  int64 // segments the backend sent meanwhile: a SYN-ACK or an RST for each SYN it got
	accepted int64 // connections the listeners accepted
}

// hazardProbe runs a child prober in namespace prober, in mode, probing
// each case's address hazardReps times, and checks that every probe had
// its case's outcome and that the listeners ls, in namespace backend,
// accepted nothing.
func hazardProbe(t *testing.T, prober, backend string, ls testkit.Listeners, mode Mode, cases []hazardCase, env ...string) hazardResult {
	t.Helper()
	var addrs []string
	for _, c := range cases {
		addrs = append(addrs, c.addr.String())
	}
	before := ls.SoFar() // flushed by the previous call's ProbeAcceptsIn
	resets0, _ := testkit.NetnsCounters(t, backend)
	cookies0 := nsTCPExt(t, backend, "SyncookiesSent")
	answers0 := nsCounter(t, backend, "snmp", "Tcp:", "OutSegs")
	start := time.Now()
	out := testkit.RunTest(t, prober, "TestRawHazardHelper", append([]string{hazardEnv + "=" + mode.String(),
		"SHAKER_HAZARD_ADDRS=" + strings.Join(addrs, ",")}, env...)...)
	took := time.Since(start)
	var r hazardResult
	resets, _ := testkit.NetnsCounters(t, backend)
	r.resets, r.cookies = resets-resets0, nsTCPExt(t, backend, "SyncookiesSent")-cookies0
	r.answers = nsCounter(t, backend, "snmp", "Tcp:", "OutSegs") - answers0
	r.accepted = ls.ProbeAcceptsIn(t, backend) - before
	got := map[string][]string{}
	for _, f := range testkit.Results(out) {
		switch {
		case len(f) == 2 && f[0] == "skip":
			t.Skipf("%v mode: %s", mode, out)
		case len(f) == 2 && f[0] == "mode" && f[1] != mode.String():
			t.Fatalf("the child's engine ran in mode %s, want %v", f[1], mode)
		case len(f) == 2+numOutcomes && f[0] == "probe":
			got[f[1]] = f[2:]
		}
	}
	var summary []string
	for _, c := range cases {
		counts, ok := got[c.addr.String()]
		if !ok {
			t.Fatalf("%v mode: no result for %v\n%s", mode, c.addr, out)
		}
		var parts []string
		for o, n := range counts {
			if n != "0" {
				parts = append(parts, n+" "+Outcome(o).String())
			}
		}
		summary = append(summary, fmt.Sprintf("%v: %s", c.addr, strings.Join(parts, ", ")))
		if counts[c.want] != strconv.Itoa(hazardReps) {
			t.Errorf("%v mode: %v: %s of %d probes %v (%s)", mode, c.addr, counts[c.want], hazardReps, c.want, strings.Join(parts, ", "))
		}
		if c.want == Up {
			n, _ := strconv.Atoi(counts[Up])
			r.up += n
		}
	}
	t.Logf("%v mode: %s; backend: %d answers sent to %d probes, %d embryonic resets, %d SYN cookies sent; %d accepted; the child took %v",
		mode, strings.Join(summary, "; "), r.answers, len(cases)*hazardReps, r.resets, r.cookies, r.accepted, took.Round(time.Millisecond))
	if r.accepted != 0 {
		t.Errorf("%v mode: listeners accepted %d connections", mode, r.accepted)
	}
	return r
}

// checkResets fails the test unless the backend counted an embryonic
// reset for every probe that was up: the prober's RST (raw mode: its
// kernel's) reached the backend and ended the half-made connection.
func checkResets(t *testing.T, mode Mode, r hazardResult) {
	t.Helper()
	if r.resets < int64(r.up) {
		t.Errorf("%v mode: %d probes up, the backend counted %d embryonic resets: RSTs lost on the way", mode, r.up, r.resets)
	}
}

// nsTCPExt reads the TcpExt counter name of network namespace ns.
func nsTCPExt(t *testing.T, ns, name string) int64 {
	t.Helper()
	return nsCounter(t, ns, "netstat", "TcpExt:", name)
}

// nsCounter reads a counter of /proc/net/file (snmp, netstat) in network
// namespace ns: the line that starts with prefix, the column name.
func nsCounter(t *testing.T, ns, file, prefix, name string) int64 {
	t.Helper()
	var v int64
	var err error
	testkit.InNetns(t, ns, func() { v, err = testkit.ProcNetField("/proc/thread-self/net/"+file, prefix, name) })
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestRawHazardHelper is the child of the hazard tests: it probes each
// address of $SHAKER_HAZARD_ADDRS hazardReps times, all at once, in the
// probe mode $SHAKER_HAZARD_HELPER, and prints RESULT mode m, then for
// each address RESULT probe addr and its count of each outcome.
func TestRawHazardHelper(t *testing.T) {
	mode := childMode(t, hazardEnv, "the hazard tests")
	loops := 0
	if s := os.Getenv(hazardLoops); s != "" {
		var err error
		if loops, err = strconv.Atoi(s); err != nil {
			t.Fatalf("%s=%q: %v", hazardLoops, s, err)
		}
	}
	e, err := New(Options{Mode: mode, Loops: loops})
	if err != nil {
		if mode == ModeRaw {
			fmt.Printf("RESULT skip raw-unavailable\n%v\n", err)
			return
		}
		t.Fatal(err)
	}
	defer e.Close()
	fmt.Printf("RESULT mode %v\n", e.Mode())
	addrs := strings.Split(os.Getenv("SHAKER_HAZARD_ADDRS"), ",")
	timeout := hazardTimeout
	if s := os.Getenv(hazardTimeoutEnv); s != "" {
		if timeout, err = time.ParseDuration(s); err != nil {
			t.Fatal(err)
		}
	}
	counts := make([][numOutcomes]int, len(addrs))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, s := range addrs {
		a := netip.MustParseAddrPort(s)
		for range hazardReps {
			wg.Add(1)
			e.ProbeAsync(a, timeout, func(r Result) {
				mu.Lock()
				counts[i][r.Outcome]++
				mu.Unlock()
				wg.Done()
			})
		}
	}
	waited := make(chan struct{})
	go func() { wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(timeout + 10*time.Second):
		t.Fatalf("probes without a result 10 s past their timeout: %+v", e.Stats())
	}
	for i, s := range addrs {
		var f []string
		for _, n := range counts[i] {
			f = append(f, strconv.Itoa(n))
		}
		fmt.Printf("RESULT probe %s %s\n", s, strings.Join(f, " "))
	}
}

// Conntrack and NAT between the prober and the backend, as Docker sets
// them up for a published port: the prober probes pub:8080, which nft
// DNATs to the backend's 80 (pub:8081 to its 81, where nothing listens);
// pub:8082 is not forwarded, and the NAT host itself refuses it. The
// backend is a namespace C behind the NAT host H, reached over a veth
// pair (hc0 in H, c0 in C), and H masquerades what it sends to C.
//   - "host": the prober runs on H itself (Caddy on the Docker host), pub
//     is an address of H's, and the DNAT is in H's output hook;
//   - "router": the prober runs in a namespace P of its own on H's link
//     (another host), pub is H's address there, and the DNAT is in H's
//     prerouting hook, H forwarding.
//
// Conntrack tracks the raw SYN as it would connect()'s; the SYN-ACK comes
// back through it translated to the address probed, and the kernel's RST
// goes out through it translated to the backend's.
const natRules = `
table inet shaker_nat {
	chain pub {
		type nat hook %s priority -100; policy accept;
		ip daddr %s tcp dport 8080 dnat ip to 10.88.0.2:80
		ip daddr %[2]s tcp dport 8081 dnat ip to 10.88.0.2:81
		ip6 daddr %s tcp dport 8080 dnat ip6 to [fd53:6b72:88::2]:80
		ip6 daddr %[3]s tcp dport 8081 dnat ip6 to [fd53:6b72:88::2]:81
	}
	chain masq {
		type nat hook postrouting priority 100; policy accept;
		oifname "hc0" masquerade
	}
}`

// TestRawThroughNAT: conntrack with DNAT and masquerade between the prober
// and the backend (see natRules): up and refused as they should be through
// the NAT, 0 accepted, every answered probe's half-made connection reset
// through the NAT, in raw mode and connect mode alike.
func TestRawThroughNAT(t *testing.T) {
	for _, where := range []string{"host", "router"} {
		for _, family := range []int{4, 6} {
			t.Run(fmt.Sprintf("%s/IPv%d", where, family), func(t *testing.T) {
				pub4, pub6, hook := "198.18.40.1", "fd53:6b72:40::1", "output"
				if where == "router" {
					pub4, pub6, hook = hazardB4, hazardB6, "prerouting"
				}
				h := testkit.Netns(t, true, fmt.Sprintf(natRules, hook, pub4, pub6))
				c := testkit.Netns(t, false, "")
				hazardLink(t, h, "hc0", []string{"10.88.0.1/24", "fd53:6b72:88::1/64"}, c, "c0", []string{"10.88.0.2/24", "fd53:6b72:88::2/64"})
				hazardRun(t, "ip", "-n", c, "route", "add", "default", "via", "10.88.0.1")
				hazardRun(t, "ip", "-n", c, "-6", "route", "add", "default", "via", "fd53:6b72:88::1")
				prober := h
				if where == "host" {
					hazardRun(t, "ip", "-n", h, "addr", "add", pub4+"/32", "dev", "lo")
					hazardRun(t, "ip", "-n", h, "addr", "add", pub6+"/128", "dev", "lo")
				} else {
					prober = testkit.Netns(t, false, "")
					hazardLink(t, prober, "p0", []string{hazardP4 + "/24", hazardP6 + "/64"}, h, "b0", []string{hazardB4 + "/24", hazardB6 + "/64"})
					hazardRun(t, "ip", "netns", "exec", h, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
				}
				back, pub := "10.88.0.2", netip.MustParseAddr(pub4)
				if family == 6 {
					back, pub = "fd53:6b72:88::2", netip.MustParseAddr(pub6)
				}
				ls := hazardListener(t, c, back)
				cases := []hazardCase{
					{netip.AddrPortFrom(pub, 8080), Up},
					{netip.AddrPortFrom(pub, 8081), Refused},
					{netip.AddrPortFrom(pub, 8082), Refused},
				}
				for _, mode := range hazardModes {
					checkResets(t, mode, hazardProbe(t, prober, c, ls, mode, cases))
				}
			})
		}
	}
}

// invalidRules drops what conntrack finds invalid, coming in and going
// out, counting it.
const invalidRules = `
table inet shaker_ct {
	chain in {
		type filter hook input priority 0; policy accept;
		ct state invalid counter drop
	}
	chain out {
		type filter hook output priority 0; policy accept;
		ct state invalid counter drop
	}
}`

// TestRawCtStateInvalidDrop: an nft policy that drops `ct state invalid`
// (input and output) on the prober's side and on the backend's: the raw
// SYN, the SYN-ACK and the kernel's RST are all valid to conntrack (the
// RST's sequence number is the SYN's plus one, as conntrack expects), so
// up and refused are right, every half-made connection is reset, 0
// accepted; the drop counters are logged.
func TestRawCtStateInvalidDrop(t *testing.T) {
	for _, family := range []int{4, 6} {
		t.Run(fmt.Sprintf("IPv%d", family), func(t *testing.T) {
			p, b, ls, cases := hazardBackend(t, family, invalidRules, invalidRules)
			for _, mode := range hazardModes {
				r := hazardProbe(t, p, b, ls, mode, cases)
				checkResets(t, mode, r)
				t.Logf("%v mode: invalid packets dropped: prober %s, backend %s", mode, invalidDrops(t, p), invalidDrops(t, b))
			}
		})
	}
}

var nftCounter = regexp.MustCompile(`counter packets (\d+)`)

// invalidDrops is what invalidRules' counters in ns say: "in N, out M",
// since the namespace was made.
func invalidDrops(t *testing.T, ns string) string {
	t.Helper()
	var s []string
	for _, chain := range []string{"in", "out"} {
		out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "shaker_ct", chain).CombinedOutput()
		m := nftCounter.FindSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("nft list chain inet shaker_ct %s: %v: %s", chain, err, out)
		}
		s = append(s, chain+" "+string(m[1]))
	}
	return strings.Join(s, ", ")
}

// TestRawSYNCookies: the backend answers every SYN with a SYN cookie
// (net.ipv4.tcp_syncookies=2 in its namespace): no half-made connection
// is kept there, so only the ACK of a completed handshake could make one,
// from the cookie. Raw mode never sends that ACK: up, 0 accepted, and the
// backend counted a cookie for every probe up.
func TestRawSYNCookies(t *testing.T) {
	for _, family := range []int{4, 6} {
		t.Run(fmt.Sprintf("IPv%d", family), func(t *testing.T) {
			p, b, ls, cases := hazardBackend(t, family, "", "")
			hazardRun(t, "ip", "netns", "exec", b, "sysctl", "-q", "-w", "net.ipv4.tcp_syncookies=2")
			for _, mode := range hazardModes {
				r := hazardProbe(t, p, b, ls, mode, cases)
				if r.cookies < int64(r.up) {
					t.Errorf("%v mode: %d probes up, %d SYN cookies sent: the backend did not answer with cookies", mode, r.up, r.cookies)
				}
			}
		})
	}
}

// TestRawChecksumOffload: checksum offload on the veth pair on and off
// (ethtool -K tx, rx), on each end. With tx offload on, a SYN-ACK crosses
// veth with its checksum not yet computed (CHECKSUM_PARTIAL: the field
// holds only the pseudo-header's sum): raw mode does not verify checksums
// on receive, it matches the acknowledgement number, so the answer
// counts. Raw mode's IPv4 SYN carries a checksum the engine computes,
// its IPv6 one one the kernel computes (IPV6_CHECKSUM), and the backend
// verifies either in software: a wrong one would time out.
func TestRawChecksumOffload(t *testing.T) {
	if _, err := exec.LookPath("ethtool"); err != nil {
		t.Skip("needs ethtool (Debian package ethtool) to switch checksum offload on veth")
	}
	for _, family := range []int{4, 6} {
		for _, offload := range [][2]string{{"on", "on"}, {"off", "off"}, {"on", "off"}, {"off", "on"}} {
			t.Run(fmt.Sprintf("IPv%d/prober-%s/backend-%s", family, offload[0], offload[1]), func(t *testing.T) {
				p, b, ls, cases := hazardBackend(t, family, "", "")
				hazardRun(t, "ip", "netns", "exec", p, "ethtool", "-K", "p0", "tx", offload[0], "rx", offload[0])
				hazardRun(t, "ip", "netns", "exec", b, "ethtool", "-K", "b0", "tx", offload[1], "rx", offload[1])
				for _, end := range [][3]string{{p, "p0", offload[0]}, {b, "b0", offload[1]}} {
					out, err := exec.Command("ip", "netns", "exec", end[0], "ethtool", "-k", end[1]).CombinedOutput()
					if err != nil || !strings.Contains(string(out), "tx-checksumming: "+end[2]) {
						t.Fatalf("ethtool -k %s: tx-checksumming is not %s: %v\n%s", end[1], end[2], err, out)
					}
				}
				for _, mode := range hazardModes {
					checkResets(t, mode, hazardProbe(t, p, b, ls, mode, cases))
				}
			})
		}
	}
}

// TestRawNeighbourResolution: the first probes of a fresh veth link wait
// for neighbour resolution (the pair's static neighbours flushed). IPv6's
// takes a second here: the first neighbour solicitation on a link just
// up is lost; IPv4's ARP is not. The outcomes are right and nothing is
// accepted in either mode. The modes differ: at 1 s the kernel does not
// retransmit a SYN still waiting in a host queue (TcpExt
// TCPSpuriousRtxHostQueues counts it), raw mode sends it again, and the
// backend gets both and answers each (logged: the backend's answers and
// the prober's held-back retransmissions). Each mode runs on a fresh
// pair. The probes' timeout is 4 s: the kernel sends up to three
// solicitations a second apart, and in one run of the whole package the
// second was lost too, so that a 2 s timeout timed every probe out.
func TestRawNeighbourResolution(t *testing.T) {
	for _, family := range []int{4, 6} {
		for _, mode := range hazardModes {
			t.Run(fmt.Sprintf("IPv%d/%v", family, mode), func(t *testing.T) {
				p, b, ls, cases := hazardBackend(t, family, "", "")
				hazardRun(t, "ip", "-n", p, "neigh", "flush", "dev", "p0", "nud", "permanent")
				hazardRun(t, "ip", "-n", b, "neigh", "flush", "dev", "b0", "nud", "permanent")
				held0 := nsTCPExt(t, p, "TCPSpuriousRtxHostQueues")
				r := hazardProbe(t, p, b, ls, mode, cases, hazardTimeoutEnv+"=4s")
				t.Logf("%v mode: the prober's kernel held back %d SYN retransmissions still in a host queue",
					mode, nsTCPExt(t, p, "TCPSpuriousRtxHostQueues")-held0)
				checkResets(t, mode, r)
			})
		}
	}
}

// TestRawMixedSources: one loop probes a listener on loopback in the
// prober's own namespace, then the backend across the veth link: the two
// need different source addresses (127.0.0.1 and hazardP4; IPv6: ::1 and
// hazardP6), and every probe must still be up or refused as it should be,
// with 0 accepted on either side. Raw mode picks an IPv4 probe's source
// address itself, by connecting a UDP socket to the destination; that
// socket kept the source of its first connect(), and every IPv4 probe
// off the host after one of 127.0.0.1 failed with EINVAL (the real-server
// suite's MariaDB, on a veth link beside the servers on loopback).
func TestRawMixedSources(t *testing.T) {
	t.Setenv(hazardLoops, "1") // one loop: one source lookup for all
	for _, family := range []int{4, 6} {
		for _, mode := range hazardModes {
			t.Run(fmt.Sprintf("IPv%d/%v", family, mode), func(t *testing.T) {
				p, b, ls, cases := hazardBackend(t, family, "", "")
				lo := "127.0.0.1"
				if family == 6 {
					lo = "::1"
				}
				local := hazardListener(t, p, lo)
				// loopback first: the child starts each address's probes in order
				r := hazardProbe(t, p, b, ls, mode, append(upAndRefused(lo), cases...))
				if n := local.ProbeAcceptsIn(t, p); n != 0 {
					t.Errorf("%v mode: the listener on %s accepted %d connections", mode, lo, n)
				}
				if r.resets < hazardReps {
					t.Errorf("%v mode: the backend counted %d embryonic resets for %d probes up", mode, r.resets, hazardReps)
				}
			})
		}
	}
}
