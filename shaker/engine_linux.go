//go:build linux && !shaker_fallback

package shaker

import (
	"math"
	"net/netip"
	"runtime"
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
	// slice is the most time a loop spends starting probes or running
	// callbacks before it looks at epoll again (without waiting) and
	// closes the sockets that have answered: a SYN-ACK that arrives
	// meanwhile waits at most about that long, plus one callback. It is
	// a bound in time, not in work items: on a path where a connect() or
	// a close() runs the peer's network processing inline (a veth pair),
	// a few dozen of them can take tens of milliseconds.
	slice = int64(2 * time.Millisecond)
	// checkEvery is how many probes a loop starts, or callbacks it runs,
	// between two reads of the clock.
	checkEvery = 8
	// maxEvents is the most completions read by one epoll_wait.
	maxEvents = 256
	// wakeIndex marks the eventfd in epoll's user data.
	wakeIndex = -1
	// overdueEvery is how often a loop that is behind its schedule counts
	// its overdue probes (the count walks them).
	overdueEvery = int64(100 * time.Millisecond)
	// farFuture bounds due times, far from overflow.
	farFuture = math.MaxInt64 / 2
	// maxSlack is the most a loop lets a periodic probe wait past its due
	// time so that it starts in one wake-up with others: waking once for
	// many probes costs far less CPU than once for each (one epoll_wait,
	// warm caches). A loop's slack is a 64th of the shortest interval it
	// started in the last second, at most maxSlack: 10 ms for 1 s
	// intervals, well under a millisecond for fast ones.
	maxSlack = int64(10 * time.Millisecond)
	// slackWindow is how often a loop forgets its shortest interval.
	slackWindow = int64(time.Second)
)

// Engine runs half-open probes from one or more epoll loops, each a
// goroutine that owns its probes' sockets from connect() to close().
// Its methods are safe for concurrent use.
type Engine struct {
	defaultTimeout time.Duration
	maxSockets     int
	base           time.Time
	loops          []*loop
}

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
}

// pending is a result whose callback has not run yet.
type pending struct {
	done  func(Result)
	sched *Schedule
	res   Result
}

// loop is one epoll instance and its goroutine.
type loop struct {
	e      *Engine
	epfd   int
	evfd   int
	budget int // probes this loop may have waiting for an answer

	mu       sync.Mutex
	queue    ring        // one-off probes waiting to start
	adds     []*Schedule // schedules to take in
	stops    []*Schedule // schedules to drop
	nows     []*Schedule // schedules to probe at once (Schedule.Now)
	closed   bool
	sleeping bool // the loop is in, or about to enter, a blocking epoll_wait

	done chan struct{}

	// Owned by the loop goroutine.
	slots      []slot
	free       []int32
	heap       []int32     // slot indices, min-heap by deadline
	timers     []*Schedule // min-heap by due
	events     []unix.EpollEvent
	batch      []request
	addBuf     []*Schedule
	stopBuf    []*Schedule
	nowBuf     []*Schedule
	results    []pending
	idle       [2][]int // sockets kept for reuse, IPv4 and IPv6
	tcpInfo    unix.TCPInfo
	linger     unix.Linger
	evbuf      [8]byte
	woke       int64 // engine time at which the last epoll_wait returned
	full       bool  // the last epoll_wait filled the events buffer: more answers may wait
	hurry      bool  // due probes were left for the next turn: it must not sleep
	stopping   bool  // shutdown: epoll is closed, no more looks
	open       int   // sockets open: in flight and idle
	queueFirst bool  // which kind of probe starts first this turn
	countAfter int64 // engine time after which overdue may be counted again
	slack      int64 // how long past its due time a periodic probe may wait for others
	minCur     int64 // the shortest interval started since slackFrom
	slackFrom  int64
	epollOnly  bool

	// Read by Stats from any goroutine.
	outcomes      outcomeCounts
	inFlight      atomic.Int64
	sockets       atomic.Int64
	queued        atomic.Int64
	scheduled     atomic.Int64
	overdue       atomic.Int64
	headDue       atomic.Int64 // due time of the earliest timer; MaxInt64 when none
	late          atomic.Uint64
	delays        [numDelayBuckets]atomic.Uint64
	delaySum      atomic.Int64
	maxCloseDelay atomic.Int64
	closeDelays   [numCloseBuckets]atomic.Uint64
	closeSum      atomic.Int64
	epollUp       atomic.Uint64
	maxReady      atomic.Int64
}

