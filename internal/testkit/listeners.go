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

// accepted returns how many connections other than sentinels the listener
// has accepted so far. It neither waits out the kernel's window nor flushes
// the accept queue: count with ProbeAccepts or SettledAccepts, which do.
func (l *Listener) accepted() int64 { return l.total.Load() - l.sentinels.Load() }

func (l *Listener) addrPort() netip.AddrPort { return l.Addr }

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

// ProbeAccepts waits out the kernel's delayed-ACK window, flushes the
// accept queue (see Flush) and returns how many connections other than
// sentinels the listener has accepted (see the package function
// ProbeAccepts). For several listeners, count them together
// (Listeners.ProbeAccepts): one wait for all.
func (l *Listener) ProbeAccepts(tb testing.TB) int64 {
	tb.Helper()
	return ProbeAccepts(tb, l)
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

// ProbeAccepts returns the sum of the listeners' ProbeAccepts, after one
// wait for all of them.
func (ls Listeners) ProbeAccepts(tb testing.TB) int64 {
	tb.Helper()
	return ProbeAccepts(tb, ls.counters()...)
}

// SettledAccepts is ProbeAccepts outside a test (bench's listener process).
func (ls Listeners) SettledAccepts() (int64, error) {
	return SettledAccepts(ls.counters()...)
}

// Snapshot flushes the listeners' accept queues and returns how many
// connections they accepted, without waiting out the kernel's window: it is
// for a mark inside a run that goes on (bench's "accepted while running"),
// whose end is counted with SettledAccepts. A count once probing has
// stopped must wait (SettledAccepts, ProbeAccepts).
func (ls Listeners) Snapshot() (int64, error) {
	return flushCount(ls.counters()...)
}

func (ls Listeners) counters() []Counter {
	cs := make([]Counter, len(ls))
	for i, l := range ls {
		cs[i] = l
	}
	return cs
}

// Close closes every listener.
func (ls Listeners) Close() {
	for _, l := range ls {
		l.Close()
	}
}

// CountAccepts wraps ln so that n counts every connection accepted through
// it, for a server with an accept loop of its own (http.Server.Serve). Count
// with ProbeAccepts or SettledAccepts on what it returns, not by reading n:
// they wait out the kernel's window and flush the accept queue first.
func CountAccepts(ln net.Listener, n *atomic.Int64) *Counted {
	return &Counted{Listener: ln, n: n, sentinels: map[uint16]chan struct{}{}}
}

// Counted is a listener wrapped by CountAccepts. Its Flush makes a sentinel
// connection from a port it binds first, so that Accept can tell it from
// any other connection: Accept closes it, does not count it, and never
// hands it to the server.
type Counted struct {
	net.Listener
	n *atomic.Int64

	mu        sync.Mutex
	sentinels map[uint16]chan struct{} // by the sentinel's local port
}

// Accept returns the next connection that is not a sentinel, counting it.
func (l *Counted) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return c, err
		}
		if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			l.mu.Lock()
			ch, sentinel := l.sentinels[uint16(a.Port)]
			delete(l.sentinels, uint16(a.Port))
			l.mu.Unlock()
			if sentinel && a.IP.IsLoopback() {
				c.Close()
				close(ch)
				continue
			}
		}
		l.n.Add(1)
		return c, nil
	}
}

func (l *Counted) accepted() int64 { return l.n.Load() }

func (l *Counted) addrPort() netip.AddrPort {
	a, _ := l.Addr().(*net.TCPAddr)
	if a == nil {
		return netip.AddrPort{}
	}
	return a.AddrPort()
}

// Flush makes a sentinel connection and waits until Accept has seen it: the
// accept queue is FIFO, so every connection a probe could have left in it
// has been accepted (and counted) by then. The server must be serving.
func (l *Counted) Flush() error {
	to := l.addrPort()
	ip := to.Addr().Unmap()
	if ip.IsUnspecified() {
		ip = netip.MustParseAddr("127.0.0.1")
		if to.Addr().Is6() && !to.Addr().Is4In6() {
			ip = netip.IPv6Loopback()
		}
	}
	to = netip.AddrPortFrom(ip, to.Port())
	var seen chan struct{}
	var port uint16
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(network, _ string, rc syscall.RawConn) error {
		// bind before connect(), and register the port, so that Accept
		// cannot see the connection before it knows it for a sentinel
		var err error
		cerr := rc.Control(func(fd uintptr) {
			var sa unix.Sockaddr = &unix.SockaddrInet4{}
			if network == "tcp6" {
				sa = &unix.SockaddrInet6{}
			}
			if err = unix.Bind(int(fd), sa); err != nil {
				return
			}
			var lsa unix.Sockaddr
			if lsa, err = unix.Getsockname(int(fd)); err != nil {
				return
			}
			switch a := lsa.(type) {
			case *unix.SockaddrInet4:
				port = uint16(a.Port)
			case *unix.SockaddrInet6:
				port = uint16(a.Port)
			}
		})
		if err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		seen = make(chan struct{})
		l.mu.Lock()
		l.sentinels[port] = seen
		l.mu.Unlock()
		return nil
	}}
	c, err := d.Dial("tcp", to.String())
	if err != nil {
		if seen != nil {
			l.mu.Lock()
			delete(l.sentinels, port)
			l.mu.Unlock()
		}
		return fmt.Errorf("sentinel dial %v: %w", to, err)
	}
	defer c.Close()
	select {
	case <-seen:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("sentinel connection to %v never accepted", to)
	}
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
