//go:build linux && !shaker_fallback

package shaker

import (
	"math"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

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
	inbox    []rawAnswer // raw mode: answers to this loop's probes, read by the first loop
	closed   bool
	sleeping bool // the loop is in, or about to enter, a blocking epoll_wait

	done chan struct{}

	// Owned by the loop goroutine.
	slots      []slot
	free       []int32
	heap       []int32      // slot indices, min-heap by deadline
	timers     []timerEntry // min-heap by due
	events     []unix.EpollEvent
	batch      []request
	addBuf     []*Schedule
	stopBuf    []*Schedule
	nowBuf     []*Schedule
	inboxBuf   []rawAnswer
	results    []pending
	idle       [2][]int // sockets kept for reuse, IPv4 and IPv6
	tcpInfo    unix.TCPInfo
	linger     unix.Linger
	evbuf      [8]byte
	woke       int64 // engine time at which the last epoll_wait returned
	looked     int64 // engine time before the last epoll_wait was entered
	since      int64 // none of the answers being handled came before it (handle); 0: no bound
	sinceNext  int64 // since for the answers of the next epoll_wait
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
	raw        *rawLoop // raw mode; nil in connect mode
	cl         *closer  // connect mode: closes the answered sockets
	parked     *parker  // sleeps in the Go scheduler, not in epoll_wait

	// tick is the kernel clock's tick as far as this loop knows it: as
	// measured (kernelTick), or the least nonzero tcpi_last_ack_recv of
	// its answers if that is shorter (noteTick).
	tick int64
	// microOK: the kernel's microsecond clock may time close delays
	// (microClock).
	microOK bool

	// exactDelays counts the close delays counted from the kernel's
	// microsecond clock (kernelView.arrival); viewsApart those where that
	// clock put the SYN-ACK after the loop or closer saw it, and was not
	// used. Read by tests.
	exactDelays, viewsApart atomic.Uint64

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

func newLoop(e *Engine, budget int, epollOnly bool) (*loop, error) {
	l := &loop{
		e:         e,
		budget:    budget,
		done:      make(chan struct{}),
		events:    make([]unix.EpollEvent, maxEvents),
		batch:     make([]request, 0, checkEvery),
		linger:    unix.Linger{Onoff: 1, Linger: 0},
		epollOnly: epollOnly,
		tick:      kernelTick(),
		microOK:   microClock(),
	}
	l.headDue.Store(math.MaxInt64)
	var err error
	if l.epfd, l.evfd, err = epollWithEventfd(wakeIndex); err != nil {
		return nil, err
	}
	return l, nil
}

// epollWithEventfd makes an epoll instance and a non-blocking eventfd it
// watches for input, under index (the event's Fd field): a loop's wake-up
// and a closer's stop. On error nothing is left open.
func epollWithEventfd(index int32) (epfd, evfd int, err error) {
	if epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return -1, -1, &opError{"epoll_create1", errnoOf(err)}
	}
	if evfd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		unix.Close(epfd)
		return -1, -1, &opError{"eventfd", errnoOf(err)}
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: index}
	if err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(evfd)
		unix.Close(epfd)
		return -1, -1, &opError{"epoll_ctl", errnoOf(err)}
	}
	return epfd, evfd, nil
}

// openCloser gives a connect-mode loop its closer, and lets the loop
// sleep in the Go scheduler: with the closer closing the answered sockets,
// a late wake-up of the loop delays only callbacks.
func (l *loop) openCloser() error {
	if !withCloser {
		return nil
	}
	c, err := newCloser(l)
	if err != nil {
		return err
	}
	l.cl = c
	return l.newParker()
}

