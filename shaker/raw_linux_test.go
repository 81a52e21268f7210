//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// forger is the test's own raw sockets, of one family (4 or 6), on
// loopback: one captures the engine's SYNs to a port, the others send
// forged answers to them. The sending is done on a thread pinned to one
// CPU, so that the packets reach the engine's sockets in the order sent
// (loopback queues each on the sending CPU's backlog).
type forger struct {
	family int
	peer   netip.Addr // the address probed, and the answers' source
	dport  uint16     // the port probed
	cap    int        // captures SYNs to dport
	tcp    int        // sends TCP segments
	tcp2   int        // IPv4: sends TCP segments from 127.0.0.2
	icmp   int        // sends ICMP or ICMPv6 errors
	seen   map[uint32]bool
	jobs   chan func()
}

func newForger(t *testing.T, to netip.AddrPort) *forger {
	t.Helper()
	f := &forger{family: 4, peer: to.Addr(), dport: to.Port(), tcp2: -1, seen: map[uint32]bool{}, jobs: make(chan func())}
	af, icmpProto := unix.AF_INET, unix.IPPROTO_ICMP
	if to.Addr().Is6() {
		f.family, af, icmpProto = 6, unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	none := []unix.SockFilter{bpfStmt(bpfRet, 0)} // the senders read nothing
	open := func(proto int, filter []unix.SockFilter) int {
		fd, err := rawSocket(af, proto, filter)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	// the capture passes TCP segments to dport
	var capFilter []unix.SockFilter
	if f.family == 4 {
		capFilter = append(capFilter, bpfStmt(bpfLdxMsh, 0))
	} else {
		capFilter = append(capFilter, bpfStmt(unix.BPF_LDX|unix.BPF_IMM, 0))
	}
	capFilter = append(capFilter,
		bpfStmt(bpfLdhInd, 2),
		bpfJump(bpfJeq, uint32(f.dport), 0, 1),
		bpfStmt(bpfRet, rawBufSize),
		bpfStmt(bpfRet, 0))
	f.cap = open(unix.IPPROTO_TCP, capFilter)
	f.tcp = open(unix.IPPROTO_TCP, none)
	f.icmp = open(icmpProto, none)
	if f.family == 6 {
		if err := unix.SetsockoptInt(f.tcp, unix.IPPROTO_IPV6, unix.IPV6_CHECKSUM, 16); err != nil {
			t.Fatal(err)
		}
	} else {
		f.tcp2 = open(unix.IPPROTO_TCP, none)
		if err := unix.Bind(f.tcp2, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 2}}); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		// never unlocked: the pinned thread ends with the goroutine
		runtime.LockOSThread()
		var cur, one unix.CPUSet
		if unix.SchedGetaffinity(0, &cur) == nil {
			for c := 0; c < 1024; c++ {
				if cur.IsSet(c) {
					one.Set(c)
					unix.SchedSetaffinity(0, &one)
					break
				}
			}
		}
		for job := range f.jobs {
			job()
		}
	}()
	t.Cleanup(func() { close(f.jobs) })
	return f
}

// capture waits (10 s at most) for an engine's SYN to the port probed that
// it has not seen before, and returns its source port and sequence number.
func (f *forger) capture(t *testing.T) (sport uint16, seq uint32) {
	t.Helper()
	var b [rawBufSize]byte
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		pfd := []unix.PollFd{{Fd: int32(f.cap), Events: unix.POLLIN}}
		unix.Poll(pfd, 100)
		n, _, err := unix.Recvfrom(f.cap, b[:], unix.MSG_DONTWAIT)
		if err != nil {
			continue
		}
		tcp := b[:n]
		if f.family == 4 {
			if n < 20 || n < int(tcp[0]&0x0f)*4 {
				continue
			}
			tcp = tcp[int(tcp[0]&0x0f)*4:]
		}
		if len(tcp) < 20 || tcp[13]&0x12 != 0x02 { // a SYN, no ACK
			continue
		}
		seq = binary.BigEndian.Uint32(tcp[4:])
		if f.seen[seq] {
			continue // a retransmission
		}
		f.seen[seq] = true
		return binary.BigEndian.Uint16(tcp[0:]), seq
	}
	t.Fatalf("no SYN to %v:%d with a sequence number not seen before captured in 10 s", f.peer, f.dport)
	return 0, 0
}

