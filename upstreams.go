package caddyshaker

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// Upstreams is a reverse_proxy upstream source that returns the upstreams
// whose addresses answer half-open TCP probes (SYN, SYN-ACK, RST): the
// backends' kernels answer, their applications never see a connection.
//
// Each upstream is host:port. A host that is a name is resolved to all its
// IPv4 and IPv6 addresses, with a timeout, and re-resolved periodically;
// every address is probed on its own and is up or down on its own. An
// address not probed yet counts as up until its first result, which sets
// its state; after that it goes down after `fails` consecutive failed
// probes and up again after `passes` consecutive answers. When no address
// is up, no upstream is returned and reverse_proxy answers 503.
//
// The probe engine, and each address's health state, belong to the
// `shaker` app: the same address with the same settings is probed once
// however many handlers use it, and its state survives config reloads.
//
// GetUpstreams never waits for a probe: it reads the current state.
type Upstreams struct {
	// The upstreams to probe and proxy to, as host:port (an IPv6 address
	// in brackets). Give either these or discover.
	Upstreams []string `json:"upstreams,omitempty"`

	// Another upstream source whose upstreams are probed: any
	// http.reverse_proxy.upstreams module (a, srv, multi, ...). It says
	// which upstreams exist; this source probes every address it returns
	// (host names resolved to all their addresses) and returns its list
	// filtered by health. Caddy runs no active checks for dynamic
	// upstreams; this does. Its upstreams are probed from the moment they
	// first appear, and this source polls it every interval so that it
	// does not depend on traffic. Give either this or upstreams. (In the
	// Caddyfile, the `source` subdirective; in JSON "source" is already
	// the name of this module.)
	SourceRaw json.RawMessage `json:"discover,omitempty" caddy:"namespace=http.reverse_proxy.upstreams inline_key=source"`

	// How long an upstream that the discover source stopped returning is
	// still probed and remembered, with its health, in case it returns.
	// Default: 5 intervals.
	ForgetAfter caddy.Duration `json:"forget_after,omitempty"`

	// The time between the starts of two probes of one address.
	// Default: 2s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long a probe waits for a SYN-ACK before it counts as failed
	// ("timeout"). Probes of one address never overlap: with a timeout
	// longer than the interval, the next probe starts when the last one
	// ends. Default: 1s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// The time between probes of an address that is changing state: one
	// that is up but whose last probes failed, or down but whose last
	// probes were answered. A short one makes detection faster without
	// probing steady addresses more often (HAProxy's fastinter): an
	// address goes down within interval + (fails-1) x fast_interval +
	// timeout. Default: the interval.
	FastInterval caddy.Duration `json:"fast_interval,omitempty"`

	// The time between probes of an address that is down (HAProxy's
	// downinter): longer to probe dead backends less, shorter to bring
	// them back sooner. Default: the interval.
	DownInterval caddy.Duration `json:"down_interval,omitempty"`

	// How much every interval between probes (interval, fast_interval or
	// down_interval, whichever is in use) varies at random, so that many
	// proxies probing the same backends do not fall into step and send
	// their SYNs in bursts (Envoy's interval_jitter, HAProxy's
	// spread-checks): each is drawn uniformly from [interval - j,
	// interval + j], so the mean rate does not change. j is a percentage
	// of the interval in use, from 0 to 50% ("10%"), or a duration
	// ("200ms") of at most half the interval (cut to half of
	// fast_interval or down_interval while a shorter one is in use);
	// "0", "0%" or "off" for none. It lengthens the worst-case detection
	// time by j per failed probe: (interval + j) x fails + timeout.
	// Default: "5%".
	Jitter Jitter `json:"jitter,omitempty"`

	// The consecutive answered probes that bring a down address back up.
	// Default: 2.
	Passes int `json:"passes,omitempty"`

	// The consecutive failed probes (refused, timeout, unreachable, or
	// another error) that take an up address down. Default: 3.
	Fails int `json:"fails,omitempty"`

	// Fail open below this fraction of addresses up (0 to 1, like Envoy's
	// panic threshold): when fewer than panic_threshold x all addresses
	// are up, every address is returned, up or down, instead of only
	// those up. 0, the default, never fails open: only addresses that are
	// up are returned, and with none up reverse_proxy answers 503.
	PanicThreshold float64 `json:"panic_threshold,omitempty"`

	// Ramp a returning address's share of requests up over this time, as
	// HAProxy's slowstart and Envoy's slow_start_config: an address that
	// comes back into service (down to up, but not its first result at
	// start; back from maintenance or drain) is left out of a share of
	// GetUpstreams results that shrinks linearly from all to none over
	// slow_start, so that its share of requests grows from nearly none to
	// its full share. It works with every selection policy; hash-based
	// ones (ip_hash, uri_hash, header, cookie, client_ip_hash) send a key
	// to the address only on the calls that include it, so keys move back
	// to it gradually. Default: 0, off.
	SlowStart caddy.Duration `json:"slow_start,omitempty"`

	// If set, probe this port instead of each upstream's own port
	// (requests still go to the upstream's port). 1-65535.
	Port int `json:"port,omitempty"`

	// How often host names are resolved again. Default: 1m.
	ResolveInterval caddy.Duration `json:"resolve_interval,omitempty"`

	// How long one resolution of a host name may take. On failure the
	// addresses found last are kept. Default: 5s.
	ResolveTimeout caddy.Duration `json:"resolve_timeout,omitempty"`

	specs  []upstreamSpec
	inner  reverseproxy.UpstreamSource
	app    *App
	logger *zap.Logger
	jit    jitter // Jitter parsed, by Provision
	*sourceState
}

