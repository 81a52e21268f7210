// Package shakerl4 is the layer-4 part of caddy-shaker: a load-balancing
// selection policy for caddy-l4's proxy handler
// (layer4.proxy.selection_policies.shaker) that probes the handler's own
// upstreams with half-open TCP probes (SYN, SYN-ACK, RST: the backends'
// applications never accept a check) and hands another policy only those
// in service.
//
// It is a module of its own (github.com/caddy-shaker/caddy-shaker/l4), so
// that builds with the HTTP part only never have caddy-l4 in their module
// graph. Build Caddy with both:
//
//	xcaddy build --with github.com/caddy-shaker/caddy-shaker \
//	    --with github.com/caddy-shaker/caddy-shaker/l4 \
//	    --with github.com/mholt/caddy-l4@v0.1.2
package shakerl4

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxy"
	"go.uber.org/zap"

	caddyshaker "github.com/caddy-shaker/caddy-shaker"
)

func init() {
	caddy.RegisterModule(new(Policy))
}

// Policy is a caddy-l4 proxy load-balancing selection policy that probes
// the handler's own upstreams with half-open TCP probes and hands another
// policy (inner, default random) only those in service. The inner policy
// still sees caddy-l4's own state of each upstream (passive health
// checks, max_connections, caddy-l4's active checks if configured), so it
// keeps working as it does without this one.
//
// The upstreams come from the proxy handler when it is provisioned, so
// probing starts before the first connection. An upstream with several
// dial addresses is dialled to all of them (caddy-l4 tees the stream), so
// it is in service only while every one of them is. A dial address that
// cannot be probed (a placeholder left after provisioning, a Unix socket,
// UDP) counts as in service, with one warning at load. Select does O(1)
// work besides the inner policy's: the list in service is rebuilt when an
// address changes state, not per connection.
type Policy struct {
	// The policy that chooses among the upstreams in service: any
	// layer4.proxy.selection_policies module but this one and
	// random_choose (which can panic in caddy-l4 v0.1.2 when the
	// upstreams it samples are busy). Default: random.
	InnerRaw json.RawMessage `json:"inner,omitempty" caddy:"namespace=layer4.proxy.selection_policies inline_key=policy"`

	// How the upstreams are probed and judged (interval, timeout, passes,
	// fails, jitter, panic_threshold, slow_start, port, ...: the
	// `dynamic shaker` source's settings, with the same defaults).
	caddyshaker.ProbeConfig

	orig   l4proxy.Selector          // the inner policy as configured
	kind   innerKind                 // how a choice is made: orig given the pool in service, or by position
	static l4proxy.UpstreamPool      // the handler's upstreams
	slots  []*slot                   // one per upstream of static
	index  map[*l4proxy.Upstream]int // position of each in static
	probed *caddyshaker.Probed       // nil when nothing can be probed
	states caddyshaker.MemberStates  // probed, or a test's
	key    string                    // the connection's replacer key for this policy's last choice
	logger *zap.Logger

	failOpen caddyshaker.FailOpen
	pools    caddyshaker.Rebuilt[poolState]

	// round_robin and weighted_round_robin, chosen by position over the
	// handler's upstreams (see innerKind)
	robin      atomic.Uint32
	wrrMu      sync.Mutex
	wrrCurrent []int
}

// slot is one of the handler's upstreams, as this policy sees it.
type slot struct {
	dials []string // its dial addresses that are probed
}

// innerKind is how the inner policy is given the upstreams in service.
type innerKind int

const (
	// the inner policy chooses among a pool of the upstreams in service,
	// in the handler's order: random, least_conn, first, ip_hash, and
	// any policy not of caddy-l4
	byPool innerKind = iota
	// caddy-l4's round_robin and weighted_round_robin keep their state by
	// position in the pool (a counter modulo its length; a counter per
	// position, reset when the length changes), so a shorter pool would
	// shift them. They are run here over the handler's own upstreams,
	// skipping those out of service as caddy-l4 skips the unavailable:
	// the same choices, in the same order, as the policy alone where the
	// upstreams out of service are unavailable.
	byRoundRobin
	byWeightedRoundRobin
)

