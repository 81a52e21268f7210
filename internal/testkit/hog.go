//go:build linux

package testkit

import (
	"context"
	"os"
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

// BurstsEnv chooses which burst scenarios run (the close-delay tests on a
// shaped veth path): "idle" runs the machine-otherwise-idle ones, "all"
// those with busy loops on every core too. Unset, they skip: they need a
// machine with nothing else running to mean anything, so .ci/run runs
// them on their own ("idle"), not beside the other test binaries.
const BurstsEnv = "SHAKER_BURSTS"

// BurstModes returns the modes to run ("idle", then "busy" with "all"),
// or skips the test when BurstsEnv is unset.
func BurstModes(tb testing.TB) []string {
	tb.Helper()
	switch v := os.Getenv(BurstsEnv); v {
	case "idle":
		return []string{"idle"}
	case "all":
		return []string{"idle", "busy"}
	case "":
		tb.Skipf("a burst scenario: runs with %s=idle or %s=all, on a machine running nothing else (.ci/run runs it on its own)", BurstsEnv, BurstsEnv)
	default:
		tb.Fatalf("%s=%q: want idle or all", BurstsEnv, v)
	}
	return nil
}

// BurstRate is the tbf rate of a burst scenario's link in mode. Idle it
// is 15 Mbit/s, which the probes of 2,000 addresses at 100 ms fill (about
// 13,400 IPv4 probes a second get through it, 10,400 IPv6). With a busy
// loop on every core ("busy") it is 8 Mbit/s (about 7,400 and 6,000): a
// prober sharing its cores with them sends fewer, how many depending on
// the machine's other work. Inside Caddy, with its admin API read in a
// loop, it sent 10,300-13,000 IPv4 probes a second at 15 Mbit/s and did
// not fill the link in four runs of twelve, and 7,800-9,000 at 10 Mbit/s,
// failing once; at 8 Mbit/s it filled it in twelve of twelve, the
// smallest queue 2,800 packets (2026-12-04).
func BurstRate(mode string) string {
	if mode == "busy" {
		return "8mbit"
	}
	return "15mbit"
}

// BurstsStrictEnv, set to 0, makes a burst scenario's accepted connection
// a logged warning instead of a failure: for a machine too loaded to give
// the prober a core within 200 ms of its SYN-ACKs, where a probe can
// become a connection (docs/closedelay.md). By default an accepted
// connection fails the test: with the closer, the worst close delay in
// these scenarios is a tenth of the kernel's window.
const BurstsStrictEnv = "SHAKER_BURSTS_STRICT"

// BurstAccepted checks a burst scenario's accepted connections: a failure,
// or a logged warning with BurstsStrictEnv=0.
func BurstAccepted(tb testing.TB, accepted uint64, what string) {
	tb.Helper()
	if accepted == 0 {
		return
	}
	if os.Getenv(BurstsStrictEnv) != "0" {
		tb.Errorf("%s: listeners accepted %d connections: probes closed past the kernel's 200 ms (%s=0 makes this a warning)", what, accepted, BurstsStrictEnv)
		return
	}
	tb.Logf("WARNING: %s: listeners accepted %d connections: probes closed past the kernel's 200 ms", what, accepted)
}

// Bursts of answers: what makes a burst scenario real. Either the engine
// saw at least BurstMinReady answers in one look at epoll, or the probes
// filled a tbf's queue with at least BurstMinQueued packets, so that its
// answers left the link at the link's rate, one on the heels of another.
// A loop starved of CPU does not fill the link but sees big batches; a
// closer that looks at epoll as each answer lands sees small ones while
// the link is full: each alone is not proof, and either is.
const (
	BurstMinReady  = 32
	BurstMinQueued = 1000
)

// BurstsSeen fails the test when a burst scenario made no bursts by the
// measure of BurstMinReady and BurstMinQueued.
func BurstsSeen(tb testing.TB, maxReady, maxQueued int) {
	tb.Helper()
	if maxReady < BurstMinReady && maxQueued < BurstMinQueued {
		tb.Errorf("at most %d answers a look at epoll (want %d) and %d packets queued in a tbf (want %d): no bursts",
			maxReady, BurstMinReady, maxQueued, BurstMinQueued)
	}
}