// probe starts a probe (10 s) of the forger's address on e, whose only
// source port is port, and returns its SYN's sequence number, captured,
// and the channel of its result.
func (f *forger) probe(t *testing.T, e *Engine, port uint16) (uint32, <-chan Result) {
	t.Helper()
	res := make(chan Result, 1)
	e.ProbeAsync(netip.AddrPortFrom(f.peer, f.dport), 10*time.Second, func(r Result) { res <- r })
	sport, seq := f.capture(t)
	if sport != port {
		t.Fatalf("SYN from port %d, want the engine's only source port %d", sport, port)
	}
	return seq, res
}

// TCP flags.
const (
	flagSYN = 0x02
	flagRST = 0x04
	flagACK = 0x10
)

// segment is a TCP header from sport to dport with the ack and flags given.
func segment(sport, dport uint16, ack uint32, flags byte) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint32(b[4:], 0x5eed)
	binary.BigEndian.PutUint32(b[8:], ack)
	b[12] = 5 << 4
	b[13] = flags
	binary.BigEndian.PutUint16(b[14:], 65535)
	return b
}

// sendTCP sends a TCP segment to the engine's port, from the port probed
// (plus off) and the address probed (or, with other, 127.0.0.2), on the
// pinned thread.
func (f *forger) sendTCP(t *testing.T, to uint16, off int, other bool, ack uint32, flags byte) {
	t.Helper()
	seg := segment(f.dport+uint16(off), to, ack, flags)
	fd := f.tcp
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: f.peer.As16()}
	if f.family == 4 {
		src := f.peer.As4()
		if other {
			fd, src = f.tcp2, [4]byte{127, 0, 0, 2}
		}
		binary.BigEndian.PutUint16(seg[16:], tcpChecksum4(src, f.peer.As4(), seg))
		sa = &unix.SockaddrInet4{Addr: f.peer.As4()}
	}
	f.send(t, fd, seg, sa)
}

// sendICMP sends an ICMP (or ICMPv6) error of the type and code given,
// quoting a SYN from the engine's port to the port probed (plus off) with
// sequence number seq.
func (f *forger) sendICMP(t *testing.T, from uint16, off int, seq uint32, typ, code byte) {
	t.Helper()
	quoted := make([]byte, 8)
	binary.BigEndian.PutUint16(quoted[0:], from)
	binary.BigEndian.PutUint16(quoted[2:], f.dport+uint16(off))
	binary.BigEndian.PutUint32(quoted[4:], seq)
	msg := []byte{typ, code, 0, 0, 0, 0, 0, 0}
	if f.family == 4 {
		ip := make([]byte, 20)
		ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_TCP
		binary.BigEndian.PutUint16(ip[2:], 20+synLen)
		copy(ip[12:], f.peer.AsSlice()) // from the engine's address: the same, on loopback
		copy(ip[16:], f.peer.AsSlice())
		msg = append(append(msg, ip...), quoted...)
		binary.BigEndian.PutUint16(msg[2:], inetChecksum(0, msg))
		f.send(t, f.icmp, msg, &unix.SockaddrInet4{Addr: f.peer.As4()})
		return
	}
	ip := make([]byte, 40)
	ip[0], ip[6], ip[7] = 0x60, unix.IPPROTO_TCP, 64
	binary.BigEndian.PutUint16(ip[4:], synLen)
	copy(ip[8:], f.peer.AsSlice())
	copy(ip[24:], f.peer.AsSlice())
	msg = append(append(msg, ip...), quoted...) // the kernel fills in an ICMPv6 checksum
	f.send(t, f.icmp, msg, &unix.SockaddrInet6{Addr: f.peer.As16()})
}

func (f *forger) send(t *testing.T, fd int, b []byte, sa unix.Sockaddr) {
	t.Helper()
	done := make(chan error)
	f.jobs <- func() { done <- unix.Sendto(fd, b, 0, sa) }
	if err := <-done; err != nil {
		t.Fatalf("forging a packet: %v", err)
	}
}

// awaitResult waits (15 s at most) for a probe's result.
func awaitResult(t *testing.T, what string, res <-chan Result) Result {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(15 * time.Second):
		t.Fatalf("%s: no result after 15 s", what)
	}
	return Result{}
}

