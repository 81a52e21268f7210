package shaker

import (
	"net/netip"
	"time"
)

// request is a probe asked for and not started yet.
type request struct {
	addr    netip.AddrPort
	timeout time.Duration // from the SYN
	// deadline, in engine time (ns since Engine.base), bounds the probe
	// whatever its timeout; 0 means none. Probe sets it from its context.
	deadline int64
	done     func(Result)
	sched    *Schedule // a periodic probe's schedule, instead of done
	scope    uint32    // IPv6 zone index, looked up by submit
	err      error     // a failure found by submit, delivered by the loop
}

// deadlineFrom is the engine time at which a probe whose SYN goes out at
// start times out: its timeout after the SYN, or the request's own
// deadline if that comes first.
func (r *request) deadlineFrom(start int64) int64 {
	deadline := start + int64(r.timeout)
	if r.deadline != 0 && r.deadline < deadline {
		deadline = r.deadline
	}
	return deadline
}
