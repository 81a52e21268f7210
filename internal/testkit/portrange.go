//go:build linux

package testkit

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// FreePorts returns the first of n consecutive TCP ports that no socket of
// either family holds at the time of the call (each binds on the dual-stack
// wildcard address), below the kernel's ephemeral range, none of them
// handed out before by LoopbackPort or FreePorts: source ports for a raw
// prober of a test's own, which must not share them with another's. It
// fails the test if it finds none.
func FreePorts(tb testing.TB, n int) uint16 {
	tb.Helper()
	for range 100 {
		base, err := LoopbackPort() // handed out, and free on 127.0.0.1
		if err != nil {
			tb.Fatal(err)
		}
		if base+n-1 > 65535 {
			continue
		}
		if claimPorts(base, n) {
			return uint16(base)
		}
	}
	tb.Fatalf("no %d consecutive free ports below the ephemeral range", n)
	return 0
}

// claimPorts marks base+1 to base+n-1 handed out if none was and each can
// be bound.
func claimPorts(base, n int) bool {
	handedOut.Lock()
	defer handedOut.Unlock()
	for p := base; p < base+n; p++ {
		if p > base && handedOut.m[p] || wildcardBind(p) != nil {
			return false
		}
	}
	for p := base + 1; p < base+n; p++ {
		handedOut.m[p] = true
	}
	return true
}

// wildcardBind binds a TCP socket to [::]:port, IPv4 too, and closes it.
func wildcardBind(port int) error {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{Port: port}); err != nil {
		return fmt.Errorf("bind [::]:%d: %w", port, err)
	}
	return nil
}
