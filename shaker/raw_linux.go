//go:build linux && !shaker_fallback

package shaker

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Raw mode: a loop sends each probe's SYN itself on a raw socket, from a
// source port of its own part of the engine's reserved range. The answers
// are read on the engine's raw sockets, one per protocol and family, whose
// kernel filters pass only what can answer a probe (SYN-ACKs and RSTs to
// those ports, ICMP errors quoting a SYN from them). The kernel copies
// every TCP packet of the host to each raw TCP socket before its filter
// runs, so there is one of each per engine, not per loop: the first loop
// reads them and hands each answer to the loop of its port. No socket of
// any kind listens on, or is connected from, a reserved port: each is held
// by a socket bound to it and nothing else. So the kernel finds no socket for a SYN-ACK and answers it with an
// RST itself, in softirq, whatever the loop is doing. A probe has no file
// descriptor (its slot's fd is rawFD); it is found again from its answer's
// acknowledgement number, which is its sequence number plus one: the
// sequence number encodes the slot, under a key of the engine's, so that
// a stale answer (an earlier probe of the slot) or a forged one does not
// decode to the probe in flight.

const (
	// rawFD is the fd of a slot whose probe is a raw SYN.
	rawFD = -2

	// Epoll user data of a loop's raw sockets.
	rawIndexTCP4  = -2
	rawIndexTCP6  = -3
	rawIndexICMP4 = -4
	rawIndexICMP6 = -5

	// rawBatch is how many packets one recvmmsg reads.
	rawBatch = 64
	// rawBatches bounds the recvmmsg calls of one look at a socket, so
	// that a flood of answers cannot hold the loop; epoll is level
	// triggered, so what is left is read at the next look.
	rawBatches = 8
	// rawBufSize is how much of a packet is kept: the IPv4 header with
	// options, an ICMP header and the quoted IP and TCP headers fit.
	rawBufSize = 128
	// rawCtrlSize holds one SCM_TIMESTAMPNS control message.
	rawCtrlSize = 64
	// rawRcvBuf is the receive buffer asked for each raw socket, so that
	// a burst of answers is not dropped before the loop reads it.
	rawRcvBuf = 8 << 20
	// synRTO is the first retransmission timeout of a SYN, the kernel's
	// (TCP_TIMEOUT_INIT): a probe whose timeout is longer sends its SYN
	// again at 1 s, then 3 s, 7 s..., as connect() would.
	synRTO = int64(time.Second)
	// srcTTL is how long a schedule keeps the source address it looked
	// up for its IPv4 destination (the pseudo-header of the checksum
	// needs it) while its probes are answered.
	srcTTL = int64(10 * time.Second)
	// synLen is the length of the TCP header of a SYN: 20 bytes and an
	// MSS option.
	synLen = 24
)

// rawShared is what the loops of a raw engine share: the reserved ports,
// the key of the sequence numbers and the raw sockets. The first loop
// reads them; every loop sends its IPv6 SYNs on tcp6 (a sendto from
// several threads is safe), its IPv4 ones on a socket of its own.
type rawShared struct {
	ports   PortRange
	reserve []int // one socket bound to each port, never listening
	key     [4]uint32
	loops   int

	tcp4, tcp6, icmp4, icmp6 int // -1 when not open (no IPv6 here)
}

// newRawShared opens the raw sockets and reserves the source ports of an
// engine of n loops.
func newRawShared(ports PortRange, n int) (*rawShared, error) {
	r := &rawShared{loops: n, tcp4: -1, tcp6: -1, icmp4: -1, icmp6: -1}
	var err error
	if ports == (PortRange{}) {
		if ports, err = DefaultPortRange(); err != nil {
			return nil, err
		}
	}
	if ports.Size() < n {
		return nil, fmt.Errorf("shaker: source ports %v: %d ports for %d loops; each loop needs one at least", ports, ports.Size(), n)
	}
	r.ports = ports
	if err := r.openSockets(); err != nil {
		r.close()
		return nil, err
	}
	var kb [16]byte
	if _, err := rand.Read(kb[:]); err != nil {
		r.close()
		return nil, fmt.Errorf("shaker: raw mode's sequence key: %v", err)
	}
	for i := range r.key {
		r.key[i] = binary.LittleEndian.Uint32(kb[4*i:])
	}
	for p := int(ports.First); p <= int(ports.Last); p++ {
		fd, err := reservePort(uint16(p))
		if err != nil {
			r.close()
			return nil, err
		}
		r.reserve = append(r.reserve, fd)
	}
	return r, nil
}

