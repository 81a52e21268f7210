package caddyshaker

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// The collectors live at package level, like reverse_proxy's, so that
// their values survive config reloads; each config's registry gets them
// registered once.
var shakerMetrics = struct {
	once      sync.Once
	probes    *prometheus.CounterVec
	healthy   *prometheus.GaugeVec
	rtt       prometheus.Histogram
	inFlight  prometheus.GaugeFunc
	closeWait prometheus.GaugeFunc
	// one child per result, so that observing a probe does not allocate
	byResult map[string]prometheus.Counter
}{}

func initMetrics() {
	shakerMetrics.once.Do(func() {
		const ns, sub = "caddy", "shaker"
		m := &shakerMetrics
		m.probes = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "probes_total",
			Help: "Half-open health probes by result (up, refused, timeout, unreachable, error, local_error).",
		}, []string{"result"})
		m.byResult = make(map[string]prometheus.Counter)
		for _, r := range []string{"up", "refused", "timeout", "unreachable", "error", "local_error"} {
			m.byResult[r] = m.probes.WithLabelValues(r)
		}
		m.healthy = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "upstream_healthy",
			Help: "Health of each probed address: 1 up (or not probed yet), 0 down.",
		}, []string{"address"})
		m.rtt = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "probe_rtt_seconds",
			Help:    "Kernel-measured SYN to SYN-ACK round trip of successful probes.",
			Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		})
		m.inFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "probes_in_flight",
			Help: "Probes whose SYN is out and whose result is not known yet.",
		}, func() float64 {
			if e := reg.cur.Load(); e != nil {
				return float64(e.Stats().InFlight)
			}
			return 0
		})
		m.closeWait = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "max_close_delay_seconds",
			Help: "Worst delay seen between a SYN-ACK and the close of its probe socket; " +
				"near 0.2 s a probe becomes a real connection.",
		}, func() float64 {
			if e := reg.cur.Load(); e != nil {
				return e.Stats().MaxCloseDelay.Seconds()
			}
			return 0
		})
	})
}

// registerMetrics registers the collectors on a config's registry.
func registerMetrics(r *prometheus.Registry) error {
	initMetrics()
	if r == nil {
		return nil
	}
	m := &shakerMetrics
	for _, c := range []prometheus.Collector{m.probes, m.healthy, m.rtt, m.inFlight, m.closeWait} {
		if err := r.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return fmt.Errorf("registering shaker metrics: %v", err)
			}
		}
	}
	return nil
}

// observeProbe counts a probe's result. It runs on the engine's loop.
func observeProbe(res shaker.Result) {
	m := &shakerMetrics
	if m.byResult == nil {
		return
	}
	var k string
	switch {
	case res.Err == nil:
		k = "up"
		m.rtt.Observe(res.RTT.Seconds())
	case errors.Is(res.Err, shaker.ErrRefused):
		k = "refused"
	case errors.Is(res.Err, shaker.ErrTimeout):
		k = "timeout"
	case errors.Is(res.Err, shaker.ErrUnreachable):
		k = "unreachable"
	case errors.Is(res.Err, shaker.ErrLocal):
		k = "local_error"
	default:
		k = "error"
	}
	m.byResult[k].Inc()
}

// refreshGaugeLocked sets the healthy gauge of an address from its
// checkers (1 when any is up: several sources may probe it with different
// settings), or deletes it when none is left. It runs under reg.mu, so a
// late update cannot bring back the gauge of a forgotten address.
func (r *registry) refreshGaugeLocked(addr netip.AddrPort) {
	g := shakerMetrics.healthy
	if g == nil {
		return
	}
	cs := r.byAddr[addr]
	if len(cs) == 0 {
		g.DeleteLabelValues(addr.String())
		return
	}
	v := 0.0
	for _, c := range cs {
		if c.healthy.Load() {
			v = 1
			break
		}
	}
	g.WithLabelValues(addr.String()).Set(v)
}

// refreshGauge is refreshGaugeLocked for callers without reg.mu.
func (r *registry) refreshGauge(addr netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.refreshGaugeLocked(addr)
}
