//go:build linux && !shaker_fallback

package shaker

import (
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// halfOpen: on Linux, TCP_QUICKACK off keeps the kernel from acknowledging
// the SYN-ACK before the socket is closed.
const halfOpen = true

const (
	// startBatch is the most probes the loop starts before it looks for
	// completions again, so that SYN-ACKs never wait behind a long run of
	// connect() calls.
	startBatch = 64
	// maxEvents is the most completions read by one epoll_wait.
	maxEvents = 256
	// wakeIndex marks the eventfd in epoll's user data.
	wakeIndex = -1
)

// slot is a probe in flight. Slots are owned by the loop goroutine.
type slot struct {
	fd       int   // -1 when free
	gen      int32 // bumped each time the slot is freed; stale events carry an old one
	heapIdx  int
	start    int64 // engine time of connect()
	deadline int64 // engine time
	addr     netip.AddrPort
	done     func(Result)
}

// pending is a result whose callback has not run yet.
type pending struct {
	done func(Result)
	res  Result
}

// Engine runs half-open probes from one epoll loop goroutine.
// Its methods are safe for concurrent use.
type Engine struct {
	maxInFlight    int
	defaultTimeout time.Duration
	epollOnly      bool
	base           time.Time

	epfd int
	evfd int

	mu       sync.Mutex
	queue    ring
	closed   bool
	sleeping bool // the loop is in, or about to enter, a blocking epoll_wait

	loopDone chan struct{}

	// Owned by the loop goroutine.
	slots   []slot
	free    []int32
	heap    []int32 // slot indices, min-heap by deadline
	events  []unix.EpollEvent
	batch   []request
	results []pending
	idle    [2][]int // sockets kept for reuse, IPv4 and IPv6
	tcpInfo unix.TCPInfo
	linger  unix.Linger
	evbuf   [8]byte

	inFlight       atomic.Int64
	up             atomic.Uint64
	refused        atomic.Uint64
	timeout        atomic.Uint64
	unreachable    atomic.Uint64
	failed         atomic.Uint64
	closedCount    atomic.Uint64
	maxCloseDelayN atomic.Int64
}

// New creates an engine: one epoll instance and the goroutine that runs its
// loop. Call Close to stop it.
func New(opts Options) (*Engine, error) {
	e := &Engine{
		maxInFlight:    opts.MaxInFlight,
		defaultTimeout: opts.DefaultTimeout,
		epollOnly:      opts.epollOnly,
		base:           time.Now(),
		loopDone:       make(chan struct{}),
		events:         make([]unix.EpollEvent, maxEvents),
		batch:          make([]request, 0, startBatch),
		linger:         unix.Linger{Onoff: 1, Linger: 0},
	}
	if err := opts.check(); err != nil {
		return nil, err
	}
	if e.maxInFlight == 0 {
		e.maxInFlight = DefaultMaxInFlight
	}
	if e.defaultTimeout == 0 {
		e.defaultTimeout = DefaultTimeout
	}
	var err error
	e.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, &opError{"epoll_create1", errnoOf(err)}
	}
	e.evfd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(e.epfd)
		return nil, &opError{"eventfd", errnoOf(err)}
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeIndex}
	if err := unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, e.evfd, &ev); err != nil {
		unix.Close(e.evfd)
		unix.Close(e.epfd)
		return nil, &opError{"epoll_ctl", errnoOf(err)}
	}
	go e.loop()
	return e, nil
}

func (e *Engine) submit(req request) {
	if req.done == nil {
		panic("shaker: ProbeAsync with a nil done")
	}
	// An IPv6 zone name is looked up here, on the caller's goroutine,
	// never on the loop.
	if z := req.addr.Addr().Zone(); z != "" && req.addr.Addr().Is6() && !req.addr.Addr().Is4In6() {
		req.scope, req.err = zoneIndex(z)
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		e.closedCount.Add(1)
		req.done(Result{Addr: req.addr, Err: ErrClosed})
		return
	}
	e.queue.push(req)
	if e.sleeping {
		// Under mu: the loop closes the eventfd under mu too, so this
		// never writes to a closed (or reused) fd number.
		e.sleeping = false
		e.wake()
	}
	e.mu.Unlock()
}

var one = [8]byte{1}

func (e *Engine) wake() {
	// EAGAIN means the counter is full: the loop is awake anyway.
	unix.Write(e.evfd, one[:])
}

