package caddyshaker

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// adminAPI is a module that provides the /shaker/ endpoints of Caddy's
// admin API: the health of every address the shaker app probes, the
// engine's state, and the administrative state of each address (drain,
// maint, ready), which nothing else changes.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.shaker",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the routes of the /shaker/upstreams and /shaker/engine
// endpoints.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{
			Pattern: "/shaker/upstreams",
			Handler: caddy.AdminHandlerFunc(a.handleUpstreams),
		},
		{
			Pattern: "/shaker/upstreams/",
			Handler: caddy.AdminHandlerFunc(a.handleUpstream),
		},
		{
			Pattern: "/shaker/engine",
			Handler: caddy.AdminHandlerFunc(a.handleEngine),
		},
	}
}

// EngineStatus is the probe engine's state, as GET /shaker/engine shows
// it.
type EngineStatus struct {
	// Running is false when no config uses the plugin.
	Running bool `json:"running"`
	// HalfOpen is true where probes are half-open: by construction (a
	// Linux build) and not refuted by the self-check (true while it is
	// pending). False means backends accept() a connection per probe.
	HalfOpen bool `json:"half_open"`
	// SelfCheck is the state of the self-check the engine runs when it
	// starts: "pending" (it takes about 250 ms), "ok" (its probes of a
	// listener of its own were never accepted), "failed" (see
	// SelfCheckError), or "not run" (no engine, or it stopped first).
	SelfCheck string `json:"self_check"`
	// SelfCheckError says why the self-check failed.
	SelfCheckError string `json:"self_check_error,omitempty"`
	// ProbeMode is the mode the engine's probes use, "connect" or "raw"
	// (never "auto": that one chooses at start); absent without an
	// engine.
	ProbeMode string `json:"probe_mode,omitempty"`
	// ProbeModeAsked is the app's probe_mode when the engine started:
	// "connect", "raw" or "auto". A reload that changes probe_mode
	// changes it only when the engine restarts.
	ProbeModeAsked string `json:"probe_mode_asked,omitempty"`
	// SourcePorts are the source ports raw mode sends from, "first-last";
	// absent in connect mode.
	SourcePorts string `json:"source_ports,omitempty"`
	// RawError says why the engine probes in connect mode although
	// probe_mode auto asked for raw where it can (CAP_NET_RAW missing, a
	// source port taken, ...); absent otherwise.
	RawError string `json:"raw_error,omitempty"`
	// CloserPriority is how connect mode's closers run: "realtime"
	// (SCHED_FIFO 1), "normal", or "none" (raw mode has no closers, nor
	// has a build with the race detector); absent without an engine.
	CloserPriority string `json:"closer_priority,omitempty"`
	// CloserPriorityAsked is the app's closer_priority when the engine
	// started: "auto", "realtime" or "normal".
	CloserPriorityAsked string `json:"closer_priority_asked,omitempty"`
	// CloserPriorityError says why the closers run at normal priority
	// although closer_priority auto asked for realtime where it can
	// (CAP_SYS_NICE missing, RLIMIT_RTPRIO 0); absent otherwise.
	CloserPriorityError string `json:"closer_priority_error,omitempty"`
	// Loops, Sockets and MaxSockets: the engine's loops, probe sockets
	// open, and their bound. In raw mode no probe holds a socket (Sockets
	// is 0), and MaxSockets bounds the probes in flight.
	Loops      int `json:"loops"`
	Sockets    int `json:"sockets"`
	MaxSockets int `json:"max_sockets"`
	// InFlight: probes whose SYN is out; Scheduled: periodic probes.
	InFlight  int `json:"in_flight"`
	Scheduled int `json:"scheduled"`
	// Overdue: periodic probes past their time and not started; LagMs:
	// how late the most overdue one is, in milliseconds.
	Overdue int     `json:"overdue"`
	LagMs   float64 `json:"lag_ms"`
	// LateProbes: periodic probes that started later than a quarter of
	// their interval, since the engine started.
	LateProbes uint64 `json:"late_probes"`
	// MaxCloseDelayMs: the worst SYN-ACK-to-close delay seen, in ms
	// (always 0 in raw mode: nothing is left to close).
	MaxCloseDelayMs float64 `json:"max_close_delay_ms"`
	// CloseDelay: the distribution of those delays, one per answered
	// probe since the engine started.
	CloseDelay CloseDelayStatus `json:"close_delay"`
	// Advice says what to do when the engine does not keep its schedule
	// or closes sockets late; "" when all is well.
	Advice string `json:"advice,omitempty"`
}

