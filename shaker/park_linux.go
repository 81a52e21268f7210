//go:build linux && !shaker_fallback

package shaker

import (
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A loop sleeps in the Go scheduler: its epoll instance is itself
// registered with the runtime's poller, and the loop goroutine parks until
// it has events or a deadline passes. A loop that sleeps in epoll_wait
// instead holds its thread in a system call, which sysmon, the runtime's
// monitor, answers by waking every 20 us to take the thread's P away:
// measured at 10,000 probes a second, most of the process's context
// switches. A parked goroutine waits for the runtime to poll (up to 10 ms
// on a busy process), so a loop parks only when a late look costs nothing
// but the results' latency: in raw mode, where nothing must be closed,
// and in connect mode with a closer, which closes the answered sockets
// itself (closer_linux.go). A connect-mode loop without one (under -race)
// keeps the direct epoll_wait: every answered socket must be closed within
// 200 ms.
type parker struct {
	f    *os.File
	rc   syscall.RawConn
	n    int
	err  unix.Errno
	read func(fd uintptr) bool
}

// newParker wraps the loop's epoll instance for the runtime's poller.
func (l *loop) newParker() error {
	if err := unix.SetNonblock(l.epfd, true); err != nil {
		return &opError{"fcntl O_NONBLOCK", errnoOf(err)}
	}
	// From here the os.File owns the epoll fd: closeEpoll closes it
	// through the file, never behind its back (its finalizer would close
	// the number again).
	p := &parker{f: os.NewFile(uintptr(l.epfd), "shaker-epoll")}
	l.parked = p
	rc, err := p.f.SyscallConn()
	if err != nil {
		return &opError{"epoll poller", unix.EINVAL}
	}
	p.rc = rc
	p.read = func(fd uintptr) bool {
		p.n, p.err = epollWait(int(fd), l.events, 0)
		return p.n != 0 || p.err != 0
	}
	return nil
}

// park waits until the loop's epoll instance has events, for at most msec
// milliseconds (-1: no bound), and reads them.
func (l *loop) park(msec int) (int, unix.Errno) {
	p := l.parked
	if msec > 0 {
		p.f.SetReadDeadline(time.Now().Add(time.Duration(msec) * time.Millisecond))
	} else {
		p.f.SetReadDeadline(time.Time{})
	}
	p.n, p.err = 0, 0
	if err := p.rc.Read(p.read); err != nil {
		return 0, 0 // the deadline: nothing came
	}
	return p.n, p.err
}

// closeEpoll closes the loop's epoll instance, through the runtime's
// poller if it is registered there.
func (l *loop) closeEpoll() {
	if l.parked != nil {
		l.parked.f.Close()
		return
	}
	unix.Close(l.epfd)
}
