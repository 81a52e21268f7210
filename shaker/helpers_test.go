//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// countingListener is a real listener whose accept loop counts every
// connection it accepts. Sentinel connections, which the test makes itself
// to flush the accept queue, announce themselves with a byte and are not
// counted as probe connections.
type countingListener struct {
	ln        *net.TCPListener
	addr      netip.AddrPort
	total     atomic.Int64 // every accept()
	sentinels atomic.Int64
	sentinel  chan struct{}
	wg        sync.WaitGroup
}

func newCountingListener(t testing.TB, network, address string) *countingListener {
	t.Helper()
	ln, err := net.Listen(network, address)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, address, err)
	}
	l := &countingListener{
		ln:       ln.(*net.TCPListener),
		addr:     ln.Addr().(*net.TCPAddr).AddrPort(),
		sentinel: make(chan struct{}, 16),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	t.Cleanup(l.close)
	return l
}

func (l *countingListener) acceptLoop() {
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

func (l *countingListener) close() {
	l.ln.Close()
	l.wg.Wait()
}

// probeAccepts returns how many connections other than sentinels the
// listener has accepted. It first makes a sentinel connection and waits
// until the accept loop has seen it: the accept queue is FIFO, so every
// connection a probe could have left in it has been accepted by then.
func (l *countingListener) probeAccepts(t testing.TB) int64 {
	t.Helper()
	c, err := net.DialTimeout("tcp", l.addr.String(), 5*time.Second)
	if err != nil {
		t.Fatalf("sentinel dial %v: %v", l.addr, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{'S'}); err != nil {
		t.Fatalf("sentinel write %v: %v", l.addr, err)
	}
	select {
	case <-l.sentinel:
	case <-time.After(10 * time.Second):
		t.Fatalf("sentinel connection to %v never accepted", l.addr)
	}
	return l.total.Load() - l.sentinels.Load()
}

// bindLoopback returns a TCP socket bound to a free port of ip, closed at
// the end of the test, and the address it is bound to.
func bindLoopback(t testing.TB, ip string) (int, netip.AddrPort) {
	t.Helper()
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
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, sa); err != nil {
		t.Skipf("cannot bind %s: %v", ip, err)
	}
	lsa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	switch a := lsa.(type) {
	case *unix.SockaddrInet4:
		return fd, netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return fd, netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	t.Fatalf("getsockname: %T", lsa)
	return -1, netip.AddrPort{}
}

// boundNotListening returns a loopback address with a bound socket that does
// not listen: the kernel answers SYNs to it with an RST.
func boundNotListening(t testing.TB, ip string) netip.AddrPort {
	t.Helper()
	_, addr := bindLoopback(t, ip)
	return addr
}

// fullQueueListener returns the address of a listener whose accept queue is
// full: the kernel drops new SYNs to it, so probes time out.
func fullQueueListener(t testing.TB, ip string) netip.AddrPort {
	t.Helper()
	fd, addr := bindLoopback(t, ip)
	if err := unix.Listen(fd, 0); err != nil { // room for one connection
		t.Fatal(err)
	}
	// Fill the queue with real connections until the listener reports it
	// full (TCP_INFO on a listener: tcpi_unacked is the accept queue
	// length, tcpi_sacked its limit).
	for i := 0; i < 4; i++ {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		if info.Unacked > info.Sacked {
			return addr
		}
		c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
		if err != nil {
			t.Fatalf("filling accept queue of %v: %v", addr, err)
		}
		t.Cleanup(func() { c.Close() })
		// The server side joins the queue when our ACK is processed;
		// wait for it, boundedly.
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); runtime.Gosched() {
			info, _ = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
			if info.Unacked > uint32(i) {
				break
			}
		}
	}
	t.Fatalf("accept queue of %v never filled", addr)
	return addr
}

func newEngine(t testing.TB, opts Options) *Engine {
	t.Helper()
	e, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// countFDs counts this process's open file descriptors.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// waitGoroutines waits, boundedly, until the number of goroutines is at most
// want, and returns the last count.
func waitGoroutines(want int) int {
	deadline := time.Now().Add(5 * time.Second)
	n := runtime.NumGoroutine()
	for n > want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// probeCtx is a context for one blocking probe in tests.
func probeCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
