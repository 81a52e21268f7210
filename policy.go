package caddyshaker

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Policy))
}

// Policy is a reverse_proxy load-balancing selection policy that probes
// the handler's own upstreams with half-open TCP probes and hands another
// policy (inner, default random) only those in service. The inner policy
// still sees Caddy's own state of each upstream (passive health checks,
// max_requests, Caddy's active checks if configured), so it keeps
// working as it does without this one.
//
// The upstreams come from the handler when it is provisioned, so probing
// starts before the first request. Upstreams that cannot be probed (a
// placeholder, a Unix socket, UDP) are always handed on, with one warning
// at load; so are upstreams from a dynamic source (use `dynamic shaker`
// to probe those). Select does O(1) work besides the inner policy's: the
// list in service is rebuilt when an address changes state, not per
// request.
type Policy struct {
	// The policy that chooses among the upstreams in service: any
	// http.reverse_proxy.selection_policies module but this one.
	// Default: random.
	InnerRaw json.RawMessage `json:"inner,omitempty" caddy:"namespace=http.reverse_proxy.selection_policies inline_key=policy"`

	// How the upstreams are probed and judged (interval, timeout, passes,
	// fails, jitter, panic_threshold, slow_start, port, ...: the
	// `dynamic shaker` source's settings, with the same defaults).
	ProbeConfig

	orig   reverseproxy.Selector     // the inner policy as configured
	inner  reverseproxy.Selector     // the one given our pools (orig, or a weighted_round_robin fitted to them)
	static reverseproxy.UpstreamPool // the handler's upstreams
	pos    []int                     // the positions of static the inner policy may choose
	probe  []bool                    // for each of pos: probed
	probed *Probed                   // nil when nothing can be probed
	states MemberStates              // probed, or a test's
	logger *zap.Logger

	failOpen FailOpen
	pools    Rebuilt[poolState]
}

// poolState is the list in service, as of a Version of the probes.
type poolState struct {
	pool    reverseproxy.UpstreamPool      // in service (failing open: ready), ramping ones included
	base    reverseproxy.UpstreamPool      // pool less the ramping ones
	ramping []Ramp[*reverseproxy.Upstream] // in service, ramping up under slow_start
}

// CaddyModule returns the Caddy module information.
func (*Policy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.shaker",
		New: func() caddy.Module { return new(Policy) },
	}
}

// Provision loads the inner policy, takes the upstreams of the
// reverse_proxy handler being provisioned and starts probing them.
func (p *Policy) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	if err := p.SetDefaults(); err != nil {
		return err
	}
	h, err := Parent[*reverseproxy.Handler](ctx, "a reverse_proxy handler's load_balancing")
	if err != nil {
		return err
	}
	if err := p.loadInner(ctx); err != nil {
		return err
	}
	if h.DynamicUpstreamsRaw != nil || h.DynamicUpstreams != nil {
		p.logger.Warn("this reverse_proxy takes its upstreams from a dynamic source: they are handed on unprobed; wrap the source in `dynamic shaker` to probe them")
	}
	if h.HealthChecks != nil && h.HealthChecks.Active != nil {
		p.logger.Info("Caddy's own active health checks run too: the inner policy sees their state, and backends see their requests")
	}
	p.static = h.Upstreams
	p.pos = p.choosable()
	var dials, unprobed []string
	p.probe = make([]bool, len(p.pos))
	for k, i := range p.pos {
		d := p.static[i].Dial
		if CanProbe(d) {
			p.probe[k] = true
			if !slices.Contains(dials, d) {
				dials = append(dials, d)
			}
		} else {
			unprobed = append(unprobed, d)
		}
	}
	if len(unprobed) > 0 {
		p.logger.Warn("upstreams that cannot be probed (placeholders, Unix sockets, UDP) are always handed on",
			zap.Strings("upstreams", unprobed))
	}
	if len(dials) > 0 {
		probed, err := NewProbed(ctx, p.ProbeConfig, dials)
		if err != nil {
			return err
		}
		p.probed, p.states = probed, probed
	}
	return nil
}

// loadInner loads the inner policy (random by default), refusing this one.
func (p *Policy) loadInner(ctx caddy.Context) error {
	var err error
	p.orig, err = LoadInner[reverseproxy.Selector](ctx, p, "InnerRaw", p.InnerRaw, reverseproxy.RandomSelection{}, nil)
	if err != nil {
		return err
	}
	return p.fitInner()
}