// TestRawForgedAnswers: an answer counts only if it acknowledges the live
// probe's sequence number and comes from the address and port probed. A
// probe is sent to a listener whose full accept queue drops SYNs, its SYN
// captured, and the test sends forged answers (a wrong acknowledgement,
// the previous probe's, another source port or address, an ACK without
// SYN, an RST without ACK, ICMP errors quoting another sequence number or
// port, a path MTU message) and then the right one, of another kind: the
// probe must end with the right one's outcome. Four probes, so that each
// kind is both a forgery and the answer.
func TestRawForgedAnswers(t *testing.T) {
	testkit.NeedRaw(t)
	for _, lb := range loopbacks {
		t.Run(lb.name, func(t *testing.T) {
			full := testkit.FullQueueListener(t, lb.ip)
			f := newForger(t, full)
			port := testkit.FreePorts(t, 1)
			e := newEngine(t, Options{Mode: ModeRaw, Loops: 1, SourcePorts: PortRange{port, port}})
			probe := func() (uint32, <-chan Result) { return f.probe(t, e, port) }
			// destination unreachable: host (or address) and network
			icmpType, unreach, netUnreach := byte(3), byte(1), byte(0)
			if f.family == 6 {
				icmpType, unreach = 1, 3
			}

			// A: forged SYN-ACKs, then the RST.
			seqA, res := probe()
			f.sendTCP(t, port, 0, false, seqA+2, flagSYN|flagACK)
			f.sendTCP(t, port, 0, false, seqA, flagSYN|flagACK)
			f.sendTCP(t, port, 1, false, seqA+1, flagSYN|flagACK)
			if f.family == 4 {
				f.sendTCP(t, port, 0, true, seqA+1, flagSYN|flagACK)
			}
			f.sendTCP(t, port, 0, false, seqA+1, flagACK)
			f.sendTCP(t, port, 0, false, seqA+1, flagRST|flagACK)
			if r := awaitResult(t, "A", res); r.Outcome != Refused {
				t.Fatalf("probe A: %+v, want refused: a forged SYN-ACK counted", r)
			}
			// B: forged RSTs (the stale one of A too), then the SYN-ACK.
			seqB, res := probe()
			f.sendTCP(t, port, 0, false, seqB+2, flagRST|flagACK)
			f.sendTCP(t, port, 1, false, seqB+1, flagRST|flagACK)
			if f.family == 4 {
				f.sendTCP(t, port, 0, true, seqB+1, flagRST|flagACK)
			}
			f.sendTCP(t, port, 0, false, seqA+1, flagRST|flagACK)
			f.sendTCP(t, port, 0, false, seqB+1, flagRST)
			f.sendTCP(t, port, 0, false, seqB+1, flagSYN|flagACK)
			if r := awaitResult(t, "B", res); r.Outcome != Up || r.RTT <= 0 {
				t.Fatalf("probe B: %+v, want up with an RTT: a forged RST counted", r)
			}
			// C: forged ICMP errors (network unreachable), an ICMP
			// message that is no error for a SYN (fragmentation needed,
			// packet too big), then a host unreachable one.
			seqC, res := probe()
			if f.family == 4 {
				f.sendICMP(t, port, 0, seqC, 3, 4)
			} else {
				f.sendICMP(t, port, 0, seqC, 2, 0)
			}
			f.sendICMP(t, port, 0, seqC+1, icmpType, netUnreach)
			f.sendICMP(t, port, 1, seqC, icmpType, netUnreach)
			f.sendICMP(t, port, 0, seqB, icmpType, netUnreach)
			f.sendICMP(t, port, 0, seqC, icmpType, unreach)
			if r := awaitResult(t, "C", res); r.Outcome != Unreachable || !errors.Is(r.Err, syscall.EHOSTUNREACH) {
				t.Fatalf("probe C: %+v, want host unreachable: a forged ICMP error counted", r)
			}
			// D: the stale SYN-ACKs of B and C, then the RST.
			seqD, res := probe()
			f.sendTCP(t, port, 0, false, seqB+1, flagSYN|flagACK)
			f.sendTCP(t, port, 0, false, seqC+1, flagSYN|flagACK)
			f.sendTCP(t, port, 0, false, seqD+1, flagRST|flagACK)
			if r := awaitResult(t, "D", res); r.Outcome != Refused {
				t.Fatalf("probe D: %+v, want refused: a stale SYN-ACK counted", r)
			}
			if s := e.Stats(); s.Up != 1 || s.Refused != 2 || s.Unreachable != 1 || s.Total() != 4 || s.InFlight != 0 {
				t.Fatalf("stats %+v: want 1 up, 2 refused, 1 unreachable", s)
			}
		})
	}
}