// New creates an engine: its loops, each with an epoll instance and a
// goroutine. Call Close to stop it.
func New(opts Options) (*Engine, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	n := opts.Loops
	if n == 0 {
		n = runtime.GOMAXPROCS(0)
	}
	e := &Engine{
		defaultTimeout: opts.DefaultTimeout,
		maxSockets:     opts.MaxSockets,
		base:           time.Now(),
	}
	if e.defaultTimeout == 0 {
		e.defaultTimeout = DefaultTimeout
	}
	if e.maxSockets == 0 {
		e.maxSockets = DefaultMaxSockets()
	}
	per := max(e.maxSockets/n, 1)
	for i := 0; i < n; i++ {
		l, err := newLoop(e, per, opts.epollOnly)
		if err != nil {
			for _, l := range e.loops {
				l.close()
			}
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	for _, l := range e.loops {
		go l.run()
	}
	return e, nil
}

// DefaultMaxSockets is the bound on probe sockets when Options.MaxSockets
// is zero: the RLIMIT_NOFILE soft limit, less a quarter of it (at least
// 256, at most half) for the process's own files and connections.
func DefaultMaxSockets() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == 0 {
		return 768
	}
	soft := int(min(rl.Cur, 1<<30))
	reserve := min(max(soft/4, 256), soft/2)
	return max(soft-reserve, 1)
}

func newLoop(e *Engine, budget int, epollOnly bool) (*loop, error) {
	l := &loop{
		e:         e,
		budget:    budget,
		done:      make(chan struct{}),
		events:    make([]unix.EpollEvent, maxEvents),
		batch:     make([]request, 0, checkEvery),
		linger:    unix.Linger{Onoff: 1, Linger: 0},
		epollOnly: epollOnly,
	}
	l.headDue.Store(math.MaxInt64)
	var err error
	l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, &opError{"epoll_create1", errnoOf(err)}
	}
	l.evfd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(l.epfd)
		return nil, &opError{"eventfd", errnoOf(err)}
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeIndex}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, l.evfd, &ev); err != nil {
		l.close()
		return nil, &opError{"epoll_ctl", errnoOf(err)}
	}
	return l, nil
}

// close releases a loop that never ran.
func (l *loop) close() {
	unix.Close(l.evfd)
	unix.Close(l.epfd)
}

// loopOf is the loop that probes addr: the same one every time.
func (e *Engine) loopOf(addr netip.AddrPort) *loop {
	if len(e.loops) == 1 {
		return e.loops[0]
	}
	// FNV-1a over the address and port.
	b := addr.Addr().As16()
	h := uint32(2166136261)
	for _, c := range b {
		h = (h ^ uint32(c)) * 16777619
	}
	p := addr.Port()
	h = (h ^ uint32(p>>8)) * 16777619
	h = (h ^ uint32(p&0xff)) * 16777619
	return e.loops[h%uint32(len(e.loops))]
}

func (e *Engine) submit(req request) {
	if req.done == nil {
		panic("shaker: ProbeAsync with a nil done")
	}
	req.scope, req.err = scopeOf(req.addr)
	l := e.loopOf(req.addr)
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.outcomes.add(Closed)
		req.done(result(Result{Addr: req.addr, Err: ErrClosed}))
		return
	}
	l.queue.push(req)
	l.queued.Add(1)
	l.wakeLocked()
	l.mu.Unlock()
}

var one = [8]byte{1}

