//go:build linux

package testkit

import "testing"

// TestLoopbackPortNeverTwice: ports handed out but not bound yet are not
// handed out again.
func TestLoopbackPortNeverTwice(t *testing.T) {
	seen := make(map[int]bool)
	for range 2000 {
		p := FreePort(t)
		if seen[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		seen[p] = true
	}
}
