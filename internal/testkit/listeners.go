//go:build linux

package testkit

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Listener is a real TCP listener whose accept loop counts every connection
// it accepts: a half-open probe must never be accepted. Sentinel
// connections, which Flush makes to drain the accept queue, announce
// themselves with a byte and are not counted.
type Listener struct {
	// Addr is the address it listens on.
	Addr netip.AddrPort

	ln        net.Listener
	total     atomic.Int64 // every accept()
	sentinels atomic.Int64
	sentinel  chan struct{}
	wg        sync.WaitGroup
}

// Listen starts a counting listener on network and address ("tcp4",
// "127.0.0.1:0", say). Close stops it.
func Listen(network, address string) (*Listener, error) {
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, err
	}
	l := &Listener{
		Addr:     ln.Addr().(*net.TCPAddr).AddrPort(),
		ln:       ln,
		sentinel: make(chan struct{}, 16),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

func (l *Listener) acceptLoop() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.total.Add(1)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			var b [1]byte
			if n, _ := c.Read(b[:]); n == 1 && b[0] == 'S' {
				l.sentinels.Add(1)
				l.sentinel <- struct{}{}
			}
		}()
	}
}

// Close closes the listener and waits for its accept loop and for the
// connections it accepted to be closed.
func (l *Listener) Close() error {
	err := l.ln.Close()
	l.wg.Wait()
	return err
}

// Accepted returns how many connections other than sentinels the listener
// has accepted so far. Unlike ProbeAccepts it does not flush the accept
// queue first.
func (l *Listener) Accepted() int64 { return l.total.Load() - l.sentinels.Load() }