// TestRawEnginesSharePorts: two engines on the same source port (a reload:
// SO_REUSEPORT lets both reserve it) each see the other's answers on their
// raw sockets, and neither takes them. Both probe the same address (its
// SYNs dropped), and the test answers each SYN, one engine's with an RST
// and the other's with a SYN-ACK, in both orders: an engine that took the
// other's answer, read first, would end with the wrong outcome.
func TestRawEnginesSharePorts(t *testing.T) {
	testkit.NeedRaw(t)
	full := testkit.FullQueueListener(t, "127.0.0.1")
	f := newForger(t, full)
	port := testkit.FreePorts(t, 1)
	opts := Options{Mode: ModeRaw, Loops: 1, SourcePorts: PortRange{port, port}}
	e1, e2 := newEngine(t, opts), newEngine(t, opts)
	for round, upFirst := range []bool{false, true} {
		seq1, res1 := f.probe(t, e1, port)
		seq2, res2 := f.probe(t, e2, port)
		if upFirst { // e2 reads e1's SYN-ACK before its own RST
			f.sendTCP(t, port, 0, false, seq1+1, flagSYN|flagACK)
			f.sendTCP(t, port, 0, false, seq2+1, flagRST|flagACK)
		} else { // e1 reads e2's RST before its own SYN-ACK
			f.sendTCP(t, port, 0, false, seq2+1, flagRST|flagACK)
			f.sendTCP(t, port, 0, false, seq1+1, flagSYN|flagACK)
		}
		if r := awaitResult(t, "first engine", res1); r.Outcome != Up {
			t.Errorf("round %d: the first engine's probe %+v, want up: it took the second's RST", round, r)
		}
		if r := awaitResult(t, "second engine", res2); r.Outcome != Refused {
			t.Errorf("round %d: the second engine's probe %+v, want refused: it took the first's SYN-ACK", round, r)
		}
	}
}

// TestRawSourcePortTaken: a source port that another socket holds (a
// listener, IPv4 or IPv6) fails New in raw mode with an error that names
// the port and is no ErrRawUnavailable; ModeAuto falls back to connect
// mode and RawError says the same.
func TestRawSourcePortTaken(t *testing.T) {
	testkit.NeedRaw(t)
	for _, lb := range loopbacks {
		t.Run(lb.name, func(t *testing.T) {
			p := testkit.FreePorts(t, 3) + 1 // its neighbours free too
			l := testkit.NewListener(t, lb.network, net.JoinHostPort(lb.ip, strconv.Itoa(int(p))))
			for _, ports := range []PortRange{{p, p}, {p - 1, p + 1}} {
				_, err := New(Options{Mode: ModeRaw, Loops: 1, SourcePorts: ports})
				if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("port %d:", p)) || errors.Is(err, ErrRawUnavailable) {
					t.Fatalf("New with source ports %v, %d held by a listener: %v; want an error naming port %d, not ErrRawUnavailable", ports, p, err, p)
				}
				t.Logf("%v: %v", ports, err)
				e := newEngine(t, Options{Mode: ModeAuto, Loops: 1, SourcePorts: ports})
				if e.Mode() != ModeConnect || e.RawError() == nil || e.RawError().Error() != err.Error() || e.SourcePorts() != (PortRange{}) {
					t.Fatalf("ModeAuto with port %d held: mode %v, RawError %v, ports %v; want connect, with %v", p, e.Mode(), e.RawError(), e.SourcePorts(), err)
				}
				if r := e.Probe(probeCtx(t, 5*time.Second), l.Addr); r.Outcome != Up {
					t.Fatalf("probe in the fallen-back connect mode: %+v", r)
				}
			}
			if n := l.ProbeAccepts(t); n != 0 {
				t.Fatalf("listener accepted %d probe connections", n)
			}
		})
	}
}

