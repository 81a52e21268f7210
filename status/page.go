package status

import (
	"bufio"
	"fmt"
	"math"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-shaker/caddy-shaker/health"
)

func init() {
	caddy.RegisterModule(Page{})
	httpcaddyfile.RegisterHandlerDirective("shaker_status", parseStatusPage)
	// Next to Caddy's own `metrics`: a handler that answers the request,
	// after basic_auth, forward_auth and the like.
	httpcaddyfile.RegisterDirectiveOrder("shaker_status", httpcaddyfile.After, "metrics")
}

// Source is what the page reads: every checker of every probed address.
// The page reads each one's Brief, builds the Status (as the admin API
// shows it) only of the rows it shows, and orders them as
// Registry.Statuses does: by upstream, then address, then settings. The
// shaker app's registry (*health.Registry) is one.
type Source interface {
	Checkers() []*health.Checker
}

// source is the page's Source, set once by the package that registers the
// shaker app (SetSource); nil until then.
var source atomic.Pointer[sourceOf]

type sourceOf struct{ Source }

// SetSource sets where every shaker_status handler, and the RTT history,
// read the checkers from. The plugin's root package calls it at init,
// with its registry: the page shows nothing until it is set.
func SetSource(s Source) { source.Store(&sourceOf{s}) }

// CloseDelays is how soon the engine closed its answered probes' sockets
// after their SYN-ACKs, since it started: the worst delay, and quantiles
// of their histogram (each the upper bound of the bucket that holds it,
// at most the worst), over Count answered probes. A socket still open
// 200 ms after its SYN-ACK becomes a connection the backend accepts.
type CloseDelays struct {
	Count   uint64  `json:"count"`
	WorstMs float64 `json:"worst_ms"`
	P50Ms   float64 `json:"p50_ms"`
	P99Ms   float64 `json:"p99_ms"`
	P999Ms  float64 `json:"p999_ms"`
}

// CloseDelaySource is a Source that also reads the engine's close
// delays; ok is false when there are none to show (no engine running, or
// one in raw mode, which leaves nothing to close).
type CloseDelaySource interface {
	CloseDelays() (d CloseDelays, ok bool)
}

// currentCloseDelays reads the close delays from the Source, when it
// can.
func currentCloseDelays() (CloseDelays, bool) {
	if src := source.Load(); src != nil {
		if cs, ok := src.Source.(CloseDelaySource); ok {
			return cs.CloseDelays()
		}
	}
	return CloseDelays{}, false
}

// currentCheckers is every checker, from the Source; none without one.
func currentCheckers() []*health.Checker {
	if src := source.Load(); src != nil && src.Source != nil {
		return src.Checkers()
	}
	return nil
}

// Bounds of the page's settings.
const (
	// DefaultStatusRefresh is how often the page reloads its data.
	DefaultStatusRefresh = 5 * time.Second
	// MinStatusRefresh and MaxStatusRefresh bound `refresh`.
	MinStatusRefresh = time.Second
	MaxStatusRefresh = time.Hour

	statusPerPage    = 100  // rows per page by default
	statusMaxPerPage = 1000 // and at most
)

// Page is an HTTP handler that serves the health of every address
// the shaker app probes: an HTML page (HAProxy's stats page, for Caddy)
// or, when the request's Accept header prefers application/json, the same
// data as JSON. It is meant to be mounted on a path of a site and
// protected there, like Caddy's `metrics` handler:
//
//	handle /shaker* {
//		basic_auth { admin <hash> }
//		shaker_status
//	}
//
// The page shows summary counts, then one row per probed address (its
// upstream, health, last RTT, last error, probe counts, how long it has
// been in its health state and how many times that changed, its admin
// state when not ready, and a sparkline of its recent RTTs), 100 rows a
// page, sortable and filterable with query
// parameters (q, state, sort, order, page, per_page; state is up, down,
// failing, pending, drain or maint), and reloads its data every `refresh`. It loads nothing from elsewhere. Everything from
// configuration or the network is escaped.
//
// The page also shows how soon the engine closed answered probes after
// their SYN-ACKs (p99 and worst, CloseDelays), where it has any.
//
// The JSON is {"upstreams": [...]}, with the fields of GET
// /shaker/upstreams for each address plus "rtt_history_us", summary
// counts, and "close_delay" (CloseDelays) where the page shows it. The
// same query parameters filter and sort it; it is paged only when page or
// per_page is given.
//
// Only GET and HEAD are served; other methods get 405.
type Page struct {
	// How often the page reloads its data (the JSON is fresh on each
	// request). Default: 5s; from 1s to 1h.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	checkers func() []*health.Checker
	statuses func() []health.Status // the tests' lists, instead of checkers
	delays   func() (CloseDelays, bool)
	history  *rttSampler
	held     bool
}