// wakeLocked wakes the loop if it sleeps. Under mu: the loop closes the
// eventfd under mu too, so this never writes to a closed (or reused) fd
// number.
func (l *loop) wakeLocked() {
	if l.sleeping {
		l.sleeping = false
		// EAGAIN means the counter is full: the loop is awake anyway.
		unix.Write(l.evfd, one[:])
	}
}

// Close aborts every probe in flight or queued, closing their sockets at
// once (one-off probes' done gets ErrClosed; schedules' callbacks are not
// called again), stops the loops and releases their descriptors. After
// Close returns, no backend can accept a connection from this engine.
// Every loop is told to stop before Close waits for any. Close is
// idempotent. It must not be called from a callback.
func (e *Engine) Close() error {
	for _, l := range e.loops {
		l.mu.Lock()
		if !l.closed {
			l.closed = true
			l.sleeping = true // force the write
			l.wakeLocked()
		}
		l.mu.Unlock()
	}
	for _, l := range e.loops {
		<-l.done
	}
	return nil
}

// Burst says how fast a burst of new probes with the given timeout (<= 0:
// the engine's default) may be started, such as the first probes of many
// new addresses (see health.Registry.Start); periodic probes spread over
// their interval need no pacing.
func (e *Engine) Burst(timeout time.Duration) Burst {
	if timeout <= 0 {
		timeout = e.defaultTimeout
	}
	return burstOf(e.maxSockets, timeout)
}

// Stats returns a snapshot of the engine's counters, summed over its
// loops.
func (e *Engine) Stats() Stats {
	s := Stats{Loops: len(e.loops), MaxSockets: e.maxSockets}
	s.StartDelay.Counts = make([]uint64, len(StartDelayBuckets)+1)
	s.CloseDelay.Counts = make([]uint64, len(CloseDelayBuckets)+1)
	now := e.now()
	for _, l := range e.loops {
		l.outcomes.addTo(&s)
		s.InFlight += int(l.inFlight.Load())
		s.Queued += int(l.queued.Load())
		s.Sockets += int(l.sockets.Load())
		s.Scheduled += int(l.scheduled.Load())
		s.Overdue += int(l.overdue.Load())
		if lag := time.Duration(now - l.headDue.Load()); lag > s.Lag {
			s.Lag = lag
		}
		s.Late += l.late.Load()
		for i := range l.delays {
			s.StartDelay.Counts[i] += l.delays[i].Load()
		}
		s.StartDelay.Sum += time.Duration(l.delaySum.Load())
		s.MaxCloseDelay = max(s.MaxCloseDelay, time.Duration(l.maxCloseDelay.Load()))
		for i := range l.closeDelays {
			s.CloseDelay.Counts[i] += l.closeDelays[i].Load()
		}
		s.CloseDelay.Sum += time.Duration(l.closeSum.Load())
		s.EpollUp += l.epollUp.Load()
		s.MaxReady = max(s.MaxReady, int(l.maxReady.Load()))
	}
	return s
}

// now is the engine's monotonic clock, in ns.
func (e *Engine) now() int64 { return int64(time.Since(e.base)) }

