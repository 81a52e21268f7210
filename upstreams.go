package caddyshaker

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
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
	// in brackets). Give either these or inner.
	Upstreams []string `json:"upstreams,omitempty"`

	// Another upstream source whose upstreams are probed: any
	// http.reverse_proxy.upstreams module (a, srv, multi, ...). It says
	// which upstreams exist; this source probes every address it returns
	// (host names resolved to all their addresses) and returns its list
	// filtered by health. Caddy runs no active checks for dynamic
	// upstreams; this does. Its upstreams are probed from the moment they
	// first appear, and this source polls it every interval so that it
	// does not depend on traffic. Give either this or upstreams. It is
	// `inner` in the Caddyfile too, as the shaker policy's inner policy.
	InnerRaw json.RawMessage `json:"inner,omitempty" caddy:"namespace=http.reverse_proxy.upstreams inline_key=source"`

	// DiscoverRaw is the name inner had before: still read, with a
	// deprecation warning at load. Give one of them.
	DiscoverRaw json.RawMessage `json:"discover,omitempty" caddy:"namespace=http.reverse_proxy.upstreams inline_key=source"`

	// How long an upstream that the inner source stopped returning is
	// still probed and remembered, with its health, in case it returns.
	// Default: 5 intervals. An upstream is forgotten forget_after after
	// the source last returned it, whether the source's polls still
	// answer or keep failing.
	ForgetAfter caddy.Duration `json:"forget_after,omitempty"`

	// The most upstreams an inner source probes at once. Past it, new
	// upstreams are not probed (requests may still go to them, as to any
	// upstream not probed yet) and one warning is logged, until forgetting
	// makes room. It bounds what a misbehaving inner source can make this
	// proxy probe and remember. Default: 10000.
	MaxDiscovered int `json:"max_discovered,omitempty"`

	// How addresses are probed and judged: interval, timeout, passes,
	// fails, jitter, panic_threshold, slow_start, port, ... (flat in JSON).
	ProbeConfig

	specs  []upstreamSpec
	inner  reverseproxy.UpstreamSource
	app    *App
	logger *zap.Logger
	*sourceState
}

// sourceState is the mutable part of a source, set up by Provision.
type sourceState struct {
	mu       sync.Mutex
	closed   bool
	held     []health.Want           // references taken in reg
	names    map[string][]netip.Addr // host name -> addresses in use
	hosts    []string                // the names held in resolved
	snap     atomic.Pointer[[]entry]
	gen      atomic.Uint64                          // counts the snaps stored
	table    atomic.Pointer[map[string]*discovered] // with inner: dial -> upstream
	failOpen FailOpen                               // panic_threshold
	full     atomic.Bool                            // max_discovered reached and logged
	wg       sync.WaitGroup

	stopCtx    context.Context // canceled by Cleanup, or when the config is unloaded
	stopCancel context.CancelFunc
}

