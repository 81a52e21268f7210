package caddyshaker

import (
	"context"
	"errors"
	"fmt"
	"go.uber.org/zap"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
	"github.com/caddyserver/caddy/v2"
)

func TestParseUpstream(t *testing.T) {
	good := []struct {
		in   string
		host string
		ip   string
		port uint16
	}{
		{"10.0.0.1:8080", "", "10.0.0.1", 8080},
		{"[::1]:443", "", "::1", 443},
		{"[::ffff:127.0.0.1]:80", "", "127.0.0.1", 80},
		{"App.Internal:8080", "app.internal", "", 8080},
		{"localhost:1", "localhost", "", 1},
		{"db_1.svc.:5432", "db_1.svc", "", 5432},
	}
	for _, g := range good {
		s, err := parseUpstream(g.in)
		if err != nil {
			t.Errorf("%q: %v", g.in, err)
			continue
		}
		ip := ""
		if s.ip.IsValid() {
			ip = s.ip.String()
		}
		if s.host != g.host || ip != g.ip || s.port != g.port || s.raw != g.in {
			t.Errorf("%q: got %+v", g.in, s)
		}
	}
	bad := []struct{ in, want string }{
		{"10.0.0.1", "missing port"},
		{"10.0.0.1:0", `port "0" out of range`},
		{"10.0.0.1:65536", `port "65536" out of range`},
		{"10.0.0.1:http", `port "http" out of range`},
		{"http://10.0.0.1:80", "without a scheme"},
		{"{env.X}:80", "placeholders"},
		{"bad host:80", `host "bad host"`},
		{"-x.example:80", `host "-x.example"`},
		{"[::1:80", "not host:port"},
		{"[fe80::1%eth0/x]:80", `IPv6 zone "eth0/x"`},
		{"", "missing port"},
	}
	for _, b := range bad {
		_, err := parseUpstream(b.in)
		if err == nil {
			t.Errorf("%q: no error", b.in)
			continue
		}
		if !strings.Contains(err.Error(), b.want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", b.in)) {
			t.Errorf("%q: error %q, want it to name the value and say %q", b.in, err, b.want)
		}
	}
}

func TestValidateNamesBadValue(t *testing.T) {
	for _, tc := range []struct {
		u    Upstreams
		want string
	}{
		{Upstreams{}, "no upstreams"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Interval: caddy.Duration(-time.Second)}}, "interval -1s"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Timeout: caddy.Duration(-time.Millisecond)}}, "timeout -1ms"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Passes: -1}}, "passes -1"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Fails: -2}}, "fails -2"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Port: 70000}}, "port 70000"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Port: -1}}, "port -1"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{ResolveInterval: -1}}, "resolve_interval"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{ResolveTimeout: -1}}, "resolve_timeout"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{SlowStart: caddy.Duration(-time.Second)}}, "slow_start -1s: must not be negative (0 for none)"},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Jitter: "banana"}}, `jitter "banana"`},
		{Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Interval: caddy.Duration(time.Second), Jitter: "501ms"}}, `jitter "501ms": must be at most half the interval (500ms)`},
	} {
		err := tc.u.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.u, err, tc.want)
		}
	}
	ok := Upstreams{Upstreams: []string{"a:1"}, ProbeConfig: ProbeConfig{Port: 65535}}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid: %v", err)
	}
}

// sourceWith returns a source whose snapshot holds n addresses, every
// third one down.
func sourceWith(n int) (*Upstreams, []*health.Checker) {
	su := &Upstreams{sourceState: new(sourceState), logger: zap.NewNop()}
	es := make([]entry, n)
	ws := make([]health.Want, n)
	for i := range n {
		ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 8080)
		ws[i] = health.Want{Addr: ap, Name: ap.String(), Settings: health.Settings{
			Interval: time.Hour, Timeout: time.Second, Passes: 1, Fails: 1,
		}}
	}
	// a registry of their own, never given an engine: nothing is probed
	cs, _ := health.NewRegistry().Acquire(ws)
	for i, c := range cs {
		if i%3 == 2 {
			setHealthy(c, false)
		}
		es[i] = entry{dial: ws[i].Addr.String(), c: c}
	}
	su.snap.Store(&es)
	return su, cs
}

// setHealthy drives a checker with passes 1 and fails 1 to a state, as a
// probe result would.
func setHealthy(c *health.Checker, up bool) {
	if up {
		c.Observe(shaker.Result{Outcome: shaker.Up, RTT: time.Microsecond})
	} else {
		c.Observe(shaker.Result{Outcome: shaker.Refused, Err: shaker.ErrRefused})
	}
}

func TestGetUpstreams(t *testing.T) {
	su, cs := sourceWith(6)
	r, _ := http.NewRequest("GET", "/", nil)
	got, err := su.GetUpstreams(r)
	if err != nil {
		t.Fatal(err)
	}
	var dials []string
	for _, u := range got {
		dials = append(dials, u.Dial)
	}
	want := "10.0.0.0:8080 10.0.0.1:8080 10.0.0.3:8080 10.0.0.4:8080"
	if strings.Join(dials, " ") != want {
		t.Fatalf("got %v, want %s", dials, want)
	}
	// fresh values: Caddy mutates them
	got[0].Dial = "mutated"
	again, _ := su.GetUpstreams(r)
	if again[0].Dial != "10.0.0.0:8080" || again[0] == got[0] {
		t.Fatal("GetUpstreams returned the same Upstream twice")
	}
	for _, c := range cs {
		setHealthy(c, false)
	}
	none, err := su.GetUpstreams(r)
	if err != nil || len(none) != 0 {
		t.Fatalf("all down: got %v, %v; want none", none, err)
	}
	// not provisioned, or cleaned up
	if u, err := (&Upstreams{}).GetUpstreams(r); u != nil || err != nil {
		t.Fatal("unprovisioned source returned upstreams")
	}
}