func (l *loop) run() {
	defer close(l.done)
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			l.shutdown()
			return
		}
		l.addBuf, l.adds = l.adds, l.addBuf[:0]
		l.stopBuf, l.stops = l.stops, l.stopBuf[:0]
		l.nowBuf, l.nows = l.nows, l.nowBuf[:0]
		l.mu.Unlock()
		l.takeSchedules()

		wait := l.waitMs(l.e.now())
		if l.hurry {
			wait, l.hurry = 0, false
		}
		if wait != 0 {
			l.mu.Lock()
			if l.closed || len(l.adds) > 0 || len(l.stops) > 0 || len(l.nows) > 0 || l.queue.n > 0 && len(l.heap) < l.budget {
				wait = 0
			} else {
				l.sleeping = true
			}
			l.mu.Unlock()
		}

		n, errno := epollWait(l.epfd, l.events, wait)
		l.woke = l.e.now()
		if wait != 0 {
			l.mu.Lock()
			l.sleeping = false
			l.mu.Unlock()
		}
		if errno != 0 {
			if errno != unix.EINTR {
				// epoll_wait fails only on a bad epfd or buffer: a bug.
				panic("shaker: epoll_wait: " + errno.Error())
			}
			n = 0
		}

		// Completions first: close every socket that has its answer.
		l.handle(n)
		// Then deadlines.
		if len(l.heap) > 0 {
			now := l.e.now()
			for len(l.heap) > 0 && l.slots[l.heap[0]].deadline <= now {
				l.expire(l.heap[0], now)
			}
		}
		// Then callbacks, in slices with a look at epoll between two.
		l.deliver()
		// Then new probes, for at most a slice since the last look. But
		// if the events buffer was full, more answers may be waiting,
		// and if the closes (a batch on veth can take tens of ms) and
		// callbacks used the slice up, more may have come: read them
		// first.
		if l.full || l.e.now()-l.woke >= slice {
			l.hurry = true
			continue
		}
		l.startDue()
	}
}

// handle handles the n events an epoll_wait returned: it closes every
// socket that has its answer (their callbacks run later, in deliver).
func (l *loop) handle(n int) {
	l.full = n == len(l.events)
	if int64(n) > l.maxReady.Load() {
		l.maxReady.Store(int64(n))
	}
	for i := 0; i < n; i++ {
		ev := &l.events[i]
		if ev.Fd == wakeIndex {
			unix.Read(l.evfd, l.evbuf[:])
			continue
		}
		l.complete(ev.Fd, ev.Pad, ev.Events)
	}
}

// look reads epoll without waiting and closes the sockets that have
// answered: between two slices of other work, so that a SYN-ACK never
// waits for a whole turn.
func (l *loop) look() {
	n, errno := epollWait(l.epfd, l.events, 0)
	l.woke = l.e.now()
	if errno != 0 {
		if errno != unix.EINTR {
			panic("shaker: epoll_wait: " + errno.Error())
		}
		n = 0
	}
	l.handle(n)
}

// sliceOver reports whether the loop has spent a slice since its last
// look at epoll; now is the engine's time, or 0 to read it.
func (l *loop) sliceOver(now int64) bool {
	if l.stopping {
		return false
	}
	if now == 0 {
		now = l.e.now()
	}
	return now-l.woke >= slice
}

// waitMs is how long epoll_wait may sleep: until the next deadline or
// due probe, 0 if one has passed, -1 for ever.
func (l *loop) waitMs(now int64) int {
	next := int64(math.MaxInt64)
	if len(l.heap) > 0 {
		next = l.slots[l.heap[0]].deadline
	}
	if len(l.timers) > 0 && len(l.heap) < l.budget {
		next = min(next, l.timers[0].due+l.slack)
	}
	if next == math.MaxInt64 {
		return -1
	}
	d := next - now
	switch {
	case d <= 0:
		return 0
	case d >= int64(time.Hour):
		return int(time.Hour / time.Millisecond)
	}
	return int((d + int64(time.Millisecond) - 1) / int64(time.Millisecond))
}

// takeSchedules takes in the schedules added and stopped since the last
// turn.
func (l *loop) takeSchedules() {
	for i, s := range l.addBuf {
		l.addBuf[i] = nil
		if s.stopped.Load() {
			s.removed = true
			continue
		}
		l.timerPush(s)
	}
	for i, s := range l.stopBuf {
		l.stopBuf[i] = nil
		if s.removed {
			continue
		}
		s.removed = true
		if s.idx >= 0 {
			l.timerRemove(int(s.idx))
		}
	}
	if len(l.nowBuf) > 0 {
		now := l.e.now()
		for i, s := range l.nowBuf {
			l.nowBuf[i] = nil
			// not in the heap: in flight (its result comes soon), or gone
			if s.removed || s.idx < 0 || s.due <= now {
				continue
			}
			s.due = now
			siftUp(int(s.idx), l.timerLess, l.timerSwap)
		}
	}
	l.addBuf, l.stopBuf, l.nowBuf = l.addBuf[:0], l.stopBuf[:0], l.nowBuf[:0]
}

