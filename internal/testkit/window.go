//go:build linux

package testkit

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"
)

// Window is how long to wait after the last probe before counting what a
// listener accepted. A probe's socket that is left open with a SYN-ACK in
// hand becomes a connection when the kernel sends its delayed ACK, at most
// 200 ms (TCP_DELACK_MAX) after the SYN-ACK; counted before that, a leak
// goes unseen. 100 ms of slack on top.
const Window = 300 * time.Millisecond

// halfMadeBound bounds the wait, after Window, for the half-made
// connections to the listeners to go (see WaitWindow).
const halfMadeBound = 3 * time.Second

// Counter is a listener whose accepts can be counted: a Listener, or a
// listener wrapped by CountAccepts.
type Counter interface {
	// Flush returns once every connection queued before it was accepted.
	Flush() error
	accepted() int64
	addrPort() netip.AddrPort
}

// ProbeAccepts waits out the kernel's window once (WaitWindow), then
// flushes each listener's accept queue and returns how many connections
// they accepted in all (sentinels not counted). Call it once probing has
// stopped; it fails the test if a flush fails. Every accept count in the
// tests goes through it (or SettledAccepts), so that none is taken inside
// the window.
func ProbeAccepts(tb testing.TB, cs ...Counter) int64 {
	tb.Helper()
	n, err := SettledAccepts(cs...)
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

// SettledAccepts is ProbeAccepts returning the error of a failed flush.
func SettledAccepts(cs ...Counter) (int64, error) {
	addrs := make([]netip.AddrPort, len(cs))
	for i, c := range cs {
		addrs[i] = c.addrPort()
	}
	WaitWindow(addrs...)
	return flushCount(cs...)
}

// flushCount flushes the accept queues of cs and returns how many
// connections they accepted in all, up to the first flush that failed.
func flushCount(cs ...Counter) (int64, error) {
	var n int64
	for _, c := range cs {
		if err := c.Flush(); err != nil {
			return n, err
		}
		n += c.accepted()
	}
	return n, nil
}

// WaitWindow waits out the kernel's delayed-ACK window: Window from now,
// then, bounded, until the half-made connections to the ports of addrs that
// are left then (request sockets in SYN_RECV, which an ACK could still
// complete: a SYN-ACK that came late, say) have completed or gone. Those
// made later, by probes that go on, are not waited for. Call it once the
// last probe to count has been sent. The sleep is the point: nothing
// signals that a timer in the kernel has not fired, so the window is waited
// out, not awaited. Only the caller's network namespace is looked at for
// half-made connections; Window alone covers listeners in another one on a
// path without added delay.
func WaitWindow(addrs ...netip.AddrPort) {
	time.Sleep(Window)
	ports := make(map[uint16]bool, len(addrs))
	for _, a := range addrs {
		ports[a.Port()] = true
	}
	left, err := HalfMade(ports)
	for deadline := time.Now().Add(halfMadeBound); err == nil && len(left) > 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond) // polled: the kernel has no event for it
		var now map[string]bool
		if now, err = HalfMade(ports); err != nil {
			return
		}
		for c := range left {
			if !now[c] {
				delete(left, c)
			}
		}
	}
}

// HalfMade returns the request sockets (SYN_RECV) of this network namespace
// whose local port is in ports, by local and remote address: SYNs answered
// by a listener whose handshake is neither completed nor reset yet.
func HalfMade(ports map[uint16]bool) (map[string]bool, error) {
	m := map[string]bool{}
	for _, path := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(path)
		if os.IsNotExist(err) {
			continue // no IPv6
		}
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Scan() // header
		for sc.Scan() {
			// "  12: 0100007F:1F90 0100007F:C350 03 ..."
			f := bytes.Fields(sc.Bytes())
			if len(f) < 4 || string(f[3]) != "03" { // TCP_SYN_RECV
				continue
			}
			i := bytes.LastIndexByte(f[1], ':')
			if i < 0 {
				return nil, fmt.Errorf("%s: local address %q", path, f[1])
			}
			p, err := strconv.ParseUint(string(f[1][i+1:]), 16, 16)
			if err != nil {
				return nil, fmt.Errorf("%s: local address %q", path, f[1])
			}
			if ports[uint16(p)] {
				m[string(f[1])+" "+string(f[2])] = true
			}
		}
	}
	return m, nil
}
