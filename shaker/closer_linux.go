//go:build linux && !shaker_fallback

package shaker

import (
	"fmt"
	"math"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A connect-mode loop hands its probe sockets, once their SYN is out, to a
// closer: a goroutine that lives inside one system call for the engine's
// whole life, on a thread of its own. It waits in epoll_wait on the
// sockets and, as each answer comes, reads the outcome (TCP_INFO, or
// SO_ERROR) and closes the socket, with no Go scheduling in between: a
// goroutine in a system call holds no P, so neither other goroutines (a
// scrape, the admin API, the GC's workers), nor a stop of the world, nor
// a preemption can stand between a SYN-ACK and its close. The kernel
// wakes the thread as it would any other; from there to the close is a
// few system calls.
//
// To run Go code inside a system call, the closer calls the runtime's
// entersyscall and exitsyscall itself, as syscall.Syscall does around
// one call, and as gVisor does (the runtime keeps both for that use, see
// go.dev/issue/67401). Between them the code must not grow its stack,
// allocate, write pointers or call anything that could: every function
// it runs is nosplit, its memory is reached through uintptrs and
// preallocated arrays, and the race detector and checkptr are kept out
// (norace, nocheckptr); sync/atomic's functions are nosplit assembly.
//
// The loop and the closer share a cslot per probe, whose state word says
// who owns the socket: the loop arms it before epoll_ctl, the closer
// takes it (a CAS) when its answer comes, or the loop takes it back (the
// same CAS) when its deadline passes first; whoever wins closes the fd,
// and the other never touches it, so a number the kernel has already
// given to another file is never closed. The closer hands the slots it
// closed back on a stack (a CAS push; the loop takes the whole stack with
// one swap) and wakes the loop if it sleeps for longer than closerLag.

//go:linkname entersyscall runtime.entersyscall
func entersyscall()

//go:linkname exitsyscall runtime.exitsyscall
func exitsyscall()

const (
	chunkBits = 10
	chunkSize = 1 << chunkBits

	// The phases of a cslot, in the low bits of its state; the slot's
	// generation is above them.
	phaseIdle   = 0 // no probe
	phaseArmed  = 1 // the SYN is out: the closer may take it
	phaseCloser = 2 // the closer took it: it closes the socket, and its result comes on the stack
	phaseLoop   = 3 // the loop took it back (deadline): the loop closes the socket
	phaseBits   = 2

	// closedFD is the fd of a slot whose socket the closer closed, seen
	// at shutdown.
	closedFD = -3

	// stopIndex marks the closer's stop eventfd in epoll's user data.
	stopIndex = -1

	// closerLag is how long results may wait on the stack for a loop
	// that sleeps: the closer wakes a loop due to wake later than that,
	// and leaves one due sooner to find them when it wakes. The sockets
	// are closed already; only the callbacks wait.
	closerLag = int64(2_000_000) // 2 ms
)

// cslot is what the loop and its closer share of a probe in flight.
type cslot struct {
	state uint64 // generation<<phaseBits | phase; atomic
	fd    int32  // set by the loop before it arms the slot

	// Written by the closer before it pushes the slot.
	next    int32  // the stack: index+1 of the slot below, 0 for none
	failed  uint32 // epoll reported an error or a hang-up
	gerr    int32  // the errno of getsockopt, 0 if it worked
	soerr   int32  // SO_ERROR, when failed
	rtt     uint32 // tcpi_rtt, us, when not failed
	lastAck uint32 // tcpi_last_ack_recv, ms, when not failed
	retrans uint32 // tcpi_total_retrans, when not failed
	seen    int64  // CLOCK_MONOTONIC, ns: when epoll_wait returned the answer
	since   int64  // CLOCK_MONOTONIC, ns: the answer came after it (closer.since); 0 for no bound
	end     int64  // CLOCK_MONOTONIC, ns: after the close
}

//go:nosplit
func stateOf(gen int32, phase uint64) uint64 {
	return uint64(uint32(gen))<<phaseBits | phase
}

// closer is one loop's closer. Fields after the first group are set up
// before it runs and only read by it.
type closer struct {
	head     uint64 // the stack of closed slots: index+1 of the top, 0 when empty; atomic
	asleep   uint32 // 1 while the loop sleeps (or is about to); atomic
	wakeAt   int64  // CLOCK_MONOTONIC, ns, by which a sleeping loop wakes anyway; atomic
	maxReady int64  // the most answers one epoll_wait returned; atomic

	epfd   int
	stopfd int
	wakefd int              // the loop's eventfd
	chunks []unsafe.Pointer // *[chunkSize]cslot each, nil until the loop needs it; atomic
	events []unix.EpollEvent
	mono0  int64 // CLOCK_MONOTONIC at engine time 0
	since  int64 // CLOCK_MONOTONIC before the last epoll_wait that left no answer behind: see watchAll
	done   chan struct{}
	tid    int // its thread, once it runs

	// The closer's own scratch, reached through the uintptrs below.
	tcpInfo unix.TCPInfo
	ts      unix.Timespec
	size    uint32
	one     [8]byte
	buf     [8]byte

	evAddr, tiAddr, tsAddr, sizeAddr, oneAddr, bufAddr uintptr
}

// newCloser makes the closer of a loop whose probes in flight are at most
// budget; it does not start it.
func newCloser(l *loop) (*closer, error) {
	c := &closer{
		wakefd: l.evfd,
		chunks: make([]unsafe.Pointer, (l.budget+chunkSize-1)/chunkSize),
		events: make([]unix.EpollEvent, maxEvents),
		done:   make(chan struct{}),
	}
	var err error
	if c.epfd, c.stopfd, err = epollWithEventfd(stopIndex); err != nil {
		return nil, err
	}
	c.one[0] = 1
	c.evAddr = uintptr(unsafe.Pointer(&c.events[0]))
	c.tiAddr = uintptr(unsafe.Pointer(&c.tcpInfo))
	c.tsAddr = uintptr(unsafe.Pointer(&c.ts))
	c.sizeAddr = uintptr(unsafe.Pointer(&c.size))
	c.oneAddr = uintptr(unsafe.Pointer(&c.one[0]))
	c.bufAddr = uintptr(unsafe.Pointer(&c.buf[0]))
	c.mono0 = monoOffset(l.e.now, c.clock)
	return c, nil
}

// monoOffset is the time of clock (the closer's CLOCK_MONOTONIC, which
// its seen and end are on) at time 0 of now (engine time): read between
// two engine times, in the shortest of three brackets, and off by at
// most half of it, a fraction of a microsecond unless the thread was
// descheduled in all three. A close delay from the kernel's clock
// (kernelView.arrival, engine time) to a close the closer timed takes
// the offset's error whole.
func monoOffset(now, clock func() int64) int64 {
	var off int64
	best := int64(math.MaxInt64)
	for range 3 {
		n1 := now()
		m := clock()
		if d := now() - n1; d < best {
			best, off = d, m-n1-d/2
		}
	}
	return off
}

// close releases the closer's descriptors, once it has stopped (or never
// ran).
func (c *closer) close() {
	unix.Close(c.stopfd)
	unix.Close(c.epfd)
}

// stop stops the closer and waits until it has: from then on the loop
// owns every armed slot.
func (c *closer) stop() {
	unix.Write(c.stopfd, c.one[:])
	<-c.done
}

// slot returns the cslot of index idx, making its chunk if need be (nil
// if idx is past the budget). Only the loop calls it.
func (c *closer) slot(idx int32) *cslot {
	ci := int(idx >> chunkBits)
	if idx < 0 || ci >= len(c.chunks) {
		return nil
	}
	p := atomic.LoadPointer(&c.chunks[ci])
	if p == nil {
		p = unsafe.Pointer(new([chunkSize]cslot))
		atomic.StorePointer(&c.chunks[ci], p)
	}
	return &(*[chunkSize]cslot)(p)[idx&(chunkSize-1)]
}

// watch arms the slot of a probe whose SYN is out and gives its socket to
// the closer. On error the loop still owns the socket. It is part of the
// SYN's window (synwindow_linux.go), so nosplit.
//
//go:nosplit
func (c *closer) watch(cs *cslot, fd int, idx, gen int32) syscall.Errno {
	cs.fd = int32(fd)
	atomic.StoreUint64(&cs.state, stateOf(gen, phaseArmed))
	ev := unix.EpollEvent{Events: unix.EPOLLOUT | unix.EPOLLONESHOT, Fd: idx, Pad: gen}
	if errno := rawEpollCtl(c.epfd, unix.EPOLL_CTL_ADD, fd, &ev); errno != 0 {
		atomic.StoreUint64(&cs.state, stateOf(gen, phaseLoop))
		return errno
	}
	return 0
}

// takeBack takes an armed slot back for the loop (its deadline passed):
// true if the loop now owns the socket, false if the closer has it and
// its result is on the way.
func (c *closer) takeBack(cs *cslot, gen int32) bool {
	return atomic.CompareAndSwapUint64(&cs.state, stateOf(gen, phaseArmed), stateOf(gen, phaseLoop))
}

// takeClosed takes the stack of slots the closer has closed: the index+1
// of its top; each slot's next leads to the one below.
func (c *closer) takeClosed() uint64 {
	if atomic.LoadUint64(&c.head) == 0 {
		return 0
	}
	return atomic.SwapUint64(&c.head, 0)
}

// sleep tells the closer that the loop is about to sleep, at most until
// engine time until (or for ever, if until is at or past farFuture). It
// returns false if results wait already: then the loop must not sleep.
func (c *closer) sleep(until int64) bool {
	at := int64(farFuture)
	if until < farFuture {
		at = c.mono0 + until
	}
	atomic.StoreInt64(&c.wakeAt, at)
	atomic.StoreUint32(&c.asleep, 1)
	if atomic.LoadUint64(&c.head) != 0 {
		atomic.StoreUint32(&c.asleep, 0)
		return false
	}
	return true
}

// awake tells the closer that the loop is awake.
func (c *closer) awake() {
	atomic.StoreUint32(&c.asleep, 0)
}

// closerStart is what startClosers tells each closer once all of them
// have said whether their thread could be made real-time.
type closerStart struct {
	serve    bool // false: New fails; the closer ends at once
	realtime bool // the closers stay real-time (all could be made so)
}

// run is the closer's goroutine. It has its thread to itself for its
// whole life. With realtime it makes the thread real-time and tells ready
// the error (else nil); then it waits for start, gives the thread back
// its own scheduling unless start keeps it real-time, and serves if start
// says so. When it stops, the thread gets its own scheduling back: the
// thread ends with the goroutine anyway, but for the process's main
// thread, which the runtime parks for ever instead.
func (c *closer) run(realtime bool, ready chan<- error, start <-chan closerStart) {
	runtime.LockOSThread() // never unlocked
	c.tid = unix.Gettid()
	var own *unix.SchedAttr // the thread's scheduling before, while it is real-time
	var err error
	if realtime {
		own, err = setRealtime()
	}
	ready <- err
	st := <-start
	if own != nil && !st.realtime {
		restoreSched(own)
		own = nil
	}
	if st.serve {
		c.serve()
	}
	if own != nil {
		restoreSched(own)
	}
	close(c.done)
}

// setRealtime makes the calling thread SCHED_FIFO, priority 1, and
// returns its scheduling before.
func setRealtime() (*unix.SchedAttr, error) {
	own, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		return nil, &opError{"sched_getattr", errnoOf(err)}
	}
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
	if err := unix.SchedSetAttr(0, &attr, 0); err != nil {
		op := &opError{"sched_setattr SCHED_FIFO 1", errnoOf(err)}
		if err == unix.EPERM {
			return nil, fmt.Errorf("%w; %s", op, realtimeNeeds)
		}
		return nil, op
	}
	return own, nil
}

