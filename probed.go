package caddyshaker

import (
	"fmt"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// Probed is a fixed list of upstreams probed under one ProbeConfig, for a
// module that keeps its own upstreams, as a load-balancing policy does
// with its handler's. Each is host:port (or tcp/host:port); a host name is
// resolved to all its addresses, re-resolved every resolve_interval, and
// is in service while one of them is. Its checkers are the process's own:
// the admin API, the status page, metrics and events show them as they
// show those of a `dynamic shaker` source.
type Probed struct {
	su *Upstreams

	mu  sync.Mutex
	gen uint64                       // su.gen that by was built from
	by  map[string][]*health.Checker // host:port -> checkers
}

// MemberStates is what a load-balancing policy reads of its probed
// upstreams: a Probed, or a test's states.
type MemberStates interface {
	// Member is the upstream dial as the in-service rule sees it.
	Member(dial string) Member
	// Version changes whenever Member may answer otherwise.
	Version() uint64
}

// CanProbe reports whether a dial address can be probed: TCP host:port
// (tcp/, tcp4/ and tcp6/ prefixes too), with no placeholder left in it.
// Unix sockets, UDP and placeholders cannot.
func CanProbe(dial string) bool { return parseDial(dial).probe }

// NewProbed starts probing dials, each of which CanProbe, under pc (which
// SetDefaults has filled in), for the module being provisioned in ctx.
func NewProbed(ctx caddy.Context, pc ProbeConfig, dials []string) (*Probed, error) {
	su := &Upstreams{ProbeConfig: pc}
	for _, d := range dials {
		su.Upstreams = append(su.Upstreams, hostPort(d))
	}
	if err := su.Provision(ctx); err != nil {
		_ = su.Cleanup()
		return nil, err
	}
	return &Probed{su: su}, nil
}

// hostPort strips a tcp/ network from a dial address.
func hostPort(dial string) string {
	if network, rest, ok := strings.Cut(dial, "/"); ok && strings.HasPrefix(network, "tcp") {
		return rest
	}
	return dial
}

// Version changes whenever Member may answer otherwise: a health
// transition or admin state change of any address, or a host name's
// addresses changing.
func (p *Probed) Version() uint64 { return reg.Version() + p.su.gen.Load() }

// Member is the upstream dial (as given to NewProbed) as the in-service
// rule sees it: in service while one of its addresses is, or while none is
// known yet (a name not resolved yet, an address not probed yet, or a dial
// not probed at all).
func (p *Probed) Member(dial string) Member {
	cs := p.checkers(dial)
	if len(cs) == 0 {
		return Member{In: true, Ready: true}
	}
	return memberOf(cs)
}

// memberOf is an upstream with the addresses of cs as the in-service rule
// sees it: in while one of them is in service; ready unless every one is
// drained or in maintenance; returned the earliest return among those in
// service, 0 if one of them has served since its first result.
func memberOf(cs []*health.Checker) Member {
	var m Member
	first := true
	for _, c := range cs {
		if c.AdminState() == health.Ready {
			m.Ready = true
		}
		if !c.InService() {
			continue
		}
		m.In = true
		if ret := c.ReturnedAt(); first || ret < m.Returned {
			m.Returned, first = ret, false
		}
	}
	return m
}

// ProbeNow probes the addresses of dial (host:port, as a request's
// http.reverse_proxy.upstream.hostport gives it) at once, as after a
// request to it failed; at most once per fast_interval.
func (p *Probed) ProbeNow(dial string) {
	for _, c := range p.checkers(dial) {
		if c.ProbeNow() {
			p.su.logger.Debug("request failed: probing the upstream now",
				zap.String("upstream", dial), zap.String("address", c.Addr().String()))
		}
	}
}

// Close stops probing; a checker no other module uses stops.
func (p *Probed) Close() error { return p.su.Cleanup() }

// checkers returns the checkers of dial.
func (p *Probed) checkers(dial string) []*health.Checker {
	dial = hostPort(dial)
	p.mu.Lock()
	defer p.mu.Unlock()
	if g := p.su.gen.Load(); g != p.gen || p.by == nil {
		by := make(map[string][]*health.Checker)
		if es := p.su.snap.Load(); es != nil {
			for _, e := range *es {
				by[e.raw] = append(by[e.raw], e.c)
			}
		}
		p.by, p.gen = by, g
	}
	return p.by[dial]
}

// Parent returns the module whose provisioning is provisioning the current
// one (the one before it in ctx's lineage of modules), as a T; or an error
// that says where the current module belongs (what, as "a reverse_proxy
// handler's load_balancing", say) and names the parent it has.
func Parent[T caddy.Module](ctx caddy.Context, what string) (T, error) {
	mods := ctx.Modules() // ends with the current module
	var zero T
	if len(mods) >= 2 {
		if h, ok := mods[len(mods)-2].(T); ok {
			return h, nil
		}
	}
	parent := "none"
	if len(mods) >= 2 {
		parent = string(mods[len(mods)-2].CaddyModule().ID)
	}
	return zero, fmt.Errorf("the shaker selection policy goes directly in %s, to probe its upstreams; its parent here is %s", what, parent)
}