// entry is one address GetUpstreams may return.
type entry struct {
	dial string // ip:port
	raw  string // the upstream it comes from, as configured
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
	su.takeDiscover()
	if err := su.Validate(); err != nil {
		return err
	}
	if err := su.SetDefaults(); err != nil {
		return err
	}
	if su.ForgetAfter == 0 {
		su.ForgetAfter = DefaultForgetAfterIntervals * su.Interval
		if su.ForgetAfter/DefaultForgetAfterIntervals != su.Interval {
			su.ForgetAfter = caddy.Duration(math.MaxInt64) // a huge interval: no overflow
		}
	}
	if su.MaxDiscovered == 0 {
		su.MaxDiscovered = DefaultMaxDiscovered
	}
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
	if su.InnerRaw != nil {
		return su.provisionInner(ctx)
	}

	su.names = make(map[string][]netip.Addr)
	var hosts []string
	for _, s := range specs {
		if s.host != "" && !slices.Contains(hosts, s.host) {
			hosts = append(hosts, s.host)
		}
	}
	su.hosts = hosts
	for _, h := range hosts {
		holdHost(h)
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
	// Caddy clears InnerRaw once it has loaded the module into inner.
	hasSource := su.InnerRaw != nil || su.DiscoverRaw != nil || su.inner != nil
	switch {
	case su.InnerRaw != nil && su.DiscoverRaw != nil:
		return fmt.Errorf("inner %s and discover %s: discover is inner's deprecated name; give inner only", su.InnerRaw, su.DiscoverRaw)
	case len(su.Upstreams) == 0 && !hasSource:
		return fmt.Errorf("no upstreams: give at least one host:port, or an inner source to discover them")
	case len(su.Upstreams) > 0 && hasSource:
		return fmt.Errorf("upstreams %v and an inner source: give one or the other", su.Upstreams)
	}
	if err := su.ProbeConfig.Validate(); err != nil {
		return err
	}
	if su.ForgetAfter < 0 {
		return fmt.Errorf("forget_after %v: must not be negative (0 for the default, %d intervals)", time.Duration(su.ForgetAfter), DefaultForgetAfterIntervals)
	}
	if su.MaxDiscovered < 0 {
		return fmt.Errorf("max_discovered %d: must not be negative (0 for the default, %d)", su.MaxDiscovered, DefaultMaxDiscovered)
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
	for _, h := range su.hosts {
		releaseHost(h)
	}
	su.hosts = nil
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
	at := func(i int) Member {
		c := es[i].c
		return Member{In: c.InService(), Ready: c.AdminState() == health.Ready, Returned: c.ReturnedAt()}
	}
	t := su.CountAndNote(len(es), at, &su.failOpen, su.logger)
	n := t.Serving()
	if n == 0 {
		return nil, nil
	}
	var draw func(int64) bool
	if t.Ramp && !t.Panic {
		draw = su.SlowStartDraw(health.Now())
	}
	vals := make([]reverseproxy.Upstream, n)
	out := make([]*reverseproxy.Upstream, 0, n)
	su.Choose(len(es), at, t, draw, func(i int) {
		v := &vals[len(out)]
		v.Dial = es[i].dial
		out = append(out, v)
	})
	return out, nil
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
		plan = append(plan, planned{dial, su.Want(netip.AddrPortFrom(ip, s.port), s.raw)})
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
		es[i] = entry{dial: p.dial, raw: p.want.Name, c: cs[i]}
	}
	su.snap.Store(&es)
	su.gen.Add(1)
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
// resolution (at a reload, say) keeps the addresses and their state. Only
// names some source holds are kept: a source holds its names from before
// its first lookup to its Cleanup (a discovered name, until it is
// forgotten), so that at a reload the old config's hold spans the new
// one's lookups, and a name no config uses any more is dropped.
var resolved = struct {
	sync.Mutex
	m map[string]*resolvedHost
}{m: make(map[string]*resolvedHost)}

type resolvedHost struct {
	addrs []netip.Addr
	refs  int
}

// holdHost keeps host's last addresses until a matching releaseHost.
func holdHost(host string) {
	resolved.Lock()
	defer resolved.Unlock()
	h := resolved.m[host]
	if h == nil {
		h = new(resolvedHost)
		resolved.m[host] = h
	}
	h.refs++
}

// releaseHost drops a hold of holdHost; the last one forgets host.
func releaseHost(host string) {
	resolved.Lock()
	defer resolved.Unlock()
	if h := resolved.m[host]; h != nil {
		if h.refs--; h.refs <= 0 {
			delete(resolved.m, host)
		}
	}
}

func lastResolved(host string) []netip.Addr {
	resolved.Lock()
	defer resolved.Unlock()
	if h := resolved.m[host]; h != nil {
		return h.addrs
	}
	return nil
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
	if h := resolved.m[host]; h != nil { // kept only while held
		h.addrs = out
	}
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