// poolState is the list in service, as of a Version of the probes.
type poolState struct {
	pool    l4proxy.UpstreamPool                  // in service (failing open: ready), ramping ones included, in the handler's order
	in      []bool                                // by position among the handler's upstreams: in pool
	ramping []caddyshaker.Ramp[*l4proxy.Upstream] // in service, ramping up under slow_start
}

// CaddyModule returns the Caddy module information.
func (*Policy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.proxy.selection_policies.shaker",
		New: func() caddy.Module { return new(Policy) },
	}
}

// Provision loads the inner policy, takes the upstreams of the layer-4
// proxy handler being provisioned and starts probing them.
func (p *Policy) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	if err := p.SetDefaults(); err != nil {
		return err
	}
	h, err := caddyshaker.Parent[*l4proxy.Handler](ctx, "a layer4 proxy handler's load_balancing")
	if err != nil {
		return err
	}
	if err := p.loadInner(ctx); err != nil {
		return err
	}
	if h.HealthChecks != nil && h.HealthChecks.Active != nil {
		p.logger.Warn("caddy-l4's own active health checks (health_*) run too: they connect to the backends in full, and the inner policy sees their state as well as the probes'")
	}
	p.setUpstreams(h.Upstreams)
	var dials, unprobed []string
	for _, s := range p.slots {
		for _, d := range s.dials {
			if !slices.Contains(dials, d) {
				dials = append(dials, d)
			}
		}
	}
	for _, u := range h.Upstreams {
		for _, d := range u.Dial {
			if _, ok := probeDial(d); !ok {
				unprobed = append(unprobed, d)
			}
		}
	}
	if len(unprobed) > 0 {
		p.logger.Warn("dial addresses that cannot be probed (placeholders, Unix sockets, UDP) count as up: half-open probes are TCP only",
			zap.Strings("dials", unprobed))
	}
	if len(dials) > 0 {
		probed, err := caddyshaker.NewProbed(ctx, p.ProbeConfig, dials)
		if err != nil {
			return err
		}
		p.probed, p.states = probed, probed
	}
	p.key = fmt.Sprintf("shaker.l4.chosen.%p", p)
	return nil
}

// setUpstreams takes the handler's upstreams and their dial addresses
// that are probed.
func (p *Policy) setUpstreams(ups l4proxy.UpstreamPool) {
	p.static = ups
	p.slots = make([]*slot, len(ups))
	p.index = make(map[*l4proxy.Upstream]int, len(ups))
	for i, u := range ups {
		s := new(slot)
		for _, d := range u.Dial {
			if pd, ok := probeDial(d); ok {
				s.dials = append(s.dials, pd)
			}
		}
		p.slots[i] = s
		p.index[u] = i
	}
}

// probeDial is dial as caddy-l4 dials it (placeholders known at load
// replaced, as its provisioning does), and whether it can be probed: TCP,
// with no placeholder left for the connection to fill in.
func probeDial(dial string) (string, bool) {
	d := caddy.NewReplacer().ReplaceKnown(dial, "")
	if strings.ContainsAny(d, "{}") || !caddyshaker.CanProbe(d) {
		return d, false
	}
	return d, true
}

// loadInner loads the inner policy (random by default), refusing this one
// and random_choose.
func (p *Policy) loadInner(ctx caddy.Context) error {
	orig, err := caddyshaker.LoadInner[l4proxy.Selector](ctx, p, "InnerRaw", p.InnerRaw, new(l4proxy.RandomSelection), refuseInner)
	p.orig, p.kind = orig, kindOf(orig)
	return err
}

// kindOf is how inner is given the upstreams in service.
func kindOf(inner l4proxy.Selector) innerKind {
	switch inner.(type) {
	case *l4proxy.RoundRobinSelection:
		return byRoundRobin
	case *l4proxy.WeightedRoundRobinSelection:
		return byWeightedRoundRobin
	}
	return byPool
}

// refuseInner says why a policy cannot be the inner one (besides shaker,
// which caddyshaker.LoadInner and UnmarshalInner refuse themselves).
func refuseInner(name string) error {
	switch name {
	case "random_choose":
		return fmt.Errorf("random_choose is refused: in caddy-l4 v0.1.2 it can panic (a nil upstream dereferenced in leastConns when fewer than `choose` upstreams were sampled and the first is busy) and never picks a busy upstream over none; use least_conn, which picks the least busy of all those in service")
	}
	return nil
}

