//go:build linux

package testkit

import (
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// leak makes what a broken prober leaves behind: a socket with TCP_QUICKACK
// off, connected without blocking to to and left open, so that its SYN-ACK
// is acknowledged only by the kernel's delayed-ACK timer. It returns once
// the SYN-ACK is in hand (the socket is writable).
func leak(t *testing.T, to netip.AddrPort) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, 0); err != nil {
		t.Fatal(err)
	}
	err = unix.Connect(fd, &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()})
	if err != nil && err != unix.EINPROGRESS {
		t.Fatal(err)
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	if n, err := unix.Poll(pfd, 5000); n != 1 || err != nil {
		t.Fatalf("no SYN-ACK: poll %d %v", n, err)
	}
}

// TestProbeAcceptsAfterWindow: a socket leaked just before the count becomes
// a connection only when the delayed ACK goes out; ProbeAccepts must count
// it. Counted at once (a flush without the wait) it is not.
func TestProbeAcceptsAfterWindow(t *testing.T) {
	ls := NewListeners(t, 2, "tcp4", "127.0.0.1:0")
	for _, l := range ls {
		leak(t, l.Addr)
	}
	start := time.Now()
	if err := ls[0].Flush(); err != nil {
		t.Fatal(err)
	}
	if ls[0].accepted() != 0 {
		t.Skip("the kernel acknowledged the SYN-ACK at once: no delayed ACK to wait out here")
	}
	if n := ls.ProbeAccepts(t); n != 2 {
		t.Fatalf("ProbeAccepts = %d after two leaked sockets, want 2", n)
	}
	took := time.Since(start)
	t.Logf("two listeners counted in %v", took)
	if took > Window+time.Second {
		t.Errorf("counting two listeners took %v: one wait for all, want about %v", took, Window)
	}
}

// TestCountedSentinels: a CountAccepts listener counts a leaked socket after
// the window, and its sentinels are neither counted nor served.
func TestCountedSentinels(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n, served atomic.Int64
	c := CountAccepts(ln, &n)
	srv := &http.Server{ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			served.Add(1)
		}
	}, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })}
	go srv.Serve(c)
	t.Cleanup(func() { srv.Close() })

	for range 3 {
		if got := ProbeAccepts(t, c); got != 0 {
			t.Fatalf("%d accepted with only sentinels", got)
		}
	}
	if s := served.Load(); s != 0 {
		t.Fatalf("the server was handed %d sentinel connections", s)
	}
	leak(t, c.addrPort())
	if got := ProbeAccepts(t, c); got != 1 {
		t.Fatalf("ProbeAccepts = %d after a leaked socket, want 1", got)
	}
}

// TestHalfMade: a SYN answered and not yet acknowledged is a half-made
// connection to the listener's port.
func TestHalfMade(t *testing.T) {
	l := NewListener(t, "tcp4", "127.0.0.1:0")
	leak(t, l.Addr)
	m, err := HalfMade(map[uint16]bool{l.Addr.Port(): true})
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 {
		t.Skipf("half-made connections %v: the kernel acknowledged the SYN-ACK at once", m)
	}
	WaitWindow(l.Addr)
	if m, _ := HalfMade(map[uint16]bool{l.Addr.Port(): true}); len(m) != 0 {
		t.Errorf("half-made connections %v left after WaitWindow", m)
	}
}
