//go:build linux && !shaker_fallback

package shaker

import (
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"golang.org/x/sys/unix"
)

func needCloser(t *testing.T) {
	t.Helper()
	if !withCloser {
		t.Skip("the closer is off under the race detector (closer_race.go): run without -race")
	}
}

// monotonic reads CLOCK_MONOTONIC, the closer's clock, in ns.
func monotonic(t testing.TB) int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano()
}

// fdOpen reports whether fd is an open descriptor of this process.
func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// TestCloserOwnership: who closes a probe's socket. The closer takes an
// armed slot of the event's generation and closes its socket; a slot the
// loop took back (its deadline), or an event of an older generation, is
// left alone, and the socket stays open for the loop to close.
func TestCloserOwnership(t *testing.T) {
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(evfd)
	l := &loop{e: &Engine{base: nanotime()}, budget: 3 * chunkSize / 2, evfd: evfd}
	c, err := newCloser(l)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	if got := len(c.chunks); got != 2 {
		t.Fatalf("%d chunks for a budget of %d, want 2", got, l.budget)
	}
	if c.slot(2*chunkSize) != nil || c.slot(-1) != nil {
		t.Fatal("a slot past the budget, or of a negative index, was given")
	}
	pair := func() int {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fds[1]) })
		return fds[0]
	}

	// Taken back by the loop: the closer leaves it.
	fd := pair()
	cs := c.slot(5)
	if errno := c.watch(cs, fd, 5, 7); errno != 0 {
		t.Fatal(errno)
	}
	if !c.takeBack(cs, 7) {
		t.Fatal("the loop could not take back an armed slot")
	}
	if c.closeAnswered(5, 7, unix.EPOLLOUT, 1, 0) {
		t.Fatal("the closer took a slot the loop had taken back")
	}
	if !fdOpen(fd) {
		t.Fatal("the closer closed a socket the loop had taken back")
	}
	unix.Close(fd)

	// An old generation's event: left alone; this one's: closed, pushed.
	fd = pair()
	cs = c.slot(chunkSize + 3) // the second chunk
	if errno := c.watch(cs, fd, chunkSize+3, 9); errno != 0 {
		t.Fatal(errno)
	}
	if c.closeAnswered(chunkSize+3, 8, unix.EPOLLOUT, 1, 0) || !fdOpen(fd) {
		t.Fatal("an event of an older generation closed the socket")
	}
	if !c.closeAnswered(chunkSize+3, 9, unix.EPOLLOUT|unix.EPOLLERR, 100, 60) {
		t.Fatal("the closer did not take an armed slot of its generation")
	}
	if fdOpen(fd) {
		t.Fatal("the closer took the slot but left its socket open")
	}
	if c.takeBack(cs, 9) {
		t.Fatal("the loop took back a slot the closer had closed")
	}
	if cs.failed != 1 || cs.seen != 100 || cs.since != 60 || cs.end < cs.seen {
		t.Fatalf("closed slot: failed %d, seen %d, since %d, end %d", cs.failed, cs.seen, cs.since, cs.end)
	}

	// A second one, then the stack: the last pushed on top.
	fd = pair()
	cs2 := c.slot(0)
	if errno := c.watch(cs2, fd, 0, 1); errno != 0 {
		t.Fatal(errno)
	}
	if !c.closeAnswered(0, 1, unix.EPOLLOUT, 200, 0) {
		t.Fatal("the closer did not take the second slot")
	}
	h := c.takeClosed()
	var got []int32
	for h != 0 {
		idx := int32(h - 1)
		got = append(got, idx)
		h = uint64(uint32(c.slot(idx).next))
	}
	if len(got) != 2 || got[0] != 0 || got[1] != chunkSize+3 {
		t.Fatalf("stack %v, want [0 %d]", got, chunkSize+3)
	}
	if c.takeClosed() != 0 {
		t.Fatal("the stack was not emptied")
	}
}

