//go:build linux && !shaker_fallback

package shaker

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Raw mode: the loop sends each probe's SYN itself on a raw socket, from a
// source port of its own part of the engine's reserved range, and reads
// the answers on raw sockets whose kernel filters pass only what can
// answer its probes (SYN-ACKs and RSTs to those ports, ICMP errors quoting
// a SYN from them). No socket of any kind listens on, or is connected
// from, a reserved port: each is held by a socket bound to it and nothing
// else. So the kernel finds no socket for a SYN-ACK and answers it with an
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

// rawShared is what the loops of a raw engine share: the reserved ports
// and the key of the sequence numbers.
type rawShared struct {
	ports   PortRange
	reserve []int // one socket bound to each port, never listening
	key     [4]uint32
}

// newRawShared checks that raw sockets can be opened and reserves the
// source ports of an engine of n loops.
func newRawShared(ports PortRange, n int) (*rawShared, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, &rawError{"socket(AF_INET, SOCK_RAW, IPPROTO_TCP)", err, rawNeeds}
	}
	unix.Close(fd)
	if ports == (PortRange{}) {
		if ports, err = DefaultPortRange(); err != nil {
			return nil, err
		}
	}
	if ports.Size() < n {
		return nil, fmt.Errorf("shaker: source ports %v: %d ports for %d loops; each loop needs one at least", ports, ports.Size(), n)
	}
	r := &rawShared{ports: ports}
	var kb [16]byte
	if _, err := rand.Read(kb[:]); err != nil {
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

// close releases the reserved ports. Nil-safe.
func (r *rawShared) close() {
	if r == nil {
		return
	}
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

	tcp4, tcp6, icmp4, icmp6 int // -1 when not open (no IPv6 here)
	udp4                     int // connected to a destination to learn the source address

	syn [synLen]byte

	msgs  [rawBatch]unix.Mmsghdr
	iovs  [rawBatch]unix.Iovec
	bufs  [rawBatch][rawBufSize]byte
	ctrl  [rawBatch][rawCtrlSize]byte
	names [rawBatch]unix.RawSockaddrInet6
}

// openRaw opens loop i of n's raw sockets and takes its part of the
// reserved ports.
func (l *loop) openRaw(shared *rawShared, i, n int) error {
	size := shared.ports.Size()
	lo, hi := size*i/n, size*(i+1)/n
	r := &rawLoop{
		shared: shared,
		first:  shared.ports.First + uint16(lo),
		count:  hi - lo,
		tcp4:   -1, tcp6: -1, icmp4: -1, icmp6: -1, udp4: -1,
	}
	l.raw = r
	// The sequence number keeps the slot index in its low bits and as
	// much of the slot's generation as fits above.
	r.idxBits = 1
	for 1<<r.idxBits < l.budget {
		r.idxBits++
	}
	if r.idxBits > 24 {
		return fmt.Errorf("shaker: raw mode: %d probes in flight per loop, more than %d", l.budget, 1<<24)
	}
	last := r.first + uint16(r.count) - 1
	var err error
	if r.tcp4, err = rawSocket(unix.AF_INET, unix.IPPROTO_TCP, tcpFilter(4, r.first, last)); err != nil {
		return err
	}
	if r.icmp4, err = rawSocket(unix.AF_INET, unix.IPPROTO_ICMP, icmp4Filter(r.first, last)); err != nil {
		return err
	}
	if r.tcp6, err = rawSocket(unix.AF_INET6, unix.IPPROTO_TCP, tcpFilter(6, r.first, last)); err == nil {
		// The kernel fills in the checksum of what this socket sends,
		// from the source address it picks.
		if err = unix.SetsockoptInt(r.tcp6, unix.IPPROTO_IPV6, unix.IPV6_CHECKSUM, 16); err != nil {
			return &rawError{"setsockopt IPV6_CHECKSUM", err, ""}
		}
		if r.icmp6, err = rawSocket(unix.AF_INET6, unix.IPPROTO_ICMPV6, icmp6Filter(r.first, last)); err != nil {
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
	} else if !errors.Is(err, unix.EAFNOSUPPORT) {
		return err
	}
	if r.udp4, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0); err != nil {
		return &rawError{"socket(AF_INET, SOCK_DGRAM)", err, ""}
	}
	for _, s := range []struct {
		fd  int
		idx int32
	}{{r.tcp4, rawIndexTCP4}, {r.tcp6, rawIndexTCP6}, {r.icmp4, rawIndexICMP4}, {r.icmp6, rawIndexICMP6}} {
		if s.fd < 0 {
			continue
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: s.idx}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
			return &opError{"epoll_ctl", errnoOf(err)}
		}
	}
	for i := range r.msgs {
		r.iovs[i] = unix.Iovec{Base: &r.bufs[i][0]}
		r.iovs[i].SetLen(rawBufSize)
		h := &r.msgs[i].Hdr
		h.Iov = &r.iovs[i]
		h.Iovlen = 1
	}
	return nil
}

