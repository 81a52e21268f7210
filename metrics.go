package caddyshaker

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// SeriesCap is App.PerAddressMetrics: how many probed addresses get a
// series of their own. In JSON it is a number of addresses, "all" or
// "off"; 0 (or absent) is the default, DefaultPerAddressMetrics.
type SeriesCap int

// The SeriesCap values that are not a number of addresses.
const (
	SeriesOff SeriesCap = -1 // "off": no per-address series
	SeriesAll SeriesCap = -2 // "all": one per address, however many
)

// DefaultPerAddressMetrics is the default of per_address_metrics: a scrape
// of 1,000 per-address series is about 60 KB, and any cluster with more
// addresses than that is better watched through caddy_shaker_upstreams.
const DefaultPerAddressMetrics = 1000

// limit is the most addresses that get a series of their own.
func (c SeriesCap) limit() int {
	switch {
	case c == 0:
		return DefaultPerAddressMetrics
	case c == SeriesOff:
		return 0
	case c == SeriesAll:
		return math.MaxInt
	}
	return int(c)
}

// String is the cap as the Caddyfile and JSON write it.
func (c SeriesCap) String() string {
	switch c {
	case SeriesOff:
		return "off"
	case SeriesAll:
		return "all"
	}
	return strconv.Itoa(int(c))
}

func (c SeriesCap) validate() error {
	if c < SeriesAll {
		return fmt.Errorf("per_address_metrics %d: must be a number of addresses, \"all\" or \"off\"", int(c))
	}
	return nil
}

// parseSeriesCap parses a number of addresses (at least 1), all or off.
func parseSeriesCap(s string) (SeriesCap, error) {
	switch s {
	case "off":
		return SeriesOff, nil
	case "all":
		return SeriesAll, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > math.MaxInt32 {
		return 0, fmt.Errorf("per_address_metrics %q: must be a number of addresses from 1 to %d, all or off", s, math.MaxInt32)
	}
	return SeriesCap(n), nil
}

// MarshalJSON writes the cap as a number, "all" or "off".
func (c SeriesCap) MarshalJSON() ([]byte, error) {
	if c < 0 {
		return json.Marshal(c.String())
	}
	return json.Marshal(int(c))
}

// UnmarshalJSON reads a number of addresses (0 for the default), "all" or
// "off".
func (c *SeriesCap) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := parseSeriesCap(s)
		if err != nil {
			return err
		}
		*c = v
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil || n < 0 || n > math.MaxInt32 {
		return fmt.Errorf("per_address_metrics %s: must be a number of addresses from 0 (the default, %d) to %d, \"all\" or \"off\"",
			b, DefaultPerAddressMetrics, math.MaxInt32)
	}
	*c = SeriesCap(n)
	return nil
}

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

// probesTotalHelp is caddy_shaker_probes_total's help. It counts the
// probes of upstreams, the health layer's, and by design not the
// engine's self-check: its three probes of a listener of its own, once
// per engine start, say nothing of any upstream, and their verdict has a
// metric of its own (caddy_shaker_half_open). The engine's own figures
// (caddy_shaker_close_delay_seconds, the probe count it logs when it
// stops) count every probe it sent, the self-check's too.
const probesTotalHelp = "Half-open health probes of upstreams by result (up, refused, timeout, unreachable, error, local_error). " +
	"The engine's startup self-check (3 probes of its own listener on 127.0.0.1, see caddy_shaker_half_open) is not counted here, " +
	"though caddy_shaker_close_delay_seconds counts it."

func metricName(name string) string { return prometheus.BuildFQName(metricsNS, metricsSub, name) }