// deliver runs the callbacks of the results collected so far, and
// re-arms the schedules among them. Once a slice has passed since the
// last look at epoll (the clock is read every checkEvery callbacks, and
// after each schedule's, where rearm reads it anyway), it looks again and
// closes what has answered before the next callback: nothing a callback
// does (metrics, logs, a lock) keeps an answered socket open for more
// than a slice plus that one callback. The results of those looks are
// delivered in the same call.
func (l *loop) deliver() {
	var now int64 // when the last callback ended, if known
	for i := 0; i < len(l.results); i++ {
		if (now != 0 || i%checkEvery == 0) && l.sliceOver(now) {
			l.look() // appends to l.results
		}
		p := &l.results[i]
		done, s, res := p.done, p.sched, p.res
		*p = pending{}
		if s != nil {
			now = l.rearm(s, res)
		} else {
			done(res)
			now = 0
		}
	}
	l.results = l.results[:0]
}

// rearm gives a periodic probe's result to its callback and puts the
// schedule back in the timer heap. It returns the time it read after
// the callback, or 0.
func (l *loop) rearm(s *Schedule, res Result) int64 {
	s.inFlight = false
	if s.removed || s.stopped.Load() {
		s.removed = true
		return 0
	}
	next := int64(s.fn(res))
	if s.stopped.Load() {
		s.removed = true // Stop from the callback
		return 0
	}
	if next <= 0 {
		next = s.interval
	}
	s.cur = next
	due := s.due + next
	if next > farFuture-s.due {
		due = farFuture // an interval of centuries: no overflow
	}
	now := l.e.now()
	if due < now {
		due = now
	}
	s.due = due
	l.timerPush(s)
	return now
}

// startDue starts the probes that are due: periodic ones whose time has
// come and queued one-off ones, while sockets are free and until a slice
// has passed since the last look at epoll (then the next turn, which does
// not sleep, reads the answers first and goes on). The two kinds take
// turns at going first.
func (l *loop) startDue() {
	l.queueFirst = !l.queueFirst
	if l.queueFirst {
		if l.startQueued() {
			l.startTimers()
		}
	} else {
		if l.startTimers() {
			l.startQueued()
		}
	}
	// Failures at start (socket errors, deadlines already passed) have
	// their results now.
	l.deliver()
	l.noteBacklog()
}

// startTimers starts the due periodic probes, checkEvery at least, until
// the slice is over. It returns false if it left due probes for that
// reason.
func (l *loop) startTimers() bool {
	if len(l.timers) == 0 {
		return true
	}
	now := l.e.now()
	for n := 1; len(l.timers) > 0 && len(l.heap) < l.budget; n++ {
		if n%checkEvery == 0 {
			if now = l.e.now(); l.sliceOver(now) {
				if l.timers[0].due <= now {
					l.hurry = true
					return false
				}
				return true
			}
		}
		s := l.timers[0]
		if s.due > now {
			break
		}
		l.timerRemove(0)
		if s.stopped.Load() {
			// stopped since this turn took its stops in: it must not
			// start (its stop, still queued, finds it removed)
			s.removed = true
			continue
		}
		delay := now - s.due
		l.delays[bucketOf(time.Duration(delay))].Add(1)
		l.delaySum.Add(delay)
		if delay > max(s.cur/4, int64(LateMin)) {
			l.late.Add(1)
		}
		if s.cur < l.minCur || l.minCur == 0 {
			l.minCur = s.cur
		}
		s.inFlight = true
		req := request{addr: s.addr, timeout: time.Duration(s.timeout), scope: s.scope, err: s.err, sched: s}
		l.start(&req)
	}
	return true
}