// Close aborts every probe in flight or queued, closing their sockets at
// once (done gets ErrClosed), stops the loop and releases its descriptors.
// After Close returns, no backend can accept a connection from this engine.
// Close is idempotent. It must not be called from a done callback.
func (e *Engine) Close() error {
	e.mu.Lock()
	if !e.closed {
		e.closed = true
		e.wake()
	}
	e.mu.Unlock()
	<-e.loopDone
	return nil
}

// Stats returns a snapshot of the engine's counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	q := e.queue.n
	e.mu.Unlock()
	return Stats{
		Up:            e.up.Load(),
		Refused:       e.refused.Load(),
		Timeout:       e.timeout.Load(),
		Unreachable:   e.unreachable.Load(),
		Failed:        e.failed.Load(),
		Closed:        e.closedCount.Load(),
		InFlight:      int(e.inFlight.Load()),
		Queued:        q,
		MaxCloseDelay: time.Duration(e.maxCloseDelayN.Load()),
	}
}

// now is the engine's monotonic clock, in ns.
func (e *Engine) now() int64 { return int64(time.Since(e.base)) }

func (e *Engine) loop() {
	defer close(e.loopDone)
	for {
		wait := -1
		if len(e.heap) > 0 {
			d := e.slots[e.heap[0]].deadline - e.now()
			switch {
			case d <= 0:
				wait = 0
			case d >= int64(time.Hour):
				wait = int(time.Hour / time.Millisecond)
			default:
				wait = int((d + int64(time.Millisecond) - 1) / int64(time.Millisecond))
			}
		}
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			e.shutdown()
			return
		}
		if e.queue.n > 0 && len(e.heap) < e.maxInFlight {
			wait = 0
		}
		if wait != 0 {
			e.sleeping = true
		}
		e.mu.Unlock()

		n, errno := epollWait(e.epfd, e.events, wait)
		if wait != 0 {
			e.mu.Lock()
			e.sleeping = false
			e.mu.Unlock()
		}
		if errno != 0 {
			if errno != unix.EINTR {
				// epoll_wait fails only on a bad epfd or buffer: a bug.
				panic("shaker: epoll_wait: " + errno.Error())
			}
			n = 0
		}

		// Completions first: close every socket that has its answer.
		for i := 0; i < n; i++ {
			ev := &e.events[i]
			if ev.Fd == wakeIndex {
				unix.Read(e.evfd, e.evbuf[:])
				continue
			}
			e.complete(ev.Fd, ev.Pad, ev.Events)
		}
		// Then deadlines.
		if len(e.heap) > 0 {
			now := e.now()
			for len(e.heap) > 0 && e.slots[e.heap[0]].deadline <= now {
				e.expire(e.heap[0], now)
			}
		}
		e.deliver()
		// Then new probes, a batch at a time; but if the events buffer
		// was full, more answers may be waiting: read them first.
		if n < len(e.events) {
			e.startQueued()
		}
	}
}

// deliver runs the callbacks of the results collected so far.
func (e *Engine) deliver() {
	for i := range e.results {
		p := &e.results[i]
		done, res := p.done, p.res
		*p = pending{}
		done(res)
	}
	e.results = e.results[:0]
}

func (e *Engine) startQueued() {
	room := e.maxInFlight - len(e.heap)
	if room <= 0 {
		return
	}
	if room > startBatch {
		room = startBatch
	}
	e.mu.Lock()
	e.batch = e.queue.popN(e.batch[:0], room)
	e.mu.Unlock()
	for i := range e.batch {
		e.start(&e.batch[i])
		e.batch[i] = request{}
	}
	// Failures at start (socket errors, deadlines already passed) have
	// their results now.
	e.deliver()
}

func (e *Engine) finish(done func(Result), res Result) {
	e.results = append(e.results, pending{done, res})
}

func (e *Engine) count(err error) {
	switch {
	case err == nil:
		e.up.Add(1)
	case err == ErrRefused:
		e.refused.Add(1)
	case err == ErrTimeout:
		e.timeout.Add(1)
	case err == errHostUnreach || err == errNetUnreach:
		e.unreachable.Add(1)
	case err == ErrClosed:
		e.closedCount.Add(1)
	default:
		e.failed.Add(1)
	}
}