// sourceState is the mutable part of a source, set up by Provision.
type sourceState struct {
	mu     sync.Mutex
	closed bool
	held   []health.Want           // references taken in reg
	names  map[string][]netip.Addr // host name -> addresses in use
	snap   atomic.Pointer[[]entry]
	table  atomic.Pointer[map[string]*discovered] // with discover: dial -> upstream
	panic  atomic.Bool                            // failing open (panic_threshold)
	wg     sync.WaitGroup

	stopCtx    context.Context // canceled by Cleanup, or when the config is unloaded
	stopCancel context.CancelFunc
}

// entry is one address GetUpstreams may return.
type entry struct {
	dial string
	c    *health.Checker
}

// CaddyModule returns the Caddy module information.
func (Upstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.upstreams.shaker",
		New: func() caddy.Module { return new(Upstreams) },
	}
}

// Provision sets defaults, checks the configuration, resolves host names
// (each bounded by resolve_timeout) and starts probing.
func (su *Upstreams) Provision(ctx caddy.Context) error {
	su.logger = ctx.Logger()
	su.sourceState = new(sourceState)
	su.stopCtx, su.stopCancel = context.WithCancel(ctx)
	if su.Interval == 0 {
		su.Interval = caddy.Duration(DefaultInterval)
	}
	if su.Timeout == 0 {
		su.Timeout = caddy.Duration(DefaultTimeout)
	}
	if su.Passes == 0 {
		su.Passes = DefaultPasses
	}
	if su.Fails == 0 {
		su.Fails = DefaultFails
	}
	if su.ResolveInterval == 0 {
		su.ResolveInterval = caddy.Duration(DefaultResolveInterval)
	}
	if su.ResolveTimeout == 0 {
		su.ResolveTimeout = caddy.Duration(DefaultResolveTimeout)
	}
	if su.ForgetAfter == 0 {
		su.ForgetAfter = DefaultForgetAfterIntervals * su.Interval
		if su.ForgetAfter/DefaultForgetAfterIntervals != su.Interval {
			su.ForgetAfter = caddy.Duration(math.MaxInt64) // a huge interval: no overflow
		}
	}
	if su.Jitter == "" {
		su.Jitter = Jitter(strconv.Itoa(DefaultJitterPercent) + "%")
	}
	if err := su.Validate(); err != nil {
		return err
	}
	su.jit, _ = su.jitterSetting() // Validate checked it
	specs, err := parseUpstreams(su.Upstreams)
	if err != nil {
		return err
	}
	su.specs = specs

	// the app owns the engine; loading it here makes sure it runs
	appIface, err := ctx.App("shaker")
	if err != nil {
		return fmt.Errorf("loading shaker app: %v", err)
	}
	su.app = appIface.(*App)
	if su.SourceRaw != nil {
		return su.provisionInner(ctx)
	}

	su.names = make(map[string][]netip.Addr)
	var hosts []string
	for _, s := range specs {
		if s.host != "" && !slices.Contains(hosts, s.host) {
			hosts = append(hosts, s.host)
		}
	}
	if len(hosts) > 0 {
		found := su.resolveAll(ctx, hosts)
		for _, h := range hosts {
			su.names[h] = found[h]
		}
	}
	su.mu.Lock()
	su.rebuildLocked()
	su.mu.Unlock()

	if len(hosts) > 0 {
		su.wg.Add(1)
		go su.refresh(hosts)
	}
	return nil
}