// restoreSched gives the calling thread back the scheduling own, which
// it had before setRealtime: a thread may always lower its own priority
// back to where it was.
func restoreSched(own *unix.SchedAttr) {
	own.Size = unix.SizeofSchedAttr
	unix.SchedSetAttr(0, own, 0)
}

// serve enters a system call and stays in it until the stop eventfd
// is written. It is never inlined, so that it stays nosplit.
//
//go:nosplit
//go:noinline
//go:norace
//go:nocheckptr
func (c *closer) serve() {
	entersyscall()
	c.watchAll()
	exitsyscall()
}

// watchAll is the closer's life: wait, close what has answered, push it,
// wake the loop if need be.
//
// It also bounds when each answer came, for the close delays of answers
// that the kernel's microsecond clock cannot time (epollDelay): an
// epoll_wait that returned fewer events than it could took every answer
// on epoll's ready list when it was entered, for the sockets on that
// epoll by then, so such a socket's answer in a later one came after that
// entry (c.since; closedSince checks the socket was there). One that
// filled the buffer may have left answers behind, and the bound stays
// where it was.
//
//go:nosplit
//go:norace
//go:nocheckptr
func (c *closer) watchAll() {
	for {
		enter := c.clock()
		r, _, errno := syscall.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(c.epfd), c.evAddr, maxEvents, ^uintptr(0), 0, 0)
		if errno != 0 {
			if errno == unix.EINTR {
				continue
			}
			// epoll_wait fails only on a bad epfd or buffer: a bug, and
			// nothing here may panic. Stop closing; the loop's deadlines
			// close what is left.
			return
		}
		n := int(r)
		if n > maxEvents {
			n = maxEvents
		}
		seen, since := c.clock(), c.since
		if n < maxEvents {
			c.since = enter // for the next batch
		}
		if int64(n) > atomic.LoadInt64(&c.maxReady) {
			atomic.StoreInt64(&c.maxReady, int64(n)) // the closer is its only writer
		}
		stop, pushed := false, false
		for i := 0; i < n; i++ {
			ev := &c.events[i]
			if ev.Fd == stopIndex {
				stop = true
				continue
			}
			if c.closeAnswered(ev.Fd, ev.Pad, ev.Events, seen, since) {
				pushed = true
			}
		}
		if pushed && atomic.LoadUint32(&c.asleep) == 1 &&
			atomic.LoadInt64(&c.wakeAt)-seen > closerLag &&
			atomic.SwapUint32(&c.asleep, 0) == 1 {
			// EAGAIN means the counter is full: the loop wakes anyway.
			syscall.RawSyscall(unix.SYS_WRITE, uintptr(c.wakefd), c.oneAddr, 8)
		}
		if stop {
			syscall.RawSyscall(unix.SYS_READ, uintptr(c.stopfd), c.bufAddr, 8)
			return
		}
	}
}

