package caddyshaker

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// A shaker source may wrap another upstream source (a, srv, multi, or any
// http.reverse_proxy.upstreams module): the inner source says which
// upstreams exist, this one probes each address it returns and filters the
// list by health. Caddy's own active checks never run for dynamic
// upstreams; these do.
//
// What is probed never depends on a request. The inner source is asked
// for upstreams to probe only by this source's own poll, every interval,
// with a replacer that holds no request; an inner configuration with a
// placeholder that only a request fills ({http.request.header.*}, say) is
// refused at load, since it would let clients choose what this proxy
// probes. Per request, the inner source's list is filtered by health, and
// an upstream the poll has not found is passed through unprobed. At most
// max_discovered upstreams are probed at once; each is forgotten, with
// its state, forget_after after the inner source last returned it.

// DefaultForgetAfterIntervals is how many intervals a discovered address
// is remembered after the inner source stops returning it, when
// forget_after is not set.
const DefaultForgetAfterIntervals = 5

// DefaultMaxDiscovered is how many upstreams an inner source probes at
// most, when max_discovered is not set.
const DefaultMaxDiscovered = 10000

// discovered is an upstream the inner source returned.
type discovered struct {
	dial string
	// probe is false for what cannot be probed (a Unix socket, a UDP
	// address, a placeholder): such upstreams are always returned.
	probe bool
	host  string     // a host name to resolve, or ""
	ip    netip.Addr // when host is ""
	port  uint16

	lastSeen atomic.Int64                      // unix ns
	cs       atomic.Pointer[[]*health.Checker] // nil until resolved

	// under sourceState.mu
	held       []health.Want
	resolvedAt time.Time
	resolving  bool
	dropped    bool // forgotten or released: a late lookup must not take checkers
}

// serve is the upstream as the in-service rule sees it (memberOf): in
// too when it cannot be probed or is not resolved yet.
func (d *discovered) serve() Member {
	if !d.probe {
		return Member{In: true, Ready: true}
	}
	p := d.cs.Load()
	if p == nil || len(*p) == 0 {
		return Member{In: true, Ready: true}
	}
	return memberOf(*p)
}

// discoverUpstreams is GetUpstreams for a source that wraps another.
func (su *Upstreams) discoverUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	ups, err := su.inner.GetUpstreams(r)
	if err != nil || len(ups) == 0 {
		return ups, err
	}
	table := *su.table.Load()
	now := time.Now().UnixNano()
	for _, u := range ups {
		// Mark it seen, at most once a second per upstream: requests on
		// many cores would fight over the cache line otherwise.
		if d := table[u.Dial]; d != nil && now-d.lastSeen.Load() > int64(time.Second) {
			d.lastSeen.Store(now)
		}
	}
	at := func(i int) Member {
		d := table[ups[i].Dial]
		if d == nil {
			// Not found by a poll: passed through, never probed on a
			// request's word (it would let clients choose targets).
			return Member{In: true, Ready: true}
		}
		return d.serve()
	}
	t := su.CountAndNote(len(ups), at, &su.failOpen, su.logger)
	if t.In == len(ups) && !t.Ramp {
		return ups, nil
	}
	// The inner source's upstreams are fresh values: keep them, filtered
	// into a new slice.
	var draw func(int64) bool
	if t.Ramp && !t.Panic {
		draw = su.SlowStartDraw(health.Now())
	}
	out := make([]*reverseproxy.Upstream, 0, t.Serving())
	su.Choose(len(ups), at, t, draw, func(i int) { out = append(out, ups[i]) })
	return out, nil
}

// discover starts probing upstreams seen for the first time, up to
// max_discovered in all.
func (su *Upstreams) discover(dials []string) {
	su.mu.Lock()
	defer su.mu.Unlock()
	if su.closed {
		return
	}
	old := *su.table.Load()
	var table map[string]*discovered
	now := time.Now().UnixNano()
	skipped := 0
	for _, dial := range dials {
		if old[dial] != nil || (table != nil && table[dial] != nil) {
			continue
		}
		if len(old) >= su.MaxDiscovered || len(table) >= su.MaxDiscovered {
			skipped++
			continue
		}
		if table == nil {
			table = maps.Clone(old)
		}
		d := parseDial(dial)
		d.lastSeen.Store(now)
		table[dial] = d
		switch {
		case !d.probe:
			su.logger.Warn("discovered upstream cannot be probed: it is always returned",
				zap.String("upstream", dial))
		case d.host == "":
			su.setAddrsLocked(d, []netip.Addr{d.ip})
		default:
			holdHost(d.host)
			// Addresses this process found for the name before (as
			// at a reload) are probed at once; a fresh lookup follows.
			if addrs := lastResolved(d.host); len(addrs) > 0 {
				su.setAddrsLocked(d, addrs)
			}
			su.resolveLocked(d)
		}
		su.logger.Debug("discovered upstream", zap.String("upstream", dial))
	}
	if table != nil {
		su.table.Store(&table)
	}
	if skipped > 0 && !su.full.Swap(true) {
		su.logger.Warn("max_discovered reached: upstreams past it are not probed, and requests may reach them unchecked; raise max_discovered if the source really has that many",
			zap.Int("max_discovered", su.MaxDiscovered), zap.Int("not_probed", skipped))
	}
}