// LoadInner loads the inner selection policy of a shaker policy m being
// provisioned in ctx, from its field (whose value is raw; dflt when raw
// is nil): a module that is an S, the proxy's selector interface. It
// refuses the shaker policy itself, and any name that refuse (if not
// nil) refuses, with its reason.
func LoadInner[S any](ctx caddy.Context, m any, field string, raw json.RawMessage, dflt S, refuse func(name string) error) (S, error) {
	if raw == nil {
		return dflt, nil
	}
	var name struct {
		Policy string `json:"policy"`
	}
	if json.Unmarshal(raw, &name) == nil {
		if name.Policy == "shaker" {
			return dflt, fmt.Errorf("inner: a shaker policy cannot wrap another shaker policy")
		}
		if refuse != nil {
			if err := refuse(name.Policy); err != nil {
				return dflt, fmt.Errorf("inner: %v", err)
			}
		}
	}
	mod, err := ctx.LoadModule(m, field)
	if err != nil {
		return dflt, fmt.Errorf("loading inner selection policy: %v", err)
	}
	sel, ok := mod.(S)
	if !ok {
		return dflt, fmt.Errorf("inner: module %T is not a %T selection policy", mod, &sel)
	}
	return sel, nil
}

// fitInner sets the policy given our pools: the inner one, except that
// weighted_round_robin, which takes its weights by position in the pool,
// is fitted to pools of the weighted upstreams only (see choosable).
func (p *Policy) fitInner() error {
	p.inner = p.orig
	if w, ok := p.orig.(*reverseproxy.WeightedRoundRobinSelection); ok {
		fit := &reverseproxy.WeightedRoundRobinSelection{}
		for _, wt := range w.Weights {
			if wt > 0 {
				fit.Weights = append(fit.Weights, wt)
			}
		}
		if len(w.Weights) < 2 {
			fit.Weights = w.Weights // it takes the pool's first, whatever its weight
		}
		if err := fit.Provision(caddy.Context{}); err != nil { // it only sums the weights
			return err
		}
		p.inner = fit
	}
	return nil
}

// choosable returns the positions of the handler's upstreams that the
// inner policy may choose: all of them, except for weighted_round_robin,
// which chooses only among the first len(weights) with a weight above 0
// (the first one alone, with fewer than two weights). Handing it pools of
// those, in order, with its zero weights dropped, makes it choose as it
// does among the handler's upstreams with the others unavailable.
func (p *Policy) choosable() []int {
	w, ok := p.orig.(*reverseproxy.WeightedRoundRobinSelection)
	var pos []int
	for i := range p.static {
		if ok && (i >= len(w.Weights) || w.Weights[i] == 0 || len(w.Weights) < 2 && i > 0) {
			continue
		}
		pos = append(pos, i)
	}
	return pos
}

// Cleanup stops probing; a checker no other module uses stops.
func (p *Policy) Cleanup() error {
	if p.probed != nil {
		return p.probed.Close()
	}
	return nil
}

// Select hands the inner policy the upstreams in service. On a retry
// (Caddy calls Select again for the same request), the upstream that
// failed is probed at once. A pool other than the handler's own (from a
// dynamic source) is handed on as it is.
func (p *Policy) Select(pool reverseproxy.UpstreamPool, r *http.Request, w http.ResponseWriter) *reverseproxy.Upstream {
	if len(pool) == 0 || len(pool) != len(p.static) || &pool[0] != &p.static[0] {
		return p.orig.Select(pool, r, w)
	}
	if p.probed != nil {
		if repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); repl != nil {
			if failed, _ := repl.GetString("http.reverse_proxy.upstream.hostport"); failed != "" {
				p.probed.ProbeNow(failed)
			}
		}
	}
	return p.inner.Select(p.current().pick(time.Duration(p.SlowStart)), r, w)
}

// current is the list in service, rebuilt when the probes' Version has
// moved or a ramp has ended.
func (p *Policy) current() *poolState { return p.pools.For(p.states, p.rebuild) }

// rebuild makes the list in service, by the one in-service rule, and
// returns it with the end of its first ramp (0: none).
func (p *Policy) rebuild() (*poolState, int64) {
	ms := make([]Member, len(p.pos))
	for k, i := range p.pos {
		if p.probe[k] {
			ms[k] = p.states.Member(p.static[i].Dial)
		} else {
			ms[k] = Member{In: true, Ready: true}
		}
	}
	at := func(k int) Member { return ms[k] }
	t := p.CountAndNote(len(ms), at, &p.failOpen, p.logger)
	st := &poolState{pool: make(reverseproxy.UpstreamPool, 0, t.Serving())}
	var base reverseproxy.UpstreamPool
	end := p.KeepRamping(len(ms), at, t, func(k int, ramps bool) {
		u := p.static[p.pos[k]]
		st.pool = append(st.pool, u)
		if ramps {
			st.ramping = append(st.ramping, Ramp[*reverseproxy.Upstream]{u, ms[k].Returned})
		} else {
			base = append(base, u)
		}
	})
	if len(st.ramping) > 0 {
		st.base = base
	}
	return st, end
}