// Cleanup stops probing; a checker no other module uses stops.
func (p *Policy) Cleanup() error {
	if p.probed != nil {
		return p.probed.Close()
	}
	return nil
}

// Select hands the inner policy the upstreams in service. With
// lb_try_duration, caddy-l4 calls Select again for the same connection
// after a failed dial: the upstream this policy chose last for it (kept
// in the connection's replacer) is then probed at once. A pool other than
// the handler's own is handed on as it is.
func (p *Policy) Select(pool l4proxy.UpstreamPool, conn *layer4.Connection) *l4proxy.Upstream {
	if len(pool) == 0 || len(pool) != len(p.static) || &pool[0] != &p.static[0] {
		return p.orig.Select(pool, conn)
	}
	var repl *caddy.Replacer
	if conn != nil {
		repl = conn.Replacer()
	}
	if p.probed == nil {
		repl = nil // nothing to probe: no need to remember the choice
	}
	if repl != nil {
		if v, ok := repl.Get(p.key); ok {
			if s, _ := v.(*slot); s != nil {
				for _, d := range s.dials {
					p.probed.ProbeNow(d)
				}
			}
		}
	}
	u := p.choose(p.current(), conn)
	if repl != nil {
		var s *slot
		if u != nil {
			s = p.slotOf(u)
		}
		repl.Set(p.key, s)
	}
	return u
}

// slotOf is the slot of u, one of the handler's upstreams.
func (p *Policy) slotOf(u *l4proxy.Upstream) *slot {
	if i, ok := p.index[u]; ok {
		return p.slots[i]
	}
	return nil
}

// choose makes one choice among the upstreams in service.
func (p *Policy) choose(st *poolState, conn *layer4.Connection) *l4proxy.Upstream {
	pool, in := st.pick(time.Duration(p.SlowStart), p.kind != byPool, p.index)
	switch p.kind {
	case byRoundRobin:
		return p.roundRobin(in)
	case byWeightedRoundRobin:
		return p.weightedRoundRobin(in)
	}
	return p.orig.Select(pool, conn)
}

// first tells whether caddy-l4 sees an upstream as available (healthy to
// its own checks, not at max_connections): its first policy returns the
// first available upstream of the pool it is given.
var first l4proxy.FirstSelection

// available reports whether caddy-l4 sees the handler's upstream i as
// available.
func (p *Policy) available(i int) bool {
	return first.Select(p.static[i:i+1], nil) != nil
}

// roundRobin is caddy-l4's round_robin over the handler's upstreams, with
// those not in service skipped as it skips the unavailable ones.
func (p *Policy) roundRobin(in []bool) *l4proxy.Upstream {
	n := uint32(len(p.static))
	for range n {
		i := p.robin.Add(1) % n
		if in[i] && p.available(int(i)) {
			return p.static[i]
		}
	}
	return nil
}

// weightedRoundRobin is caddy-l4's weighted_round_robin (smooth weighted
// round robin, each upstream's weight from its own weight field) over the
// handler's upstreams, with those not in service skipped as it skips the
// unavailable ones: their counters stay as they are until they return.
func (p *Policy) weightedRoundRobin(in []bool) *l4proxy.Upstream {
	p.wrrMu.Lock()
	defer p.wrrMu.Unlock()
	if len(p.wrrCurrent) != len(p.static) {
		p.wrrCurrent = make([]int, len(p.static))
	}
	total, best := 0, -1
	for i, u := range p.static {
		if !in[i] || !p.available(i) {
			continue
		}
		w := u.Weight
		if w <= 0 {
			w = 1
		}
		p.wrrCurrent[i] += w
		total += w
		if best == -1 || p.wrrCurrent[i] > p.wrrCurrent[best] {
			best = i
		}
	}
	if best == -1 {
		return nil
	}
	p.wrrCurrent[best] -= total
	return p.static[best]
}

