//go:build linux && !shaker_fallback

package shaker

import (
	"net/netip"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// slot is a probe in flight. Slots are owned by their loop's goroutine.
type slot struct {
	fd       int   // -1 when free
	gen      int32 // bumped each time the slot is freed; stale events carry an old one
	heapIdx  int
	start    int64 // engine time of connect()
	deadline int64 // engine time
	addr     netip.AddrPort
	done     func(Result) // a one-off probe's callback, or
	sched    *Schedule    // a periodic probe's schedule
	watched  bool         // its socket is with the closer
	added    int64        // watched: engine time after the closer's epoll_ctl (closedSince)

	// Raw mode (fd is rawFD): deadline is the next retransmission of
	// the SYN until end, the probe's own deadline.
	sport    uint16
	src4     [4]byte // an IPv4 probe's source address
	scope    uint32
	end      int64
	rto      int64
	sentWall int64 // Unix ns of the last SYN
}

// pending is a result whose callback has not run yet.
type pending struct {
	done  func(Result)
	sched *Schedule
	res   Result
}

func (l *loop) finish(done func(Result), sched *Schedule, res Result) {
	res.Outcome = outcomeOf(res.Err)
	l.outcomes.add(res.Outcome)
	l.results = append(l.results, pending{done, sched, res})
}

// start sends the SYN of a probe.
func (l *loop) start(req *request) {
	res := Result{Addr: req.addr, Err: req.err}
	if req.deadline != 0 && req.deadline <= l.e.now() {
		// Probe's context ended while the probe was queued.
		res.Err = ErrTimeout
	}
	if res.Err != nil {
		l.finish(req.done, req.sched, res)
		return
	}
	var (
		sa4    unix.RawSockaddrInet4
		sa6    unix.RawSockaddrInet6
		sa     unsafe.Pointer
		salen  uintptr
		family int
	)
	ip := req.addr.Addr()
	port := req.addr.Port()
	switch {
	case !req.addr.IsValid() || port == 0:
		res.Err = errInvalidAddr
	case ip.Is4() || ip.Is4In6():
		family = unix.AF_INET
		sa4.Family = unix.AF_INET
		sa4.Addr = ip.Unmap().As4()
		putPort(&sa4.Port, port)
		sa, salen = unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	default:
		family = unix.AF_INET6
		sa6.Family = unix.AF_INET6
		sa6.Addr = ip.As16()
		putPort(&sa6.Port, port)
		sa6.Scope_id = req.scope
		sa, salen = unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	if res.Err != nil {
		l.finish(req.done, req.sched, res)
		return
	}
	if l.raw != nil {
		l.startRaw(req, res, family, sa, salen)
		return
	}

	fd, op, errno := l.socket(family)
	if errno != 0 {
		res.Err = &opError{op, errno}
		l.finish(req.done, req.sched, res)
		return
	}
	// Delayed-ACK mode, before every connect: a disconnect resets it.
	var zero int32
	if errno := rawSetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, unsafe.Pointer(&zero), 4); errno != 0 {
		l.closeFD(fd)
		res.Err = &opError{"setsockopt TCP_QUICKACK", errno}
		l.finish(req.done, req.sched, res)
		return
	}

	idle := &l.idle[familyIndex(family)]
	p := synProbe{fd: fd, sa: sa, salen: salen, reuse: len(*idle) < maxIdle, idx: l.nextSlot()}
	p.gen = l.slots[p.idx].gen
	if l.cl != nil {
		p.cs = l.cl.slot(p.idx)
	}
	w := l.synWindow(&p)
	// The timeout runs from the SYN, as does the close delay where the
	// kernel's clock times it (kernelView.arrival).
	start := p.start
	deadline := req.deadlineFrom(start)
	switch w {
	case synError:
		l.closeFD(fd)
		res.Err = classify("connect", p.errno)
		res.Duration = time.Duration(l.e.now() - start)
		l.finish(req.done, req.sched, res)
	case synAnswered:
		// On loopback and other local paths the handshake has often
		// finished inside connect(), and the connection is aborted
		// already, with no epoll round trip at all.
		res, v := l.answered(fd, req.addr, false)
		if p.kept {
			*idle = append(*idle, fd)
		} else {
			l.socketClosed()
		}
		l.noteTick(v.ackAgo)
		l.settle(res, req.done, req.sched, start, p.end, l.insideDelay(start, p.info, p.end, v), v)
	case synEnded:
		l.closeProbe(fd, family, req.addr, req.done, req.sched, start, start, 0, true)
	case synWatched:
		s := &l.slots[l.alloc(fd, req, start, deadline)]
		s.watched, s.added = true, l.e.now()
	case synUnwatched:
		l.closeFD(fd)
		res.Err = &opError{"epoll_ctl", p.errno}
		l.finish(req.done, req.sched, res)
	case synSent:
		idx := l.alloc(fd, req, start, deadline)
		ev := unix.EpollEvent{Events: unix.EPOLLOUT, Fd: idx, Pad: l.slots[idx].gen}
		if errno := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); errno != 0 {
			l.release(idx)
			l.closeFD(fd)
			res.Err = &opError{"epoll_ctl", errno}
			l.finish(req.done, req.sched, res)
		}
	}
}

