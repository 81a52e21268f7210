//go:build linux

package testkit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// FDs counts this process's open file descriptors.
func FDs() (int, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	return len(ents), nil
}

// CountFDs is FDs for a test: it skips the test when /proc/self/fd cannot
// be read.
func CountFDs(tb testing.TB) int {
	tb.Helper()
	n, err := FDs()
	if err != nil {
		tb.Skipf("no /proc/self/fd: %v", err)
	}
	return n
}

// WaitGoroutines waits, boundedly (5 s), until the number of goroutines is
// at most want, and returns the last count.
func WaitGoroutines(want int) int {
	deadline := time.Now().Add(5 * time.Second)
	n := runtime.NumGoroutine()
	for n > want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// CPUTime is the CPU time (user+sys) this process has used, from
// getrusage.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procStat returns the fields of /proc/PID/stat after the command name
// (which may hold spaces): the state is [0], utime [11], stime [12].
func procStat(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return nil, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	return f, nil
}

// ProcCPU is the user+sys time of process pid, all its threads, from
// /proc/PID/stat (clock ticks of 10 ms).
func ProcCPU(pid int) (time.Duration, error) {
	u, s, err := ProcTimes(pid)
	return u + s, err
}

// ProcTimes is the user and the sys time of process pid, all its threads,
// from /proc/PID/stat (clock ticks of 10 ms). The kernel's softirqs that
// interrupt the process count in its sys time.
func ProcTimes(pid int) (user, sys time.Duration, err error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, 0, err
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, 0, err
	}
	const tick = 10 * time.Millisecond // USER_HZ 100 on Linux
	return time.Duration(u) * tick, time.Duration(s) * tick, nil
}

// ProcState is the state letter of process pid (R, S, T, ...) from
// /proc/PID/stat. It fails the test if that cannot be read.
func ProcState(tb testing.TB, pid int) byte {
	tb.Helper()
	f, err := procStat(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return f[0][0]
}