// startQueued starts queued one-off probes, checkEvery at a time, until
// the slice is over. It returns false if it left queued probes for that
// reason.
func (l *loop) startQueued() bool {
	for {
		room := min(checkEvery, l.budget-len(l.heap))
		if room <= 0 {
			return true
		}
		l.mu.Lock()
		l.batch = l.queue.popN(l.batch[:0], room)
		left := l.queue.n
		l.mu.Unlock()
		if len(l.batch) == 0 {
			return true
		}
		l.queued.Add(-int64(len(l.batch)))
		for i := range l.batch {
			l.start(&l.batch[i])
			l.batch[i] = request{}
		}
		if left == 0 {
			return true
		}
		if l.sliceOver(0) {
			l.hurry = true
			return false
		}
	}
}

// noteBacklog publishes the earliest due time and, while the loop is
// behind, the number of overdue probes.
func (l *loop) noteBacklog() {
	if len(l.timers) == 0 {
		l.headDue.Store(math.MaxInt64)
		l.overdue.Store(0)
		return
	}
	head := l.timers[0].due + l.slack // not overdue while it waits for others
	l.headDue.Store(head)
	now := l.e.now()
	if now-l.slackFrom >= slackWindow {
		if l.minCur > 0 {
			l.slack = min(l.minCur/64, maxSlack)
		}
		l.minCur, l.slackFrom = 0, now
	}
	if head > now {
		l.overdue.Store(0)
		return
	}
	if now < l.countAfter {
		return
	}
	l.countAfter = now + overdueEvery
	l.overdue.Store(int64(l.countDue(0, now)))
}

// countDue counts the timers at or below heap index i that are due.
func (l *loop) countDue(i int, now int64) int {
	if i >= len(l.timers) || l.timers[i].due > now {
		return 0
	}
	return 1 + l.countDue(2*i+1, now) + l.countDue(2*i+2, now)
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

	// The timeout runs from the SYN.
	start := l.e.now()
	deadline := start + int64(req.timeout)
	if req.deadline != 0 && req.deadline < deadline {
		deadline = req.deadline
	}
	switch errno := rawConnect(fd, sa, salen); errno {
	case 0, unix.EINPROGRESS:
	default:
		l.closeFD(fd)
		res.Err = classify("connect", errno)
		res.Duration = time.Duration(l.e.now() - start)
		l.finish(req.done, req.sched, res)
		return
	}
	// On loopback and other local paths the handshake has often finished
	// inside connect(). Then the socket is closed now, with no epoll
	// round trip at all; TCP_INFO is read anyway for the RTT.
	if state, ok := l.readTCPInfo(fd); ok && state != unix.BPF_TCP_SYN_SENT && !l.epollOnly {
		l.closeProbe(fd, family, req.addr, req.done, req.sched, start, start, state != unix.BPF_TCP_ESTABLISHED)
		return
	}
	idx := l.alloc(fd, req, start, deadline)
	ev := unix.EpollEvent{Events: unix.EPOLLOUT, Fd: idx, Pad: l.slots[idx].gen}
	if errno := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); errno != 0 {
		l.release(idx)
		l.closeFD(fd)
		res.Err = &opError{"epoll_ctl", errno}
		l.finish(req.done, req.sched, res)
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

// alloc takes a slot for a probe whose SYN is out and puts it in the
// deadline heap.
func (l *loop) alloc(fd int, req *request, start, deadline int64) int32 {
	var idx int32
	if n := len(l.free); n > 0 {
		idx = l.free[n-1]
		l.free = l.free[:n-1]
	} else {
		l.slots = append(l.slots, slot{})
		idx = int32(len(l.slots) - 1)
	}
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
	l.closeProbe(s.fd, 0, s.addr, s.done, s.sched, s.start, l.woke, failed)
	l.release(idx)
}

// readTCPInfo reads the socket's TCP_INFO into l.tcpInfo and returns its
// state.
func (l *loop) readTCPInfo(fd int) (state uint8, ok bool) {
	size := uint32(unsafe.Sizeof(l.tcpInfo))
	if errno := rawGetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&l.tcpInfo), &size); errno != 0 {
		l.tcpInfo.Rtt = 0
		l.tcpInfo.Last_ack_recv = 0
		return 0, false
	}
	return l.tcpInfo.State, true
}