// current is the list in service, rebuilt when the probes' Version has
// moved or a ramp has ended. While one connection rebuilds it, others use
// the list before.
func (p *Policy) current() *poolState { return p.pools.For(p.states, p.rebuild) }

// member is the handler's upstream i as the in-service rule sees it: in
// service while every one of its probed dial addresses is (caddy-l4 dials
// them all), ready while every one is, back in service since the last
// one returned.
func (p *Policy) member(i int) caddyshaker.Member {
	m := caddyshaker.Member{In: true, Ready: true}
	for _, d := range p.slots[i].dials {
		dm := p.states.Member(d)
		m.In = m.In && dm.In
		m.Ready = m.Ready && dm.Ready
		m.Returned = max(m.Returned, dm.Returned)
	}
	if !m.In {
		m.Returned = 0
	}
	return m
}

// rebuild makes the list in service, by the one in-service rule, and
// returns it with the end of its first ramp (0: none).
func (p *Policy) rebuild() (*poolState, int64) {
	n := len(p.static)
	ms := make([]caddyshaker.Member, n)
	for i := range ms {
		if p.states != nil {
			ms[i] = p.member(i)
		} else {
			ms[i] = caddyshaker.Member{In: true, Ready: true}
		}
	}
	at := func(i int) caddyshaker.Member { return ms[i] }
	t := p.CountAndNote(n, at, &p.failOpen, p.logger)
	st := &poolState{pool: make(l4proxy.UpstreamPool, 0, t.Serving()), in: make([]bool, n)}
	end := p.KeepRamping(n, at, t, func(i int, ramps bool) {
		st.pool = append(st.pool, p.static[i])
		st.in[i] = true
		if ramps {
			st.ramping = append(st.ramping, caddyshaker.Ramp[*l4proxy.Upstream]{U: p.static[i], Returned: ms[i].Returned})
		}
	})
	return st, end
}

// pick is the pool for one choice, and (when byPosition) which of the
// handler's upstreams are in it, by position (index): a ramping upstream
// is in it with a probability that grows over slow_start; when the draws
// leave out every upstream in service, all of them are in it
// (caddyshaker.DrawOut). Outside a ramp it is the list as built, with no
// work.
func (st *poolState) pick(slow time.Duration, byPosition bool, index map[*l4proxy.Upstream]int) (l4proxy.UpstreamPool, []bool) {
	out := caddyshaker.DrawOut(slow, st.ramping, len(st.pool))
	if out == nil {
		return st.pool, st.in
	}
	if byPosition {
		in := slices.Clone(st.in)
		for _, u := range out {
			in[index[u]] = false
		}
		return nil, in
	}
	return caddyshaker.Without(st.pool, out), nil
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens, inside a
// layer4 proxy block. Syntax:
//
//	lb_policy shaker [<inner policy> [<its arguments...>]] {
//	    inner <policy> [<its arguments...>]
//	    interval         <duration>
//	    fast_interval    <duration>
//	    down_interval    <duration>
//	    jitter           <duration|percent>
//	    timeout          <duration>
//	    passes           <n>
//	    fails            <n>
//	    port             <port>
//	    panic_threshold  <fraction|percent>
//	    slow_start       <duration>
//	    resolve_interval <duration>
//	    resolve_timeout  <duration>
//	}
//
// The inner policy (default random) goes on the lb_policy line or on an
// `inner` line in the block. The subdirectives are those of `dynamic
// shaker`, with the same defaults.
func (p *Policy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return p.UnmarshalPolicy(d, p.setInner)
}

// setInner reads the inner policy whose name d is on.
func (p *Policy) setInner(d *caddyfile.Dispenser) error {
	raw, err := caddyshaker.UnmarshalInner[l4proxy.Selector](d, "layer4.proxy.selection_policies.", p.InnerRaw != nil, refuseInner)
	if err == nil {
		p.InnerRaw = raw
	}
	return err
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Policy)(nil)
	_ caddy.Validator       = (*Policy)(nil)
	_ caddy.CleanerUpper    = (*Policy)(nil)
	_ l4proxy.Selector      = (*Policy)(nil)
	_ caddyfile.Unmarshaler = (*Policy)(nil)
)
