//go:build linux

package testkit

import (
	"context"
	"os/exec"
	"testing"
	"time"
)

// Hogs starts n busy loops (shell processes spinning, so that the kernel
// schedules them against the process under test as it would other
// programs), each killed after at most d, and returns a func that stops
// them and waits for them; the end of the test stops them too. It skips
// the test when there is no sh.
func Hogs(tb testing.TB, n int, d time.Duration) (stop func()) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	var cmds []*exec.Cmd
	for range n {
		cmd := exec.CommandContext(ctx, "sh", "-c", "while :; do :; done")
		if err := cmd.Start(); err != nil {
			cancel()
			for _, c := range cmds {
				c.Wait()
			}
			tb.Skipf("no sh for the busy loops: %v", err)
		}
		cmds = append(cmds, cmd)
	}
	done := false
	stop = func() {
		if done {
			return
		}
		done = true
		cancel()
		for _, c := range cmds {
			c.Wait() // killed: an error, expected
		}
	}
	tb.Cleanup(stop)
	return stop
}
