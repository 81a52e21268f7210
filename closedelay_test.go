package caddyshaker

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestCloseDelayMetric: caddy_shaker_close_delay_seconds is a histogram
// over the engine's CloseDelayBuckets, beside the max gauge, with or
// without an engine.
func TestCloseDelayMetric(t *testing.T) {
	r := prometheus.NewRegistry()
	if err := r.Register(&engineCollector{}); err != nil {
		t.Fatal(err)
	}
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var h, g bool
	for _, mf := range mfs {
		switch mf.GetName() {
		case "caddy_shaker_close_delay_seconds":
			h = true
			if mf.GetType() != dto.MetricType_HISTOGRAM {
				t.Errorf("close_delay_seconds is a %v", mf.GetType())
			}
			if n := len(mf.GetMetric()[0].GetHistogram().GetBucket()); n != len(shaker.CloseDelayBuckets) {
				t.Errorf("close_delay_seconds has %d buckets, want %d", n, len(shaker.CloseDelayBuckets))
			}
		case "caddy_shaker_max_close_delay_seconds":
			g = true
		}
	}
	if !h || !g {
		t.Errorf("histogram %v, max gauge %v: want both", h, g)
	}
}

// TestCloseDelayStatus: the quantiles GET /shaker/engine shows are
// bucket bounds, never above the worst delay seen.
func TestCloseDelayStatus(t *testing.T) {
	counts := make([]uint64, len(shaker.CloseDelayBuckets)+1)
	at := func(le time.Duration) int {
		t.Helper()
		for i, b := range shaker.CloseDelayBuckets {
			if b == le {
				return i
			}
		}
		t.Fatalf("no bucket of %v in %v", le, shaker.CloseDelayBuckets)
		return 0
	}
	counts[at(100*time.Microsecond)] = 989
	counts[at(10*time.Millisecond)] = 10
	counts[at(20*time.Millisecond)] = 1
	st := shaker.Stats{MaxCloseDelay: 17 * time.Millisecond, CloseDelay: shaker.Histogram{Counts: counts}}
	cs := closeDelayStatus(st)
	if cs.Count != 1000 || cs.P50Ms != 0.1 || cs.P99Ms != 10 || cs.P999Ms != 10 || len(cs.Buckets) != len(counts) {
		t.Errorf("got %+v", cs)
	}
	if b := cs.Buckets[at(100*time.Microsecond)]; b.LeMs != 0.1 || b.Count != 989 {
		t.Errorf("the 100 us bucket reads %+v", b)
	}
	counts[at(20*time.Millisecond)] = 2
	if cs := closeDelayStatus(st); cs.P999Ms != 17 {
		t.Errorf("p99.9 %v ms, want the worst, 17", cs.P999Ms)
	}
}