// Validate checks the settings; each error names the bad value.
func (su *Upstreams) Validate() error {
	// Caddy clears SourceRaw once it has loaded the module into inner.
	hasSource := su.SourceRaw != nil || su.inner != nil
	switch {
	case len(su.Upstreams) == 0 && !hasSource:
		return fmt.Errorf("no upstreams: give at least one host:port, or a source to discover them")
	case len(su.Upstreams) > 0 && hasSource:
		return fmt.Errorf("upstreams %v and a discover source: give one or the other", su.Upstreams)
	}
	// 0 is accepted everywhere below: the default, or off (Provision
	// fills in the defaults before it calls Validate)
	defInterval := "0 for the default, " + DefaultInterval.String()
	for _, iv := range []struct {
		name string
		d    caddy.Duration
		zero string
	}{{"interval", su.Interval, defInterval}, {"fast_interval", su.FastInterval, "0 for none"}, {"down_interval", su.DownInterval, "0 for none"}} {
		if iv.d != 0 && time.Duration(iv.d) < MinInterval {
			return fmt.Errorf("%s %v: must be at least %v (or %s)", iv.name, time.Duration(iv.d), MinInterval, iv.zero)
		}
	}
	if su.Timeout < 0 {
		return fmt.Errorf("timeout %v: must not be negative (0 for the default, %v)", time.Duration(su.Timeout), DefaultTimeout)
	}
	if su.Passes < 0 {
		return fmt.Errorf("passes %d: must not be negative (0 for the default, %d)", su.Passes, DefaultPasses)
	}
	if su.Fails < 0 {
		return fmt.Errorf("fails %d: must not be negative (0 for the default, %d)", su.Fails, DefaultFails)
	}
	if _, err := su.jitterSetting(); err != nil {
		return err
	}
	if su.PanicThreshold < 0 || su.PanicThreshold > 1 {
		return fmt.Errorf("panic_threshold %v: must be a fraction from 0 to 1", su.PanicThreshold)
	}
	if su.Port < 0 || su.Port > 65535 {
		return fmt.Errorf("port %d: out of range 1-65535", su.Port)
	}
	if su.ResolveInterval < 0 {
		return fmt.Errorf("resolve_interval %v: must not be negative (0 for the default, %v)", time.Duration(su.ResolveInterval), DefaultResolveInterval)
	}
	if su.ResolveTimeout < 0 {
		return fmt.Errorf("resolve_timeout %v: must not be negative (0 for the default, %v)", time.Duration(su.ResolveTimeout), DefaultResolveTimeout)
	}
	if su.ForgetAfter < 0 {
		return fmt.Errorf("forget_after %v: must not be negative (0 for the default, %d intervals)", time.Duration(su.ForgetAfter), DefaultForgetAfterIntervals)
	}
	if su.SlowStart < 0 {
		return fmt.Errorf("slow_start %v: must not be negative (0 for none)", time.Duration(su.SlowStart))
	}
	return nil
}

// Cleanup stops re-resolving and releases this source's checkers; a
// checker that no other source (of this config or the next) uses stops.
func (su *Upstreams) Cleanup() error {
	if su.sourceState == nil {
		return nil
	}
	su.mu.Lock()
	if su.closed {
		su.mu.Unlock()
		return nil
	}
	su.closed = true
	su.stopCancel()
	su.mu.Unlock()
	su.wg.Wait() // refresh returns soon: its lookups see the stop
	su.mu.Lock()
	defer su.mu.Unlock()
	reg.Release(su.held)
	su.held = nil
	su.snap.Store(nil)
	if su.inner != nil {
		su.releaseDiscoveredLocked()
	}
	return nil
}

