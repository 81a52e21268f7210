package caddyshaker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// manyWants are n addresses on 127.100.0.0/14 from the first-th (never
// probed: the checkers are acquired, not started).
func manyWants(n, first int, name string) []health.Want {
	set := health.Settings{Interval: 10 * time.Second, Timeout: time.Second, Passes: 2, Fails: 3}
	ws := make([]health.Want, n)
	for j := range ws {
		i := first + j
		a := netip.AddrFrom4([4]byte{127, 100 + byte(i>>24), byte(i >> 16), byte(i >> 8)})
		ws[j] = health.Want{Addr: netip.AddrPortFrom(a, uint16(1+i&0xff)), Settings: set, Name: name}
	}
	return ws
}

// emptyRegistry waits for the process's registry to be empty (another
// test's Caddy may still be stopping): the tests that count every
// checker start with it.
func emptyRegistry(tb testing.TB) {
	tb.Helper()
	for deadline := time.Now().Add(5 * time.Second); reg.Len() > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			tb.Fatalf("%d checkers left in the registry by another test", reg.Len())
		}
	}
}

// acquireMany puts n checkers in the process's registry until the test
// ends.
func acquireMany(tb testing.TB, n, first int, name string) []*health.Checker {
	tb.Helper()
	ws := manyWants(n, first, name)
	cs, _ := reg.Acquire(ws)
	tb.Cleanup(func() { reg.Release(ws) })
	return cs
}

// setAdminState sets the admin state of the checker of addr in the
// process's registry; an error fails the test.
func setAdminState(tb testing.TB, addr netip.AddrPort, st health.AdminState) {
	tb.Helper()
	if _, err := reg.SetAdminState(addr, st); err != nil {
		tb.Fatal(err)
	}
}

// heraldApp makes an app of the test's own, with per_address_metrics cap,
// the newest config for the metrics, until the test ends; its warnings go
// to the logs returned.
func heraldApp(tb testing.TB, cap SeriesCap) (*App, *observer.ObservedLogs) {
	tb.Helper()
	core, logs := observer.New(zap.WarnLevel)
	a := &App{PerAddressMetrics: cap, logger: zap.New(core), startState: new(startState)}
	prev := engines.herald.Swap(a)
	tb.Cleanup(func() { engines.herald.Store(prev) })
	return a, logs
}

// gather gathers the shaker metrics from a registry of their own (a
// pedantic one: Gather also fails on a metric that Describe did not
// announce).
func gather(tb testing.TB) []*dto.MetricFamily {
	tb.Helper()
	r := prometheus.NewPedanticRegistry()
	if err := registerMetrics(r); err != nil {
		tb.Fatal(err)
	}
	mfs, err := r.Gather()
	if err != nil {
		tb.Fatalf("gathering metrics: %v", err)
	}
	return mfs
}

// scrape gathers the shaker metrics (gather) and returns the series by
// family name.
func scrape(tb testing.TB) map[string][]string {
	tb.Helper()
	out := make(map[string][]string)
	for _, mf := range gather(tb) {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			out[mf.GetName()] = append(out[mf.GetName()],
				fmt.Sprintf("{%s} %g", strings.Join(labels, ","), m.GetGauge().GetValue()))
		}
	}
	return out
}