// setAddrsLocked points d at the checkers of addrs, starting those that
// are new, and drops the ones it held before.
func (su *Upstreams) setAddrsLocked(d *discovered, addrs []netip.Addr) {
	ws := make([]health.Want, len(addrs))
	for i, ip := range addrs {
		ws[i] = su.Want(netip.AddrPortFrom(ip, d.port), d.dial)
	}
	cs, fresh := reg.Acquire(ws)
	su.app.schedule(fresh)
	d.cs.Store(&cs)
	old := d.held
	d.held = ws
	reg.Release(old)
}

// resolveLocked resolves d's host name in the background, bounded by
// resolve_timeout, then probes its addresses. A failed resolution keeps
// the addresses found last.
func (su *Upstreams) resolveLocked(d *discovered) {
	if d.resolving {
		return
	}
	d.resolving = true
	su.wg.Go(func() {
		addrs, err := resolve(su.stopCtx, d.host, time.Duration(su.ResolveTimeout))
		su.mu.Lock()
		defer su.mu.Unlock()
		d.resolving = false
		d.resolvedAt = time.Now()
		if su.closed || d.dropped {
			return
		}
		if err != nil {
			su.logger.Warn("resolving discovered upstream failed",
				zap.String("upstream", d.dial), zap.Error(err))
			if d.cs.Load() == nil {
				empty := []*health.Checker{}
				d.cs.Store(&empty)
			}
			return
		}
		su.setAddrsLocked(d, addrs)
	})
}

// pollInner asks the inner source for its upstreams every interval, so
// that discovery and forgetting do not depend on traffic, and forgets the
// upstreams it stopped returning forget_after ago.
func (su *Upstreams) pollInner() {
	t := time.NewTimer(time.Duration(su.Interval))
	defer t.Stop()
	for {
		select {
		case <-su.stopCtx.Done():
			return
		case <-t.C:
		}
		su.pollOnce()
		su.forget()
		t.Reset(time.Duration(su.Interval))
	}
}

// pollOnce asks the inner source for its upstreams, bounded by
// resolve_timeout, with a replacer that holds no request, marks them seen
// and starts probing the new ones: the only place where upstreams to probe
// are found.
func (su *Upstreams) pollOnce() {
	ctx, cancel := context.WithTimeout(su.stopCtx, time.Duration(su.ResolveTimeout))
	defer cancel()
	ctx = context.WithValue(ctx, caddy.ReplacerCtxKey, caddy.NewReplacer())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	if err != nil {
		su.logger.Error("polling upstream source", zap.Error(err))
		return
	}
	ups, err := su.inner.GetUpstreams(req)
	if err != nil && su.stopCtx.Err() == nil {
		su.logger.Warn("upstream source returned an error; keeping the upstreams found before", zap.Error(err))
	}
	now := time.Now().UnixNano()
	table := *su.table.Load()
	var fresh []string
	for _, u := range ups {
		if d := table[u.Dial]; d != nil {
			d.lastSeen.Store(now)
		} else {
			fresh = append(fresh, u.Dial)
		}
	}
	if fresh != nil {
		su.discover(fresh)
	}
}

// forget drops the upstreams the inner source last returned, to a poll or
// a request, more than forget_after ago (a source whose polls keep failing
// loses them too: what it found is not kept without bound), and
// re-resolves host names that are due.
func (su *Upstreams) forget() {
	now := time.Now()
	su.mu.Lock()
	defer su.mu.Unlock()
	if su.closed {
		return
	}
	table := *su.table.Load()
	var kept map[string]*discovered
	for dial, d := range table {
		switch {
		case now.UnixNano()-d.lastSeen.Load() > int64(su.ForgetAfter):
			if kept == nil {
				kept = maps.Clone(table)
			}
			delete(kept, dial)
			su.dropLocked(d)
			su.logger.Info("upstream no longer returned by the source: forgotten", zap.String("upstream", dial))
		case d.host != "" && !d.resolving && now.Sub(d.resolvedAt) >= time.Duration(su.ResolveInterval):
			su.resolveLocked(d)
		}
	}
	if kept != nil {
		su.table.Store(&kept)
		if len(kept) < su.MaxDiscovered {
			su.full.Store(false) // warn again if the cap is met again
		}
	}
}