// Flush makes a sentinel connection and waits until the accept loop has
// seen it: the accept queue is FIFO, so every connection a probe could have
// left in it has been accepted by then.
func (l *Listener) Flush() error {
	c, err := net.DialTimeout("tcp", l.Addr.String(), 5*time.Second)
	if err != nil {
		return fmt.Errorf("sentinel dial %v: %w", l.Addr, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{'S'}); err != nil {
		return fmt.Errorf("sentinel write %v: %w", l.Addr, err)
	}
	select {
	case <-l.sentinel:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("sentinel connection to %v never accepted", l.Addr)
	}
}

// NewListener is Listen for a test: it skips the test when it cannot
// listen, and closes the listener at the end of the test.
func NewListener(tb testing.TB, network, address string) *Listener {
	tb.Helper()
	l, err := Listen(network, address)
	if err != nil {
		tb.Skipf("cannot listen on %s %s: %v", network, address, err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// ProbeAccepts flushes the accept queue (see Flush) and returns how many
// connections other than sentinels the listener has accepted. It fails the
// test if the flush fails.
func (l *Listener) ProbeAccepts(tb testing.TB) int64 {
	tb.Helper()
	if err := l.Flush(); err != nil {
		tb.Fatal(err)
	}
	return l.Accepted()
}

// Listeners is a set of counting listeners.
type Listeners []*Listener

// ListenMany starts n counting listeners on network and address (whose
// port should be 0). On an error it closes those it started.
func ListenMany(n int, network, address string) (Listeners, error) {
	ls := make(Listeners, 0, n)
	for range n {
		l, err := Listen(network, address)
		if err != nil {
			ls.Close()
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// NewListeners is ListenMany for a test: it skips the test when it cannot
// listen (most often: too few file descriptors), and closes the listeners
// at the end of the test.
func NewListeners(tb testing.TB, n int, network, address string) Listeners {
	tb.Helper()
	ls, err := ListenMany(n, network, address)
	if err != nil {
		hint := ""
		if errors.Is(err, syscall.EMFILE) {
			hint = " (raise RLIMIT_NOFILE)"
		}
		tb.Skipf("%d listeners on %s %s: %v%s", n, network, address, err, hint)
	}
	tb.Cleanup(ls.Close)
	return ls
}

// Strings returns the listeners' addresses as host:port strings.
func (ls Listeners) Strings() []string {
	s := make([]string, len(ls))
	for i, l := range ls {
		s[i] = l.Addr.String()
	}
	return s
}

// Accepted returns the sum of the listeners' Accepted.
func (ls Listeners) Accepted() int64 {
	var n int64
	for _, l := range ls {
		n += l.Accepted()
	}
	return n
}

// ProbeAccepts returns the sum of the listeners' ProbeAccepts.
func (ls Listeners) ProbeAccepts(tb testing.TB) int64 {
	tb.Helper()
	var n int64
	for _, l := range ls {
		n += l.ProbeAccepts(tb)
	}
	return n
}

// Close closes every listener.
func (ls Listeners) Close() {
	for _, l := range ls {
		l.Close()
	}
}

// CountAccepts wraps ln so that n counts every connection accepted through
// it, for a server with an accept loop of its own (http.Server.Serve).
func CountAccepts(ln net.Listener, n *atomic.Int64) net.Listener {
	return countAccepts{ln, n}
}

type countAccepts struct {
	net.Listener
	n *atomic.Int64
}

func (l countAccepts) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// BindLoopback returns a TCP socket bound to a free port of ip, closed at
// the end of the test, and the address it is bound to. It skips the test
// when ip cannot be bound (no IPv6, say).
func BindLoopback(tb testing.TB, ip string) (int, netip.AddrPort) {
	tb.Helper()
	addr := netip.MustParseAddr(ip)
	family := unix.AF_INET
	var sa unix.Sockaddr
	if addr.Is4() {
		sa = &unix.SockaddrInet4{Addr: addr.As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Addr: addr.As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, sa); err != nil {
		tb.Skipf("cannot bind %s: %v", ip, err)
	}
	lsa, err := unix.Getsockname(fd)
	if err != nil {
		tb.Fatal(err)
	}
	switch a := lsa.(type) {
	case *unix.SockaddrInet4:
		return fd, netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return fd, netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	tb.Fatalf("getsockname: %T", lsa)
	return -1, netip.AddrPort{}
}

// BoundNotListening returns a loopback address with a bound socket that
// does not listen: the kernel answers SYNs to it with an RST.
func BoundNotListening(tb testing.TB, ip string) netip.AddrPort {
	tb.Helper()
	_, addr := BindLoopback(tb, ip)
	return addr
}

// QueueListener returns the address of a listener on ip with a backlog of
// 0 whose application never calls accept(), and a function that fills its
// accept queue: the kernel then drops new SYNs to it and probes time out.
// It is what a hung application looks like to a half-open probe.
func QueueListener(tb testing.TB, ip string) (addr netip.AddrPort, fill func()) {
	tb.Helper()
	fd, addr := BindLoopback(tb, ip)
	if err := unix.Listen(fd, 0); err != nil { // room for one connection
		tb.Fatal(err)
	}
	return addr, func() {
		tb.Helper()
		// Fill the queue with real connections until the listener reports
		// it full (TCP_INFO on a listener: tcpi_unacked is the accept
		// queue length, tcpi_sacked its limit).
		for i := 0; i < 4; i++ {
			info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
			if err != nil {
				tb.Fatal(err)
			}
			if info.Unacked > info.Sacked {
				return
			}
			c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
			if err != nil {
				tb.Fatalf("filling accept queue of %v: %v", addr, err)
			}
			tb.Cleanup(func() { c.Close() })
			// The server side joins the queue when our ACK is processed;
			// wait for it, boundedly.
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); runtime.Gosched() {
				info, _ = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
				if info.Unacked > uint32(i) {
					break
				}
			}
		}
		tb.Fatalf("accept queue of %v never filled", addr)
	}
}

// FullQueueListener returns the address of a listener whose accept queue is
// full (QueueListener, filled): the kernel drops new SYNs to it, so probes
// time out.
func FullQueueListener(tb testing.TB, ip string) netip.AddrPort {
	tb.Helper()
	addr, fill := QueueListener(tb, ip)
	fill()
	return addr
}