// closeRaw closes the loop's raw sockets.
func (r *rawLoop) close() {
	for _, fd := range []int{r.tcp4, r.tcp6, r.icmp4, r.icmp6, r.udp4} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.tcp4, r.tcp6, r.icmp4, r.icmp6, r.udp4 = -1, -1, -1, -1, -1
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

// startRaw sends the SYN of a probe whose address is valid (sa is its
// sockaddr, IPv4 or IPv6).
func (l *loop) startRaw(req *request, res Result, family int, sa unsafe.Pointer, salen uintptr) {
	r := l.raw
	var src [4]byte
	if family == unix.AF_INET {
		var ok bool
		if src, ok = l.sourceOf(req, sa, salen); !ok {
			res.Err = classify("connect", l.srcErrno)
			l.finish(req.done, req.sched, res)
			return
		}
	}
	port := r.first + uint16(r.next)
	if s := req.sched; s != nil && s.rawPort == port && r.count > 1 {
		// Never the port of this address's previous probe: an answer
		// to it may still be on its way, or its backend's half-made
		// connection still alive.
		r.next = (r.next + 1) % r.count
		port = r.first + uint16(r.next)
	}
	r.next = (r.next + 1) % r.count
	if s := req.sched; s != nil {
		s.rawPort = port
	}
	start := l.e.now()
	deadline := start + int64(req.timeout)
	if req.deadline != 0 && req.deadline < deadline {
		deadline = req.deadline
	}
	idx := l.alloc(rawFD, req, start, deadline)
	s := &l.slots[idx]
	s.sport = port
	s.src4 = src
	s.scope = req.scope
	s.end = deadline
	s.rto = synRTO
	if start+synRTO < deadline {
		s.deadline = start + synRTO // the first retransmission, then the deadline
		l.heapFix(s.heapIdx)
	}
	if errno := l.sendSYN(idx); errno != 0 {
		res.Err = classify("connect", errno)
		res.Duration = time.Duration(l.e.now() - start)
		l.release(idx)
		l.finish(req.done, req.sched, res)
	}
}

// sourceOf is the source address of an IPv4 probe: the schedule's, or
// looked up (a UDP socket connected to the destination names it).
func (l *loop) sourceOf(req *request, sa unsafe.Pointer, salen uintptr) ([4]byte, bool) {
	s := req.sched
	now := l.e.now()
	if s != nil && s.srcAt != 0 && now-s.srcAt < srcTTL {
		return s.src4, true
	}
	r := l.raw
	if errno := rawConnect(r.udp4, sa, salen); errno != 0 {
		l.srcErrno = errno
		return [4]byte{}, false
	}
	var name unix.RawSockaddrInet4
	size := uint32(unsafe.Sizeof(name))
	_, _, errno := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(r.udp4), uintptr(unsafe.Pointer(&name)), uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		l.srcErrno = errno
		return [4]byte{}, false
	}
	if s != nil {
		s.src4, s.srcAt = name.Addr, now
	}
	return name.Addr, true
}

// sendSYN sends (or sends again) the SYN of raw slot idx.
func (l *loop) sendSYN(idx int32) syscall.Errno {
	r := l.raw
	s := &l.slots[idx]
	seq := r.shared.seal(uint32(idx) | uint32(s.gen)<<r.idxBits)
	b := r.syn[:]
	binary.BigEndian.PutUint16(b[0:], s.sport)
	binary.BigEndian.PutUint16(b[2:], s.addr.Port())
	binary.BigEndian.PutUint32(b[4:], seq)
	binary.BigEndian.PutUint32(b[8:], 0)
	b[12] = (synLen / 4) << 4
	b[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(b[14:], 65535)
	b[16], b[17] = 0, 0 // checksum
	b[18], b[19] = 0, 0
	b[20], b[21] = 2, 4 // MSS
	ip := s.addr.Addr()
	var (
		fd    int
		sa4   unix.RawSockaddrInet4
		sa6   unix.RawSockaddrInet6
		sa    unsafe.Pointer
		salen uintptr
	)
	if ip.Is4() || ip.Is4In6() {
		binary.BigEndian.PutUint16(b[22:], 1460)
		dst := ip.Unmap().As4()
		binary.BigEndian.PutUint16(b[16:], tcpChecksum4(s.src4, dst, b))
		sa4.Family = unix.AF_INET
		sa4.Addr = dst
		fd, sa, salen = r.tcp4, unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	} else {
		if r.tcp6 < 0 {
			return unix.EAFNOSUPPORT
		}
		binary.BigEndian.PutUint16(b[22:], 1440)
		sa6.Family = unix.AF_INET6
		sa6.Addr = ip.As16()
		sa6.Scope_id = s.scope
		fd, sa, salen = r.tcp6, unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	s.sentWall = time.Now().UnixNano()
	_, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), synLen,
		unix.MSG_DONTWAIT, uintptr(sa), salen)
	return errno
}

