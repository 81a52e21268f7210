//go:build linux && !shaker_fallback

package shaker

import (
	"encoding/binary"
	"net/netip"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A raw probe's life: startRaw sends its SYN (sendSYN), expireRaw sends it
// again or times it out, and its answer, read by the first loop (readRaw,
// parse), reaches the probe's loop (takeAnswers) and ends it (match).

// startRaw sends the SYN of a probe whose address is valid (sa is its
// sockaddr, IPv4 or IPv6).
func (l *loop) startRaw(req *request, res Result, family int, sa unsafe.Pointer, salen uintptr) {
	r := l.raw
	var src [4]byte
	if family == unix.AF_INET {
		var errno syscall.Errno
		if src, errno = l.sourceOf(req, sa, salen); errno != 0 {
			res.Err = classify("connect", errno)
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
	deadline := req.deadlineFrom(start)
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
// the loop's cache's, or looked up (a UDP socket connected to the
// destination names it) and kept for srcTTL. The socket is disconnected
// first: a connect() keeps the source address an earlier one chose, so
// after 127.0.0.1 every other destination got 127.0.0.1 or, off the
// host, EINVAL.
func (l *loop) sourceOf(req *request, sa unsafe.Pointer, salen uintptr) ([4]byte, syscall.Errno) {
	s := req.sched
	now := l.e.now()
	if s != nil && s.srcAt != 0 && now-s.srcAt < srcTTL {
		return s.src4, 0
	}
	r := l.raw
	dst := (*unix.RawSockaddrInet4)(sa).Addr
	c := &r.srcs[(uint32(dst[0])^uint32(dst[1])*7^uint32(dst[2])*31^uint32(dst[3])*131)%srcCacheSize]
	if c.at == 0 || c.dst != dst || now-c.at >= srcTTL {
		if errno := rawConnect(r.udp4, unsafe.Pointer(&unspec), unsafe.Sizeof(unspec)); errno != 0 {
			return [4]byte{}, errno
		}
		if errno := rawConnect(r.udp4, sa, salen); errno != 0 {
			return [4]byte{}, errno
		}
		var name unix.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(name))
		_, _, errno := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(r.udp4), uintptr(unsafe.Pointer(&name)), uintptr(unsafe.Pointer(&size)))
		if errno != 0 {
			return [4]byte{}, errno
		}
		*c = srcEntry{dst: dst, src: name.Addr, at: now}
	}
	if s != nil {
		s.src4, s.srcAt = c.src, c.at
	}
	return c.src, 0
}

// srcCacheSize is the number of entries of a loop's cache of IPv4 source
// addresses, by destination (direct-mapped): it spares one-off probes of
// the same few addresses a lookup each. Schedules keep their own.
const srcCacheSize = 256

// srcEntry is the source address of probes to dst, looked up at at.
type srcEntry struct {
	dst, src [4]byte
	at       int64
}

// sendSYN sends (or sends again) the SYN of raw slot idx.
func (l *loop) sendSYN(idx int32) syscall.Errno {
	r := l.raw
	s := &l.slots[idx]
	seq := r.shared.seal(uint32(idx) | uint32(s.gen)<<r.idxBits)
	ip := s.addr.Addr()
	v4 := ip.Is4() || ip.Is4In6()
	// The TCP header goes right after the IPv4 header of an IPv4 SYN,
	// alone for an IPv6 one.
	b := r.syn6[:]
	if v4 {
		b = r.pkt4[20:]
	}
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
	var (
		fd    int
		sa4   unix.RawSockaddrInet4
		sa6   unix.RawSockaddrInet6
		sa    unsafe.Pointer
		salen uintptr
	)
	n := uintptr(synLen)
	if v4 {
		binary.BigEndian.PutUint16(b[22:], 1460)
		dst := ip.Unmap().As4()
		binary.BigEndian.PutUint16(b[16:], tcpChecksum4(s.src4, dst, b))
		// The IPv4 header before it, for the loop's IPPROTO_RAW socket:
		// the kernel fills in the total length, the ID and the
		// header's checksum.
		h := r.pkt4[:20]
		h[0], h[1] = 0x45, 0
		h[2], h[3], h[4], h[5] = 0, 0, 0, 0
		h[6], h[7] = 0x40, 0 // don't fragment
		h[8], h[9] = 64, unix.IPPROTO_TCP
		h[10], h[11] = 0, 0
		copy(h[12:16], s.src4[:])
		copy(h[16:20], dst[:])
		b, n = r.pkt4[:], uintptr(len(r.pkt4))
		sa4.Family = unix.AF_INET
		sa4.Addr = dst
		fd, sa, salen = r.send4, unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	} else {
		if r.shared.tcp6 < 0 {
			return unix.EAFNOSUPPORT
		}
		binary.BigEndian.PutUint16(b[22:], 1440)
		sa6.Family = unix.AF_INET6
		sa6.Addr = ip.As16()
		sa6.Scope_id = s.scope
		fd, sa, salen = r.shared.tcp6, unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	s.sentWall = time.Now().UnixNano()
	_, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), n,
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
	return inetChecksum(sum, seg)
}

// inetChecksum is the Internet checksum (RFC 1071) of b, its sum started
// at sum (a pseudo-header's, or 0).
func inetChecksum(sum uint32, b []byte) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
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
	if s.sched != nil {
		// Look the source address up again next time: if the route
		// changed, the SYN's checksum was wrong for the source the
		// kernel chose, and the backend dropped it.
		s.sched.srcAt = 0
	}
	l.finish(s.done, s.sched, res)
	l.release(idx)
}

// rawAnswer is a packet that may answer a probe: a SYN-ACK or RST (its
// acknowledgement number less one in seq), or an ICMP error quoting a SYN
// (its sequence number in seq, the error in errno).
type rawAnswer struct {
	peer         netip.Addr
	ours, theirs uint16
	rst          bool
	seq          uint32
	errno        syscall.Errno
	rx           int64 // the kernel's receive time, Unix ns; 0: unknown
}

// readRaw reads the answers waiting on one of the engine's raw sockets
// (the first loop only), ends the probes of this loop they answer and
// hands the others to their loops.
func (l *loop) readRaw(which int32) {
	r, rc := l.raw, l.raw.recv
	var fd int
	switch which {
	case rawIndexTCP4:
		fd = r.shared.tcp4
	case rawIndexTCP6:
		fd = r.shared.tcp6
	case rawIndexICMP4:
		fd = r.shared.icmp4
	default:
		fd = r.shared.icmp6
	}
	for b := 0; b < rawBatches; b++ {
		for i := range rc.msgs {
			h := &rc.msgs[i].Hdr
			h.Name = (*byte)(unsafe.Pointer(&rc.names[i]))
			h.Namelen = uint32(unsafe.Sizeof(rc.names[i]))
			h.Control = &rc.ctrl[i][0]
			h.SetControllen(rawCtrlSize)
			h.Flags = 0
		}
		n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&rc.msgs[0])), rawBatch,
			unix.MSG_DONTWAIT, 0, 0)
		if errno != 0 || n == 0 {
			break
		}
		for i := 0; i < int(n); i++ {
			a, ok := rc.parse(which, i)
			if !ok {
				continue
			}
			switch t := r.shared.loopOf(a.ours); {
			case t == 0:
				l.match(&a)
			case t > 0:
				rc.outbox[t] = append(rc.outbox[t], a)
			}
		}
		if int(n) < rawBatch {
			break
		}
	}
	for t, as := range rc.outbox {
		if len(as) == 0 {
			continue
		}
		o := l.e.loops[t]
		o.mu.Lock()
		if !o.closed {
			o.inbox = append(o.inbox, as...)
			o.wakeLocked()
		}
		o.mu.Unlock()
		clear(as)
		rc.outbox[t] = as[:0]
	}
}

