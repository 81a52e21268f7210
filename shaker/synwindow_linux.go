//go:build linux && !shaker_fallback

package shaker

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The SYN's window: from a probe's connect() until its socket is closed
// (the handshake finished inside connect(), as on loopback) or is the
// closer's (on its epoll), a SYN-ACK may have come, and the kernel's
// delayed ACK runs. A goroutine preempted there waits for a P: tens of ms
// when other goroutines hold them all (25 ms measured in Caddy with its
// admin API read in a loop, on the veth path of TestCloseDelayBurstsInCaddy),
// and the kernel's 200 ms is the only bound. The Go scheduler preempts a
// goroutine only at a safe point, and a nosplit function has none (the
// compiler marks all of its points unsafe, and it has no stack check to
// be preempted in), so the window is one nosplit function that calls only
// nosplit ones: the raw system calls, sync/atomic, the runtime's
// nanotime. The thread can still be descheduled by the kernel, as any
// thread can; no goroutine can take its place.

// What synWindow did with a probe's socket.
const (
	// connect() failed with errno; the loop owns the socket.
	synError = iota
	// The handshake finished inside connect(), and the connection is
	// aborted (an RST): the socket is kept for reuse if kept, else
	// closed. The loop's tcpInfo holds its TCP_INFO, end the engine time
	// after the RST.
	synAnswered
	// connect() ended the probe inside it another way (an RST: the port
	// is closed): the loop owns the socket and reads SO_ERROR.
	synEnded
	// The SYN is out and the socket is the closer's.
	synWatched
	// epoll_ctl on the closer's epoll failed with errno; the loop owns
	// the socket.
	synUnwatched
	// The SYN is out; the loop owns the socket and watches it itself
	// (no closer, or no cslot for it).
	synSent
)

// synProbe is a probe going through synWindow: set before, read after.
type synProbe struct {
	fd    int
	sa    unsafe.Pointer
	salen uintptr
	reuse bool   // the socket may be kept for another probe (recycle)
	cs    *cslot // the probe's slot with the closer; nil: none
	idx   int32  // the probe's slot, which alloc takes next
	gen   int32
	errno syscall.Errno
	start int64 // engine time just before connect(), with no safe point between
	kept  bool  // synAnswered: the socket is kept
	info  int64 // synAnswered: engine time after the TCP_INFO read
	end   int64 // synAnswered: engine time after the abort
}

// synWindow sends the probe's SYN and, with no safe point in between,
// aborts its connection if the answer came inside connect(), or hands
// its socket to the closer. It is never inlined: inlined into start, which
// is not nosplit, it would have safe points again.
//
//go:nosplit
//go:noinline
func (l *loop) synWindow(p *synProbe) int {
	p.start = l.e.now()
	if errno := rawConnect(p.fd, p.sa, p.salen); errno != 0 && errno != unix.EINPROGRESS {
		p.errno = errno
		return synError
	}
	if state, ok := l.readTCPInfo(p.fd); ok && state != unix.BPF_TCP_SYN_SENT && !l.epollOnly {
		if state != unix.BPF_TCP_ESTABLISHED {
			return synEnded
		}
		p.info = l.e.now()
		// connect(AF_UNSPEC) aborts the connection as close() with a
		// zero linger does, and keeps the socket.
		p.kept = p.reuse && rawConnect(p.fd, unsafe.Pointer(&unspec), unsafe.Sizeof(unspec)) == 0
		if !p.kept {
			rawClose(p.fd)
		}
		p.end = l.e.now()
		return synAnswered
	}
	if p.cs == nil {
		return synSent
	}
	if p.errno = l.cl.watch(p.cs, p.fd, p.idx, p.gen); p.errno != 0 {
		return synUnwatched
	}
	return synWatched
}
