//go:build linux

package testkit

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// handedOut are the ports LoopbackPort returned: a port is free until the
// program it is for binds it, so without this two calls could return the
// same one (seen: two servers of one Caddy config on one port).
var handedOut = struct {
	sync.Mutex
	m map[int]bool
}{m: make(map[int]bool)}

// LoopbackPort returns a port free on 127.0.0.1 at the time of the call,
// for a listener that another program (Caddy, HAProxy) opens later, and
// never the same port twice in one process. It
// comes from below the kernel's ephemeral range: a port from that range
// (what listening on :0 gives) may meanwhile become the source port of one
// of the many probes the tests and the bench send, and the listen would
// fail with EADDRINUSE.
func LoopbackPort() (int, error) {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 2048 {
				low = n
			}
		}
	}
	const base = 1024
	for range 1000 {
		port := base + rand.IntN(low-base)
		handedOut.Lock()
		if handedOut.m[port] {
			handedOut.Unlock()
			continue // given to another listener already
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			handedOut.Unlock()
			continue // taken
		}
		ln.Close()
		handedOut.m[port] = true
		handedOut.Unlock()
		return port, nil
	}
	return 0, fmt.Errorf("no free port below %d", low)
}

// FreePort is LoopbackPort for a test: it fails the test if no port is
// free.
func FreePort(tb testing.TB) int {
	tb.Helper()
	port, err := LoopbackPort()
	if err != nil {
		tb.Fatal(err)
	}
	return port
}
