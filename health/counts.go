package health

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"
)

// Health is a checker's health as Status.Health shows it: up, down, or
// unknown (not probed yet; in maintenance, and after it until its first
// result).
type Health uint8

const (
	// Unknown: not probed yet, or in maintenance and until the first
	// result after it.
	Unknown Health = iota
	// Up: the last results brought it up.
	Up
	// Down: the last results took it down.
	Down
)

// String is the health's name, as in Status.Health: unknown, up or down.
func (h Health) String() string {
	switch h {
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return "unknown"
}

// ParseHealth parses a health's name (Status.Health): unknown, up or
// down.
func ParseHealth(s string) (Health, error) {
	for h := Unknown; h <= Down; h++ {
		if s == h.String() {
			return h, nil
		}
	}
	return Unknown, fmt.Errorf("health %q: must be unknown, up or down", s)
}

// Counts holds how many checkers are in each state: by health (Unknown,
// Up, Down) and admin state (Ready, Drain, Maint). A checker in Maint is
// always Unknown.
type Counts [3][3]int64

// Total is the number of checkers counted.
func (c *Counts) Total() int64 {
	var n int64
	for _, row := range c {
		for _, v := range row {
			n += v
		}
	}
	return n
}

// counts are the running counts behind Registry.Counts: kept up to date
// at every change of a checker's state, so that reading them costs the
// same at any number of addresses.
type counts [3][3]atomic.Int64

// classLocked is where c is counted. Under c.mu, or before c is shared.
func (c *Checker) classLocked() uint8 {
	a := c.AdminState()
	h := Unknown
	switch {
	case !c.known || a == Maint || c.rejoin.Load():
	case c.healthy.Load():
		h = Up
	default:
		h = Down
	}
	return uint8(h)<<4 | uint8(min(a, Maint))
}

// recount moves c from class old to its class now. Under c.mu: the
// callers change a checker's state with
//
//	defer c.recount(c.classLocked())
//
// which allocates nothing (it runs on the engine's loop) and touches the
// counts only when the class changed.
func (c *Checker) recount(old uint8) {
	if now := c.classLocked(); now != old {
		c.r.counts.add(old, -1)
		c.r.counts.add(now, 1)
	}
}

func (n *counts) add(class uint8, d int64) { n[class>>4][class&0xf].Add(d) }

// Counts returns how many checkers are in each state. It reads running
// counts: it takes no lock and costs the same at any number of
// addresses. Each count is exact; taken together they may be a moment
// apart.
func (r *Registry) Counts() Counts {
	var out Counts
	for h := range r.counts {
		for a := range r.counts[h] {
			out[h][a] = r.counts[h][a].Load()
		}
	}
	return out
}

// Addresses is the number of probed addresses (a checker or more each).
func (r *Registry) Addresses() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.checkers)
}

// Summary is what a list needs of a checker to filter and sort it, without
// building its Status: no allocation, and a short lock.
type Summary struct {
	Checker    *Checker
	Name       string
	Addr       netip.AddrPort
	Interval   time.Duration
	Health     Health
	AdminState AdminState
}

// Summary returns the checker's summary.
func (c *Checker) Summary() Summary {
	c.mu.Lock()
	class := c.classLocked()
	name := c.name
	c.mu.Unlock()
	return Summary{Checker: c, Name: name, Addr: c.addr, Interval: c.set.Interval,
		Health: Health(class >> 4), AdminState: AdminState(class & 0xf)}
}