// openSockets opens the raw sockets, their filters passing answers to any
// of the reserved ports.
func (r *rawShared) openSockets() error {
	first, last := r.ports.First, r.ports.Last
	var err error
	if r.tcp4, err = rawSocket(unix.AF_INET, unix.IPPROTO_TCP, tcpFilter(4, first, last)); err != nil {
		return err
	}
	if r.icmp4, err = rawSocket(unix.AF_INET, unix.IPPROTO_ICMP, icmp4Filter(first, last)); err != nil {
		return err
	}
	r.tcp6, err = rawSocket(unix.AF_INET6, unix.IPPROTO_TCP, tcpFilter(6, first, last))
	if errors.Is(err, unix.EAFNOSUPPORT) {
		return nil // no IPv6 here: IPv6 probes fail with EAFNOSUPPORT
	}
	if err != nil {
		return err
	}
	// The kernel fills in the checksum of what this socket sends, from
	// the source address it picks.
	if err = unix.SetsockoptInt(r.tcp6, unix.IPPROTO_IPV6, unix.IPV6_CHECKSUM, 16); err != nil {
		return &rawError{"setsockopt IPV6_CHECKSUM", err, ""}
	}
	if r.icmp6, err = rawSocket(unix.AF_INET6, unix.IPPROTO_ICMPV6, icmp6Filter(first, last)); err != nil {
		return err
	}
	var f unix.ICMPv6Filter
	for i := range f.Data {
		f.Data[i] = 0xffffffff // block all...
	}
	for _, t := range []int{1, 3, 4} { // ...but destination unreachable, time exceeded, parameter problem
		f.Data[t>>5] &^= 1 << (uint(t) & 31)
	}
	if err = unix.SetsockoptICMPv6Filter(r.icmp6, unix.SOL_ICMPV6, unix.ICMPV6_FILTER, &f); err != nil {
		return &rawError{"setsockopt ICMPV6_FILTER", err, ""}
	}
	return nil
}

// perLoop is how many of the reserved ports each loop sends from; the
// last loop also takes what is left over.
func (r *rawShared) perLoop() int { return r.ports.Size() / r.loops }

// portsOf is loop i's part of the reserved ports: first, and how many.
func (r *rawShared) portsOf(i int) (first uint16, count int) {
	per := r.perLoop()
	count = per
	if i == r.loops-1 {
		count = r.ports.Size() - i*per
	}
	return r.ports.First + uint16(i*per), count
}

// loopOf is the index of the loop that sends from port, or -1.
func (r *rawShared) loopOf(port uint16) int {
	if port < r.ports.First || port > r.ports.Last {
		return -1
	}
	return min(int(port-r.ports.First)/r.perLoop(), r.loops-1)
}

// reservePort binds a socket to port, for IPv6 and IPv4 when the host has
// IPv6, and never listens on it: other sockets cannot take the port, and
// it receives nothing. SO_REUSEPORT lets the next engine of this process
// (a reload) reserve the same ports while this one still runs; the two
// tell their answers apart by their keys.
func reservePort(port uint16) (int, error) {
	one := 1
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err == nil {
		if err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err == nil {
			if err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, one); err == nil {
				err = unix.Bind(fd, &unix.SockaddrInet6{Port: int(port)})
			}
		}
		if err == nil {
			return fd, nil
		}
		unix.Close(fd)
		if !errors.Is(err, unix.EAFNOSUPPORT) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return -1, portError(port, err)
		}
	}
	// No IPv6 here: IPv4 alone.
	fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, portError(port, err)
	}
	if err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, one); err == nil {
		err = unix.Bind(fd, &unix.SockaddrInet4{Port: int(port)})
	}
	if err != nil {
		unix.Close(fd)
		return -1, portError(port, err)
	}
	return fd, nil
}