// takeAnswers ends the probes that the answers handed to this loop
// answer; their callbacks run in this turn, which does not sleep first.
func (l *loop) takeAnswers() {
	for i := range l.inboxBuf {
		l.match(&l.inboxBuf[i])
	}
	if len(l.results) > 0 {
		l.hurry = true
	}
	clear(l.inboxBuf)
	l.inboxBuf = l.inboxBuf[:0]
}

// parse reads packet i of the last batch read from socket which.
func (rc *rawReceiver) parse(which int32, i int) (a rawAnswer, ok bool) {
	pkt := rc.bufs[i][:min(int(rc.msgs[i].Len), rawBufSize)]
	var (
		tcp    []byte // the TCP header of the answer, or the quoted one
		quoted bool
	)
	switch which {
	case rawIndexTCP4, rawIndexICMP4:
		if len(pkt) < 20 {
			return a, false
		}
		ihl := int(pkt[0]&0x0f) * 4
		if which == rawIndexTCP4 {
			if len(pkt) < ihl+14 {
				return a, false
			}
			a.peer = netip.AddrFrom4([4]byte(pkt[12:16]))
			tcp = pkt[ihl:]
			break
		}
		// ICMP: type, code, checksum, 4 bytes; then the quoted IP header
		if len(pkt) < ihl+8+20 {
			return a, false
		}
		icmp := pkt[ihl:]
		q := icmp[8:]
		qihl := int(q[0]&0x0f) * 4
		if len(q) < qihl+8 {
			return a, false
		}
		a.peer = netip.AddrFrom4([4]byte(q[16:20]))
		tcp, quoted = q[qihl:], true
		a.errno = icmp4.errno(icmp[0], icmp[1])
	case rawIndexTCP6:
		if len(pkt) < 14 {
			return a, false
		}
		a.peer = netip.AddrFrom16(rc.names[i].Addr)
		tcp = pkt
	case rawIndexICMP6:
		if len(pkt) < 8+40+8 {
			return a, false
		}
		a.peer = netip.AddrFrom16([16]byte(pkt[8+24 : 8+40]))
		tcp, quoted = pkt[8+40:], true
		a.errno = icmp6.errno(pkt[0], pkt[1])
	}
	if quoted {
		// The quoted SYN: from our port, to theirs, with our sequence number.
		if a.errno == 0 {
			return a, false // not an error for a SYN (a fragmentation-needed, say)
		}
		a.ours, a.theirs = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
		a.seq = binary.BigEndian.Uint32(tcp[4:])
		return a, true
	}
	if tcp[13]&0x10 == 0 {
		return a, false // no ACK: it answers nothing of ours
	}
	a.theirs, a.ours = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
	a.seq = binary.BigEndian.Uint32(tcp[8:]) - 1
	a.rst = tcp[13]&0x04 != 0
	if !a.rst {
		a.rx = rxTime(&rc.msgs[i].Hdr)
	}
	return a, true
}