// CloseDelayStatus is the distribution of SYN-ACK-to-close delays, as GET
// /shaker/engine shows it: quantiles (the upper bound of the bucket that
// holds each, at most the worst delay seen) and the buckets themselves.
type CloseDelayStatus struct {
	Count  uint64  `json:"count"`
	P50Ms  float64 `json:"p50_ms"`
	P99Ms  float64 `json:"p99_ms"`
	P999Ms float64 `json:"p999_ms"`
	// Buckets: each bucket's upper bound in ms (le_ms; 0 for the last,
	// unbounded one) and its own count, not cumulative.
	Buckets []DelayBucket `json:"buckets"`
}

// DelayBucket is one bucket of a delay distribution.
type DelayBucket struct {
	LeMs  float64 `json:"le_ms"`
	Count uint64  `json:"count"`
}

// msOf is d in milliseconds, to the microsecond.
func msOf(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// closeDelayQuantiles returns the count of the engine's close delays and
// their p50, p99 and p99.9 in ms: each the upper bound of the bucket that
// holds it, at most the worst delay seen.
func closeDelayQuantiles(st shaker.Stats) (count uint64, p50, p99, p999 float64) {
	h := st.CloseDelay
	q := func(q float64) float64 {
		d := h.Quantile(q, shaker.CloseDelayBuckets)
		if d < 0 || d > st.MaxCloseDelay {
			d = st.MaxCloseDelay
		}
		return msOf(d)
	}
	return h.Count(), q(0.5), q(0.99), q(0.999)
}

// closeDelayStatus summarises the engine's close delays.
func closeDelayStatus(st shaker.Stats) CloseDelayStatus {
	var cs CloseDelayStatus
	cs.Count, cs.P50Ms, cs.P99Ms, cs.P999Ms = closeDelayQuantiles(st)
	for i, c := range st.CloseDelay.Counts {
		var le float64
		if i < len(shaker.CloseDelayBuckets) {
			le = msOf(shaker.CloseDelayBuckets[i])
		}
		cs.Buckets = append(cs.Buckets, DelayBucket{LeMs: le, Count: c})
	}
	return cs
}

// engineStatus reads the engine's state.
func engineStatus() EngineStatus {
	check, checkErr, halfOpen := selfCheckState()
	e := engines.cur.Load()
	if e == nil {
		return EngineStatus{HalfOpen: halfOpen, SelfCheck: check, SelfCheckError: checkErr}
	}
	st := e.Stats()
	es := EngineStatus{
		Running: true, HalfOpen: halfOpen, SelfCheck: check, SelfCheckError: checkErr,
		Loops: st.Loops, Sockets: st.Sockets, MaxSockets: st.MaxSockets,
		InFlight: st.InFlight, Scheduled: st.Scheduled,
		Overdue: st.Overdue, LagMs: msOf(st.Lag),
		LateProbes:      st.Late,
		MaxCloseDelayMs: msOf(st.MaxCloseDelay),
		CloseDelay:      closeDelayStatus(st),
		ProbeMode:       e.Mode().String(),
	}
	es.CloserPriority = closerPriorityInUse(e)
	if set := engines.settings.Load(); set != nil {
		es.ProbeModeAsked = set.mode.String()
		es.CloserPriorityAsked = set.priority.String()
	}
	if _, err := e.CloserRealtime(); err != nil {
		es.CloserPriorityError = err.Error()
	}
	if e.Mode() == shaker.ModeRaw {
		es.SourcePorts = e.SourcePorts().String()
	}
	if err := e.RawError(); err != nil {
		es.RawError = err.Error()
	}
	var advice []string
	if check == checkFailed {
		advice = append(advice, "the self-check failed (self_check_error, and Caddy's log): backends may accept() a real connection per probe and log or count it; "+
			"run Caddy directly on a Linux kernel (not gVisor, not another system, no userland network stack or proxy in front of it), "+
			"then restart Caddy to check again")
	}
	if st.Overdue > 0 || st.Lag > time.Second {
		switch {
		case st.Mode == shaker.ModeRaw && st.InFlight >= st.MaxSockets:
			advice = append(advice, "probes in flight are at max_sockets, raw mode's bound on them (many addresses waiting for their timeout): raise max_sockets, or shorten the timeout")
		case st.Mode != shaker.ModeRaw && st.Sockets >= st.MaxSockets:
			advice = append(advice, "probe sockets are all taken (many addresses waiting for their timeout): raise max_sockets (and Caddy's open-file limit), or shorten the timeout")
		}
		advice = append(advice, "probes start late: give Caddy more CPU, set loops to the number of cores, or probe less often (a longer interval)")
	}
	if st.MaxCloseDelay > closeDelayWarn {
		advice = append(advice, "sockets were closed late after their SYN-ACK (at 200 ms the backend gets a real connection): the machine is overloaded")
	}
	es.Advice = strings.Join(advice, "; ")
	return es
}

// handleEngine answers GET /shaker/engine with the engine's state (see
// EngineStatus).
func (adminAPI) handleEngine(w http.ResponseWriter, r *http.Request) error {
	return serveJSON(w, r, func() any { return engineStatus() })
}

// handleUpstreams answers GET /shaker/upstreams with a JSON array with
// one object per probed address and settings (see Status), sorted by
// upstream, then address (numerically), then interval; a page of them,
// DefaultUpstreamsPerPage by default. The query parameters:
//
//   - health=up|down|unknown: only those whose health field is that;
//   - admin_state=ready|drain|maint: only those in that admin state;
//   - upstream=<name>: only those of that upstream, as configured (the
//     upstream field);
//   - page=<n>: the page, from 1 (the default); past the last, [];
//   - per_page=<n>|all: rows a page; all for every row in one answer.
//
// health, admin_state and upstream may each be given several times, or
// health and admin_state as comma-separated lists: a row matches any of
// the values of each. The answer's headers say the rest: X-Total-Count,
// the rows that match; Link, the first, prev, next and last pages (RFC
// 8288), with the same filters. A bad or unknown parameter is a 400 that
// names it. A page costs a look at every address and a heap of the rows
// up to its end (at 1,000,000 addresses, the first page about 0.2 s of
// CPU and 250 KB), not the building and serialising of a million objects.
func (adminAPI) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method not allowed"),
		}
	}
	q, err := parseUpstreamsQuery(r.URL.Query())
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	rows, total := q.rows(reg.Checkers())
	w.Header().Set("X-Total-Count", strconv.Itoa(total))
	if link := q.links(r.URL, total); link != "" {
		w.Header().Set("Link", link)
	}
	w.Header().Set("Content-Type", "application/json")
	// one status at a time, so that "all" over a million addresses never
	// holds them all as objects; the bytes are those json.Encoder wrote
	// for the whole list before
	bw := bufio.NewWriterSize(w, 64<<10)
	bw.WriteByte('[')
	for i, row := range rows {
		b, err := json.Marshal(row.Checker.Status())
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
		}
		if i > 0 {
			bw.WriteByte(',')
		}
		bw.Write(b)
	}
	bw.WriteString("]\n")
	return bw.Flush()
}