// maxIdle is how many sockets of each family a loop keeps for reuse. A
// socket is reused only when its probe ended inside start, so one or two
// are enough.
const maxIdle = 4

func familyIndex(family int) int {
	if family == unix.AF_INET6 {
		return 1
	}
	return 0
}

// socket returns a TCP socket of the family, non-blocking, with a zero
// linger, from the idle ones or new. On error it names the failing call.
func (l *loop) socket(family int) (int, string, syscall.Errno) {
	idle := &l.idle[familyIndex(family)]
	if n := len(*idle); n > 0 {
		fd := (*idle)[n-1]
		*idle = (*idle)[:n-1]
		return fd, "", 0
	}
	r, _, errno := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if errno != 0 {
		return -1, "socket", errno
	}
	fd := int(r)
	l.open++
	l.sockets.Store(int64(l.open))
	if errno := rawSetsockopt(fd, unix.SOL_SOCKET, unix.SO_LINGER, unsafe.Pointer(&l.linger), unsafe.Sizeof(l.linger)); errno != 0 {
		l.closeFD(fd)
		return -1, "setsockopt SO_LINGER", errno
	}
	return fd, "", 0
}

// closeFD closes a probe socket (with its zero linger, an RST if the
// handshake was answered).
func (l *loop) closeFD(fd int) {
	rawClose(fd)
	l.socketClosed()
}

// socketClosed counts a probe socket closed.
func (l *loop) socketClosed() {
	l.open--
	l.sockets.Store(int64(l.open))
}

// unspec is the address of a disconnect: connect() to AF_UNSPEC.
var unspec = unix.RawSockaddr{Family: unix.AF_UNSPEC}

// recycle ends the connection of a socket whose probe is over and keeps
// the socket for another probe. connect(AF_UNSPEC) aborts the connection
// as close() with a zero linger does, an RST if the handshake was answered,
// and leaves the socket unbound and ready to connect again: reuse saves a
// socket(), a close() and a setsockopt per probe.
func (l *loop) recycle(fd, family int) {
	idle := &l.idle[familyIndex(family)]
	if len(*idle) >= maxIdle || rawConnect(fd, unsafe.Pointer(&unspec), unsafe.Sizeof(unspec)) != 0 {
		l.closeFD(fd)
		return
	}
	*idle = append(*idle, fd)
}

// nextSlot is the slot that alloc takes next, made if need be.
func (l *loop) nextSlot() int32 {
	if n := len(l.free); n > 0 {
		return l.free[n-1]
	}
	l.slots = append(l.slots, slot{fd: -1})
	idx := int32(len(l.slots) - 1)
	l.free = append(l.free, idx)
	return idx
}

// alloc takes a slot for a probe whose SYN is out and puts it in the
// deadline heap.
func (l *loop) alloc(fd int, req *request, start, deadline int64) int32 {
	idx := l.nextSlot()
	l.free = l.free[:len(l.free)-1]
	s := &l.slots[idx]
	s.fd = fd
	s.start = start
	s.deadline = deadline
	s.addr = req.addr
	s.done = req.done
	s.sched = req.sched
	l.heapPush(idx)
	l.inFlight.Add(1)
	return idx
}