func portError(port uint16, err error) error {
	if errors.Is(err, unix.EADDRINUSE) {
		return fmt.Errorf("shaker: reserving source port %d: %v: another socket holds it; pick source ports that nothing uses", port, err)
	}
	return fmt.Errorf("shaker: reserving source port %d: %v", port, err)
}

// close closes the raw sockets and releases the reserved ports. Nil-safe.
func (r *rawShared) close() {
	if r == nil {
		return
	}
	for _, fd := range []int{r.tcp4, r.tcp6, r.icmp4, r.icmp6} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.tcp4, r.tcp6, r.icmp4, r.icmp6 = -1, -1, -1, -1
	for _, fd := range r.reserve {
		unix.Close(fd)
	}
	r.reserve = nil
}

// A probe's sequence number is its slot index and generation, permuted
// under the engine's key by a four-round Feistel network over 16-bit
// halves: a bijection of 32-bit numbers, so that every slot and generation
// has one sequence number and a guessed acknowledgement matches a probe in
// flight one time in 2^32.

func feistel(k uint32, x uint16) uint16 {
	h := (uint32(x) ^ k) * 0x9E3779B1
	h ^= h >> 15
	h *= 0x85EBCA77
	h ^= h >> 13
	return uint16(h)
}

func (r *rawShared) seal(v uint32) uint32 {
	a, b := uint16(v>>16), uint16(v)
	for _, k := range r.key {
		a, b = b, a^feistel(k, b)
	}
	return uint32(a)<<16 | uint32(b)
}

func (r *rawShared) open(v uint32) uint32 {
	a, b := uint16(v>>16), uint16(v)
	for i := len(r.key) - 1; i >= 0; i-- {
		a, b = b^feistel(r.key[i], a), a
	}
	return uint32(a)<<16 | uint32(b)
}

// rawLoop is a loop's raw-mode state, owned by the loop goroutine.
type rawLoop struct {
	shared  *rawShared
	first   uint16 // this loop's ports: first to first+count-1
	count   int
	next    int  // the port of the next probe: first+next
	idxBits uint // bits of a sequence number that hold the slot index
	udp4    int  // connected to a destination to learn the source address
	// send4 sends this loop's IPv4 SYNs, IP header included
	// (IPPROTO_RAW): a socket of its own, so that the loops do not
	// wait for each other on the lock of a shared one (raw_sendmsg
	// holds it through the whole exchange on loopback), and one that
	// receives nothing, so that the kernel does not copy every TCP
	// packet of the host to it. IPv6 SYNs go out on the engine's
	// IPv6 socket, whose checksum the kernel fills in.
	send4 int

	syn6 [synLen]byte      // an IPv6 SYN's TCP header
	pkt4 [20 + synLen]byte // an IPv4 SYN, IP header included
	srcs [srcCacheSize]srcEntry

	// The first loop's: it reads the engine's raw sockets.
	recv *rawReceiver
}

// rawReceiver is the first loop's buffers for reading answers, and the
// answers it has for each other loop.
type rawReceiver struct {
	msgs   [rawBatch]unix.Mmsghdr
	iovs   [rawBatch]unix.Iovec
	bufs   [rawBatch][rawBufSize]byte
	ctrl   [rawBatch][rawCtrlSize]byte
	names  [rawBatch]unix.RawSockaddrInet6
	outbox [][]rawAnswer // by loop index
}

