package status

import (
	"bytes"
	"cmp"
	"strings"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// entry is one address as the page filters and sorts it: its checker's
// Brief (no Status built, no allocation), or, for the tests' lists, a
// Status and its place in the list.
type entry struct {
	health.Brief
	st  *health.Status // a list's status; nil: Brief.Checker's
	i   int            // the status's place in its list (in default order)
	err string         // the last error, when the filter or sort needs it
}

// snapshot returns how many addresses there are, and each, which calls
// fn with every one of them, as often as asked: the checkers of the
// Source, or the statuses of a test's list, read once. fn must copy the
// entry to keep it.
func (p *Page) snapshot() (n int, each func(fn func(e *entry))) {
	if p.statuses != nil {
		list := p.statuses()
		return len(list), func(fn func(e *entry)) {
			var e entry
			for i := range list {
				e = entry{Brief: briefOf(&list[i]), st: &list[i], i: i}
				fn(&e)
			}
		}
	}
	var cs []*health.Checker
	if p.checkers != nil {
		cs = p.checkers()
	}
	return len(cs), func(fn func(e *entry)) {
		var e entry
		for _, c := range cs {
			e = entry{Brief: c.Brief()}
			fn(&e)
		}
	}
}

// briefOf is the Brief of a list's status.
func briefOf(s *health.Status) health.Brief {
	h, _ := health.ParseHealth(s.Health)
	a, _ := health.ParseAdminState(s.AdminState)
	b := health.Brief{
		Summary:     health.Summary{Name: s.Upstream, Health: h, AdminState: a},
		Healthy:     s.Healthy,
		Known:       s.CheckedAt != nil,
		LastOK:      s.LastError == "",
		LastRTT:     time.Duration(s.LastRTTMicros) * time.Microsecond,
		Probes:      s.Probes,
		Transitions: s.Transitions,
	}
	if s.CheckedAt != nil {
		b.CheckedAt = s.CheckedAt.UnixNano()
	}
	if s.Since != nil {
		b.Since = s.Since.UnixNano()
	}
	return b
}

// state is the address's state as the page counts and filters it: up,
// down or pending (healthOf).
func (e *entry) state() string {
	if e.st != nil {
		h, _ := healthOf(e.st)
		return h
	}
	switch {
	case !e.Known:
		return healthPending
	case e.Health == health.Up:
		return healthUp
	case e.Health == health.Down:
		return healthDown
	}
	return healthPending
}

// admin is adminOf the address: its admin state when not ready, "" when
// it is.
func (e *entry) admin() string {
	if e.st != nil {
		return adminOf(e.st)
	}
	if e.AdminState == health.Ready {
		return ""
	}
	return e.AdminState.String()
}

// adminState is Status.AdminState.
func (e *entry) adminState() string {
	if e.st != nil {
		return e.st.AdminState
	}
	return e.AdminState.String()
}

// lastError is Status.LastError; it allocates only when there is one.
func (e *entry) lastError() string {
	switch {
	case e.st != nil:
		return e.st.LastError
	case e.LastOK:
		return ""
	}
	return e.Checker.LastError()
}

// appendAddr appends Status.Address.
func (e *entry) appendAddr(b []byte) []byte {
	if e.st != nil {
		return append(b, e.st.Address...)
	}
	return e.Addr.AppendTo(b)
}

// status is the address's Status.
func (e *entry) status() health.Status {
	if e.st != nil {
		return *e.st
	}
	return e.Checker.Status()
}

// key is whose RTT history the address shows.
func (e *entry) key() histKey {
	if e.st != nil {
		return histKey{s: string(historyKey(nil, e.st))}
	}
	return histKey{c: e.Checker}
}

// compareAddr orders by Status.Address, as text, without building it.
func compareAddr(a, b *entry) int {
	if a.st == nil && b.st == nil && a.Addr == b.Addr {
		return 0
	}
	var x, y [64]byte
	return bytes.Compare(a.appendAddr(x[:0]), b.appendAddr(y[:0]))
}

// compareDefault is the page's default order, Registry.Statuses's: by
// upstream, then address, then settings. A list's statuses keep their
// order.
func compareDefault(a, b *entry) int {
	if a.st != nil && b.st != nil {
		return cmp.Compare(a.i, b.i)
	}
	if c := strings.Compare(a.Name, b.Name); c != 0 {
		return c
	}
	if c := compareAddr(a, b); c != 0 {
		return c
	}
	return health.CompareSettings(a.Checker.Settings(), b.Checker.Settings())
}
