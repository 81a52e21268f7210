package shaker

import (
	"testing"
	"time"
)

// TestBurstRate: one start batch per millisecond at most, and never so
// fast that probes which all time out would hold more than half the
// sockets.
func TestBurstRate(t *testing.T) {
	for _, c := range []struct {
		sockets int
		timeout time.Duration
		want    float64
	}{
		{1 << 20, time.Second, MaxBurstRate},
		{768, time.Second, 384},
		{768, 100 * time.Millisecond, 3840},
		{1, time.Second, 1}, // at least 1
		{1000, 0, MaxBurstRate},
	} {
		if got := burstRate(c.sockets, c.timeout); got != c.want {
			t.Errorf("burstRate(%d, %v) = %v, want %v", c.sockets, c.timeout, got, c.want)
		}
	}
	e, err := New(Options{Loops: 1, MaxSockets: 100, DefaultTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if got := e.BurstRate(0); got != 100 {
		t.Errorf("BurstRate(default 500ms) with 100 sockets = %v, want 100", got)
	}
	if got := e.BurstRate(time.Second); got != 50 {
		t.Errorf("BurstRate(1s) with 100 sockets = %v, want 50", got)
	}
}