// openRaw sets loop i of n up for raw mode: its part of the reserved
// ports and, for the first loop, the engine's raw sockets in its epoll.
func (l *loop) openRaw(shared *rawShared, i, n int) error {
	first, count := shared.portsOf(i)
	r := &rawLoop{shared: shared, first: first, count: count, udp4: -1, send4: -1}
	l.raw = r
	// The first loop hands a look's answers (at most rawBatch*rawBatches)
	// to each other loop's inbox; room for a few looks before that loop
	// drains it, so that the inbox does not grow on the first loop.
	l.inbox = make([]rawAnswer, 0, 4*rawBatch*rawBatches)
	l.inboxBuf = make([]rawAnswer, 0, 4*rawBatch*rawBatches)
	// The sequence number keeps the slot index in its low bits and as
	// much of the slot's generation as fits above.
	r.idxBits = 1
	for 1<<r.idxBits < l.budget {
		r.idxBits++
	}
	if r.idxBits > 24 {
		return fmt.Errorf("shaker: raw mode: %d probes in flight per loop, more than %d", l.budget, 1<<24)
	}
	var err error
	if r.udp4, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0); err != nil {
		return &rawError{"socket(AF_INET, SOCK_DGRAM)", err, ""}
	}
	if r.send4, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.IPPROTO_RAW); err != nil {
		return &rawError{"socket(AF_INET, SOCK_RAW, IPPROTO_RAW)", err, rawNeeds}
	}
	if l.parked == nil {
		if err := l.newParker(); err != nil {
			return err
		}
	}
	if i != 0 {
		return nil
	}
	rc := &rawReceiver{outbox: make([][]rawAnswer, n)}
	for t := range rc.outbox {
		// at most what one readRaw reads: it never grows on the loop
		rc.outbox[t] = make([]rawAnswer, 0, rawBatch*rawBatches)
	}
	r.recv = rc
	for i := range rc.msgs {
		rc.iovs[i] = unix.Iovec{Base: &rc.bufs[i][0]}
		rc.iovs[i].SetLen(rawBufSize)
		h := &rc.msgs[i].Hdr
		h.Iov = &rc.iovs[i]
		h.Iovlen = 1
	}
	for _, s := range []struct {
		fd  int
		idx int32
	}{{shared.tcp4, rawIndexTCP4}, {shared.tcp6, rawIndexTCP6}, {shared.icmp4, rawIndexICMP4}, {shared.icmp6, rawIndexICMP6}} {
		if s.fd < 0 {
			continue
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: s.idx}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
			return &opError{"epoll_ctl", errnoOf(err)}
		}
	}
	return nil
}

// close closes the loop's own sockets (the receiving ones are the
// engine's).
func (r *rawLoop) close() {
	for _, fd := range []int{r.udp4, r.send4} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.udp4, r.send4 = -1, -1
}

// rawSocket opens a non-blocking raw socket of the protocol with a
// receive filter, a large receive buffer and receive timestamps.
func rawSocket(family, proto int, filter []unix.SockFilter) (int, error) {
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
	if err != nil {
		if errors.Is(err, unix.EAFNOSUPPORT) {
			return -1, err
		}
		return -1, &rawError{fmt.Sprintf("socket(%s, SOCK_RAW, %s)", familyName(family), protoName(proto)), err, rawNeeds}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog); err != nil {
		unix.Close(fd)
		return -1, &rawError{"setsockopt SO_ATTACH_FILTER", err, ""}
	}
	// A larger buffer than the default (forced: root may pass rmem_max;
	// otherwise the kernel caps what is asked).
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rawRcvBuf) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rawRcvBuf)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		unix.Close(fd)
		return -1, &rawError{"setsockopt SO_TIMESTAMPNS", err, ""}
	}
	// Drain what arrived before the filter was attached: it may be any
	// TCP packet of the host.
	var b [rawBufSize]byte
	for {
		if _, _, err := unix.Recvfrom(fd, b[:], unix.MSG_DONTWAIT); err != nil {
			break
		}
	}
	return fd, nil
}

func familyName(f int) string {
	if f == unix.AF_INET6 {
		return "AF_INET6"
	}
	return "AF_INET"
}

func protoName(p int) string {
	switch p {
	case unix.IPPROTO_ICMP:
		return "IPPROTO_ICMP"
	case unix.IPPROTO_ICMPV6:
		return "IPPROTO_ICMPV6"
	}
	return "IPPROTO_TCP"
}

// Classic BPF, as the kernel runs it on each packet before it is queued.
func bpfStmt(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }
func bpfJump(code uint16, k uint32, jt, jf uint8) unix.SockFilter {
	return unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k}
}

const (
	bpfLdxMsh = unix.BPF_LDX | unix.BPF_B | unix.BPF_MSH
	bpfLdbInd = unix.BPF_LD | unix.BPF_B | unix.BPF_IND
	bpfLdhInd = unix.BPF_LD | unix.BPF_H | unix.BPF_IND
	bpfLdbAbs = unix.BPF_LD | unix.BPF_B | unix.BPF_ABS
	bpfJeq    = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
	bpfJge    = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
	bpfJgt    = unix.BPF_JMP | unix.BPF_JGT | unix.BPF_K
	bpfJset   = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
	bpfRet    = unix.BPF_RET | unix.BPF_K
)

