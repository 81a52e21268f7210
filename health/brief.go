package health

import (
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Brief is a checker's Summary and the rest of what a list sorts and
// filters it by (its last result, probe and transition counts), without
// building its Status: no allocation, and one short lock. The status
// page reads one per address, and builds a Status only for the rows it
// shows.
type Brief struct {
	Summary
	// Healthy is Status.Healthy.
	Healthy bool
	// Known: the checker has a result (Status.CheckedAt is set).
	Known bool
	// LastOK: the last result was a success (Status.LastError is "");
	// true before the first result.
	LastOK bool
	// LastRTT is Status.LastRTTMicros, as a duration.
	LastRTT time.Duration
	// CheckedAt and Since are unix nanoseconds; 0 when Status shows null.
	CheckedAt int64
	Since     int64
	// Probes and Transitions are Status's.
	Probes      uint64
	Transitions uint32
}

// Brief returns the checker's brief.
func (c *Checker) Brief() Brief {
	c.mu.Lock()
	defer c.mu.Unlock()
	class := c.classLocked()
	b := Brief{
		Summary: Summary{Checker: c, Name: c.name, Addr: c.addr, Interval: c.set.Interval,
			Health: Health(class >> 4), AdminState: AdminState(class & 0xf)},
		Healthy:     c.Healthy(),
		Known:       c.known,
		LastOK:      !c.known || c.lastOutcome == shaker.Up,
		LastRTT:     c.lastRTT,
		Since:       c.since,
		Probes:      c.probes,
		Transitions: c.transitions,
	}
	if c.known {
		b.CheckedAt = c.checkedAt
	}
	return b
}

// LastError is Status.LastError: why the last probe failed; "" when it
// succeeded or there is no result yet. It allocates only when there is
// an error.
func (c *Checker) LastError() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.known && c.lastOutcome != shaker.Up {
		return Reason(c.lastOutcome, c.lastErr, c.set.Timeout)
	}
	return ""
}

// LastRTT returns the RTT of the last result and true when the address
// is healthy and its last probe succeeded (a sample for an RTT history);
// 0 and false otherwise. No allocation.
func (c *Checker) LastRTT() (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.known && c.lastOutcome == shaker.Up && c.Healthy() {
		return c.lastRTT, true
	}
	return 0, false
}