// closeAnswered takes the slot of one epoll event, if it is still armed
// with that generation, reads the probe's outcome, closes its socket and
// pushes the slot. It reports whether it pushed.
//
//go:nosplit
//go:norace
//go:nocheckptr
func (c *closer) closeAnswered(idx, gen int32, events uint32, seen, since int64) bool {
	ci := int(idx >> chunkBits)
	if idx < 0 || ci >= len(c.chunks) {
		return false
	}
	p := atomic.LoadPointer(&c.chunks[ci])
	if p == nil {
		return false
	}
	cs := &(*[chunkSize]cslot)(p)[idx&(chunkSize-1)]
	if !atomic.CompareAndSwapUint64(&cs.state, stateOf(gen, phaseArmed), stateOf(gen, phaseCloser)) {
		return false // the loop took it back, or the event is stale
	}
	fd := uintptr(cs.fd)
	cs.gerr, cs.soerr, cs.rtt, cs.lastAck, cs.retrans = 0, 0, 0, 0, 0
	if events&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		cs.failed = 1
		c.size = 4
		_, _, errno := syscall.RawSyscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_ERROR,
			uintptr(unsafe.Pointer(&cs.soerr)), c.sizeAddr, 0)
		cs.gerr = int32(errno)
	} else {
		cs.failed = 0
		c.size = uint32(unsafe.Sizeof(c.tcpInfo))
		_, _, errno := syscall.RawSyscall6(unix.SYS_GETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_INFO, c.tiAddr, c.sizeAddr, 0)
		if errno == 0 {
			cs.rtt, cs.lastAck, cs.retrans = c.tcpInfo.Rtt, c.tcpInfo.Last_ack_recv, c.tcpInfo.Total_retrans
		}
	}
	syscall.RawSyscall(unix.SYS_CLOSE, fd, 0, 0) // zero linger: the RST goes out now
	cs.seen, cs.since, cs.end = seen, since, c.clock()
	for {
		old := atomic.LoadUint64(&c.head)
		cs.next = int32(old)
		if atomic.CompareAndSwapUint64(&c.head, old, uint64(idx)+1) {
			return true
		}
	}
}

// clock reads CLOCK_MONOTONIC, the clock of Go's monotonic time, through
// the system call (the vDSO's entry is the runtime's).
//
//go:nosplit
//go:norace
//go:nocheckptr
func (c *closer) clock() int64 {
	syscall.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, c.tsAddr, 0)
	return c.ts.Sec*1_000_000_000 + c.ts.Nsec
}
