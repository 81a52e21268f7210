//go:build linux

package caddyshaker

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// TestJitterReachesCheckers: the jitter of a loaded config, its default
// and each of its forms, is in the settings its checkers probe with, and
// the admin API shows it.
func TestJitterReachesCheckers(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 1)
	addr := h.backends[0].addr
	check := func(what string, want health.Settings, status string) {
		t.Helper()
		if got := h.statuses()[addr].Jitter; got != status {
			t.Errorf("%s: admin API: jitter %q, want %q", what, got, status)
		}
		for _, c := range reg.Checkers() {
			if c.Addr().String() != addr {
				continue
			}
			s := c.Settings()
			if s.JitterPercent == want.JitterPercent && s.Jitter == want.Jitter {
				return
			}
			t.Logf("%s: a checker of %s with jitter %v%% / %v", what, addr, s.JitterPercent, s.Jitter)
		}
		t.Errorf("%s: no checker of %s with jitter %v%% / %v", what, addr, want.JitterPercent, want.Jitter)
	}
	check("default", health.Settings{JitterPercent: DefaultJitterPercent}, "5%")
	for _, tc := range []struct {
		jitter any
		want   health.Settings
		status string
	}{
		{"10%", health.Settings{JitterPercent: 10}, "10%"},
		{"2.5%", health.Settings{JitterPercent: 2.5}, "2.5%"},
		{"20ms", health.Settings{Jitter: 20 * time.Millisecond}, "20ms"},
		{int64(25 * time.Millisecond), health.Settings{Jitter: 25 * time.Millisecond}, "25ms"}, // nanoseconds
		{"off", health.Settings{}, ""},
	} {
		h.extra = map[string]any{"jitter": tc.jitter}
		h.load(tInterval)
		check(fmt.Sprint(tc.jitter), tc.want, tc.status)
	}
}