// tcpFilter passes the TCP segments to ports first-last that carry a
// SYN-ACK or an RST. On an IPv4 raw socket a packet starts with its IP
// header; on an IPv6 one, with the TCP header.
func tcpFilter(ipv int, first, last uint16) []unix.SockFilter {
	var f []unix.SockFilter
	if ipv == 4 {
		f = append(f, bpfStmt(bpfLdxMsh, 0)) // X = IPv4 header length
	} else {
		f = append(f, bpfStmt(unix.BPF_LDX|unix.BPF_IMM, 0)) // X = 0
	}
	return append(f,
		bpfStmt(bpfLdhInd, 2),                // destination port
		bpfJump(bpfJge, uint32(first), 0, 5), // below: reject
		bpfJump(bpfJgt, uint32(last), 4, 0),  // above: reject
		bpfStmt(bpfLdbInd, 13),               // flags
		bpfJump(bpfJset, 0x04, 3, 0),         // RST: accept
		bpfJump(bpfJset, 0x10, 0, 1),         // no ACK: reject (a SYN-ACK has SYN and ACK...)
		bpfJump(bpfJset, 0x02, 1, 0),         // ...accept
		bpfStmt(bpfRet, 0),                   // reject
		bpfStmt(bpfRet, rawBufSize),          // accept
	)
}

// icmp4Filter passes the ICMP errors (destination unreachable, time
// exceeded, parameter problem) that quote a TCP segment from ports
// first-last. A packet starts with its IP header.
func icmp4Filter(first, last uint16) []unix.SockFilter {
	return []unix.SockFilter{
		bpfStmt(bpfLdxMsh, 0),      // X = IPv4 header length
		bpfStmt(bpfLdbInd, 0),      // ICMP type
		bpfJump(bpfJeq, 3, 2, 0),   // destination unreachable
		bpfJump(bpfJeq, 11, 1, 0),  // time exceeded
		bpfJump(bpfJeq, 12, 0, 10), // parameter problem; else reject
		bpfStmt(bpfLdbInd, 8+9),    // quoted protocol
		bpfJump(bpfJeq, unix.IPPROTO_TCP, 0, 8),
		bpfStmt(bpfLdbInd, 8), // quoted version and header length
		bpfStmt(unix.BPF_ALU|unix.BPF_AND|unix.BPF_K, 0x0f),
		bpfStmt(unix.BPF_ALU|unix.BPF_LSH|unix.BPF_K, 2),
		bpfStmt(unix.BPF_ALU|unix.BPF_ADD|unix.BPF_X, 0),
		bpfStmt(unix.BPF_MISC|unix.BPF_TAX, 0), // X = outer + quoted header lengths
		bpfStmt(bpfLdhInd, 8),                  // quoted source port
		bpfJump(bpfJge, uint32(first), 0, 1),
		bpfJump(bpfJgt, uint32(last), 0, 1),
		bpfStmt(bpfRet, 0),
		bpfStmt(bpfRet, rawBufSize),
	}
}

// icmp6Filter passes the ICMPv6 errors that quote a TCP segment from ports
// first-last right after the quoted IPv6 header. A packet starts with its
// ICMPv6 header; ICMPV6_FILTER has passed only error types.
func icmp6Filter(first, last uint16) []unix.SockFilter {
	return []unix.SockFilter{
		bpfStmt(bpfLdbAbs, 8+6), // quoted next header
		bpfJump(bpfJeq, unix.IPPROTO_TCP, 0, 4),
		bpfStmt(unix.BPF_LD|unix.BPF_H|unix.BPF_ABS, 8+40), // quoted source port
		bpfJump(bpfJge, uint32(first), 0, 2),
		bpfJump(bpfJgt, uint32(last), 1, 0),
		bpfStmt(bpfRet, rawBufSize),
		bpfStmt(bpfRet, 0),
	}
}