// TestRawDefaultPortRange: the default source ports are DefaultSourcePorts
// ports outside this host's ephemeral range, and a raw engine given no
// range uses them.
func TestRawDefaultPortRange(t *testing.T) {
	b, err := os.ReadFile(localPortRange)
	if err != nil {
		t.Skipf("no %s: %v", localPortRange, err)
	}
	var lo, hi int
	if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil {
		t.Fatalf("%s: %q: %v", localPortRange, b, err)
	}
	r, err := DefaultPortRange()
	if err != nil {
		t.Fatalf("DefaultPortRange with an ephemeral range %d-%d: %v", lo, hi, err)
	}
	if r.Size() != DefaultSourcePorts || int(r.First) <= hi && int(r.Last) >= lo || r.First < 1024 {
		t.Fatalf("DefaultPortRange = %v: want %d ports above 1023, outside the ephemeral range %d-%d", r, DefaultSourcePorts, lo, hi)
	}
	t.Logf("ephemeral ports %d-%d, default source ports %v", lo, hi, r)
	testkit.NeedRaw(t)
	e, err := New(Options{Mode: ModeRaw})
	if err != nil && strings.Contains(err.Error(), "another socket holds it") {
		t.Skipf("raw engine on the default ports %v: another process holds one: %v", r, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.SourcePorts() != r {
		t.Fatalf("raw engine's source ports %v, want the default %v", e.SourcePorts(), r)
	}
}

// rawSock is a raw socket of this process as /proc/net/raw{,6} shows it.
type rawSock struct {
	family, proto int
	rx            int64 // bytes queued to be read
	drops         int64
}

// socketInodes are the inodes of this process's sockets.
func socketInodes(t *testing.T) map[uint64]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	m := map[uint64]bool{}
	for _, ent := range ents {
		link, err := os.Readlink("/proc/self/fd/" + ent.Name())
		if err != nil {
			continue // closed meanwhile
		}
		var ino uint64
		if _, err := fmt.Sscanf(link, "socket:[%d]", &ino); err == nil {
			m[ino] = true
		}
	}
	return m
}

// rawSocks reads the raw sockets among inodes from /proc/net/raw and raw6.
func rawSocks(t *testing.T, inodes map[uint64]bool) map[uint64]rawSock {
	t.Helper()
	m := map[uint64]rawSock{}
	for _, src := range []struct {
		path   string
		family int
	}{{"/proc/net/raw", 4}, {"/proc/net/raw6", 6}} {
		b, err := os.ReadFile(src.path)
		if err != nil {
			t.Skipf("no %s: %v", src.path, err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			// sl local:proto remote st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
			f := strings.Fields(line)
			if len(f) < 13 {
				continue
			}
			ino, _ := strconv.ParseUint(f[9], 10, 64)
			if !inodes[ino] {
				continue
			}
			_, protoHex, _ := strings.Cut(f[1], ":")
			_, rxHex, _ := strings.Cut(f[4], ":")
			proto, err1 := strconv.ParseInt(protoHex, 16, 32)
			rx, err2 := strconv.ParseInt(rxHex, 16, 64)
			drops, err3 := strconv.ParseInt(f[len(f)-1], 10, 64)
			if err := errors.Join(err1, err2, err3); err != nil {
				t.Fatalf("%s: %q: %v", src.path, line, err)
			}
			m[ino] = rawSock{src.family, int(proto), rx, drops}
		}
	}
	return m
}

// TestRawFilters: the kernel filters of the engine's raw sockets pass only
// what may answer a probe. With the engine's loop held in a callback (so
// that it reads nothing), ordinary loopback traffic to other ports (a bulk
// transfer, connections made and refused, ICMP errors quoting UDP, from a
// port of the range too, echo requests and replies)
// and answers to the ports just outside the engine's range leave every one
// of its raw sockets' receive queues empty (/proc/net/raw); then one answer
// to a port at each end of the range, of each kind and family, is queued
// on its socket.
func TestRawFilters(t *testing.T) {
	testkit.NeedRaw(t)
	base := testkit.FreePorts(t, 6) // base and base+5: just outside the range
	ports := PortRange{base + 1, base + 4}
	l4 := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	l6 := testkit.NewListener(t, "tcp6", "[::1]:0")
	f4, f6 := newForger(t, l4.Addr), newForger(t, l6.Addr)
	before := socketInodes(t)
	e := newEngine(t, Options{Mode: ModeRaw, Loops: 1, SourcePorts: ports})
	mine := map[uint64]bool{}
	for ino := range socketInodes(t) {
		if !before[ino] {
			mine[ino] = true
		}
	}
	socks := rawSocks(t, mine)
	kinds := map[[2]int]bool{}
	for _, s := range socks {
		kinds[[2]int{s.family, s.proto}] = true
	}
	// The four receiving sockets, and the loop's send-only IPPROTO_RAW
	// one, which must receive nothing at all.
	for _, k := range [][2]int{{4, unix.IPPROTO_TCP}, {4, unix.IPPROTO_ICMP}, {6, unix.IPPROTO_TCP}, {6, unix.IPPROTO_ICMPV6}, {4, unix.IPPROTO_RAW}} {
		if !kinds[k] {
			t.Fatalf("the engine's raw sockets %+v: none of IPv%d, protocol %d", socks, k[0], k[1])
		}
	}
	release := holdLoop(t, e, l4.Addr, 30*time.Second)

	for _, lb := range loopbacks {
		loopbackTraffic(t, lb.network, lb.ip)
		// ICMP errors quoting UDP from a port of the range (UDP's ports
		// are not reserved): no answer to a probe
		ip := netip.MustParseAddr(lb.ip)
		udpRefused(t, netip.AddrPortFrom(ip, ports.First), testkit.BoundNotListening(t, lb.ip))
	}
	for _, f := range []*forger{f4, f6} {
		for _, p := range []uint16{base, base + 5} {
			f.sendTCP(t, p, 0, false, 1, flagSYN|flagACK)
			f.sendTCP(t, p, 0, false, 1, flagRST|flagACK)
			f.sendICMP(t, p, 0, 1, map[int]byte{4: 3, 6: 1}[f.family], 1)
		}
		// an echo request (answered by the kernel) whose data looks like
		// a quoted SYN from a port of the range: no error
		f.sendICMP(t, ports.First, 0, 1, map[int]byte{4: 8, 6: 128}[f.family], 0)
	}
	for ino, s := range rawSocks(t, mine) {
		if s.rx != 0 || s.drops != 0 {
			t.Errorf("raw socket %d (IPv%d, protocol %d): %d bytes queued, %d dropped: its filter passed traffic that answers no probe", ino, s.family, s.proto, s.rx, s.drops)
		}
	}
	// One answer to each end of the range, of each kind: each is queued.
	f4.sendTCP(t, ports.First, 0, false, 1, flagSYN|flagACK)
	f6.sendTCP(t, ports.Last, 0, false, 1, flagRST|flagACK)
	f4.sendICMP(t, ports.Last, 0, 1, 3, 1)
	f6.sendICMP(t, ports.First, 0, 1, 1, 3)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		empty := map[[2]int]bool{}
		for _, s := range rawSocks(t, mine) {
			if s.rx == 0 && s.proto != unix.IPPROTO_RAW {
				empty[[2]int{s.family, s.proto}] = true
			}
		}
		if len(empty) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("answers to the ends of the range %v not queued after 5 s on the raw sockets of %v (IPv4 or 6, protocol)", ports, empty)
		}
	}
	release()
	// The engine reads them, finds they answer no probe, and goes on.
	if r := e.Probe(probeCtx(t, 5*time.Second), l6.Addr); r.Outcome != Up {
		t.Fatalf("probe after the flood: %+v", r)
	}
	if s := e.Stats(); s.Up != 2 || s.Total() != 2 {
		t.Fatalf("stats %+v: want the two probes up and nothing else", s)
	}
	if n := (testkit.Listeners{l4, l6}).ProbeAccepts(t); n != 0 {
		t.Fatalf("listeners accepted %d probe connections", n)
	}
}