// TestCloserSince: each answer the closer closes carries a time it cannot
// have come before (cslot.since, for epollDelay): none for the first
// batches, nor after a batch that filled the events buffer (it may have
// left answers behind), and after one that did not, the entry into that
// epoll_wait, which is after the batch before and before the answer.
func TestCloserSince(t *testing.T) {
	needCloser(t)
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(evfd)
	const early = maxEvents + 10 // ready before the closer runs: a full batch, then the rest
	l := &loop{e: &Engine{base: nanotime()}, budget: early + 1, evfd: evfd}
	c, err := newCloser(l)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	arm := func(idx int32) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fds[1]) })
		if errno := c.watch(c.slot(idx), fds[0], idx, 1); errno != 0 { // writable: ready at once
			t.Fatal(errno)
		}
	}
	// collect waits, on the loop's eventfd, until n slots are closed.
	collect := func(n int) map[int32]*cslot {
		got := map[int32]*cslot{}
		var pfd [1]unix.PollFd
		for deadline := time.Now().Add(10 * time.Second); len(got) < n; {
			if c.sleep(farFuture) {
				pfd[0] = unix.PollFd{Fd: int32(evfd), Events: unix.POLLIN}
				if _, err := unix.Poll(pfd[:], int(time.Until(deadline).Milliseconds())+1); err != nil && err != unix.EINTR {
					t.Fatal(err)
				}
				var buf [8]byte
				unix.Read(evfd, buf[:])
			}
			c.awake()
			for h := c.takeClosed(); h != 0; {
				idx := int32(h - 1)
				got[idx] = c.slot(idx)
				h = uint64(uint32(got[idx].next))
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d answers closed in 10 s", len(got), n)
			}
		}
		return got
	}

	for i := range int32(early) {
		arm(i)
	}
	ready, start := make(chan error, 1), make(chan closerStart, 1)
	go c.run(false, ready, start)
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	start <- closerStart{serve: true}
	defer c.stop()

	first := collect(early)
	seen1, seen2 := int64(math.MaxInt64), int64(0) // the first batch's, the last's
	for _, cs := range first {
		seen1, seen2 = min(seen1, cs.seen), max(seen2, cs.seen)
	}
	inFirst := 0
	for idx, cs := range first {
		if cs.since != 0 {
			t.Errorf("answer %d (of the first batches) since %d, want 0: no look before it left none behind", idx, cs.since)
		}
		if cs.seen == seen1 {
			inFirst++
		}
	}
	if inFirst != maxEvents {
		t.Fatalf("the first batch had %d answers, want a full buffer of %d", inFirst, maxEvents)
	}

	armed := monotonic(t)
	arm(early)
	cs := collect(1)[early]
	if cs == nil {
		t.Fatal("the last answer was not closed")
	}
	if cs.since <= seen1 || cs.since >= seen2 || cs.since >= armed {
		t.Errorf("the last answer since %d: want after the full batch (%d), before the next (%d) and before it was armed (%d)",
			cs.since, seen1, seen2, armed)
	}
}

// TestClosedSince: a closer's bound on an answer counts only where its
// look was entered after the socket was on its epoll (the loop adds it
// from its own thread, and an answer that came before the add waits on
// the ready list from the add on), by more than the clock offset's error.
func TestClosedSince(t *testing.T) {
	us := int64(time.Microsecond)
	const mono0 = 1_000_000 * 1000 // the closer's clock at engine time 0
	for _, c := range []struct {
		since, added, want int64 // since on the closer's clock, added and want in engine time
	}{
		{since: 0, added: 0, want: 0},                            // no look yet that left none behind
		{since: mono0 + 500*us, added: 100 * us, want: 500 * us}, // entered after the add
		{since: mono0 + 100*us + sinceMargin, added: 100 * us, want: 100*us + sinceMargin},
		{since: mono0 + 100*us + sinceMargin - 1, added: 100 * us, want: 0}, // within the offset's error
		{since: mono0 + 50*us, added: 100 * us, want: 0},                    // entered before the add
	} {
		got := closedSince(&cslot{since: c.since}, &slot{added: c.added}, mono0)
		if got != c.want {
			t.Errorf("since %d, added %d: bound %d, want %d", c.since-mono0, c.added, got, c.want)
		}
	}
}