// GetUpstreams returns a fresh Upstream (reverse_proxy mutates them) for
// each address in service (up, and neither drained nor in maintenance), or
// none when none is; below panic_threshold, for every address not drained
// nor in maintenance. An address ramping up after its return (slow_start)
// is left out of a share of the calls. It never waits for a probe and
// makes two allocations.
func (su *Upstreams) GetUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	if su.sourceState == nil {
		return nil, nil
	}
	if su.inner != nil {
		return su.discoverUpstreams(r)
	}
	p := su.snap.Load()
	if p == nil {
		return nil, nil
	}
	es := *p
	n, ready := 0, 0
	ramp := false
	for i := range es {
		c := es[i].c
		if c.AdminState() != health.Ready {
			continue
		}
		ready++
		if c.InService() {
			n++
			ramp = ramp || su.SlowStart > 0 && c.ReturnedAt() != 0
		}
	}
	all := su.PanicThreshold > 0 && float64(n) < su.PanicThreshold*float64(ready)
	if all != su.panic.Load() && su.panic.CompareAndSwap(!all, all) {
		su.logPanic(all, n, ready)
	}
	if all {
		n = ready
	}
	if n == 0 {
		return nil, nil
	}
	var now int64
	if ramp && !all {
		now = health.Now()
	}
	vals := make([]reverseproxy.Upstream, n)
	out := make([]*reverseproxy.Upstream, 0, n)
	for pass := 0; pass < 2 && len(out) == 0; pass++ {
		// the second pass, without the slow start draw, only when the
		// draw left out every address: better than a 503
		for i := range es {
			if len(out) == n {
				break
			}
			c := es[i].c
			if all {
				if c.AdminState() != health.Ready {
					continue
				}
			} else if !c.InService() || now != 0 && pass == 0 && !slowStartDraw(c.ReturnedAt(), now, time.Duration(su.SlowStart)) {
				continue
			}
			v := &vals[len(out)]
			v.Dial = es[i].dial
			out = append(out, v)
		}
	}
	return out, nil
}

// slowStartDraw decides whether an address that came back into service at
// returned (unix ns; 0: never) is in one GetUpstreams result at now: with
// a probability that grows linearly from 0 to 1 over slow.
func slowStartDraw(returned, now int64, slow time.Duration) bool {
	el := now - returned
	if returned == 0 || el >= int64(slow) {
		return true
	}
	return el > 0 && rand.Int64N(int64(slow)) < el
}

// ResetCache is called by reverse_proxy before it retries a request that
// failed (lb_retries, lb_try_duration): the address of the attempt that
// failed is probed at once, and at fast_interval while its probes fail
// (once per fast_interval at most, however many requests fail). Caddy
// calls no upstream source back after a failed request it does not retry,
// so without retries failures are seen by the probes alone.
func (su *Upstreams) ResetCache(r *http.Request) error {
	if su.sourceState == nil {
		return nil
	}
	var err error
	if c, ok := su.inner.(reverseproxy.CachingUpstreamSource); ok {
		err = c.ResetCache(r)
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		return err
	}
	failed, _ := repl.GetString("http.reverse_proxy.upstream.hostport")
	if failed == "" {
		return err
	}
	for _, c := range su.checkersOf(failed) {
		if c.ProbeNow() {
			su.logger.Debug("request failed: probing the upstream now",
				zap.String("upstream", failed), zap.String("address", c.Addr().String()))
		}
	}
	return err
}

// checkersOf returns the checkers of the upstream whose dial address is
// dial (host:port).
func (su *Upstreams) checkersOf(dial string) []*health.Checker {
	if su.inner != nil {
		t := su.table.Load()
		if t == nil {
			return nil
		}
		d := (*t)[dial]
		if d == nil {
			return nil
		}
		if p := d.cs.Load(); p != nil {
			return *p
		}
		return nil
	}
	p := su.snap.Load()
	if p == nil {
		return nil
	}
	for _, e := range *p {
		if e.dial == dial {
			return []*health.Checker{e.c}
		}
	}
	return nil
}

// logPanic logs that the source starts or stops failing open.
func (su *Upstreams) logPanic(on bool, up, total int) {
	fields := []zap.Field{zap.Int("up", up), zap.Int("addresses", total), zap.Float64("panic_threshold", su.PanicThreshold)}
	if on {
		su.logger.Error("too few upstreams up: failing open, sending requests to every address", fields...)
	} else {
		su.logger.Info("enough upstreams up again: sending requests only to those up", fields...)
	}
}

