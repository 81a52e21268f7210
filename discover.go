package caddyshaker

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
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
// Addresses are probed from the moment they first appear, whether a
// request or the source's own poll (every interval) finds them, and are
// forgotten, with their state, forget_after after the inner source last
// returned them.

// DefaultForgetAfterIntervals is how many intervals a discovered address
// is remembered after the inner source stops returning it, when
// forget_after is not set.
const DefaultForgetAfterIntervals = 5

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
}

// serve says whether requests may go to the upstream: in is true when it
// cannot be probed, is not resolved or probed yet, or one of its addresses
// is in service; excluded is true when an operator drained or put every
// one of its addresses in maintenance. returned is when it came back into
// service, for slow start: the earliest return among its addresses in
// service, 0 if one of them has served since its first result.
func (d *discovered) serve() (in, excluded bool, returned int64) {
	if !d.probe {
		return true, false, 0
	}
	p := d.cs.Load()
	if p == nil || len(*p) == 0 {
		return true, false, 0
	}
	excluded = true
	first := true
	for _, c := range *p {
		if c.AdminState() == health.Ready {
			excluded = false
		}
		if !c.InService() {
			continue
		}
		in = true
		if ret := c.ReturnedAt(); first || ret < returned {
			returned, first = ret, false
		}
	}
	return in, excluded, returned
}

// discoverUpstreams is GetUpstreams for a source that wraps another.
func (su *Upstreams) discoverUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	ups, err := su.inner.GetUpstreams(r)
	if err != nil || len(ups) == 0 {
		return ups, err
	}
	table := *su.table.Load()
	now := time.Now().UnixNano()
	var fresh []string
	n, ready := 0, 0
	ramp := false
	for _, u := range ups {
		d := table[u.Dial]
		if d == nil {
			fresh = append(fresh, u.Dial)
			n++ // not probed yet: up
			ready++
			continue
		}
		// Mark it seen, at most once a second per upstream: requests on
		// many cores would fight over the cache line otherwise.
		if now-d.lastSeen.Load() > int64(time.Second) {
			d.lastSeen.Store(now)
		}
		in, excluded, returned := d.serve()
		if !excluded {
			ready++
		}
		if in {
			n++
			ramp = ramp || su.SlowStart > 0 && returned != 0
		}
	}
	if fresh != nil {
		su.discover(fresh)
	}
	all := su.PanicThreshold > 0 && float64(n) < su.PanicThreshold*float64(ready)
	if all != su.panic.Load() && su.panic.CompareAndSwap(!all, all) {
		su.logPanic(all, n, ready)
	}
	if n == len(ups) && !ramp {
		return ups, nil
	}
	// The inner source's upstreams are fresh values: keep them, filtered
	// into a new slice.
	var mono int64
	if ramp {
		mono = health.Now()
	}
	out := make([]*reverseproxy.Upstream, 0, max(n, ready))
	for pass := 0; pass < 2 && len(out) == 0; pass++ {
		// the second pass, without the slow start draw, only when the
		// draw left out every upstream: better than a 503
		for _, u := range ups {
			d := table[u.Dial]
			if d == nil {
				out = append(out, u)
				continue
			}
			in, excluded, returned := d.serve()
			switch {
			case all:
				in = !excluded
			case in && ramp && pass == 0:
				in = slowStartDraw(returned, mono, time.Duration(su.SlowStart))
			}
			if in {
				out = append(out, u)
			}
		}
		if n == 0 && !all {
			break
		}
	}
	return out, nil
}

// discover starts probing upstreams seen for the first time.
func (su *Upstreams) discover(dials []string) {
	su.mu.Lock()
	defer su.mu.Unlock()
	if su.closed {
		return
	}
	old := *su.table.Load()
	var table map[string]*discovered
	now := time.Now().UnixNano()
	for _, dial := range dials {
		if old[dial] != nil || (table != nil && table[dial] != nil) {
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
}

// setAddrsLocked points d at the checkers of addrs, starting those that
// are new, and drops the ones it held before.
func (su *Upstreams) setAddrsLocked(d *discovered, addrs []netip.Addr) {
	port := d.port
	if su.Port != 0 {
		port = uint16(su.Port)
	}
	ws := make([]health.Want, len(addrs))
	for i, ip := range addrs {
		ws[i] = su.want(netip.AddrPortFrom(ip, port), d.dial)
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
		if su.closed {
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
		ok := su.pollOnce()
		su.forget(ok)
		t.Reset(time.Duration(su.Interval))
	}
}

// pollOnce asks the inner source for its upstreams, bounded by
// resolve_timeout, marks them seen and starts probing the new ones. It
// reports whether the source answered without error.
func (su *Upstreams) pollOnce() bool {
	ctx, cancel := context.WithTimeout(su.stopCtx, time.Duration(su.ResolveTimeout))
	defer cancel()
	ctx = context.WithValue(ctx, caddy.ReplacerCtxKey, caddy.NewReplacer())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	if err != nil {
		su.logger.Error("polling upstream source", zap.Error(err))
		return false
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
	return err == nil
}

// forget drops the upstreams the inner source last returned more than
// forget_after ago (only after a poll that worked: a failing source
// keeps what it had), and re-resolves host names that are due.
func (su *Upstreams) forget(polled bool) {
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
		case polled && now.UnixNano()-d.lastSeen.Load() > int64(su.ForgetAfter):
			if kept == nil {
				kept = maps.Clone(table)
			}
			delete(kept, dial)
			reg.Release(d.held)
			d.held = nil
			su.logger.Info("upstream no longer returned by the source: forgotten", zap.String("upstream", dial))
		case d.host != "" && !d.resolving && now.Sub(d.resolvedAt) >= time.Duration(su.ResolveInterval):
			su.resolveLocked(d)
		}
	}
	if kept != nil {
		su.table.Store(&kept)
	}
}

// releaseDiscoveredLocked drops every checker held for discovered
// upstreams (at Cleanup).
func (su *Upstreams) releaseDiscoveredLocked() {
	for _, d := range *su.table.Load() {
		reg.Release(d.held)
		d.held = nil
	}
	empty := map[string]*discovered{}
	su.table.Store(&empty)
}

// want is an address to probe under this source's settings, reported
// under name.
func (su *Upstreams) want(addr netip.AddrPort, name string) health.Want {
	w := health.Want{Addr: addr, Name: name, Settings: health.Settings{
		Interval:     time.Duration(su.Interval),
		Timeout:      time.Duration(su.Timeout),
		Passes:       su.Passes,
		Fails:        su.Fails,
		FastInterval: time.Duration(su.FastInterval),
		DownInterval: time.Duration(su.DownInterval),
	}}
	w.Settings.JitterPercent, w.Settings.Jitter = su.jit.percent, su.jit.d
	return w
}

// provisionInner loads the inner source and starts polling it.
func (su *Upstreams) provisionInner(ctx caddy.Context) error {
	mod, err := ctx.LoadModule(su, "SourceRaw")
	if err != nil {
		return fmt.Errorf("loading upstream source to probe: %v", err)
	}
	if _, self := mod.(*Upstreams); self {
		return fmt.Errorf("discover: a shaker source cannot wrap another shaker source")
	}
	inner, ok := mod.(reverseproxy.UpstreamSource)
	if !ok {
		return fmt.Errorf("discover: module %T is not an upstream source", mod)
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