// TestCloserWhileLoopHeld: a callback holds the loop for longer than the
// kernel's delayed ACK (200 ms) while a probe it started has its answer.
// Without the closer the loop would close the socket after the callback,
// past the ACK, and the listener would accept it; the closer closes it at
// once.
func TestCloserWhileLoopHeld(t *testing.T) {
	needCloser(t)
	e, err := New(Options{Loops: 1, epollOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	bad := netip.MustParseAddrPort("[fe80::1%nosuchif0]:1") // fails at its start: nothing is sent
	const hold = 300 * time.Millisecond
	const within = 10 * time.Second

	// Hold the loop, so that the probe and the holder queue behind it and
	// start in one turn: the probe's SYN first, then the holder's
	// callback, which holds the loop while the answer comes.
	entered, release := make(chan struct{}), make(chan struct{})
	e.ProbeAsync(bad, within, func(Result) { close(entered); <-release })
	select {
	case <-entered:
	case <-time.After(within):
		t.Fatal("the first callback did not run")
	}
	answered := make(chan Result, 1)
	e.ProbeAsync(l.Addr, within, func(r Result) { answered <- r })
	e.ProbeAsync(bad, within, func(Result) { time.Sleep(hold) }) // the slow callback is the scenario
	close(release)

	var r Result
	select {
	case r = <-answered:
	case <-time.After(within):
		t.Fatal("the probe had no result")
	}
	if r.Outcome != Up {
		t.Fatalf("probe of a listener: %v (%v), want up", r.Outcome, r.Err)
	}
	st := e.Stats()
	if st.EpollUp != 1 {
		t.Fatalf("%d probes up through epoll, want 1", st.EpollUp)
	}
	// Closed by the loop, it would have waited for the held callback.
	if st.MaxCloseDelay >= hold {
		t.Fatalf("worst close delay %v with the loop held for %v: the socket waited for the loop", st.MaxCloseDelay, hold)
	}
	if n := l.ProbeAccepts(t); n != 0 {
		t.Fatalf("listener accepted %d probe connections", n)
	}
	t.Logf("loop held %v; the answered socket closed after %v; 0 accepted", hold, st.MaxCloseDelay)
}

// TestAnsweredInside: a SYN-ACK taken inside connect() is counted from
// the kernel's clock where that is later than the SYN, never before it,
// with the tick the loop has learned.
func TestAnsweredInside(t *testing.T) {
	ms := int64(time.Millisecond)
	for _, c := range [][5]int64{
		// start, info, ackAgo, tick: want
		{0, 50 * ms, 0, 10 * ms, 40 * ms},      // a long connect(), the answer at its end
		{0, 50 * ms, 36 * ms, 10 * ms, 4 * ms}, // the answer 36-46 ms before the read
		{0, 50 * ms, 36 * ms, 4 * ms, 10 * ms}, // 36-40 ms at HZ 250
		{0, 50 * ms, 48 * ms, 10 * ms, 0},      // no earlier than the SYN
		{100 * ms, 103 * ms, 0, 10 * ms, 100 * ms},
		{100 * ms, 112 * ms, 0, 4 * ms, 108 * ms},
	} {
		if got := answeredInside(c[0], c[1], c[2], c[3]); got != c[4] {
			t.Errorf("answeredInside(%d, %d, %d ms, tick %d ms) = %v, want %v", c[0]/ms, c[1]/ms, c[2]/ms, c[3]/ms, time.Duration(got), time.Duration(c[4]))
		}
	}
}

// TestCloseDelayViews: a close delay counts from the kernel's microsecond
// clock (the SYN's time plus tcpi_rtt, less a microsecond of rounding)
// where it knows the arrival, its first SYN answered, and agrees with
// when the answer was seen; else from the earliest the answer can have
// come: by the tick clock (a whole tick before what tcpi_last_ack_recv
// says), but not before the last look at epoll that left no answer
// behind (since), nor before the SYN.
func TestCloseDelayViews(t *testing.T) {
	ms, us := int64(time.Millisecond), int64(time.Microsecond)
	for _, c := range []struct {
		name             string
		inside, old      bool  // old: microOK false
		start, seen, end int64 // seen: epoll's return, or inside: the TCP_INFO read
		since            int64 // epoll: no answer came before it
		rtt, ackAgo      int64
		retrans          uint32
		want             int64
		exact, apart     uint64
	}{
		{name: "epoll: from the SYN plus the RTT", start: 0, seen: 30 * ms, end: 31 * ms, since: 29 * ms, rtt: 20 * ms, ackAgo: 12 * ms,
			want: 11*ms + us, exact: 1},
		{name: "epoll: retransmitted SYN, the tick clock", start: 0, seen: 1030 * ms, end: 1031 * ms, rtt: 20 * ms, ackAgo: 12 * ms, retrans: 1,
			want: 17 * ms}, // 1030 - 12 - 4 (tick)
		{name: "epoll: retransmitted SYN, since the last look", start: 0, seen: 1030 * ms, end: 1031 * ms, since: 1020 * ms, rtt: 20 * ms, ackAgo: 12 * ms, retrans: 1,
			want: 11 * ms},
		{name: "epoll: retransmitted SYN, this tick", start: 0, seen: 1030 * ms, end: 1031 * ms, rtt: 20 * ms, retrans: 1,
			want: 5 * ms},
		{name: "epoll: retransmitted SYN, a look just before", start: 0, seen: 1030 * ms, end: 1031 * ms, since: 1030*ms - 500*us, rtt: 20 * ms, retrans: 1,
			want: 1*ms + 500*us},
		{name: "epoll: no RTT", start: 0, seen: 30 * ms, end: 31 * ms, ackAgo: 4 * ms,
			want: 9 * ms},
		{name: "epoll: never before the SYN", start: 100 * ms, seen: 101 * ms, end: 102 * ms, since: 50 * ms,
			want: 2 * ms},
		{name: "epoll: the clock puts it after seen", start: 0, seen: 10 * ms, end: 11 * ms, since: 9 * ms, rtt: 20 * ms,
			want: 2 * ms, apart: 1},
		{name: "epoll: before Linux 4.20, another clock", old: true, start: 0, seen: 30 * ms, end: 31 * ms, since: 28 * ms, rtt: 20 * ms,
			want: 3 * ms},
		{name: "inside: from the SYN plus the RTT", inside: true, start: 0, seen: 50 * ms, end: 51 * ms, rtt: 47 * ms,
			want: 4*ms + us, exact: 1},
		{name: "inside: the tick clock's later", inside: true, start: 0, seen: 50 * ms, end: 51 * ms, rtt: 10 * us,
			want: 5 * ms}, // answeredInside: 50 - 0 - 4 (tick)
		{name: "inside: retransmitted SYN", inside: true, start: 0, seen: 50 * ms, end: 51 * ms, rtt: 45 * ms, retrans: 2,
			want: 5 * ms},
		{name: "inside: the clock puts it after the read", inside: true, start: 0, seen: 50 * ms, end: 51 * ms, rtt: 60 * ms,
			want: 5 * ms, apart: 1},
	} {
		l := &loop{tick: 4 * ms, microOK: !c.old}
		v := kernelView{rtt: c.rtt, ackAgo: c.ackAgo, retrans: c.retrans}
		var got int64
		if c.inside {
			got = l.insideDelay(c.start, c.seen, c.end, v)
		} else {
			got = l.epollDelay(c.start, c.seen, c.since, c.end, v)
		}
		if got != c.want || l.exactDelays.Load() != c.exact || l.viewsApart.Load() != c.apart {
			t.Errorf("%s: delay %v, exact %d, apart %d; want %v, %d, %d", c.name, time.Duration(got),
				l.exactDelays.Load(), l.viewsApart.Load(), time.Duration(c.want), c.exact, c.apart)
		}
	}
}

// TestMonoOffset: a time read on CLOCK_MONOTONIC, less the offset, falls
// between the engine times read just before and after it, within a few
// microseconds; and an engine whose time 0 is a second later gets an
// offset a second larger.
func TestMonoOffset(t *testing.T) {
	clock := func() int64 { return monotonic(t) }
	base := time.Now()
	now := func() int64 { return int64(time.Since(base)) }
	later := func() int64 { return int64(time.Since(base)) - int64(time.Second) }
	off, off2 := monoOffset(now, clock), monoOffset(later, clock)
	if d := off2 - off - int64(time.Second); d < -int64(50*time.Microsecond) || d > int64(50*time.Microsecond) {
		t.Errorf("an engine clock a second behind: offset %v more, want 1s", time.Duration(off2-off))
	}
	slack := int64(50 * time.Microsecond) // a descheduled read, at most, on a busy machine
	bad := 0
	for range 100 {
		n1 := now()
		m := clock() - off
		n2 := now()
		if m < n1-slack || m > n2+slack {
			bad++
			t.Logf("the clock read %v in engine time, between %v and %v", time.Duration(m), time.Duration(n1), time.Duration(n2))
		}
	}
	if bad > 2 { // a descheduled bracket or two
		t.Errorf("%d of 100 readings outside their bracket", bad)
	}
}

// TestKernelAtLeast: kernel releases as uname -r gives them, against
// 4.20, where TCP's microsecond clock became CLOCK_MONOTONIC.
func TestKernelAtLeast(t *testing.T) {
	for _, c := range []struct {
		release string
		want    bool
	}{
		{"6.18.44-fc-v1045", true}, {"4.20.0", true}, {"5.4.0-150-generic", true},
		{"4.19.325", false}, {"4.18.0-553.el8_10.x86_64", false}, {"3.10.0-1160.el7.x86_64", false},
		{"10.0", true}, {"4.20-rc1", true}, {"", false}, {"six.1", false}, {"6", false},
	} {
		if got := kernelAtLeast(c.release, 4, 20); got != c.want {
			t.Errorf("kernelAtLeast(%q, 4, 20) = %v, want %v", c.release, got, c.want)
		}
	}
	if !microClock() {
		t.Logf("this kernel's TCP clock is not CLOCK_MONOTONIC: close delays are not timed in microseconds here")
	}
}

// TestNoteTick: a loop takes the kernel's tick for the least nonzero
// tcpi_last_ack_recv it has seen, never more than maxTick.
func TestNoteTick(t *testing.T) {
	ms := int64(time.Millisecond)
	l := &loop{tick: maxTick}
	for _, c := range [][2]int64{
		// ackAgo: tick after it
		{0, 10 * ms},       // no tick crossed: nothing learned
		{20 * ms, 10 * ms}, // two ticks of HZ 100: the cap holds
		{8 * ms, 8 * ms},   // two ticks of HZ 250
		{0, 8 * ms},
		{4 * ms, 4 * ms}, // one
		{12 * ms, 4 * ms},
	} {
		l.noteTick(c[0])
		if l.tick != c[1] {
			t.Fatalf("after ackAgo %v: tick %v, want %v", time.Duration(c[0]), time.Duration(l.tick), time.Duration(c[1]))
		}
	}
}