// TestMetricsSeriesBounded: caddy_shaker_upstream_healthy has one series
// per address up to per_address_metrics (default 1000), none above it,
// with one warning per config saying how to opt in; caddy_shaker_upstreams
// and caddy_shaker_addresses count at any number.
func TestMetricsSeriesBounded(t *testing.T) {
	const n = 1500
	emptyRegistry(t)
	cs := acquireMany(t, n, 0, "many")
	cs[0].Observe(upResult)
	cs[1].Observe(refusedResult)
	setAdminState(t, cs[2].Addr(), health.Drain)
	setAdminState(t, cs[3].Addr(), health.Maint)

	for _, tc := range []struct {
		cap    SeriesCap
		series int
		warn   bool
	}{
		{0, 0, true}, // the default: 1000
		{SeriesOff, 0, false},
		{1499, 0, true},
		{1500, n, false},
		{SeriesAll, n, false},
	} {
		t.Run(tc.cap.String(), func(t *testing.T) {
			_, logs := heraldApp(t, tc.cap)
			for range 3 {
				m := scrape(t)
				if got := len(m["caddy_shaker_upstream_healthy"]); got != tc.series {
					t.Fatalf("%d caddy_shaker_upstream_healthy series, want %d", got, tc.series)
				}
				if got := m["caddy_shaker_addresses"]; len(got) != 1 || got[0] != fmt.Sprintf("{} %d", n) {
					t.Fatalf("caddy_shaker_addresses %v, want %d", got, n)
				}
				want := []string{
					"{admin_state=drain,health=down} 0",
					"{admin_state=drain,health=unknown} 1",
					"{admin_state=drain,health=up} 0",
					"{admin_state=maint,health=unknown} 1",
					"{admin_state=ready,health=down} 1",
					fmt.Sprintf("{admin_state=ready,health=unknown} %d", n-4),
					"{admin_state=ready,health=up} 1",
				}
				if got := m["caddy_shaker_upstreams"]; strings.Join(got, "\n") != strings.Join(want, "\n") {
					t.Fatalf("caddy_shaker_upstreams:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
			}
			warns := logs.FilterMessageSnippet("per_address_metrics").All()
			if !tc.warn {
				if len(warns) != 0 {
					t.Fatalf("warned: %v", warns[0].Message)
				}
				return
			}
			if len(warns) != 1 {
				t.Fatalf("%d warnings over 3 scrapes, want 1", len(warns))
			}
			msg := warns[0].Message
			for _, s := range []string{"caddy_shaker_upstream_healthy", "caddy_shaker_upstreams", "set per_address_metrics", "all"} {
				if !strings.Contains(msg, s) {
					t.Errorf("warning %q does not say %q", msg, s)
				}
			}
			if f := warns[0].ContextMap(); f["addresses"] != int64(n) {
				t.Errorf("warning's fields %v: want addresses %d", f, n)
			}
		})
	}

	// few addresses: every one has its series by default
	reg.Release(manyWants(n, 0, "many")[10:])
	heraldApp(t, 0)
	m := scrape(t)
	if got := len(m["caddy_shaker_upstream_healthy"]); got != 10 {
		t.Fatalf("%d caddy_shaker_upstream_healthy series at 10 addresses, want 10", got)
	}
}

var (
	upResult      = shaker.Result{Outcome: shaker.Up, RTT: 42 * time.Microsecond}
	refusedResult = shaker.Result{Outcome: shaker.Refused, Err: shaker.ErrRefused}
)

// TestSeriesCapJSON: per_address_metrics is a number, "all" or "off" in
// JSON, and a bad one is named.
func TestSeriesCapJSON(t *testing.T) {
	for in, want := range map[string]SeriesCap{`0`: 0, `5`: 5, `"all"`: SeriesAll, `"off"`: SeriesOff, `"7"`: 7} {
		var a App
		if err := json.Unmarshal([]byte(`{"per_address_metrics":`+in+`}`), &a); err != nil || a.PerAddressMetrics != want {
			t.Errorf("%s: %v, %v; want %v", in, a.PerAddressMetrics, err, want)
		}
	}
	for in, want := range map[string]string{
		`-1`:     "per_address_metrics -1: must be a number of addresses",
		`1.5`:    "per_address_metrics 1.5",
		`"most"`: `per_address_metrics "most"`,
		`"0"`:    `per_address_metrics "0"`,
	} {
		var a App
		if err := json.Unmarshal([]byte(`{"per_address_metrics":`+in+`}`), &a); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", in, err, want)
		}
	}
	for c, want := range map[SeriesCap]string{0: `{}`, 1000: `{"per_address_metrics":1000}`, SeriesAll: `{"per_address_metrics":"all"}`, SeriesOff: `{"per_address_metrics":"off"}`} {
		b, err := json.Marshal(App{PerAddressMetrics: c})
		if err != nil || string(b) != want {
			t.Errorf("%v: %s, %v; want %s", c, b, err, want)
		}
	}
	if err := (&App{PerAddressMetrics: -3}).Validate(); err == nil || !strings.Contains(err.Error(), "per_address_metrics -3") {
		t.Errorf("validate -3: %v", err)
	}
}

// BenchmarkScrape times a scrape of the shaker metrics, in Prometheus's
// text format, at 1,000,000 addresses: by default (per-address series
// off above 1000) and, at 100,000, with per_address_metrics all. It
// reports the process's CPU per scrape (Gather runs collectors on
// goroutines of their own) and the bytes of a scrape.
func BenchmarkScrape(b *testing.B) {
	for _, bc := range []struct {
		n   int
		cap SeriesCap
	}{{1_000_000, 0}, {100_000, SeriesAll}} {
		name := bc.cap.String()
		if bc.cap == 0 {
			name = "default"
		}
		b.Run(fmt.Sprintf("addresses=%d/per_address_metrics=%s", bc.n, name), func(b *testing.B) {
			emptyRegistry(b)
			acquireMany(b, bc.n, 0, "bench")
			heraldApp(b, bc.cap)
			r := prometheus.NewRegistry()
			if err := registerMetrics(r); err != nil {
				b.Fatal(err)
			}
			var buf bytes.Buffer
			runtime.GC() // the setup's garbage is not the scrape's
			cpu0 := processCPU()
			b.ResetTimer()
			for b.Loop() {
				buf.Reset()
				mfs, err := r.Gather()
				if err != nil {
					b.Fatal(err)
				}
				enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
				for _, mf := range mfs {
					if err := enc.Encode(mf); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
			b.ReportMetric(float64(buf.Len()), "bytes/scrape")
		})
	}
}