// release takes a slot out of the heap and frees it.
func (l *loop) release(idx int32) {
	s := &l.slots[idx]
	l.heapRemove(s.heapIdx)
	s.fd = -1
	s.gen++
	s.watched = false
	s.done = nil
	s.sched = nil
	s.addr = netip.AddrPort{}
	l.free = append(l.free, idx)
	l.inFlight.Add(-1)
}

// complete handles the epoll event of a probe in flight.
func (l *loop) complete(idx, gen int32, events uint32) {
	if idx < 0 || int(idx) >= len(l.slots) {
		return
	}
	s := &l.slots[idx]
	if s.gen != gen || s.fd < 0 {
		return // an event for a probe that is already over
	}
	failed := events&(unix.EPOLLERR|unix.EPOLLHUP) != 0
	if !failed {
		l.readTCPInfo(s.fd)
	}
	l.closeProbe(s.fd, 0, s.addr, s.done, s.sched, s.start, l.woke, l.since, failed)
	l.release(idx)
}

// readTCPInfo reads the socket's TCP_INFO into l.tcpInfo and returns its
// state. It is part of the SYN's window (synwindow_linux.go), so nosplit.
//
//go:nosplit
func (l *loop) readTCPInfo(fd int) (state uint8, ok bool) {
	size := uint32(unsafe.Sizeof(l.tcpInfo))
	if errno := rawGetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&l.tcpInfo), &size); errno != 0 {
		l.tcpInfo.Rtt = 0
		l.tcpInfo.Last_ack_recv = 0
		l.tcpInfo.Total_retrans = 0
		return 0, false
	}
	return l.tcpInfo.State, true
}

// closeProbe reads the outcome of a probe whose answer has come, ends its
// connection and queues the result. seen is when the loop saw the answer
// (the return of epoll_wait, or the connect() that completed inline), and
// since a time before which it cannot have come (loop.since; 0 for none).
// When failed is false, l.tcpInfo holds the socket's TCP_INFO. A socket
// that never entered epoll (family != 0) is kept for another probe;
// others are closed.
func (l *loop) closeProbe(fd, family int, addr netip.AddrPort, done func(Result), sched *Schedule, start, seen, since int64, failed bool) {
	res, v := l.answered(fd, addr, failed)
	if !failed && family == 0 {
		l.epollUp.Add(1)
	}
	if family != 0 {
		l.recycle(fd, family) // the RST goes out now
	} else {
		l.closeFD(fd) // zero linger: the RST goes out now
	}
	end := l.e.now()
	l.settle(res, done, sched, start, end, l.epollDelay(start, seen, since, end, v), v)
}

// maxTick is the longest tick of the kernel's clock (jiffies, HZ 100),
// the resolution of TCP_INFO's tcpi_last_ack_recv: the tick assumed
// where it could not be measured (kernelTick).
const maxTick = int64(10 * time.Millisecond)

// noteTick takes an answer's ackAgo (tcpi_last_ack_recv) for the tick
// if it is shorter than the one the loop has: that is a whole number of
// ticks in ms, rounded up, so the least nonzero one seen is never
// shorter than the tick (4 ms at HZ 250, 1 at HZ 1000).
func (l *loop) noteTick(ackAgo int64) {
	if ackAgo > 0 && ackAgo < l.tick {
		l.tick = ackAgo
	}
}

// answeredInside is the earliest time a SYN-ACK that came inside
// connect() can have come: not before the SYN (start), and, by the
// kernel's own clock read at info (ackAgo ago, rounded down to its tick),
// not before info-ackAgo-tick. The kernel takes such an answer at the
// end of connect() (the socket is the caller's until then), so the time
// connect() spent before it, sending the SYN and running the peer's
// receive inline, or off the CPU, is not the close's delay.
func answeredInside(start, info, ackAgo, tick int64) int64 {
	return max(start, info-ackAgo-tick)
}