// dropLocked releases what a discovered upstream holds: its checkers and
// its host name's last addresses.
func (su *Upstreams) dropLocked(d *discovered) {
	reg.Release(d.held)
	d.held = nil
	d.dropped = true
	if d.host != "" {
		releaseHost(d.host)
	}
}

// releaseDiscoveredLocked drops every checker held for discovered
// upstreams (at Cleanup).
func (su *Upstreams) releaseDiscoveredLocked() {
	for _, d := range *su.table.Load() {
		su.dropLocked(d)
	}
	empty := map[string]*discovered{}
	su.table.Store(&empty)
}

// takeDiscover reads discover, inner's deprecated JSON name, as inner,
// with a warning; given with inner, it is left for Validate to refuse.
func (su *Upstreams) takeDiscover() {
	if su.DiscoverRaw == nil || su.InnerRaw != nil {
		return
	}
	su.logger.Warn(`dynamic shaker: "discover" is deprecated: the wrapped upstream source is "inner" now (as in the Caddyfile); "discover" still works`,
		zap.ByteString("discover", su.DiscoverRaw))
	su.InnerRaw, su.DiscoverRaw = su.DiscoverRaw, nil
}

// provisionInner loads the inner source and starts polling it.
func (su *Upstreams) provisionInner(ctx caddy.Context) error {
	if ph, field := requestPlaceholder(su.InnerRaw); ph != "" {
		return fmt.Errorf("inner: %s in %q is filled in from each request: "+
			"this source probes what its inner source returns, so clients would choose what this proxy probes; "+
			"give the inner source fixed names (global placeholders such as {env.*} are fine), or use it without shaker", ph, field)
	}
	mod, err := ctx.LoadModule(su, "InnerRaw")
	if err != nil {
		return fmt.Errorf("loading upstream source to probe: %v", err)
	}
	if _, self := mod.(*Upstreams); self {
		return fmt.Errorf("inner: a shaker source cannot wrap another shaker source")
	}
	inner, ok := mod.(reverseproxy.UpstreamSource)
	if !ok {
		return fmt.Errorf("inner: module %T is not an upstream source", mod)
	}
	su.inner = inner
	empty := map[string]*discovered{}
	su.table.Store(&empty)
	// A first poll now, bounded by resolve_timeout, takes references to
	// the checkers of the upstreams it finds before the previous config
	// (at a reload) drops its own: their state carries over.
	su.pollOnce()
	su.wg.Go(su.pollInner)
	return nil
}

// requestPlaceholder returns the first placeholder in a wrapped source's
// JSON that a replacer holding no request cannot fill ({http.request.*},
// {http.vars.*}, ...), with the path of the field that holds it; "" if
// there is none. Global placeholders ({env.*}, {system.*}, {time.*},
// {file.*}) are the same for every request.
func requestPlaceholder(raw json.RawMessage) (ph, field string) {
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return "", "" // LoadModule reports the bad JSON
	}
	bg := caddy.NewReplacer().WithoutFile()
	var walk func(v any, path string) bool
	walk = func(v any, path string) bool {
		switch v := v.(type) {
		case string:
			for _, key := range placeholderKeys(v) {
				if strings.HasPrefix(key, "file.") {
					continue
				}
				if _, ok := bg.Get(key); !ok {
					ph, field = "{"+key+"}", path
					return true
				}
			}
		case []any:
			for i, e := range v {
				if walk(e, fmt.Sprintf("%s[%d]", path, i)) {
					return true
				}
			}
		case map[string]any:
			keys := slices.Sorted(maps.Keys(v))
			for _, k := range keys {
				p := k
				if path != "" {
					p = path + "." + k
				}
				if walk(v[k], p) {
					return true
				}
			}
		}
		return false
	}
	walk(v, "")
	return ph, field
}

// placeholderKeys returns the keys of the placeholders in s, as Caddy's
// replacer finds them: from an unescaped '{' to the next unescaped '}'.
func placeholderKeys(s string) []string {
	var keys []string
	for i := 0; i < len(s); i++ {
		if s[i] != '{' || i > 0 && s[i-1] == '\\' {
			continue
		}
		end := -1
		for j := i + 1; j < len(s); j++ {
			if s[j] == '}' && s[j-1] != '\\' {
				end = j
				break
			}
		}
		if end < 0 {
			break
		}
		keys = append(keys, s[i+1:end])
		i = end
	}
	return keys
}