// DefaultUpstreamsPerPage is the rows a page of GET /shaker/upstreams
// without per_page: enough for every address of most configs, and a
// bounded answer (about 250 KB) at any number of addresses.
const DefaultUpstreamsPerPage = 1000

// upstreamsQuery is GET /shaker/upstreams's query: its filters and page.
type upstreamsQuery struct {
	health    []health.Health     // any of them; none: any
	admin     []health.AdminState // any of them; none: any
	upstreams []string            // any of them; none: any
	page      int                 // from 1
	perPage   int                 // 0: all
}

// parseUpstreamsQuery reads the query of GET /shaker/upstreams; its error
// names the bad parameter and value.
func parseUpstreamsQuery(v url.Values) (upstreamsQuery, error) {
	q := upstreamsQuery{page: 1, perPage: DefaultUpstreamsPerPage}
	for key, vals := range v {
		switch key {
		case "health", "admin_state":
			for _, val := range vals {
				for one := range strings.SplitSeq(val, ",") {
					if key == "health" {
						h, ok := parseHealth(one)
						if !ok {
							return q, fmt.Errorf("health %q: must be up, down or unknown", one)
						}
						q.health = append(q.health, h)
						continue
					}
					a, err := health.ParseAdminState(one)
					if err != nil {
						return q, fmt.Errorf("admin_state %q: must be ready, drain or maint", one)
					}
					q.admin = append(q.admin, a)
				}
			}
		case "upstream":
			q.upstreams = vals
		case "page", "per_page":
			if len(vals) != 1 {
				return q, fmt.Errorf("%s given %d times: give it once", key, len(vals))
			}
			if key == "per_page" && vals[0] == "all" {
				q.perPage = 0
				continue
			}
			n, err := strconv.Atoi(vals[0])
			if err != nil || n < 1 {
				if key == "per_page" {
					return q, fmt.Errorf("per_page %q: must be a whole number from 1, or all", vals[0])
				}
				return q, fmt.Errorf("page %q: must be a whole number from 1", vals[0])
			}
			if key == "page" {
				q.page = n
			} else {
				q.perPage = n
			}
		default:
			return q, fmt.Errorf("unknown parameter %q: use health, admin_state, upstream, page or per_page", key)
		}
	}
	return q, nil
}

