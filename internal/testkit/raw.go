//go:build linux

package testkit

import (
	"syscall"
	"testing"
)

// NeedRaw skips the test unless this process may open raw sockets (root,
// or CAP_NET_RAW), as the engine's raw mode needs.
func NeedRaw(tb testing.TB) {
	tb.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.IPPROTO_TCP)
	if err != nil {
		tb.Skipf("raw mode needs raw sockets (root, or CAP_NET_RAW), and this process may not open one: %v", err)
	}
	syscall.Close(fd)
}
