package health

import (
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// AddressStatuses returns the state of every checker of addr, sorted like
// Statuses; none when it is not probed.
func (r *Registry) AddressStatuses(addr netip.AddrPort) []Status {
	r.mu.Lock()
	var cs []*Checker
	for c := r.checkers[addr]; c != nil; c = c.next {
		cs = append(cs, c)
	}
	r.mu.Unlock()
	return sortedStatuses(cs)
}

// Status is the health of one probed address under one set of settings,
// as the admin API shows it.
type Status struct {
	// Upstream is the upstream as configured (the first, in order, if
	// several configured upstreams resolve to this address).
	Upstream string `json:"upstream"`
	// Address is the address probed, host:port, IPv6 in brackets.
	Address string `json:"address"`
	// Healthy is true when the address's health lets it serve: up, or
	// not probed yet. False in maintenance, and after it until its first
	// probe answers.
	Healthy bool `json:"healthy"`
	// Health is up, down, or unknown (not probed yet; in maintenance, and
	// after it until its first result): a Health's name (ParseHealth).
	Health string `json:"health"`
	// AdminState is ready, drain or maint, an AdminState's name
	// (ParseAdminState; see the admin API's POST
	// /shaker/upstreams/<address>/<action>).
	AdminState string `json:"admin_state"`
	// Since is when the address entered its current health state (its
	// first result counts); null before its first result.
	Since *time.Time `json:"since"`
	// Transitions is how many times its health changed since it was
	// first probed.
	Transitions uint32 `json:"transitions"`
	// LastRTTMicros is the kernel's SYN to SYN-ACK round trip of the
	// last successful probe, in microseconds.
	LastRTTMicros int64 `json:"last_rtt_us"`
	// LastError is why the last probe failed; "" when it succeeded.
	LastError string `json:"last_error"`
	// CheckedAt is the time of the last result (RFC 3339); null before
	// the first one.
	CheckedAt *time.Time `json:"checked_at"`
	// Passes and Fails are the consecutive successes and failures.
	Passes int `json:"passes"`
	Fails  int `json:"fails"`
	// Probes is the number of probes with a result.
	Probes uint64 `json:"probes"`
	// Interval and Timeout are the settings the address is probed with;
	// Jitter ("5%" or "200ms"), FastInterval and DownInterval are shown
	// when set.
	Interval     string `json:"interval"`
	Timeout      string `json:"timeout"`
	Jitter       string `json:"jitter,omitempty"`
	FastInterval string `json:"fast_interval,omitempty"`
	DownInterval string `json:"down_interval,omitempty"`
}

// Status returns the checker's state.
func (c *Checker) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	admin := c.AdminState()
	s := Status{
		Upstream:      c.name,
		Address:       c.addr.String(),
		Healthy:       c.Healthy(),
		Health:        Unknown.String(),
		AdminState:    admin.String(),
		Transitions:   c.transitions,
		LastRTTMicros: c.lastRTT.Microseconds(),
		Passes:        int(c.passes),
		Fails:         int(c.fails),
		Probes:        c.probes,
		Interval:      c.set.Interval.String(),
		Timeout:       c.set.Timeout.String(),
	}
	switch {
	case c.set.JitterPercent > 0:
		s.Jitter = strconv.FormatFloat(c.set.JitterPercent, 'g', -1, 64) + "%"
	case c.set.Jitter > 0:
		s.Jitter = c.set.Jitter.String()
	}
	if c.set.FastInterval > 0 {
		s.FastInterval = c.set.FastInterval.String()
	}
	if c.set.DownInterval > 0 {
		s.DownInterval = c.set.DownInterval.String()
	}
	if c.known && c.lastOutcome != shaker.Up {
		s.LastError = Reason(c.lastOutcome, c.lastErr, c.set.Timeout)
	}
	switch {
	case !c.known || admin == Maint || c.rejoin.Load():
	case c.healthy.Load():
		s.Health = Up.String()
	default:
		s.Health = Down.String()
	}
	if c.since != 0 {
		t := time.Unix(0, c.since).UTC()
		s.Since = &t
	}
	if c.known {
		t := time.Unix(0, c.checkedAt).UTC()
		s.CheckedAt = &t
	}
	return s
}

// Statuses returns the state of every checker, sorted by upstream, then
// address, then interval.
func (r *Registry) Statuses() []Status { return sortedStatuses(r.Checkers()) }

func sortedStatuses(cs []*Checker) []Status {
	out := make([]Status, len(cs))
	ivs := make([]time.Duration, len(cs))
	for i, c := range cs {
		out[i] = c.Status()
		ivs[i] = c.set.Interval
	}
	idx := make([]int, len(cs))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool {
		x, y := &out[idx[a]], &out[idx[b]]
		if x.Upstream != y.Upstream {
			return x.Upstream < y.Upstream
		}
		if x.Address != y.Address {
			return x.Address < y.Address
		}
		return ivs[idx[a]] < ivs[idx[b]]
	})
	sorted := make([]Status, len(out))
	for i, j := range idx {
		sorted[i] = out[j]
	}
	return sorted
}