// pick is the pool for one choice: a ramping upstream is in it with a
// probability that grows over slow_start; when the draws leave out every
// upstream in service, all of them are in it (DrawOut).
func (st *poolState) pick(slow time.Duration) reverseproxy.UpstreamPool {
	out := DrawOut(slow, st.ramping, len(st.pool))
	switch len(out) {
	case 0:
		return st.pool
	case len(st.ramping):
		return st.base // every ramping one out, and some that do not ramp in
	}
	return Without(st.pool, out)
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	lb_policy shaker [<inner policy> [<its arguments...>]] {
//	    inner <policy> [<its arguments...>] [{ <its block> }]
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
// The inner policy (default random) goes on the lb_policy line, or, when
// it needs a block of its own (cookie, header or query with a fallback),
// on an `inner` line in the block. The subdirectives are those of
// `dynamic shaker`, with the same defaults.
func (p *Policy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return p.UnmarshalPolicy(d, p.setInner)
}

// UnmarshalPolicy reads a shaker selection policy's Caddyfile tokens, for
// the HTTP and the layer-4 policies alike: the inner policy on the
// lb_policy line, or on an `inner` line in the block (setInner reads it,
// with d on its name), and the probe subdirectives.
func (pc *ProbeConfig) UnmarshalPolicy(d *caddyfile.Dispenser, setInner func(*caddyfile.Dispenser) error) error {
	d.Next() // consume policy name
	if d.NextArg() {
		// the inner policy's name and arguments, up to the block: a
		// dispenser of this line only, so that the block stays ours
		line := []caddyfile.Token{d.Token()}
		for d.NextArg() {
			line = append(line, d.Token())
		}
		sub := caddyfile.NewDispenser(line)
		sub.Next()
		if err := setInner(sub); err != nil {
			return err
		}
	}
	for d.NextBlock(0) {
		if ok, err := pc.UnmarshalSubdirective(d); ok {
			if err != nil {
				return err
			}
			continue
		}
		switch d.Val() {
		case "inner":
			if !d.NextArg() {
				return d.ArgErr()
			}
			if err := setInner(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized shaker policy option '%s'", d.Val())
		}
	}
	return pc.FinishCaddyfile()
}

// setInner reads the inner policy whose name d is on.
func (p *Policy) setInner(d *caddyfile.Dispenser) error {
	raw, err := UnmarshalInner[reverseproxy.Selector](d, "http.reverse_proxy.selection_policies.", p.InnerRaw != nil, nil)
	if err == nil {
		p.InnerRaw = raw
	}
	return err
}

// UnmarshalInner reads the inner selection policy whose name d is on, for
// a shaker policy: a module of namespace (its IDs' prefix) that is an S,
// the proxy's selector interface. given says one was read already; refuse,
// if not nil, refuses names with a reason (shaker is always refused).
func UnmarshalInner[S any](d *caddyfile.Dispenser, namespace string, given bool, refuse func(name string) error) (json.RawMessage, error) {
	if given {
		return nil, d.Err("inner policy already given")
	}
	name := d.Val()
	if name == "shaker" {
		return nil, d.Err("inner shaker: a shaker policy cannot wrap another shaker policy")
	}
	if refuse != nil {
		if err := refuse(name); err != nil {
			return nil, d.Errf("inner %s: %v", name, err)
		}
	}
	modID := namespace + name
	unm, err := caddyfile.UnmarshalModule(d, modID)
	if err != nil {
		return nil, err
	}
	sel, ok := unm.(S)
	if !ok {
		var zero S
		return nil, d.Errf("module %s (%T) is not a %T selection policy", modID, unm, &zero)
	}
	return caddyconfig.JSONModuleObject(sel, "policy", name, nil), nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Policy)(nil)
	_ caddy.Validator       = (*Policy)(nil)
	_ caddy.CleanerUpper    = (*Policy)(nil)
	_ reverseproxy.Selector = (*Policy)(nil)
	_ caddyfile.Unmarshaler = (*Policy)(nil)
)
