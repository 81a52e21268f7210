//go:build linux

package main

import (
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawSequential is the floor: one probe at a time with raw system calls
// (socket, two setsockopts, connect, poll, getsockopt SO_ERROR, close), the
// loop DESIGN.md's C figures come from. It ignores the concurrency.
func rawSequential(addrs []netip.AddrPort, _ int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
	var stopped atomic.Bool
	go func() { <-stop; stopped.Store(true) }()
	var n, failed int64
	zero := int32(0)
	linger := unix.Linger{Onoff: 1}
	for k := 0; !stopped.Load(); k++ {
		a := addrs[k%len(addrs)]
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.Addr().As4()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(a.Port()>>8), byte(a.Port())
		fd, _, errno := unix.RawSyscall(unix.SYS_SOCKET, unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if errno != 0 {
			failed++
			n++
			continue
		}
		unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, uintptr(unsafe.Pointer(&zero)), 4, 0)
		unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&linger)), unsafe.Sizeof(linger), 0)
		unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		unix.Poll(pfd, 1000)
		var soerr int32
		size := uint32(4)
		unix.RawSyscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_ERROR, uintptr(unsafe.Pointer(&soerr)), uintptr(unsafe.Pointer(&size)), 0)
		unix.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
		if soerr != 0 || pfd[0].Revents&unix.POLLOUT == 0 {
			failed++
		}
		n++
	}
	return n, failed, 0, nil
}
