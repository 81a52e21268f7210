//go:build linux && !shaker_fallback

package shaker

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// closerPolicies is the scheduling policy and priority of each of e's
// closers' threads, as "fifo/1" or "other/0".
func closerPolicies(t *testing.T, e *Engine) []string {
	t.Helper()
	var out []string
	for _, l := range e.loops {
		attr, err := unix.SchedGetAttr(l.cl.tid, 0)
		if err != nil {
			t.Fatalf("sched_getattr of closer thread %d: %v", l.cl.tid, err)
		}
		name := map[uint32]string{unix.SCHED_NORMAL: "other", unix.SCHED_FIFO: "fifo"}[attr.Policy]
		out = append(out, fmt.Sprintf("%s/%d", name, attr.Priority))
	}
	return out
}

// TestCloserPriority: the closers' threads run as SCHED_FIFO 1 where auto
// or realtime asks and the process may (root here), at the process's
// priority with normal; the test's own thread stays as it was; and Close
// leaves no real-time thread behind (a closer's thread ends with it, or
// is the main thread, which the runtime parks, back at normal priority).
func TestCloserPriority(t *testing.T) {
	if !withCloser {
		t.Skip("no closers under the race detector (closer_race.go)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_NICE) for real-time threads; CI runs as root; TestCloserPriorityRefused covers the rest")
	}
	for _, c := range []struct {
		prio Priority
		want string
	}{{PriorityAuto, "fifo/1"}, {PriorityRealtime, "fifo/1"}, {PriorityNormal, "other/0"}} {
		t.Run(c.prio.String(), func(t *testing.T) {
			e, err := New(Options{Loops: 2, CloserPriority: c.prio})
			if err != nil {
				t.Fatal(err)
			}
			rt, rtErr := e.CloserRealtime()
			got := closerPolicies(t, e)
			tids := []int{e.loops[0].cl.tid, e.loops[1].cl.tid}
			if strings.Join(got, " ") != c.want+" "+c.want || rt != (c.want == "fifo/1") || rtErr != nil {
				t.Errorf("closers %v, CloserRealtime %v %v; want %s for both", got, rt, rtErr, c.want)
			}
			if self, err := unix.SchedGetAttr(0, 0); err != nil || self.Policy != unix.SCHED_NORMAL {
				t.Errorf("the test's own thread: %+v %v, want SCHED_NORMAL", self, err)
			}
			ln := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if r := e.Probe(ctx, ln.Addr); r.Err != nil {
				t.Errorf("probe: %v", r.Err)
			}
			e.Close()
			for _, tid := range tids {
				attr, err := unix.SchedGetAttr(tid, 0)
				if err == nil && attr.Policy != unix.SCHED_NORMAL {
					t.Errorf("closer thread %d after Close: policy %d, want gone or SCHED_NORMAL", tid, attr.Policy)
				}
			}
			if n := ln.ProbeAccepts(t); n != 0 {
				t.Errorf("%d accepted", n)
			}
		})
	}
}

// TestCloserPriorityRefused: where the process may not run real-time
// threads (no CAP_SYS_NICE, RLIMIT_RTPRIO 0), auto runs the closers at
// normal priority and says why, and realtime fails to start and says what
// to grant; with an RLIMIT_RTPRIO of 1, realtime starts, with no
// capability at all.
func TestCloserPriorityRefused(t *testing.T) {
	if !withCloser {
		t.Skip("no closers under the race detector (closer_race.go)")
	}
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("needs prlimit (Debian package util-linux)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := testkit.WithoutCapCommand(t, ctx, "sys_nice", "TestCloserPriorityHelper", prioHelperEnv+"=1")
	// A hard RLIMIT_RTPRIO of 1, for the child to raise its soft one to;
	// raising a hard limit needs CAP_SYS_RESOURCE, which not every root
	// has (a container's may not).
	if exec.Command(prlimit, "--rtprio=0:1", "true").Run() == nil {
		cmd.Args = append([]string{"prlimit", "--rtprio=0:1", "--", cmd.Path}, cmd.Args[1:]...)
		cmd.Path = prlimit
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child under prlimit and setpriv: %v\n%s", err, out)
	}
	t.Logf("child without CAP_SYS_NICE:\n%s", out)
	res := testkit.ResultsByName(string(out))
	want := map[string]string{
		"auto":              "normal other/0 other/0 CAP_SYS_NICE",
		"realtime":          "failed CAP_SYS_NICE",
		"realtime-rlimit-1": "realtime fifo/1 fifo/1",
	}
	if strings.Join(res["realtime-rlimit-1"], " ") == "skipped" {
		t.Log("not covered: real-time priority through RLIMIT_RTPRIO alone (raising its hard limit needs CAP_SYS_RESOURCE, which this root lacks)")
		delete(want, "realtime-rlimit-1")
	}
	for name, w := range want {
		if got := strings.Join(res[name], " "); got != w {
			t.Errorf("%s: %s, want %s", name, got, w)
		}
	}
}

const prioHelperEnv = "SHAKER_PRIO_HELPER"

// TestCloserPriorityHelper is the child of TestCloserPriorityRefused,
// started with RLIMIT_RTPRIO 0 (its hard limit 1 where the parent could
// raise it) and without CAP_SYS_NICE.
// It prints RESULT auto, realtime and realtime-rlimit-1 (after raising
// its soft limit to 1): what CloserRealtime says or that New failed, the
// closers' policies, and whether the error names CAP_SYS_NICE.
func TestCloserPriorityHelper(t *testing.T) {
	if os.Getenv(prioHelperEnv) == "" {
		t.Skip("only runs as a child of TestCloserPriorityRefused")
	}
	run := func(name string, prio Priority) {
		e, err := New(Options{Loops: 2, CloserPriority: prio})
		if err != nil {
			fmt.Printf("RESULT %s failed %s\n# %v\n", name, names(err, "CAP_SYS_NICE"), err)
			return
		}
		defer e.Close()
		rt, rtErr := e.CloserRealtime()
		state := map[bool]string{true: "realtime", false: "normal"}[rt]
		fmt.Printf("RESULT %s %s %s %s\n# %v\n", name, state, strings.Join(closerPolicies(t, e), " "), names(rtErr, "CAP_SYS_NICE"), rtErr)
	}
	run("auto", PriorityAuto)
	run("realtime", PriorityRealtime)
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_RTPRIO, &rl); err != nil || rl.Max < 1 {
		fmt.Printf("RESULT realtime-rlimit-1 skipped\n# hard RLIMIT_RTPRIO %d %v\n", rl.Max, err)
		return
	}
	if err := unix.Setrlimit(unix.RLIMIT_RTPRIO, &unix.Rlimit{Cur: 1, Max: rl.Max}); err != nil {
		t.Fatal(err)
	}
	run("realtime-rlimit-1", PriorityRealtime)
}

// names is word if err's text has it, else "".
func names(err error, word string) string {
	if err != nil && strings.Contains(err.Error(), word) {
		return word
	}
	return ""
}
