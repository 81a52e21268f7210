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
	once   sync.Once
	probes *prometheus.CounterVec
	rtt    prometheus.Histogram
	engine engineCollector
	// one child per outcome, so that observing a probe does not allocate
	byOutcome [7]prometheus.Counter
}{}

const metricsNS, metricsSub = "caddy", "shaker"

func metricName(name string) string { return prometheus.BuildFQName(metricsNS, metricsSub, name) }

func initMetrics() {
	shakerMetrics.once.Do(func() {
		m := &shakerMetrics
		m.probes = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNS, Subsystem: metricsSub, Name: "probes_total",
			Help: "Half-open health probes by result (up, refused, timeout, unreachable, error, local_error).",
		}, []string{"result"})
		for o := shaker.Up; o <= shaker.Failed; o++ {
			m.byOutcome[o] = m.probes.WithLabelValues(o.String())
		}
		m.rtt = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNS, Subsystem: metricsSub, Name: "probe_rtt_seconds",
			Help:    "Kernel-measured SYN to SYN-ACK round trip of successful probes.",
			Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
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
	for _, c := range []prometheus.Collector{m.probes, m.rtt, &m.engine} {
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
	if int(res.Outcome) >= len(m.byOutcome) || m.byOutcome[res.Outcome] == nil {
		return
	}
	if res.Outcome == shaker.Up {
		m.rtt.Observe(res.RTT.Seconds())
	}
	m.byOutcome[res.Outcome].Inc()
}

// engineCollector reports, at each scrape, what the engine and the health
// layer know: the health of each address and the engine's own figures.
// Nothing is kept per address between scrapes, so a million addresses
// cost no memory here until they are scraped.
type engineCollector struct{}

var (
	descHealthy = prometheus.NewDesc(metricName("upstream_healthy"),
		"Health of each probed address: 1 up (or not probed yet), 0 down.", []string{"address"}, nil)
	descInFlight = prometheus.NewDesc(metricName("probes_in_flight"),
		"Probes whose SYN is out and whose result is not known yet.", nil, nil)
	descCloseDelay = prometheus.NewDesc(metricName("max_close_delay_seconds"),
		"Worst delay seen between a SYN-ACK's arrival and the close of its probe socket; "+
			"near 0.2 s a probe becomes a real connection.", nil, nil)
	descCloseDelays = prometheus.NewDesc(metricName("close_delay_seconds"),
		"Delay between each answered probe's SYN-ACK and the close of its socket; "+
			"near 0.2 s a probe becomes a real connection.", nil, nil)
	descStartDelay = prometheus.NewDesc(metricName("probe_start_delay_seconds"),
		"How late periodic probes started, from their due time to their SYN.", nil, nil)
	descLate = prometheus.NewDesc(metricName("probes_late_total"),
		"Periodic probes that started later than a quarter of their interval.", nil, nil)
	descOverdue = prometheus.NewDesc(metricName("probes_overdue"),
		"Periodic probes whose time has passed and that have not started.", nil, nil)
	descLag = prometheus.NewDesc(metricName("schedule_lag_seconds"),
		"How late the most overdue periodic probe that has not started is; 0 while the engine keeps up.", nil, nil)
	descSockets = prometheus.NewDesc(metricName("sockets"),
		"Probe sockets open.", nil, nil)
	descMaxSockets = prometheus.NewDesc(metricName("max_sockets"),
		"The bound on probe sockets open (max_sockets).", nil, nil)
	descLoops = prometheus.NewDesc(metricName("loops"),
		"Probe loops (epoll instances) the engine runs.", nil, nil)
	descScheduled = prometheus.NewDesc(metricName("probes_scheduled"),
		"Periodic probes registered with the engine (one per address and settings).", nil, nil)
	descHalfOpen = prometheus.NewDesc(metricName("half_open"),
		"1 when probes are half-open (backends never accept() them), 0 when they reach the backends' accept(): "+
			"the engine's startup self-check failed, or this build falls back to full connects. "+
			"While the self-check is pending, and without an engine, it reports what the build alone says.", nil, nil)
)

// Describe sends the descriptors of the collected metrics.
func (*engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descHealthy, descInFlight, descCloseDelay, descCloseDelays, descStartDelay,
		descLate, descOverdue, descLag, descSockets, descMaxSockets, descLoops, descScheduled, descHalfOpen} {
		ch <- d
	}
}

// Collect sends the current values.
func (*engineCollector) Collect(ch chan<- prometheus.Metric) {
	type addrHealth struct {
		addr netip.AddrPort
		up   bool
	}
	var hs []addrHealth
	reg.EachAddress(func(addr netip.AddrPort, up bool) { hs = append(hs, addrHealth{addr, up}) })
	for _, h := range hs {
		v := 0.0
		if h.up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, v, h.addr.String())
	}
	var st shaker.Stats
	if e := engines.cur.Load(); e != nil {
		st = e.Stats()
	} else {
		st.StartDelay.Counts = make([]uint64, len(shaker.StartDelayBuckets)+1)
		st.CloseDelay.Counts = make([]uint64, len(shaker.CloseDelayBuckets)+1)
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	gauge(descInFlight, float64(st.InFlight))
	gauge(descCloseDelay, st.MaxCloseDelay.Seconds())
	gauge(descOverdue, float64(st.Overdue))
	gauge(descLag, st.Lag.Seconds())
	gauge(descSockets, float64(st.Sockets))
	gauge(descMaxSockets, float64(st.MaxSockets))
	gauge(descLoops, float64(st.Loops))
	gauge(descScheduled, float64(st.Scheduled))
	if _, _, halfOpen := selfCheckState(); halfOpen {
		gauge(descHalfOpen, 1)
	} else {
		gauge(descHalfOpen, 0)
	}
	ch <- prometheus.MustNewConstMetric(descLate, prometheus.CounterValue, float64(st.Late))
	buckets := make(map[float64]uint64, len(shaker.StartDelayBuckets))
	var cum uint64
	for i, b := range shaker.StartDelayBuckets {
		cum += st.StartDelay.Counts[i]
		buckets[b.Seconds()] = cum
	}
	ch <- prometheus.MustNewConstHistogram(descStartDelay, st.StartDelay.Count(), st.StartDelay.Sum.Seconds(), buckets)
	closeBuckets := make(map[float64]uint64, len(shaker.CloseDelayBuckets))
	cum = 0
	for i, b := range shaker.CloseDelayBuckets {
		cum += st.CloseDelay.Counts[i]
		closeBuckets[b.Seconds()] = cum
	}
	ch <- prometheus.MustNewConstHistogram(descCloseDelays, st.CloseDelay.Count(), st.CloseDelay.Sum.Seconds(), closeBuckets)
}