func parseHealth(s string) (health.Health, bool) {
	for _, h := range []health.Health{health.Up, health.Down, health.Unknown} {
		if s == h.String() {
			return h, true
		}
	}
	return 0, false
}

// rows returns the page's rows: the summaries of the checkers that match,
// sorted by upstream, then address, then settings; and how many match. A
// page sorts only the rows up to its end, which it picks out of the others
// with a heap: at a million addresses, the first page costs a look at each
// and about as many comparisons, not a sort of them all.
func (q *upstreamsQuery) rows(cs []*health.Checker) (rows []health.Summary, total int) {
	keep := len(cs) // rows up to the end of the page
	if q.perPage > 0 {
		if q.page-1 >= (len(cs)+q.perPage-1)/q.perPage {
			keep = 0 // past the end: only count
		} else {
			keep = min(keep, q.page*q.perPage)
		}
	}
	top := health.NewTop(keep, len(cs), compareRows)
	for _, c := range cs {
		s := c.Summary()
		if len(q.health) > 0 && !slices.Contains(q.health, s.Health) ||
			len(q.admin) > 0 && !slices.Contains(q.admin, s.AdminState) ||
			len(q.upstreams) > 0 && !slices.Contains(q.upstreams, s.Name) {
			continue
		}
		total++
		top.Add(s)
	}
	h := top.Sorted()
	lo := 0
	if q.perPage > 0 {
		lo = min((q.page-1)*q.perPage, len(h))
	}
	return h[lo:], total
}

// compareRows orders the rows of GET /shaker/upstreams: by upstream, then
// address, then settings.
func compareRows(a, b health.Summary) int {
	if c := strings.Compare(a.Name, b.Name); c != 0 {
		return c
	}
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	// then settings: the same address and interval, other settings:
	// any order, but the same on every page
	return health.CompareSettings(a.Checker.Settings(), b.Checker.Settings())
}