// match ends the probe an answer answers, if it is in flight on this
// loop.
func (l *loop) match(a *rawAnswer) {
	r := l.raw
	v := r.shared.open(a.seq)
	idx := int32(v & (1<<r.idxBits - 1))
	if int(idx) >= len(l.slots) {
		return
	}
	s := &l.slots[idx]
	// The answer's address has no zone: the probe's (its interface, as
	// in fe80::1%eth0) is left out of the comparison.
	if s.fd != rawFD || uint32(s.gen)&(1<<(32-r.idxBits)-1) != v>>r.idxBits || s.sport != a.ours ||
		s.addr.Port() != a.theirs || s.addr.Addr().WithZone("").Unmap() != a.peer.Unmap() {
		return // stale, forged, or another engine's
	}
	now := l.e.now()
	res := Result{Addr: s.addr, Duration: time.Duration(now - s.start)}
	switch {
	case a.errno != 0:
		res.Err = classify("connect", a.errno)
	case a.rst:
		res.Err = ErrRefused
	default:
		l.epollUp.Add(1)
		if a.rx != 0 && a.rx > s.sentWall {
			res.RTT = time.Duration(a.rx - s.sentWall)
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

// icmpErrnos is what a connect() in SYN-SENT gets from the ICMP errors
// of one family: the kernel's icmp_err_convert (IPv4) or
// icmpv6_err_convert (IPv6). An error it ignores gives 0.
type icmpErrnos struct {
	unreach  uint8           // the type of "destination unreachable"
	codes    []syscall.Errno // its errno by code; past the end, 0
	exceeded uint8           // "time exceeded": EHOSTUNREACH
	problem  uint8           // "parameter problem": EPROTO
}

var (
	icmp4 = icmpErrnos{unreach: 3, exceeded: 11, problem: 12, codes: []syscall.Errno{
		unix.ENETUNREACH, unix.EHOSTUNREACH, unix.ENOPROTOOPT, unix.ECONNREFUSED,
		0, // fragmentation needed: path MTU, not an answer
		unix.EOPNOTSUPP, unix.ENETUNREACH, unix.EHOSTDOWN, unix.ENONET,
		unix.ENETUNREACH, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTUNREACH,
		unix.EHOSTUNREACH, unix.EHOSTUNREACH, unix.EHOSTUNREACH, // 13: filtered; 14, 15: precedence
	}}
	icmp6 = icmpErrnos{unreach: 1, exceeded: 3, problem: 4, codes: []syscall.Errno{
		unix.ENETUNREACH, unix.EACCES, unix.EHOSTUNREACH, unix.EHOSTUNREACH,
		unix.ECONNREFUSED, unix.EACCES, unix.EACCES,
	}}
)

// errno is the errno of an ICMP error of type typ and code code, or 0.
func (t *icmpErrnos) errno(typ, code uint8) syscall.Errno {
	switch typ {
	case t.unreach:
		if int(code) < len(t.codes) {
			return t.codes[code]
		}
	case t.exceeded:
		return unix.EHOSTUNREACH
	case t.problem:
		return unix.EPROTO
	}
	return 0
}