// close releases a loop that never ran.
func (l *loop) close() {
	if l.raw != nil {
		l.raw.close()
	}
	if l.cl != nil {
		l.cl.close()
	}
	unix.Close(l.evfd)
	l.closeEpoll()
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
		l.inboxBuf, l.inbox = l.inbox, l.inboxBuf[:0]
		l.mu.Unlock()
		l.takeSchedules()
		l.takeAnswers()

		wait := l.waitMs(l.e.now())
		if l.hurry {
			wait, l.hurry = 0, false
		}
		if wait != 0 && l.cl != nil {
			until := int64(farFuture)
			if wait > 0 {
				until = l.e.now() + int64(wait)*int64(time.Millisecond)
			}
			if !l.cl.sleep(until) {
				wait = 0 // closed sockets wait for their callbacks
			}
		}
		if wait != 0 {
			l.mu.Lock()
			if l.closed || len(l.adds) > 0 || len(l.stops) > 0 || len(l.nows) > 0 || len(l.inbox) > 0 || l.queue.n > 0 && len(l.heap) < l.budget {
				wait = 0
			} else {
				l.sleeping = true
			}
			l.mu.Unlock()
			if wait == 0 && l.cl != nil {
				l.cl.awake()
			}
		}

		var n int
		var errno unix.Errno
		l.looked = l.e.now()
		if l.parked != nil && wait != 0 {
			n, errno = l.park(wait)
		} else {
			n, errno = epollWait(l.epfd, l.events, wait)
		}
		l.woke = l.e.now()
		if wait != 0 {
			l.mu.Lock()
			l.sleeping = false
			l.mu.Unlock()
			if l.cl != nil {
				l.cl.awake()
			}
		}
		// Completions first: close every socket that has its answer (in
		// connect mode the closer has closed them: take their results).
		l.handleWait(n, errno)
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
// Their close delays count from no earlier than since (epollDelay): the
// entry into the last epoll_wait before theirs that returned fewer events
// than it could, and so took every answer ready by then.
func (l *loop) handle(n int) {
	l.full = n == len(l.events)
	l.since = l.sinceNext
	if !l.full {
		l.sinceNext = l.looked
	}
	if l.cl == nil && int64(n) > l.maxReady.Load() { // else the closer's batches are the bursts
		l.maxReady.Store(int64(n))
	}
	for i := 0; i < n; i++ {
		ev := &l.events[i]
		if ev.Fd == wakeIndex {
			unix.Read(l.evfd, l.evbuf[:])
			continue
		}
		if ev.Fd <= rawIndexTCP4 {
			l.readRaw(ev.Fd)
			continue
		}
		l.complete(ev.Fd, ev.Pad, ev.Events)
	}
}

// look reads epoll without waiting and closes the sockets that have
// answered: between two slices of other work, so that a SYN-ACK never
// waits for a whole turn.
func (l *loop) look() {
	l.looked = l.e.now()
	n, errno := epollWait(l.epfd, l.events, 0)
	l.woke = l.e.now()
	l.handleWait(n, errno)
}

// handleWait handles what an epoll_wait returned: n events, or errno.
func (l *loop) handleWait(n int, errno syscall.Errno) {
	if errno != 0 {
		if errno != unix.EINTR {
			// epoll_wait fails only on a bad epfd or buffer: a bug.
			panic("shaker: epoll_wait: " + errno.Error())
		}
		n = 0
	}
	l.handle(n)
	l.collect()
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
			l.timers[s.idx].due = now
			l.timerUp(int(s.idx))
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
		if l.timers[0].due > now {
			break
		}
		s := l.timers[0].s
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

// shutdown closes every probe socket and completes every one-off probe
// with ErrClosed. It runs on the loop goroutine once closed is set, so no
// new request or schedule can come in.
func (l *loop) shutdown() {
	// The closer first: from its stop the loop owns every socket the
	// closer had not closed. Those it had closed are over like the others
	// in flight (closed, ErrClosed), and their numbers, which the kernel
	// may have given to other files since, are not closed again.
	if l.cl != nil {
		l.cl.stop()
		for h := l.cl.takeClosed(); h != 0; {
			idx := int32(h - 1)
			h = uint64(uint32(l.cl.slot(idx).next))
			l.slots[idx].fd = closedFD
			l.open--
		}
		l.sockets.Store(int64(l.open))
	}
	// Sockets first, all of them, before any callback runs.
	for len(l.heap) > 0 {
		idx := l.heap[len(l.heap)-1]
		s := &l.slots[idx]
		if s.fd >= 0 {
			l.closeFD(s.fd)
		}
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
	l.adds, l.stops, l.nows, l.inbox = nil, nil, nil, nil
	l.stopping = true  // no look at epoll from deliver
	unix.Close(l.evfd) // under mu: see wakeLocked
	l.mu.Unlock()
	l.closeEpoll()
	if l.raw != nil {
		l.raw.close()
	}
	if l.cl != nil {
		l.cl.close()
	}
	for i := range queued {
		l.finish(queued[i].done, nil, Result{Addr: queued[i].addr, Err: ErrClosed})
	}
	for _, t := range l.timers {
		t.s.idx = -1
		t.s.removed = true
	}
	l.timers = nil
	l.scheduled.Store(0)
	l.headDue.Store(math.MaxInt64)
	l.overdue.Store(0)
	l.deliver()
}