func initMetrics() {
	shakerMetrics.once.Do(func() {
		m := &shakerMetrics
		m.probes = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNS, Subsystem: metricsSub, Name: "probes_total",
			Help: probesTotalHelp,
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

// collectPerAddress sends caddy_shaker_upstream_healthy for each address,
// unless there are more than per_address_metrics of them: then it sends
// none (a subset would change from scrape to scrape) and warns, once per
// config.
func collectPerAddress(ch chan<- prometheus.Metric, addresses int) {
	app := engines.herald.Load()
	var limit SeriesCap
	if app != nil {
		limit = app.PerAddressMetrics
	}
	if addresses > limit.limit() {
		if app != nil && limit != SeriesOff && app.startState != nil && !app.warnedSeries.Swap(true) {
			app.logger.Warn("more addresses are probed than per_address_metrics: no address has a series of its own "+
				"(caddy_shaker_upstream_healthy) while that lasts; caddy_shaker_upstreams counts them by health and admin state. "+
				"To export them, set per_address_metrics in the shaker global option to a number above the addresses, or all "+
				"(each series costs every scrape about 60 bytes)",
				zap.Int("addresses", addresses),
				zap.Int("per_address_metrics", limit.limit()))
		}
		return
	}
	type addrHealth struct {
		addr netip.AddrPort
		up   bool
	}
	hs := make([]addrHealth, 0, addresses)
	reg.EachAddress(func(addr netip.AddrPort, up bool) { hs = append(hs, addrHealth{addr, up}) })
	for _, h := range hs {
		v := 0.0
		if h.up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, v, h.addr.String())
	}
}

// engineCollector reports, at each scrape, what the engine and the health
// layer know: how many addresses are in each state, the health of each
// address while there are at most per_address_metrics of them, and the
// engine's own figures. Nothing is kept per address between scrapes; the
// counts are the registry's running ones, so that a default scrape costs
// the same at any number of addresses.
type engineCollector struct{}

// Health and admin states of caddy_shaker_upstreams: every one but those
// maint makes impossible (health is unknown in maintenance).
var upstreamStates = []struct {
	h health.Health
	a health.AdminState
}{
	{health.Up, health.Ready}, {health.Down, health.Ready}, {health.Unknown, health.Ready},
	{health.Up, health.Drain}, {health.Down, health.Drain}, {health.Unknown, health.Drain},
	{health.Unknown, health.Maint},
}

var (
	descUpstreams = prometheus.NewDesc(metricName("upstreams"),
		"Probed upstreams (an address under one set of probe settings: the rows of GET /shaker/upstreams) "+
			"by health (up, down, or unknown: not probed yet, or in maintenance and until its first result after it) "+
			"and admin state (ready, drain, maint).", []string{"health", "admin_state"}, nil)
	descAddresses = prometheus.NewDesc(metricName("addresses"),
		"Probed addresses (an address probed with several settings counts once).", nil, nil)
	descHealthy = prometheus.NewDesc(metricName("upstream_healthy"),
		"Health of each probed address: 1 up (or not probed yet), 0 down. "+
			"Only while there are at most per_address_metrics addresses (default 1000).", []string{"address"}, nil)
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
	descProbeMode = prometheus.NewDesc(metricName("probe_mode"),
		"The probe engine's mode (probe_mode): 1 for the one in use, connect or raw, 0 for the other; "+
			"both 0 without an engine.", []string{"mode"}, nil)
	descHalfOpen = prometheus.NewDesc(metricName("half_open"),
		"1 when probes are half-open (backends never accept() them), 0 when they reach the backends' accept(): "+
			"the engine's startup self-check failed, or this build falls back to full connects. "+
			"While the self-check is pending, and without an engine, it reports what the build alone says.", nil, nil)
)

// Describe sends the descriptors of the collected metrics.
func (*engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUpstreams, descAddresses, descHealthy, descInFlight, descCloseDelay, descCloseDelays, descStartDelay,
		descLate, descOverdue, descLag, descSockets, descMaxSockets, descLoops, descScheduled, descHalfOpen, descProbeMode} {
		ch <- d
	}
}

// Collect sends the current values.
func (*engineCollector) Collect(ch chan<- prometheus.Metric) {
	counts := reg.Counts()
	for _, s := range upstreamStates {
		ch <- prometheus.MustNewConstMetric(descUpstreams, prometheus.GaugeValue,
			float64(counts[s.h][s.a]), s.h.String(), s.a.String())
	}
	addresses := reg.Addresses()
	ch <- prometheus.MustNewConstMetric(descAddresses, prometheus.GaugeValue, float64(addresses))
	collectPerAddress(ch, addresses)
	var st shaker.Stats
	running := false
	if e := engines.cur.Load(); e != nil {
		st = e.Stats()
		running = true
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
	for _, m := range []shaker.Mode{shaker.ModeConnect, shaker.ModeRaw} {
		v := 0.0
		if running && st.Mode == m {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descProbeMode, prometheus.GaugeValue, v, m.String())
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
