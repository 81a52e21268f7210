//go:build linux

package testkit

import (
	"os"
	"testing"
	"time"
)

func TestProcCPUSelf(t *testing.T) {
	// Burn some CPU, then /proc/PID/stat of this process must show it.
	end := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(end); x++ {
	}
	d, err := ProcCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if d <= 0 {
		t.Errorf("ProcCPU(self) = %v after 50ms of work", d)
	}
}

func TestProcState(t *testing.T) {
	if s := ProcState(t, os.Getpid()); s != 'R' && s != 'S' {
		t.Errorf("ProcState(self) = %q, want R or S", s)
	}
}

func TestCountFDs(t *testing.T) {
	n0 := CountFDs(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n := CountFDs(t); n != n0+1 {
		t.Errorf("CountFDs = %d with one more file open, want %d", n, n0+1)
	}
}
