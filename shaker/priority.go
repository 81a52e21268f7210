package shaker

import (
	"fmt"
	"strconv"
)

// Priority is the scheduling of a connect-mode engine's closers
// (Options.CloserPriority): the threads that close answered sockets, on
// which the kernel's 200 ms delayed-ACK window runs.
type Priority uint8

const (
	// PriorityAuto runs the closers at real-time priority where the
	// process may (PriorityRealtime), and at normal priority elsewhere;
	// Engine.CloserRealtime says which, and why not. The default.
	PriorityAuto Priority = iota
	// PriorityRealtime runs each closer's thread as SCHED_FIFO, priority
	// 1: the lowest real-time priority, above every ordinary thread, so
	// that a busy process or machine (Caddy's own goroutines, a scrape,
	// other processes) does not stand between a SYN-ACK and its close.
	// A closer runs only while answers wait to be closed, and the
	// kernel's real-time throttling (kernel.sched_rt_runtime_us, 95% of
	// each second by default) bounds it besides. It needs CAP_SYS_NICE
	// or an RLIMIT_RTPRIO of 1 at least; New fails without. With
	// PriorityAuto, the closers are real-time only if all can be.
	PriorityRealtime
	// PriorityNormal leaves the closers at the process's priority.
	PriorityNormal
)

// String is the priority's name: "auto", "realtime" or "normal".
func (p Priority) String() string {
	switch p {
	case PriorityAuto:
		return "auto"
	case PriorityRealtime:
		return "realtime"
	case PriorityNormal:
		return "normal"
	}
	return "Priority(" + strconv.Itoa(int(p)) + ")"
}

// ParsePriority is the Priority of a name String gives; "" is
// PriorityAuto.
func ParsePriority(s string) (Priority, error) {
	switch s {
	case "", "auto":
		return PriorityAuto, nil
	case "realtime":
		return PriorityRealtime, nil
	case "normal":
		return PriorityNormal, nil
	}
	return 0, fmt.Errorf("shaker: closer priority %q: must be auto, realtime or normal", s)
}

// realtimeNeeds is what an error about a refused real-time priority tells
// the operator.
const realtimeNeeds = "real-time priority needs CAP_SYS_NICE or an RLIMIT_RTPRIO of 1: " +
	"a systemd unit's LimitRTPRIO=1, Docker's --ulimit rtprio=1 (or --cap-add SYS_NICE), " +
	"and, on a kernel with real-time group scheduling, a real-time budget for the process's cgroup; " +
	"or set the closer priority to normal"

// CloserRealtime reports whether connect mode's closers run at real-time
// priority (Options.CloserPriority), and, where PriorityAuto asked for it
// and the process may not, why not.
func (e *Engine) CloserRealtime() (bool, error) { return e.closerRT, e.closerRTErr }

// HasClosers reports whether the engine's loops have closers: in connect
// mode on Linux, except in a build with the race detector.
func (e *Engine) HasClosers() bool { return e.closers }
