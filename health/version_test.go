package health

import "testing"

// TestVersion: the registry's Version moves exactly when an address may
// have entered or left service, so that a list of those in service kept by
// Version is never stale, and not rebuilt for nothing.
func TestVersion(t *testing.T) {
	c := testChecker(t, 1, 1)
	r := c.r
	var moves func(what string, want bool, f func())
	moves = func(what string, want bool, f func()) {
		t.Helper()
		v := r.Version()
		f()
		if got := r.Version() != v; got != want {
			t.Errorf("%s: version moved %v, want %v", what, got, want)
		}
	}
	moves("first result up (an address not probed yet is up already)", false, func() { c.Observe(up) })
	moves("another up", false, func() { c.Observe(up) })
	moves("down", true, func() { c.Observe(refused) })
	moves("still down", false, func() { c.Observe(refused) })
	moves("up again", true, func() { c.Observe(up) })
	moves("drain", true, func() { r.SetAdminState(c.Addr(), Drain) })
	moves("drain again", false, func() { r.SetAdminState(c.Addr(), Drain) })
	moves("maint", true, func() { r.SetAdminState(c.Addr(), Maint) })
	moves("ready after maint", true, func() { r.SetAdminState(c.Addr(), Ready) })
	moves("the first result after maint (rejoin)", true, func() { c.Observe(up) })

	d := testChecker(t, 1, 1) // a registry of its own
	r = d.r
	moves("a first result down", true, func() { d.Observe(refused) })
}