// start sends the SYN of a probe.
func (e *Engine) start(req *request) {
	res := Result{Addr: req.addr, Err: req.err}
	if req.deadline != 0 && req.deadline <= e.now() {
		// Probe's context ended while the probe was queued.
		res.Err = ErrTimeout
	}
	if res.Err != nil {
		e.count(res.Err)
		e.finish(req.done, res)
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
		e.count(res.Err)
		e.finish(req.done, res)
		return
	}

	fd, op, errno := e.socket(family)
	if errno != 0 {
		res.Err = &opError{op, errno}
		e.count(res.Err)
		e.finish(req.done, res)
		return
	}
	// Delayed-ACK mode, before every connect: a disconnect resets it.
	var zero int32
	if errno := rawSetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, unsafe.Pointer(&zero), 4); errno != 0 {
		e.abort(fd, req, "setsockopt TCP_QUICKACK", errno)
		return
	}

	// The timeout runs from the SYN.
	start := e.now()
	deadline := start + int64(req.timeout)
	if req.deadline != 0 && req.deadline < deadline {
		deadline = req.deadline
	}
	switch errno := rawConnect(fd, sa, salen); errno {
	case 0, unix.EINPROGRESS:
	default:
		rawClose(fd)
		res.Err = classify("connect", errno)
		res.Duration = time.Duration(e.now() - start)
		e.count(res.Err)
		e.finish(req.done, res)
		return
	}
	// On loopback and other local paths the handshake has often finished
	// inside connect(). Then the socket is closed now, with no epoll
	// round trip at all; TCP_INFO is read anyway for the RTT.
	if state, ok := e.readTCPInfo(fd); ok && state != unix.BPF_TCP_SYN_SENT && !e.epollOnly {
		e.closeProbe(fd, family, req.addr, req.done, start, state != unix.BPF_TCP_ESTABLISHED)
		return
	}
	idx := e.alloc(fd, req, start, deadline)
	ev := unix.EpollEvent{Events: unix.EPOLLOUT, Fd: idx, Pad: e.slots[idx].gen}
	if errno := rawEpollCtl(e.epfd, unix.EPOLL_CTL_ADD, fd, &ev); errno != 0 {
		e.release(idx)
		rawClose(fd)
		res.Err = &opError{"epoll_ctl", errno}
		e.count(res.Err)
		e.finish(req.done, res)
	}
}

// maxIdle is how many sockets of each family the loop keeps for reuse. A
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
func (e *Engine) socket(family int) (int, string, syscall.Errno) {
	idle := &e.idle[familyIndex(family)]
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
	if errno := rawSetsockopt(fd, unix.SOL_SOCKET, unix.SO_LINGER, unsafe.Pointer(&e.linger), unsafe.Sizeof(e.linger)); errno != 0 {
		rawClose(fd)
		return -1, "setsockopt SO_LINGER", errno
	}
	return fd, "", 0
}

// unspec is the address of a disconnect: connect() to AF_UNSPEC.
var unspec = unix.RawSockaddr{Family: unix.AF_UNSPEC}

// recycle ends the connection of a socket whose probe is over and keeps
// the socket for another probe. connect(AF_UNSPEC) aborts the connection
// as close() with a zero linger does, an RST if the handshake was answered,
// and leaves the socket unbound and ready to connect again: reuse saves a
// socket(), a close() and a setsockopt per probe.
func (e *Engine) recycle(fd, family int) {
	idle := &e.idle[familyIndex(family)]
	if len(*idle) >= maxIdle || rawConnect(fd, unsafe.Pointer(&unspec), unsafe.Sizeof(unspec)) != 0 {
		rawClose(fd)
		return
	}
	*idle = append(*idle, fd)
}

// abort closes the socket of a probe that could not be started.
func (e *Engine) abort(fd int, req *request, op string, errno syscall.Errno) {
	rawClose(fd)
	res := Result{Addr: req.addr, Err: &opError{op, errno}}
	e.count(res.Err)
	e.finish(req.done, res)
}

// alloc takes a slot for a probe whose SYN is out and puts it in the
// deadline heap.
func (e *Engine) alloc(fd int, req *request, start, deadline int64) int32 {
	var idx int32
	if n := len(e.free); n > 0 {
		idx = e.free[n-1]
		e.free = e.free[:n-1]
	} else {
		e.slots = append(e.slots, slot{})
		idx = int32(len(e.slots) - 1)
	}
	s := &e.slots[idx]
	s.fd = fd
	s.start = start
	s.deadline = deadline
	s.addr = req.addr
	s.done = req.done
	e.heapPush(idx)
	e.inFlight.Add(1)
	return idx
}