// kernelView is what TCP_INFO said of an answered probe.
type kernelView struct {
	rtt     int64  // tcpi_rtt, ns: the SYN's round trip, on the kernel's clock in us
	ackAgo  int64  // tcpi_last_ack_recv, ns: how long before the read the SYN-ACK came, in whole ticks
	retrans uint32 // tcpi_total_retrans: how many times the SYN was sent again
}

// arrival is the earliest time the SYN-ACK can have come by the kernel's
// clock in microseconds, and whether that clock knows: tcpi_rtt is the
// time from the SYN's send to the SYN-ACK's processing (the moment the
// kernel's delayed-ACK timer starts), and the SYN went out after start.
// It knows only for the first SYN: when a retransmitted one was answered
// the kernel takes no sample from the SYN (Karn), or one from a
// timestamp echo in whole ms, and start plus the RTT would read up to a
// second early. A reused socket's RTT starts from nothing again
// (tcp_disconnect clears srtt_us and, since Linux 5.5, total_retrans).
// The microsecond lost to rounding is taken off.
func (v kernelView) arrival(start int64) (int64, bool) {
	if v.rtt <= 0 || v.retrans != 0 {
		return 0, false
	}
	return start + v.rtt - int64(time.Microsecond), true
}

// epollDelay is the close delay of an answer that the loop or the closer
// saw at seen (the return of epoll_wait, after the SYN-ACK came) and
// closed before end: from its arrival by the kernel's microsecond clock
// when that knows and agrees (not after seen). Else from the earliest
// it can have come: not before the SYN (start), nor before since (the
// entry into the last epoll_wait that left no answer behind, made with
// the socket on that epoll: closedSince, loop.handle), nor before
// the kernel's tick clock allows (answeredInside's bound, with seen for
// the TCP_INFO read that came after it), so that it is not understated
// either. The microsecond clock is used only where it is the engine's
// (microOK, Linux 4.20 and later).
func (l *loop) epollDelay(start, seen, since, end int64, v kernelView) int64 {
	if at, ok := v.arrival(start); ok && l.microOK {
		if at <= seen {
			l.exactDelays.Add(1)
			return end - at
		}
		l.viewsApart.Add(1)
	}
	// Every bound is before seen; min only guards against a wrong one.
	return end - min(seen, max(since, answeredInside(start, seen, v.ackAgo, l.tick)))
}

// insideDelay is the close delay of an answer taken inside connect():
// TCP_INFO was read at info, the socket closed before end. It counts
// from the latest of the SYN, the tick clock's earliest (answeredInside)
// and the microsecond clock's, where that knows and agrees (not after
// info); exactDelays counts it when the last is the latest.
func (l *loop) insideDelay(start, info, end int64, v kernelView) int64 {
	from := answeredInside(start, info, v.ackAgo, l.tick)
	if at, ok := v.arrival(start); ok && l.microOK {
		if at > info {
			l.viewsApart.Add(1)
		} else if at > from {
			l.exactDelays.Add(1)
			from = at
		}
	}
	return end - from
}

// answered is the result of an answered probe: from l.tcpInfo (the
// socket's TCP_INFO) when failed is false, else from the socket's
// SO_ERROR; with what the kernel says of its SYN-ACK.
func (l *loop) answered(fd int, addr netip.AddrPort, failed bool) (res Result, v kernelView) {
	res.Addr = addr
	if !failed {
		// The kernel's own clocks of the SYN-ACK's arrival: they count
		// time the loop spent off the CPU before epoll_wait returned,
		// which seen does not.
		return res, viewOf(l.tcpInfo.Rtt, l.tcpInfo.Last_ack_recv, l.tcpInfo.Total_retrans)
	}
	var soerr int32
	size := uint32(4)
	switch errno := rawGetsockopt(fd, unix.SOL_SOCKET, unix.SO_ERROR, unsafe.Pointer(&soerr), &size); {
	case errno != 0:
		res.Err = &opError{"getsockopt SO_ERROR", errno}
	case soerr != 0:
		res.Err = classify("connect", syscall.Errno(soerr))
	default:
		// An error event with no error pending: the connection
		// was made and lost at once. The port answered.
	}
	return res, kernelView{}
}