// CaddyModule returns the Caddy module information.
func (Page) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.shaker_status",
		New: func() caddy.Module { return new(Page) },
	}
}

// Provision sets the page up and starts the RTT history sampler (or takes
// a reference to the running one, so that the history survives reloads).
func (p *Page) Provision(ctx caddy.Context) error {
	if p.Refresh == 0 {
		p.Refresh = caddy.Duration(DefaultStatusRefresh)
	}
	if err := p.Validate(); err != nil {
		return err
	}
	p.checkers = currentCheckers
	p.delays = currentCloseDelays
	p.history = sampler
	p.history.acquire(sampleSource)
	p.held = true
	return nil
}

// Validate checks the settings.
func (p *Page) Validate() error {
	if d := time.Duration(p.Refresh); d != 0 && (d < MinStatusRefresh || d > MaxStatusRefresh) {
		return fmt.Errorf("refresh %v: must be from %v to %v", d, MinStatusRefresh, MaxStatusRefresh)
	}
	return nil
}

// Cleanup drops this handler's reference to the RTT history sampler; the
// last one stops it and frees the history.
func (p *Page) Cleanup() error {
	if p.held {
		p.held = false
		p.history.release()
	}
	return nil
}

func parseStatusPage(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	p := new(Page)
	err := p.UnmarshalCaddyfile(h.Dispenser)
	return p, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	shaker_status [<matcher>] {
//	    refresh <duration>
//	}
func (p *Page) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.Errf("shaker_status takes no arguments, got %q (a matcher, if any, comes first and must be a path starting with / or a named matcher @name)", d.Val())
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "refresh":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return d.Errf("refresh %q: %v", d.Val(), err)
			}
			if dur < MinStatusRefresh || dur > MaxStatusRefresh {
				return d.Errf("refresh %v: must be from %v to %v", dur, MinStatusRefresh, MaxStatusRefresh)
			}
			p.Refresh = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized shaker_status subdirective %q", d.Val())
		}
	}
	return nil
}

// ServeHTTP answers with the page or the JSON; it never calls next.
func (p *Page) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
	}
	v := p.build(r.URL.Query(), time.Now(), wantsJSON(r.Header.Values("Accept")))
	h := w.Header()
	h.Set("Vary", "Accept")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	bw := bufio.NewWriterSize(w, 64<<10)
	if v.json {
		h.Set("Content-Type", "application/json")
		if err := v.writeJSON(bw); err != nil {
			return caddyhttp.Error(http.StatusInternalServerError, err)
		}
	} else {
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Security-Policy", statusCSP)
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		if err := statusTemplate.Execute(bw, v.pageData()); err != nil {
			return caddyhttp.Error(http.StatusInternalServerError, err)
		}
	}
	return bw.Flush()
}

// wantsJSON tells from the Accept header values whether the client prefers
// application/json to text/html: a higher q, or the same q from a more
// specific media range (so that "application/json, */*" gets JSON and a
// browser's "text/html, ..., */*;q=0.8" gets HTML). Without a preference,
// HTML.
func wantsJSON(accept []string) bool {
	type best struct {
		q    float64
		spec int // 0 none, 1 */*, 2 type/*, 3 exact
	}
	var js, html best
	consider := func(b *best, mtype, rng string, q float64) {
		spec := 0
		switch {
		case rng == mtype:
			spec = 3
		case strings.HasSuffix(rng, "/*") && strings.HasPrefix(mtype, strings.TrimSuffix(rng, "*")):
			spec = 2
		case rng == "*/*":
			spec = 1
		}
		if spec > b.spec {
			*b = best{q, spec}
		}
	}
	for _, line := range accept {
		for part := range strings.SplitSeq(line, ",") {
			mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
			if err != nil {
				continue
			}
			q := 1.0
			if s, ok := params["q"]; ok {
				f, err := strconv.ParseFloat(s, 64)
				if err != nil || math.IsNaN(f) || f < 0 || f > 1 {
					continue
				}
				q = f
			}
			consider(&js, "application/json", mt, q)
			consider(&html, "text/html", mt, q)
		}
	}
	if js.spec == 0 || js.q == 0 {
		return false
	}
	return js.q > html.q || (js.q == html.q && js.spec > html.spec)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Page)(nil)
	_ caddy.Validator             = (*Page)(nil)
	_ caddy.CleanerUpper          = (*Page)(nil)
	_ caddyhttp.MiddlewareHandler = (*Page)(nil)
	_ caddyfile.Unmarshaler       = (*Page)(nil)
)