// loopbackTraffic makes ordinary traffic on ip, each packet of it processed
// (and thus offered to every raw socket) by the time it returns: 4 MB
// through a connection, 100 connections made and closed, 100 refused,
// and 50 UDP datagrams answered with ICMP port unreachable.
func loopbackTraffic(t *testing.T, network, ip string) {
	t.Helper()
	sink, err := net.Listen(network, net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	c, err := net.Dial(network, sink.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(make([]byte, 4<<20)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	if _, err := c.Read(make([]byte, 1)); err != io.EOF { // the sink's FIN: it read it all
		t.Fatalf("bulk transfer: %v, want EOF", err)
	}
	c.Close()
	for range 100 {
		c, err := net.DialTimeout(network, sink.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	closed := testkit.BoundNotListening(t, ip)
	for range 100 {
		if c, err := net.DialTimeout(network, closed.String(), 5*time.Second); err == nil {
			c.Close()
			t.Fatalf("connected to %v, bound and not listening", closed)
		}
	}
	for range 50 {
		udpRefused(t, netip.AddrPortFrom(closed.Addr(), 0), closed) // no UDP socket on that port either
	}
}

// udpRefused sends a UDP datagram from from to to, where nothing listens,
// and waits for the ICMP port unreachable that answers it.
func udpRefused(t *testing.T, from, to netip.AddrPort) {
	t.Helper()
	u, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(from), net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.SetDeadline(time.Now().Add(5 * time.Second))
	u.Write([]byte("x"))
	if _, err := u.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("UDP from %v to %v: %v, want the port unreachable's ECONNREFUSED", from, to, err)
	}
}

// rawCapEnv is set in the child of TestRawWithoutCapability.
const rawCapEnv = "SHAKER_RAWCAP_HELPER"

// TestRawWithoutCapability: in a process without CAP_NET_RAW (the test
// binary run again under setpriv, the capability dropped from its bounding
// and inheritable sets), ModeRaw fails New with an error that matches
// ErrRawUnavailable and says to grant CAP_NET_RAW, and ModeAuto chooses
// connect mode, RawError saying why, and probes.
func TestRawWithoutCapability(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := testkit.WithoutCapCommand(t, ctx, "net_raw", "TestRawCapHelper", rawCapEnv+"=1").CombinedOutput()
	if err != nil {
		t.Fatalf("child under setpriv: %v\n%s", err, out)
	}
	t.Logf("child without CAP_NET_RAW:\n%s", out)
	res := testkit.ResultsByName(string(out))
	want := map[string][]string{
		"socket": {"refused"},
		"raw":    {"failed", "ErrRawUnavailable", "CAP_NET_RAW"},
		"auto":   {"connect", "ErrRawUnavailable", "CAP_NET_RAW", "up"},
	}
	for name, w := range want {
		if got := res[name]; strings.Join(got, " ") != strings.Join(w, " ") {
			t.Errorf("%s: %v, want %v", name, got, w)
		}
	}
}

// TestRawCapHelper is the child of TestRawWithoutCapability. It prints
// RESULT socket refused|opened (a raw socket of its own), RESULT raw
// failed|started [ErrRawUnavailable] [CAP_NET_RAW], and RESULT auto and
// the mode chosen, the same about RawError, and the outcome of a probe.
func TestRawCapHelper(t *testing.T) {
	if os.Getenv(rawCapEnv) == "" {
		t.Skip("only runs as a child of TestRawWithoutCapability")
	}
	says := func(err error) string {
		var s []string
		if errors.Is(err, ErrRawUnavailable) {
			s = append(s, "ErrRawUnavailable")
		}
		if err != nil && strings.Contains(err.Error(), "CAP_NET_RAW") {
			s = append(s, "CAP_NET_RAW")
		}
		return strings.Join(s, " ")
	}
	if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_TCP); err != nil {
		fmt.Printf("RESULT socket refused\n# %v\n", err)
	} else {
		unix.Close(fd)
		fmt.Printf("RESULT socket opened\n")
	}
	if e, err := New(Options{Mode: ModeRaw}); err != nil {
		fmt.Printf("RESULT raw failed %s\n# %v\n", says(err), err)
	} else {
		e.Close()
		fmt.Printf("RESULT raw started\n")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	e, err := New(Options{Mode: ModeAuto})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	r := e.Probe(probeCtx(t, 5*time.Second), ln.Addr().(*net.TCPAddr).AddrPort())
	fmt.Printf("RESULT auto %v %s %v\n# %v\n", e.Mode(), says(e.RawError()), r.Outcome, e.RawError())
}

// TestModeAutoChoosesRaw: where raw sockets open, ModeAuto is raw mode on
// the source ports given, with no RawError, and probes.
func TestModeAutoChoosesRaw(t *testing.T) {
	testkit.NeedRaw(t)
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	opts := modeOptions(t, ModeRaw, Options{}, 8)
	opts.Mode = ModeAuto
	e := newEngine(t, opts)
	checkMode(t, e, ModeRaw)
	if e.SourcePorts() != opts.SourcePorts {
		t.Fatalf("source ports %v, want %v", e.SourcePorts(), opts.SourcePorts)
	}
	if r := e.Probe(probeCtx(t, 5*time.Second), l.Addr); r.Outcome != Up {
		t.Fatalf("probe: %+v", r)
	}
	if n := l.ProbeAccepts(t); n != 0 {
		t.Fatalf("listener accepted %d probe connections", n)
	}
}

// TestRawTooFewPorts: a source port range smaller than the number of loops
// fails New with an error naming the range and the loops, not
// ErrRawUnavailable.
func TestRawTooFewPorts(t *testing.T) {
	testkit.NeedRaw(t)
	first := testkit.FreePorts(t, 3)
	ports := PortRange{first, first + 2}
	_, err := New(Options{Mode: ModeRaw, Loops: 4, SourcePorts: ports})
	if err == nil || !strings.Contains(err.Error(), ports.String()) || !strings.Contains(err.Error(), "4 loops") || errors.Is(err, ErrRawUnavailable) {
		t.Fatalf("New with 4 loops on source ports %v: %v; want an error naming both, not ErrRawUnavailable", ports, err)
	}
}

// TestRawScheduleSourcePorts: a schedule's probe never goes out from the
// port of its previous probe (an answer to that one may still be on its
// way), even when other probes of the loop would hand it that port: two
// schedules on one loop with two source ports, whose turns alternate.
func TestRawScheduleSourcePorts(t *testing.T) {
	testkit.NeedRaw(t)
	first := testkit.FreePorts(t, 2)
	e := newEngine(t, Options{Mode: ModeRaw, Loops: 1, SourcePorts: PortRange{first, first + 1}})
	var fs []*forger
	for i := 0; i < 2; i++ {
		l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
		fs = append(fs, newForger(t, l.Addr))
		s := e.Every(l.Addr, Period{Interval: 20 * time.Millisecond, Timeout: time.Second, First: time.Duration(i) * 10 * time.Millisecond},
			func(Result) time.Duration { return 0 })
		t.Cleanup(s.Stop)
	}
	for i, f := range fs {
		var prev uint16
		for k := 0; k < 6; k++ {
			sport, _ := f.capture(t)
			if sport == prev {
				t.Fatalf("schedule %d: probes %d and %d both from source port %d", i, k-1, k, sport)
			}
			prev = sport
		}
	}
}

// TestICMPErrnos pins what each of the 65,536 ICMP types and codes gives
// a SYN to the kernel's tables (net/ipv4/icmp.c icmp_err_convert,
// net/ipv6/icmp.c tab_unreach): per type that gives any errno, the errno
// of each code in order ("-" for none), runs of one written once with ×n.
// (EOPNOTSUPP is ENOTSUP on Linux, and goes by that name.)
func TestICMPErrnos(t *testing.T) {
	describe := func(tab *icmpErrnos) string {
		var types []string
		for typ := 0; typ < 256; typ++ {
			var runs []string
			name, n, any := "", 0, false
			for code := 0; code <= 256; code++ {
				next := ""
				if code < 256 {
					next = "-"
					if e := tab.errno(uint8(typ), uint8(code)); e != 0 {
						next, any = unix.ErrnoName(e), true
					}
				}
				if next == name {
					n++
					continue
				}
				if n == 1 {
					runs = append(runs, name)
				} else if n > 1 {
					runs = append(runs, fmt.Sprintf("%s×%d", name, n))
				}
				name, n = next, 1
			}
			if any {
				types = append(types, fmt.Sprintf("%d: %s", typ, strings.Join(runs, " ")))
			}
		}
		return strings.Join(types, "; ")
	}
	want4 := "3: ENETUNREACH EHOSTUNREACH ENOPROTOOPT ECONNREFUSED - ENOTSUP ENETUNREACH EHOSTDOWN ENONET ENETUNREACH EHOSTUNREACH ENETUNREACH EHOSTUNREACH×4 -×240; 11: EHOSTUNREACH×256; 12: EPROTO×256"
	want6 := "1: ENETUNREACH EACCES EHOSTUNREACH×2 ECONNREFUSED EACCES×2 -×249; 3: EHOSTUNREACH×256; 4: EPROTO×256"
	if got := describe(&icmp4); got != want4 {
		t.Errorf("ICMP errors give\n%s\nwant\n%s", got, want4)
	}
	if got := describe(&icmp6); got != want6 {
		t.Errorf("ICMPv6 errors give\n%s\nwant\n%s", got, want6)
	}
}