// tcpChecksum4 is the checksum of an IPv4 TCP segment from src to dst.
func tcpChecksum4(src, dst [4]byte, seg []byte) uint16 {
	var sum uint32
	sum += uint32(src[0])<<8 | uint32(src[1])
	sum += uint32(src[2])<<8 | uint32(src[3])
	sum += uint32(dst[0])<<8 | uint32(dst[1])
	sum += uint32(dst[2])<<8 | uint32(dst[3])
	sum += unix.IPPROTO_TCP
	sum += uint32(len(seg))
	for i := 0; i+1 < len(seg); i += 2 {
		sum += uint32(seg[i])<<8 | uint32(seg[i+1])
	}
	if len(seg)%2 == 1 {
		sum += uint32(seg[len(seg)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// expireRaw handles a raw probe whose heap time has come: the SYN goes
// out again while the probe's own deadline is ahead, as connect()'s
// would, and the probe times out at its deadline.
func (l *loop) expireRaw(idx int32, now int64) {
	s := &l.slots[idx]
	if now < s.end {
		s.rto *= 2
		s.deadline = min(now+s.rto, s.end)
		l.heapFix(s.heapIdx)
		l.sendSYN(idx) // a failure here is a lost SYN: the deadline stands
		return
	}
	res := Result{Addr: s.addr, Err: ErrTimeout, Duration: time.Duration(now - s.start)}
	l.finish(s.done, s.sched, res)
	l.release(idx)
}

// readRaw reads the answers waiting on one of the loop's raw sockets and
// ends the probes they answer.
func (l *loop) readRaw(which int32) {
	r := l.raw
	var fd int
	switch which {
	case rawIndexTCP4:
		fd = r.tcp4
	case rawIndexTCP6:
		fd = r.tcp6
	case rawIndexICMP4:
		fd = r.icmp4
	default:
		fd = r.icmp6
	}
	for b := 0; b < rawBatches; b++ {
		for i := range r.msgs {
			h := &r.msgs[i].Hdr
			h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
			h.Namelen = uint32(unsafe.Sizeof(r.names[i]))
			h.Control = &r.ctrl[i][0]
			h.SetControllen(rawCtrlSize)
			h.Flags = 0
		}
		n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&r.msgs[0])), rawBatch,
			unix.MSG_DONTWAIT, 0, 0)
		if errno != 0 || n == 0 {
			return
		}
		for i := 0; i < int(n); i++ {
			l.answer(which, i)
		}
		if int(n) < rawBatch {
			return
		}
	}
}

// answer handles packet i of the last batch read from socket which.
func (l *loop) answer(which int32, i int) {
	r := l.raw
	pkt := r.bufs[i][:min(int(r.msgs[i].Len), rawBufSize)]
	var (
		peer      netip.Addr
		tcp       []byte // the TCP header of the answer, or the quoted one
		quoted    bool
		icmpErrno syscall.Errno
	)
	switch which {
	case rawIndexTCP4, rawIndexICMP4:
		if len(pkt) < 20 {
			return
		}
		ihl := int(pkt[0]&0x0f) * 4
		if which == rawIndexTCP4 {
			if len(pkt) < ihl+14 {
				return
			}
			peer = netip.AddrFrom4([4]byte(pkt[12:16]))
			tcp = pkt[ihl:]
			break
		}
		// ICMP: type, code, checksum, 4 bytes; then the quoted IP header
		if len(pkt) < ihl+8+20 {
			return
		}
		icmp := pkt[ihl:]
		q := icmp[8:]
		qihl := int(q[0]&0x0f) * 4
		if len(q) < qihl+8 {
			return
		}
		peer = netip.AddrFrom4([4]byte(q[16:20]))
		tcp, quoted = q[qihl:], true
		icmpErrno = icmp4Errno(icmp[0], icmp[1])
	case rawIndexTCP6:
		if len(pkt) < 14 {
			return
		}
		peer = netip.AddrFrom16(r.names[i].Addr)
		tcp = pkt
	case rawIndexICMP6:
		if len(pkt) < 8+40+8 {
			return
		}
		peer = netip.AddrFrom16([16]byte(pkt[8+24 : 8+40]))
		tcp, quoted = pkt[8+40:], true
		icmpErrno = icmp6Errno(pkt[0], pkt[1])
	}
	var ours, theirs uint16
	var seq uint32
	if quoted {
		// The quoted SYN: from our port, to theirs, with our sequence number.
		ours, theirs = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
		seq = binary.BigEndian.Uint32(tcp[4:])
		if icmpErrno == 0 {
			return // not an error for a SYN (a fragmentation-needed, say)
		}
	} else {
		theirs, ours = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
		if tcp[13]&0x10 == 0 {
			return // no ACK: it answers nothing of ours
		}
		seq = binary.BigEndian.Uint32(tcp[8:]) - 1
	}
	v := r.shared.open(seq)
	idx := int32(v & (1<<r.idxBits - 1))
	if int(idx) >= len(l.slots) {
		return
	}
	s := &l.slots[idx]
	if s.fd != rawFD || uint32(s.gen)&(1<<(32-r.idxBits)-1) != v>>r.idxBits || s.sport != ours ||
		s.addr.Port() != theirs || s.addr.Addr().Unmap() != peer.Unmap() {
		return // stale, forged, or another engine's
	}
	now := l.e.now()
	res := Result{Addr: s.addr, Duration: time.Duration(now - s.start)}
	switch {
	case quoted:
		res.Err = classify("connect", icmpErrno)
	case tcp[13]&0x04 != 0:
		res.Err = ErrRefused
	default:
		l.epollUp.Add(1)
		if rx := rxTime(&r.msgs[i].Hdr); rx != 0 && rx > s.sentWall {
			res.RTT = time.Duration(rx - s.sentWall)
		} else {
			res.RTT = res.Duration
		}
	}
	l.finish(s.done, s.sched, res)
	l.release(idx)
}

// rxTime is the kernel's receive time of a packet (SCM_TIMESTAMPNS), in
// Unix ns, or 0.
func rxTime(h *unix.Msghdr) int64 {
	if h.Controllen < unix.SizeofCmsghdr+16 {
		return 0
	}
	c := (*unix.Cmsghdr)(unsafe.Pointer(h.Control))
	if c.Level != unix.SOL_SOCKET || c.Type != unix.SCM_TIMESTAMPNS {
		return 0
	}
	ts := (*unix.Timespec)(unsafe.Pointer(uintptr(unsafe.Pointer(h.Control)) + unix.SizeofCmsghdr))
	return ts.Nano()
}

// icmp4Errno is the errno a connect() in SYN-SENT gets from an ICMP error
// (the kernel's icmp_err_convert), or 0 for one it ignores.
func icmp4Errno(typ, code uint8) syscall.Errno {
	switch typ {
	case 3: // destination unreachable
		switch code {
		case 0, 6, 9, 11:
			return unix.ENETUNREACH
		case 2:
			return unix.ENOPROTOOPT
		case 3:
			return unix.ECONNREFUSED
		case 4:
			return 0 // fragmentation needed: path MTU, not an answer
		case 5:
			return unix.EOPNOTSUPP
		case 7:
			return unix.EHOSTDOWN
		case 8:
			return unix.ENONET
		}
		if code <= 15 {
			return unix.EHOSTUNREACH
		}
		return 0
	case 11: // time exceeded
		return unix.EHOSTUNREACH
	case 12: // parameter problem
		return unix.EPROTO
	}
	return 0
}

// icmp6Errno is the errno of an ICMPv6 error (icmpv6_err_convert), or 0.
func icmp6Errno(typ, code uint8) syscall.Errno {
	switch typ {
	case 1: // destination unreachable
		switch code {
		case 0:
			return unix.ENETUNREACH
		case 1, 5, 6:
			return unix.EACCES
		case 2, 3:
			return unix.EHOSTUNREACH
		case 4:
			return unix.ECONNREFUSED
		}
		return 0
	case 3: // time exceeded
		return unix.EHOSTUNREACH
	case 4: // parameter problem
		return unix.EPROTO
	}
	return 0
}