// closeProbe reads the outcome of a probe whose answer has come, ends its
// connection and queues the result. seen is when the loop saw the answer
// (the return of epoll_wait, or the connect() that completed inline).
// When failed is false, l.tcpInfo holds the socket's TCP_INFO. A socket
// that never entered epoll (family != 0) is kept for another probe;
// others are closed.
func (l *loop) closeProbe(fd, family int, addr netip.AddrPort, done func(Result), sched *Schedule, start, seen int64, failed bool) {
	res := Result{Addr: addr}
	var rtt, ackAgo int64
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
		rtt = int64(l.tcpInfo.Rtt) * int64(time.Microsecond)
		if family == 0 {
			l.epollUp.Add(1)
		}
		// The kernel's own clock of the SYN-ACK's arrival, in ms
		// (jiffies): it counts time the loop spent off the CPU before
		// epoll_wait returned, which seen does not.
		ackAgo = int64(l.tcpInfo.Last_ack_recv) * int64(time.Millisecond)
	}
	if family != 0 {
		l.recycle(fd, family) // the RST goes out now
	} else {
		l.closeFD(fd) // zero linger: the RST goes out now
	}
	end := l.e.now()
	res.Duration = time.Duration(end - start)
	if res.Err == nil {
		res.RTT = time.Duration(rtt)
		delay := end - seen
		if ackAgo <= end-start && ackAgo > delay {
			delay = ackAgo // never older than the SYN itself
		}
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
	l.closeFD(s.fd)
	res := Result{Addr: s.addr, Err: ErrTimeout, Duration: time.Duration(now - s.start)}
	l.finish(s.done, s.sched, res)
	l.release(idx)
}

// shutdown closes every probe socket and completes every one-off probe
// with ErrClosed. It runs on the loop goroutine once closed is set, so no
// new request or schedule can come in.
func (l *loop) shutdown() {
	// Sockets first, all of them, before any callback runs.
	for len(l.heap) > 0 {
		idx := l.heap[len(l.heap)-1]
		s := &l.slots[idx]
		l.closeFD(s.fd)
		if s.sched != nil {
			s.sched.removed = true
			l.outcomes.add(Closed)
		} else {
			l.finish(s.done, nil, Result{Addr: s.addr, Err: ErrClosed})
		}
		l.release(idx)
	}
	for i := range l.idle {
		for _, fd := range l.idle[i] {
			l.closeFD(fd)
		}
		l.idle[i] = nil
	}
	l.mu.Lock()
	var queued []request
	for l.queue.n > 0 {
		queued = l.queue.popN(queued, l.queue.n)
	}
	l.queued.Store(0)
	l.adds, l.stops, l.nows = nil, nil, nil
	l.stopping = true  // no look at epoll from deliver
	unix.Close(l.evfd) // under mu: see wakeLocked
	l.mu.Unlock()
	unix.Close(l.epfd)
	for i := range queued {
		l.finish(queued[i].done, nil, Result{Addr: queued[i].addr, Err: ErrClosed})
	}
	for _, s := range l.timers {
		s.idx = -1
		s.removed = true
	}
	l.timers = nil
	l.scheduled.Store(0)
	l.headDue.Store(math.MaxInt64)
	l.overdue.Store(0)
	l.deliver()
}

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0] = byte(port >> 8)
	b[1] = byte(port)
}

func errnoOf(err error) syscall.Errno {
	if errno, ok := err.(syscall.Errno); ok {
		return errno
	}
	return syscall.EINVAL
}
