package shaker

import (
	"testing"
	"time"
)

// TestBurst: one start batch per millisecond at most, and at most half the
// sockets within a timeout.
func TestBurst(t *testing.T) {
	if got, want := burstOf(1, time.Second), (Burst{MaxBurstRate, 1, time.Second}); got != want {
		t.Errorf("burstOf(1, 1s) = %+v, want %+v", got, want)
	}
	e, err := New(Options{Loops: 1, MaxSockets: 100, DefaultTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if got, want := e.Burst(0), (Burst{MaxBurstRate, 50, 500 * time.Millisecond}); got != want {
		t.Errorf("Burst(0) with 100 sockets = %+v, want %+v", got, want)
	}
	if got, want := e.Burst(time.Second), (Burst{MaxBurstRate, 50, time.Second}); got != want {
		t.Errorf("Burst(1s) with 100 sockets = %+v, want %+v", got, want)
	}
}
