//go:build linux && !shaker_fallback

package shaker

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls of a probe never block: its socket is non-blocking and
// its close, with a zero linger, aborts at once. The loop makes them raw,
// without the runtime's entersyscall/exitsyscall: it keeps its P through
// each, and each costs less. Between two of them a goroutine can still be
// preempted, unless they run in one nosplit function: the SYN's window
// (synwindow_linux.go), which is why these are nosplit. Only epoll_wait
// with a timeout, which sleeps, goes through the scheduler. (In connect
// mode the sockets that wait for their answer are closed by the loop's
// closer, which runs inside one system call: closer_linux.go.)

//go:nosplit
func rawClose(fd int) {
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

//go:nosplit
func rawSetsockopt(fd, level, opt int, val unsafe.Pointer, size uintptr) syscall.Errno {
	_, _, errno := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(val), size, 0)
	return errno
}

//go:nosplit
func rawGetsockopt(fd, level, opt int, val unsafe.Pointer, size *uint32) syscall.Errno {
	_, _, errno := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(val), uintptr(unsafe.Pointer(size)), 0)
	return errno
}

//go:nosplit
func rawConnect(fd int, sa unsafe.Pointer, size uintptr) syscall.Errno {
	_, _, errno := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(sa), size)
	return errno
}

//go:nosplit
func rawEpollCtl(epfd, op, fd int, ev *unix.EpollEvent) syscall.Errno {
	_, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	return errno
}

// epollWait waits through the scheduler when it may sleep, raw when it
// only polls (msec 0).
func epollWait(epfd int, events []unix.EpollEvent, msec int) (int, syscall.Errno) {
	if msec != 0 {
		n, err := unix.EpollWait(epfd, events, msec)
		if err != nil {
			return 0, errnoOf(err)
		}
		return n, 0
	}
	r, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	return int(r), errno
}
