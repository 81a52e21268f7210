package caddyshaker

import (
	"math"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("shaker", parseGlobalOption)
}

// parseGlobalOption sets up the shaker app from the global options
// block. It is optional: the app runs with its defaults without it.
//
//	{
//	    shaker {
//	        loops               <n>
//	        max_sockets         <n>
//	        per_address_metrics <n>|all|off
//	        probe_mode          connect|raw|auto
//	        source_ports        <first>-<last>
//	        closer_priority     auto|realtime|normal
//	    }
//	}
//
// max_in_flight <n> is still accepted, and ignored with a warning: it is
// retired (see App.MaxInFlight).
func parseGlobalOption(d *caddyfile.Dispenser, _ any) (any, error) {
	app := new(App)
	d.Next() // consume option name
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for d.NextBlock(0) {
		if err := app.unmarshalGlobal(d); err != nil {
			return nil, err
		}
	}
	return httpcaddyfile.App{
		Name:  "shaker",
		Value: caddyconfig.JSON(app, nil),
	}, nil
}

// unmarshalGlobal reads one subdirective of the shaker global option, the
// one d is on.
func (app *App) unmarshalGlobal(d *caddyfile.Dispenser) error {
	name := d.Val()
	var dst *int
	limit := math.MaxInt32
	switch name {
	case "per_address_metrics":
		val, err := ArgString(d)
		if err != nil {
			return err
		}
		c, err := parseSeriesCap(val)
		if err != nil {
			return d.Err(err.Error())
		}
		app.PerAddressMetrics = c
		return nil
	case "probe_mode", "source_ports", "closer_priority":
		val, err := ArgString(d)
		if err != nil {
			return err
		}
		switch name {
		case "probe_mode":
			_, err = parseProbeMode(val)
			app.ProbeMode = val
		case "source_ports":
			_, err = parseSourcePorts(val)
			app.SourcePorts = val
		default:
			_, err = parseCloserPriority(val)
			app.CloserPriority = val
		}
		if err != nil {
			return d.Err(err.Error())
		}
		return nil
	case "loops":
		dst, limit = &app.Loops, MaxLoops
	case "max_sockets":
		dst = &app.MaxSockets
	case "max_in_flight":
		dst = &app.MaxInFlight
	default:
		return d.Errf("unrecognized shaker global option '%s'", name)
	}
	val, err := ArgString(d)
	if err != nil {
		return err
	}
	// Not ArgInt: these options' message gives the whole range, 1 to
	// limit, in one form.
	n, err := strconv.Atoi(val)
	if err != nil || n < 1 || n > limit {
		return d.Errf("%s '%s': must be an integer from 1 to %d", name, val, limit)
	}
	*dst = n
	return nil
}

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	dynamic shaker [<upstreams...>] {
//	    to               <upstreams...>
//	    inner            <module> [<args...>] [{ <module options> }]
//	    forget_after     <duration>
//	    max_discovered   <n>
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
// Upstreams are host:port, on the `dynamic shaker` line, on `to` lines in
// the block, or both; or they come from another upstream source, `inner
// a my-service.internal 8080 { refresh 10s }` (any
// http.reverse_proxy.upstreams module, with its own Caddyfile syntax),
// whose upstreams are then probed and filtered by health. `source` is
// inner's old name, still read with a deprecation warning. Every subdirective is optional; the defaults are
// interval 2s, fast_interval and down_interval the interval, jitter 5%, timeout 1s,
// passes 2, fails 3, the upstream's own port, no panic threshold (503
// when none is up), no slow start, resolve_interval 1m and resolve_timeout
// 5s.
func (su *Upstreams) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume upstream source name

	addUpstreams := func(args []string) error {
		for _, a := range args {
			if _, err := parseUpstream(a); err != nil {
				return d.Err(err.Error())
			}
			su.Upstreams = append(su.Upstreams, a)
		}
		return nil
	}
	if err := addUpstreams(d.RemainingArgs()); err != nil {
		return err
	}

	var err error
	for d.NextBlock(0) {
		if ok, err := su.UnmarshalSubdirective(d); ok {
			if err != nil {
				return err
			}
			continue
		}
		switch d.Val() {
		case "to":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if err := addUpstreams(args); err != nil {
				return err
			}
		case "forget_after":
			su.ForgetAfter, err = ArgDuration(d)
		case "max_discovered":
			su.MaxDiscovered, err = ArgInt(d, 1, maxInt)
		case "inner", "source":
			err = su.unmarshalInner(d)
		default:
			return d.Errf("unrecognized shaker option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if err := su.FinishCaddyfile(); err != nil {
		return err
	}
	switch {
	case len(su.Upstreams) == 0 && su.InnerRaw == nil:
		return d.Err("no upstreams: give host:port upstreams after 'dynamic shaker' or on 'to' lines, or an 'inner' source to discover them")
	case len(su.Upstreams) > 0 && su.InnerRaw != nil:
		return d.Errf("upstreams %v and an inner source: give one or the other", su.Upstreams)
	}
	return nil
}

// deprecationLog is where the Caddyfile parser warns of deprecated
// subdirectives: Caddy's default logger; a variable for tests.
var deprecationLog = func() *zap.Logger { return caddy.Log().Named("shaker") }

// unmarshalInner reads the inner subdirective, the upstream source to
// probe; or source, its deprecated name, with a warning.
func (su *Upstreams) unmarshalInner(d *caddyfile.Dispenser) error {
	sub := d.Val()
	if sub == "source" {
		deprecationLog().Warn("dynamic shaker: the 'source' subdirective is deprecated: it is 'inner' now (as in JSON); 'source' still works",
			zap.String("file", d.File()), zap.Int("line", d.Line()))
	}
	if su.InnerRaw != nil {
		return d.Errf("%s already given: one inner source per shaker block (use '%s multi' for several)", sub, sub)
	}
	if !d.NextArg() {
		return d.ArgErr()
	}
	name := d.Val()
	if name == "shaker" {
		return d.Errf("%s shaker: a shaker source cannot wrap another shaker source", sub)
	}
	unm, err := caddyfile.UnmarshalModule(d, "http.reverse_proxy.upstreams."+name)
	if err != nil {
		return err
	}
	src, ok := unm.(reverseproxy.UpstreamSource)
	if !ok {
		return d.Errf("%s %s (%T) is not an upstream source", sub, name, unm)
	}
	su.InnerRaw = caddyconfig.JSONModuleObject(src, "source", name, nil)
	return nil
}

// parseFraction reads a fraction, 0.5, or a percentage, 50%: the number
// written and what it is divided by, 1 or 100.
func parseFraction(val string) (num, scale float64, err error) {
	s, scale := val, 1.0
	if strings.HasSuffix(val, "%") {
		s, scale = strings.TrimSuffix(val, "%"), 100
	}
	num, err = strconv.ParseFloat(s, 64)
	return num, scale, err
}

const maxInt = int(^uint(0) >> 1)

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Upstreams)(nil)
)