// links is the Link header of a page of total rows: first, prev, next and
// last, each u with its page changed; "" when everything fits on one page.
func (q *upstreamsQuery) links(u *url.URL, total int) string {
	if q.perPage == 0 {
		return ""
	}
	last := max(1, (total+q.perPage-1)/q.perPage)
	if last == 1 && q.page == 1 {
		return ""
	}
	link := func(page int, rel string) string {
		v := u.Query()
		v.Set("page", strconv.Itoa(page))
		v.Set("per_page", strconv.Itoa(q.perPage))
		return "<" + u.Path + "?" + v.Encode() + `>; rel="` + rel + `"`
	}
	out := []string{link(1, "first")}
	if q.page > 1 {
		out = append(out, link(min(q.page-1, last), "prev"))
	}
	if q.page < last {
		out = append(out, link(q.page+1, "next"))
	}
	return strings.Join(append(out, link(last, "last")), ", ")
}

// handleUpstream serves /shaker/upstreams/<address>[/<action>]:
//
//   - GET /shaker/upstreams/<address>: the address's status (a JSON array:
//     one object per checker of it, as in GET /shaker/upstreams);
//   - POST /shaker/upstreams/<address>/drain: no new requests go to the
//     address, probes go on;
//   - POST .../maint: no requests and no probes; its health is unknown;
//   - POST .../ready: back to normal (after maint, out of service until
//     its first probe answers, at once).
//
// <address> is the address field of GET /shaker/upstreams (IPv6 in
// brackets). A POST answers 200 with the address's new status; 404 for an
// address that is not probed, 400 for an unknown action or a malformed
// address, 405 for another method.
func (adminAPI) handleUpstream(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, "/shaker/upstreams/")
	addrText, action := rest, ""
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		addrText, action = rest[:i], rest[i+1:]
	}
	want := http.MethodGet
	if action != "" {
		want = http.MethodPost
	}
	if r.Method != want {
		w.Header().Set("Allow", want)
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method %s not allowed: use %s", r.Method, want),
		}
	}
	var st health.AdminState
	if action != "" {
		var err error
		if st, err = health.ParseAdminState(action); err != nil {
			return caddy.APIError{
				HTTPStatus: http.StatusBadRequest,
				Err:        fmt.Errorf("unknown action %q: must be drain, maint or ready", action),
			}
		}
	}
	addr, err := netip.ParseAddrPort(addrText)
	if err != nil {
		return caddy.APIError{
			HTTPStatus: http.StatusBadRequest,
			Err:        fmt.Errorf("address %q: must be an address as GET /shaker/upstreams shows it, ip:port or [ipv6]:port", addrText),
		}
	}
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	if action != "" {
		prev, err := reg.SetAdminState(addr, st)
		if errors.Is(err, health.ErrNotProbed) {
			return notProbed(addr)
		}
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		if prev != st {
			announceAdminState(addr, prev, st)
		}
	}
	statuses := reg.AddressStatuses(addr)
	if len(statuses) == 0 {
		return notProbed(addr)
	}
	return writeJSON(w, statuses)
}

func notProbed(addr netip.AddrPort) error {
	return caddy.APIError{
		HTTPStatus: http.StatusNotFound,
		Err:        fmt.Errorf("address %s is not probed: GET /shaker/upstreams lists those that are", addr),
	}
}

// announceAdminState logs a change of an address's administrative state
// and emits it as the event admin_state_changed, through the newest
// shaker app.
func announceAdminState(addr netip.AddrPort, prev, st health.AdminState) {
	herald := engines.herald.Load()
	if herald == nil {
		return
	}
	name := ""
	if ss := reg.AddressStatuses(addr); len(ss) > 0 {
		name = ss[0].Upstream
	}
	herald.logger.Info("upstream admin state changed",
		zap.String("upstream", name),
		zap.String("address", addr.String()),
		zap.Stringer("from", prev),
		zap.Stringer("to", st))
	if herald.events != nil {
		herald.events.Emit(herald.ctx, "admin_state_changed", map[string]any{
			"host": addr.String(), "upstream": name, "admin_state": st.String(), "previous": prev.String(),
		})
	}
}

// serveJSON answers a GET with what v returns, as JSON; other methods
// get 405.
func serveJSON(w http.ResponseWriter, r *http.Request, v func() any) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method not allowed"),
		}
	}
	return writeJSON(w, v())
}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	return nil
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
)