func TestResolveKeepsLastOnFailure(t *testing.T) {
	calls := 0
	old := resolveFunc
	t.Cleanup(func() { resolveFunc = old })
	resolveFunc = func(ctx context.Context, network, host string) ([]netip.Addr, error) {
		calls++
		if network != "ip" {
			t.Errorf("network %q, want ip (A and AAAA)", network)
		}
		if calls == 1 {
			return []netip.Addr{
				netip.MustParseAddr("::1"),
				netip.MustParseAddr("::ffff:127.0.0.1"),
				netip.MustParseAddr("127.0.0.1"),
			}, nil
		}
		<-ctx.Done() // a resolver that hangs: the timeout must bound it
		return nil, ctx.Err()
	}
	holdHost("test.shaker.invalid") // as a source does before its lookups
	got, err := resolve(context.Background(), "test.shaker.invalid", time.Second)
	if err != nil || len(got) != 2 || got[0].String() != "127.0.0.1" || got[1].String() != "::1" {
		t.Fatalf("resolve: %v %v", got, err)
	}
	start := time.Now()
	_, err = resolve(context.Background(), "test.shaker.invalid", 20*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hung resolver: err %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("timeout not honoured: %v", d)
	}
	if last := lastResolved("test.shaker.invalid"); len(last) != 2 {
		t.Fatalf("last resolved: %v", last)
	}
	// The last release forgets the name: the map keeps only names in use.
	holdHost("test.shaker.invalid") // a second source, as at a reload
	releaseHost("test.shaker.invalid")
	if last := lastResolved("test.shaker.invalid"); len(last) != 2 {
		t.Fatalf("released by one of two holders: last resolved %v", last)
	}
	releaseHost("test.shaker.invalid")
	if last := lastResolved("test.shaker.invalid"); last != nil {
		t.Fatalf("released by all: last resolved %v, want none", last)
	}
	resolved.Lock()
	_, kept := resolved.m["test.shaker.invalid"]
	resolved.Unlock()
	if kept {
		t.Fatal("a name nobody holds is still in the map")
	}
	// A lookup of a name nobody holds stores nothing.
	resolveFunc = func(context.Context, string, string) ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
	}
	if _, err := resolve(context.Background(), "unheld.shaker.invalid", time.Second); err != nil {
		t.Fatal(err)
	}
	if last := lastResolved("unheld.shaker.invalid"); last != nil {
		t.Fatalf("unheld name stored: %v", last)
	}
}

// BenchmarkGetUpstreams measures one call, as reverse_proxy makes it on
// every request; the parallel variants show that calls do not contend.
func BenchmarkGetUpstreams(b *testing.B) {
	r, _ := http.NewRequest("GET", "/", nil)
	for _, n := range []int{3, 100} {
		su, _ := sourceWith(n)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				ups, _ := su.GetUpstreams(r)
				if len(ups) == 0 {
					b.Fatal("no upstreams")
				}
			}
		})
		b.Run(fmt.Sprintf("%d/parallel", n), func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					ups, _ := su.GetUpstreams(r)
					if len(ups) == 0 {
						b.Fatal("no upstreams")
					}
				}
			})
		})
	}
}

// TestPanicThreshold: below the threshold every address is returned, up or
// down; at or above it, only those up; at 0, none when none is up.
func TestPanicThreshold(t *testing.T) {
	r, _ := http.NewRequest("GET", "/", nil)
	su, cs := sourceWith(4) // 10.0.0.2 down: 3 of 4 up
	count := func() int {
		ups, err := su.GetUpstreams(r)
		if err != nil {
			t.Fatal(err)
		}
		return len(ups)
	}
	for _, tc := range []struct {
		threshold float64
		down      []int // which addresses are down
		want      int
		panic     bool
	}{
		{0, []int{2}, 3, false},
		{0, []int{0, 1, 2, 3}, 0, false},   // default: nothing, Caddy answers 503
		{0.5, []int{2}, 3, false},          // 75% up
		{0.5, []int{1, 2}, 2, false},       // 50% up: not below
		{0.5, []int{0, 1, 2}, 4, true},     // 25% up: every address
		{0.5, []int{0, 1, 2, 3}, 4, true},  // none up: every address
		{1, []int{2}, 4, true},             // anything down: every address
		{1, nil, 4, false},                 // all up
		{0.25, []int{0, 1, 2, 3}, 4, true}, // none up
		{0.25, []int{0, 1, 2}, 1, false},   // 25% up: not below
	} {
		su.PanicThreshold = tc.threshold
		for i, c := range cs {
			setHealthy(c, !slices.Contains(tc.down, i))
		}
		if got := count(); got != tc.want || su.failOpen.on.Load() != tc.panic {
			t.Errorf("threshold %v, down %v: %d upstreams (panic %v), want %d (panic %v)",
				tc.threshold, tc.down, got, su.failOpen.on.Load(), tc.want, tc.panic)
		}
	}
}