// release takes a slot out of the heap and frees it.
func (e *Engine) release(idx int32) {
	s := &e.slots[idx]
	e.heapRemove(s.heapIdx)
	s.fd = -1
	s.gen++
	s.done = nil
	s.addr = netip.AddrPort{}
	e.free = append(e.free, idx)
	e.inFlight.Add(-1)
}

// complete handles the epoll event of a probe in flight.
func (e *Engine) complete(idx, gen int32, events uint32) {
	if idx < 0 || int(idx) >= len(e.slots) {
		return
	}
	s := &e.slots[idx]
	if s.gen != gen || s.fd < 0 {
		return // an event for a probe that is already over
	}
	failed := events&(unix.EPOLLERR|unix.EPOLLHUP) != 0
	if !failed {
		e.readTCPInfo(s.fd)
	}
	e.closeProbe(s.fd, 0, s.addr, s.done, s.start, failed)
	e.release(idx)
}

// readTCPInfo reads the socket's TCP_INFO into e.tcpInfo and returns its
// state.
func (e *Engine) readTCPInfo(fd int) (state uint8, ok bool) {
	size := uint32(unsafe.Sizeof(e.tcpInfo))
	if errno := rawGetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&e.tcpInfo), &size); errno != 0 {
		e.tcpInfo.Rtt = 0
		return 0, false
	}
	return e.tcpInfo.State, true
}

// closeProbe reads the outcome of a probe whose answer has come, ends its
// connection and queues the result. When failed is false, e.tcpInfo holds
// the socket's TCP_INFO. A socket that never entered epoll (family != 0) is
// kept for another probe; others are closed.
func (e *Engine) closeProbe(fd, family int, addr netip.AddrPort, done func(Result), start int64, failed bool) {
	res := Result{Addr: addr}
	var rtt int64
	if failed {
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
	} else {
		rtt = int64(e.tcpInfo.Rtt) * int64(time.Microsecond)
	}
	if family != 0 {
		e.recycle(fd, family) // the RST goes out now
	} else {
		rawClose(fd) // zero linger: the RST goes out now
	}
	end := e.now()
	res.Duration = time.Duration(end - start)
	if res.Err == nil {
		res.RTT = time.Duration(rtt)
		if delay := end - (start + rtt); delay > e.maxCloseDelayN.Load() {
			e.maxCloseDelayN.Store(delay)
		}
	}
	e.count(res.Err)
	e.finish(done, res)
}

// expire ends a probe whose deadline has passed.
func (e *Engine) expire(idx int32, now int64) {
	s := &e.slots[idx]
	rawClose(s.fd)
	res := Result{Addr: s.addr, Err: ErrTimeout, Duration: time.Duration(now - s.start)}
	e.count(res.Err)
	e.finish(s.done, res)
	e.release(idx)
}

// shutdown closes every probe socket and completes every probe with
// ErrClosed. It runs on the loop goroutine once closed is set, so no new
// request can enter the queue.
func (e *Engine) shutdown() {
	// Sockets first, all of them, before any callback runs.
	for len(e.heap) > 0 {
		idx := e.heap[len(e.heap)-1]
		s := &e.slots[idx]
		rawClose(s.fd)
		e.count(ErrClosed)
		e.finish(s.done, Result{Addr: s.addr, Err: ErrClosed})
		e.release(idx)
	}
	e.mu.Lock()
	var queued []request
	for e.queue.n > 0 {
		queued = e.queue.popN(queued, e.queue.n)
	}
	e.mu.Unlock()
	for i := range queued {
		e.count(ErrClosed)
		e.finish(queued[i].done, Result{Addr: queued[i].addr, Err: ErrClosed})
	}
	for i := range e.idle {
		for _, fd := range e.idle[i] {
			rawClose(fd)
		}
		e.idle[i] = nil
	}
	e.mu.Lock()
	unix.Close(e.evfd) // under mu: see submit
	e.mu.Unlock()
	unix.Close(e.epfd)
	e.deliver()
}

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0] = byte(port >> 8)
	b[1] = byte(port)
}

func zoneIndex(zone string) (uint32, error) {
	if n, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(n), nil
	}
	ifi, err := net.InterfaceByName(zone)
	if err != nil {
		return 0, &zoneError{zone, err}
	}
	return uint32(ifi.Index), nil
}

func errnoOf(err error) syscall.Errno {
	if errno, ok := err.(syscall.Errno); ok {
		return errno
	}
	return syscall.EINVAL
}