// viewOf is the kernelView of TCP_INFO's tcpi_rtt (us),
// tcpi_last_ack_recv (ms) and tcpi_total_retrans.
func viewOf(rtt, lastAck, retrans uint32) kernelView {
	return kernelView{rtt: int64(rtt) * int64(time.Microsecond), ackAgo: int64(lastAck) * int64(time.Millisecond), retrans: retrans}
}

// collect takes the results of the probes the closer has closed.
func (l *loop) collect() {
	if l.cl == nil {
		return
	}
	for h := l.cl.takeClosed(); h != 0; {
		idx := int32(h - 1)
		cs := l.cl.slot(idx)
		h = uint64(uint32(cs.next))
		l.settleClosed(idx, cs)
	}
}

// settleClosed queues the result of a probe whose socket the closer has
// closed, from what the closer read before the close.
func (l *loop) settleClosed(idx int32, cs *cslot) {
	s := &l.slots[idx]
	l.open--
	l.sockets.Store(int64(l.open))
	res := Result{Addr: s.addr}
	var v kernelView
	if cs.failed != 0 {
		switch {
		case cs.gerr != 0:
			res.Err = &opError{"getsockopt SO_ERROR", syscall.Errno(cs.gerr)}
		case cs.soerr != 0:
			res.Err = classify("connect", syscall.Errno(cs.soerr))
		}
	} else {
		v = viewOf(cs.rtt, cs.lastAck, cs.retrans)
		l.epollUp.Add(1)
	}
	end := cs.end - l.cl.mono0
	l.settle(res, s.done, s.sched, s.start, end, l.epollDelay(s.start, cs.seen-l.cl.mono0, closedSince(cs, s, l.cl.mono0), end, v), v)
	l.release(idx)
}

// sinceMargin is how far after a socket's epoll_ctl the closer's look
// must have been entered for its since to bound the answer
// (closedSince): more than the error of the closer's clock offset
// (monoOffset).
const sinceMargin = int64(10 * time.Microsecond)

// closedSince is the bound on when the answer of a slot the closer
// closed came (cslot.since, in engine time), or 0 for none. It holds only
// if the socket was on the closer's epoll when that look was entered: the
// loop adds it after the SYN, from its own thread, and an answer that came
// before the add is on epoll's ready list from the add on, whatever
// looks the closer made in between.
func closedSince(cs *cslot, s *slot, mono0 int64) int64 {
	if cs.since == 0 {
		return 0
	}
	if since := cs.since - mono0; since-sinceMargin >= s.added {
		return since
	}
	return 0
}

// settle counts the close delay of a probe whose socket is closed (end is
// after the close) and queues its result.
func (l *loop) settle(res Result, done func(Result), sched *Schedule, start, end, delay int64, v kernelView) {
	res.Duration = time.Duration(end - start)
	if res.Err == nil {
		l.noteTick(v.ackAgo)
		res.RTT = time.Duration(v.rtt)
		if delay > l.maxCloseDelay.Load() {
			l.maxCloseDelay.Store(delay)
		}
		l.closeDelays[closeBucketOf(time.Duration(delay))].Add(1)
		l.closeSum.Add(delay)
	}
	l.finish(done, sched, res)
}

// expire ends a probe whose deadline has passed.
func (l *loop) expire(idx int32, now int64) {
	s := &l.slots[idx]
	if s.fd == rawFD {
		l.expireRaw(idx, now)
		return
	}
	if s.watched && !l.cl.takeBack(l.cl.slot(idx), s.gen) {
		// The closer has it: its answer came at the deadline, and its
		// result is on the way.
		s.deadline = farFuture
		l.heapFix(s.heapIdx)
		return
	}
	l.closeFD(s.fd)
	res := Result{Addr: s.addr, Err: ErrTimeout, Duration: time.Duration(now - s.start)}
	l.finish(s.done, s.sched, res)
	l.release(idx)
}

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0] = byte(port >> 8)
	b[1] = byte(port)
}