// rebuildLocked takes references to the checkers of the current
// addresses, publishes them for GetUpstreams, then drops the references
// held before (in that order, so that an address kept keeps its state).
func (su *Upstreams) rebuildLocked() {
	if su.closed {
		return
	}
	type planned struct {
		dial string
		want health.Want
	}
	var plan []planned
	seen := make(map[string]bool)
	add := func(s upstreamSpec, ip netip.Addr) {
		dial := net.JoinHostPort(ip.String(), strconv.Itoa(int(s.port)))
		if seen[dial] {
			return
		}
		seen[dial] = true
		probePort := s.port
		if su.Port != 0 {
			probePort = uint16(su.Port)
		}
		plan = append(plan, planned{dial, su.want(netip.AddrPortFrom(ip, probePort), s.raw)})
	}
	for _, s := range su.specs {
		if s.host == "" {
			add(s, s.ip)
			continue
		}
		for _, ip := range su.names[s.host] {
			add(s, ip)
		}
	}
	ws := make([]health.Want, len(plan))
	for i, p := range plan {
		ws[i] = p.want
	}
	cs, fresh := reg.Acquire(ws)
	su.app.schedule(fresh)
	es := make([]entry, len(plan))
	for i, p := range plan {
		es[i] = entry{dial: p.dial, c: cs[i]}
	}
	su.snap.Store(&es)
	old := su.held
	su.held = ws
	reg.Release(old)
}

// resolveAll resolves host names in parallel, each bounded by
// resolve_timeout. A name that fails keeps the addresses found last (in
// this process); its error is logged.
func (su *Upstreams) resolveAll(ctx context.Context, hosts []string) map[string][]netip.Addr {
	out := make(map[string][]netip.Addr, len(hosts))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Go(func() {
			addrs, err := resolve(ctx, h, time.Duration(su.ResolveTimeout))
			if err != nil {
				addrs = lastResolved(h)
				su.logger.Warn("resolving upstream host failed",
					zap.String("host", h), zap.Error(err),
					zap.Int("keeping_addresses", len(addrs)))
			}
			mu.Lock()
			out[h] = addrs
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// refresh re-resolves host names until the config is unloaded.
func (su *Upstreams) refresh(hosts []string) {
	defer su.wg.Done()
	every := time.Duration(su.ResolveInterval)
	retry := min(every, 5*time.Second)
	t := time.NewTimer(every)
	defer t.Stop()
	ctx := su.stopCtx
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		found := su.resolveAll(ctx, hosts)
		if ctx.Err() != nil {
			return
		}
		missing := false
		su.mu.Lock()
		changed := false
		for _, h := range hosts {
			if !slices.Equal(su.names[h], found[h]) {
				su.logger.Info("upstream host addresses changed",
					zap.String("host", h),
					zap.Stringers("old", su.names[h]),
					zap.Stringers("new", found[h]))
				su.names[h] = found[h]
				changed = true
			}
			if len(found[h]) == 0 {
				missing = true
			}
		}
		if changed {
			su.rebuildLocked()
		}
		su.mu.Unlock()
		if missing {
			t.Reset(retry)
		} else {
			t.Reset(every)
		}
	}
}

// resolved keeps the addresses each host name had last, so that a failed
// resolution (at a reload, say) keeps the addresses and their state.
var resolved = struct {
	sync.Mutex
	m map[string][]netip.Addr
}{m: make(map[string][]netip.Addr)}

func lastResolved(host string) []netip.Addr {
	resolved.Lock()
	defer resolved.Unlock()
	return resolved.m[host]
}

// resolveFunc resolves a host name; tests replace it.
var resolveFunc = net.DefaultResolver.LookupNetIP

// resolve returns the sorted IPv4 and IPv6 addresses of host.
func resolve(ctx context.Context, host string, timeout time.Duration) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ips, err := resolveFunc(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		ip = ip.Unmap()
		if !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no addresses", host)
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	resolved.Lock()
	resolved.m[host] = out
	resolved.Unlock()
	return out, nil
}

// Interface guards
var (
	_ caddy.Provisioner                  = (*Upstreams)(nil)
	_ caddy.Validator                    = (*Upstreams)(nil)
	_ caddy.CleanerUpper                 = (*Upstreams)(nil)
	_ reverseproxy.UpstreamSource        = (*Upstreams)(nil)
	_ reverseproxy.CachingUpstreamSource = (*Upstreams)(nil)
)
