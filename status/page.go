package status

import (
	"bufio"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"math"
	"mime"
	"net/http"
	"net/url"
	"slices"
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
	httpcaddyfile.RegisterHandlerDirective("shaker_status", parsePage)
	// Next to Caddy's own `metrics`: a handler that answers the request,
	// after basic_auth, forward_auth and the like.
	httpcaddyfile.RegisterDirectiveOrder("shaker_status", httpcaddyfile.After, "metrics")
}

// Source is what the page reads: the state of every probed address, as
// the admin API shows it, sorted by upstream. The shaker app's registry
// (*health.Registry) is one.
type Source interface {
	Statuses() []health.Status
}

// source is the page's Source, set once by the package that registers the
// shaker app (SetSource); nil until then.
var source atomic.Pointer[sourceOf]

type sourceOf struct{ Source }

// SetSource sets where every shaker_status handler, and the RTT history,
// read the statuses from. The plugin's root package calls it at init,
// with its registry: the page shows nothing until it is set.
func SetSource(s Source) { source.Store(&sourceOf{s}) }

// currentStatuses is the state of every probed address, from the Source;
// none without one.
func currentStatuses() []health.Status {
	if src := source.Load(); src != nil && src.Source != nil {
		return src.Statuses()
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
// The JSON is {"upstreams": [...]}, with the fields of GET
// /shaker/upstreams for each address plus "rtt_history_us", and summary
// counts. The same query parameters filter and sort it; it is paged only
// when page or per_page is given.
//
// Only GET and HEAD are served; other methods get 405.
type Page struct {
	// How often the page reloads its data (the JSON is fresh on each
	// request). Default: 5s; from 1s to 1h.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	statuses func() []health.Status
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
	p.statuses = currentStatuses
	p.history = sampler
	p.history.acquire(currentStatuses)
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

func parsePage(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
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

// Health of an address as the page counts and filters it: the health
// layer's, and pending.
var (
	healthUp   = health.Up.String()
	healthDown = health.Down.String()
	// healthUnknown is the health of an address in maintenance, or back
	// from it and waiting for its first result: shown as such, counted
	// as pending.
	healthUnknown = health.Unknown.String()
)

// healthPending: no result to go by: not probed yet, or unknown.
const healthPending = "pending"

// Admin states as the page filters them (state=drain, state=maint): the
// health layer's. A ready address shows no admin state.
var (
	adminReady = health.Ready.String()
	adminDrain = health.Drain.String()
	adminMaint = health.Maint.String()
)

// healthOf returns the address's state as the page counts and filters it
// (up, down or pending), and the health it shows: pending when never
// probed, unknown when its health is (in maintenance, or back from it
// until its first result).
func healthOf(s *health.Status) (state, shown string) {
	switch {
	case s.CheckedAt == nil:
		return healthPending, healthPending
	case s.Health == healthUp:
		return healthUp, healthUp
	case s.Health == healthDown:
		return healthDown, healthDown
	default: // unknown
		return healthPending, healthUnknown
	}
}

// adminOf returns the address's admin state when it is not ready (in
// service as its health allows), "" when it is.
func adminOf(s *health.Status) string {
	if s.AdminState == adminReady {
		return ""
	}
	return s.AdminState
}

// statusView is one request's answer: the filtered, sorted, paged rows.
type statusView struct {
	json    bool
	now     time.Time
	refresh time.Duration
	all     []health.Status
	sum     statusSummary
	rows    []int // indices into all: the page's rows, in order
	match   int   // rows matching the filter
	hist    *rttSampler

	q, state, sort, order string
	page, pages, perPage  int
	paged                 bool
	query                 url.Values
}

// statusSummary holds the counts over every address.
type statusSummary struct {
	Addresses int `json:"addresses"`
	Upstreams int `json:"upstreams"`
	Up        int `json:"up"`
	Down      int `json:"down"`
	// Pending is addresses whose health is not known: not probed yet
	// (they count as up), or in maintenance or back from it until their
	// first result (out of service).
	Pending int `json:"pending"`
	// Failing is addresses up whose last probe failed.
	Failing int `json:"failing"`
	// AdminStates counts the addresses not ready by admin state (drain,
	// maint); absent when all are ready.
	AdminStates map[string]int `json:"admin_states,omitempty"`
}

// Sort keys of the page, and their column titles.
var statusSortKeys = []struct{ key, title string }{
	{"upstream", "Upstream"},
	{"address", "Address"},
	{"health", "Health"},
	{"rtt", "Last RTT"},
	{"error", "Last error"},
	{"checked", "Checked"},
	{"probes", "Probes"},
	{"admin", "Admin"}, // shown only when an address is not ready
	{"since", "For"},
	{"transitions", "Transitions"},
}

func (p *Page) build(q url.Values, now time.Time, asJSON bool) *statusView {
	v := &statusView{
		json:    asJSON,
		now:     now,
		refresh: time.Duration(p.Refresh),
		all:     p.statuses(),
		hist:    p.history,
		q:       strings.TrimSpace(q.Get("q")),
		state:   q.Get("state"),
		sort:    q.Get("sort"),
		order:   q.Get("order"),
	}
	if v.refresh == 0 {
		v.refresh = DefaultStatusRefresh
	}
	switch v.state {
	case healthUp, healthDown, healthPending, "failing", adminDrain, adminMaint:
	default:
		v.state = ""
	}
	if !slices.ContainsFunc(statusSortKeys, func(k struct{ key, title string }) bool { return k.key == v.sort }) {
		v.sort = "upstream"
	}
	if v.order != "desc" {
		v.order = "asc"
	}
	v.perPage = statusPerPage
	if n, err := strconv.Atoi(q.Get("per_page")); err == nil && n > 0 {
		v.perPage = min(n, statusMaxPerPage)
	}
	v.page = 1
	if n, err := strconv.Atoi(q.Get("page")); err == nil && n > 0 {
		v.page = n
	}
	v.paged = !asJSON || q.Has("page") || q.Has("per_page")

	// summary over everything, and the rows that match
	names := make(map[string]struct{})
	lq := strings.ToLower(v.q)
	rows := make([]int, 0, len(v.all))
	for i := range v.all {
		s := &v.all[i]
		h, _ := healthOf(s)
		v.sum.Addresses++
		names[s.Upstream] = struct{}{}
		switch h {
		case healthUp:
			v.sum.Up++
			if s.LastError != "" {
				v.sum.Failing++
			}
		case healthDown:
			v.sum.Down++
		case healthPending:
			v.sum.Pending++
		}
		if a := adminOf(s); a != "" {
			if v.sum.AdminStates == nil {
				v.sum.AdminStates = make(map[string]int)
			}
			v.sum.AdminStates[a]++
		}
		switch v.state {
		case "":
		case "failing":
			if h != healthUp || s.LastError == "" {
				continue
			}
		case adminDrain, adminMaint:
			if s.AdminState != v.state {
				continue
			}
		default:
			if h != v.state {
				continue
			}
		}
		if lq != "" && !containsFold(s.Upstream, lq) && !containsFold(s.Address, lq) && !containsFold(s.LastError, lq) {
			continue
		}
		rows = append(rows, i)
	}
	v.sum.Upstreams = len(names)
	v.match = len(rows)

	if v.sort != "upstream" || v.order != "asc" { // statuses() come sorted by upstream
		cmp := statusCompare(v.sort)
		desc := v.order == "desc"
		slices.SortStableFunc(rows, func(a, b int) int {
			c := cmp(&v.all[a], &v.all[b])
			if desc {
				return -c
			}
			return c
		})
	}
	v.pages = max(1, (len(rows)+v.perPage-1)/v.perPage)
	if v.paged {
		v.page = min(v.page, v.pages)
		lo := (v.page - 1) * v.perPage
		rows = rows[lo:min(lo+v.perPage, len(rows))]
	}
	v.rows = rows
	v.query = url.Values{}
	for k, val := range map[string]string{"q": v.q, "state": v.state} {
		if val != "" {
			v.query.Set(k, val)
		}
	}
	if v.sort != "upstream" || v.order != "asc" {
		v.query.Set("sort", v.sort)
		v.query.Set("order", v.order)
	}
	if v.perPage != statusPerPage {
		v.query.Set("per_page", strconv.Itoa(v.perPage))
	}
	return v
}

// containsFold reports whether s contains lower (already lower case),
// ignoring ASCII case.
func containsFold(s, lower string) bool {
	if len(lower) > len(s) {
		return false
	}
	for i := 0; i+len(lower) <= len(s); i++ {
		ok := true
		for j := 0; j < len(lower); j++ {
			c := s[i+j]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != lower[j] {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// statusCompare returns the comparison of one sort key; ties keep the
// upstream order.
func statusCompare(key string) func(a, b *health.Status) int {
	rank := map[string]int{healthDown: 0, healthPending: 1, healthUp: 2}
	// ready first, then drain, then maint
	adminRank := map[string]int{"": 0, adminDrain: 1, adminMaint: 2}
	// nil (no result yet) first, then oldest first
	cmpTime := func(a, b *time.Time) int {
		switch {
		case a == nil && b == nil:
			return 0
		case a == nil:
			return -1
		case b == nil:
			return 1
		}
		return a.Compare(*b)
	}
	switch key {
	case "address":
		return func(a, b *health.Status) int { return strings.Compare(a.Address, b.Address) }
	case "health":
		return func(a, b *health.Status) int {
			ha, _ := healthOf(a)
			hb, _ := healthOf(b)
			ra, rb := rank[ha], rank[hb]
			if ra == rb && ra == 2 { // failing before fine
				return boolCmp(a.LastError == "", b.LastError == "")
			}
			return ra - rb
		}
	case "rtt":
		return func(a, b *health.Status) int { return cmpInt(a.LastRTTMicros, b.LastRTTMicros) }
	case "error":
		return func(a, b *health.Status) int { return strings.Compare(a.LastError, b.LastError) }
	case "checked":
		return func(a, b *health.Status) int { return cmpTime(a.CheckedAt, b.CheckedAt) }
	case "probes":
		return func(a, b *health.Status) int { return cmpInt(a.Probes, b.Probes) }
	case "admin":
		return func(a, b *health.Status) int { return adminRank[adminOf(a)] - adminRank[adminOf(b)] }
	case "since":
		return func(a, b *health.Status) int { return cmpTime(a.Since, b.Since) }
	case "transitions":
		return func(a, b *health.Status) int { return cmpInt(a.Transitions, b.Transitions) }
	}
	return func(a, b *health.Status) int { return strings.Compare(a.Upstream, b.Upstream) }
}

func cmpInt[T int64 | uint64 | uint32 | int](a, b T) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func boolCmp(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

// JSON

// statusEntry is one address in the JSON: the admin API's fields, and the
// RTT history.
type statusEntry struct {
	health.Status
	// RTTHistory is the last RTTs sampled, oldest first, in microseconds;
	// null where the address was down or not probed yet.
	RTTHistory rttHistory `json:"rtt_history_us"`
}

// statusDoc is the JSON answer.
type statusDoc struct {
	GeneratedAt time.Time     `json:"generated_at"`
	Summary     statusSummary `json:"summary"`
	// Matching is the number of addresses that match the filter (all of
	// them without one); Page and Pages are set when paged.
	Matching int `json:"matching"`
	Page     int `json:"page,omitempty"`
	Pages    int `json:"pages,omitempty"`
	// RTTSampleEvery is the period of the RTT history's samples.
	RTTSampleEvery string        `json:"rtt_sample_every"`
	Upstreams      []statusEntry `json:"upstreams"`
}

func (v *statusView) writeJSON(w *bufio.Writer) error {
	doc := statusDoc{
		GeneratedAt:    v.now.UTC(),
		Summary:        v.sum,
		Matching:       v.match,
		RTTSampleEvery: v.hist.period().String(),
		Upstreams:      make([]statusEntry, len(v.rows)),
	}
	if v.paged {
		doc.Page, doc.Pages = v.page, v.pages
	}
	keys := make([]byte, 0, 64)
	for i, idx := range v.rows {
		s := &v.all[idx]
		keys = historyKey(keys[:0], s)
		doc.Upstreams[i] = statusEntry{Status: *s, RTTHistory: v.hist.history(keys)}
	}
	return json.NewEncoder(w).Encode(doc)
}

// rttHistory is a list of packed RTTs; 0 is "no sample" (JSON null).
type rttHistory []uint16

// MarshalJSON writes the RTTs in microseconds.
func (h rttHistory) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 2+len(h)*6)
	b = append(b, '[')
	for i, x := range h {
		if i > 0 {
			b = append(b, ',')
		}
		if x == 0 {
			b = append(b, "null"...)
		} else {
			b = strconv.AppendInt(b, unpackRTT(x), 10)
		}
	}
	return append(b, ']'), nil
}

// HTML

//go:embed assets/status.html
var statusHTML string

//go:embed assets/status.css
var statusCSS string

//go:embed assets/status.js
var statusJS string

var statusTemplate = template.Must(template.New("status").Parse(statusHTML))

// statusCSP allows the page's own inline style and script (by hash), and
// nothing else: no other origin, no injected script.
var statusCSP = "default-src 'none'; " +
	"style-src '" + cspHash(statusCSS) + "'; " +
	"script-src '" + cspHash(statusJS) + "'; " +
	"img-src data:; connect-src 'self'; form-action 'self'; " +
	"base-uri 'none'; frame-ancestors 'none'"

func cspHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return "sha256-" + base64.StdEncoding.EncodeToString(h[:])
}

// statusPageData is what the template renders.
type statusPageData struct {
	CSS     template.CSS
	JS      template.JS
	Refresh int // seconds
	Now     string
	Sum     statusSummary
	Counts  []countLink
	Admin   []countLink
	Match   int
	Q       string
	State   string
	States  []option
	PerPage []option
	Hidden  []option // sort and order, kept by the filter form
	Cols    []column
	Rows    []statusRow
	From    int
	To      int
	Page    int
	Pages   int
	Nav     []navLink
	HistFor string // what the sparkline covers

	// ShowAdmin is true when an address (of all, not only of this page)
	// is not ready: then the page has an Admin column.
	ShowAdmin bool
}

type countLink struct {
	Label string
	N     int
	Class string
	Key   string
	Href  string
	On    bool
}

type option struct {
	Value, Label string
	On           bool
}

type column struct {
	Title string
	Href  string
	Arrow string
	Key   string
}

type navLink struct {
	Label, Href, Title string
}

type statusRow struct {
	Upstream, Address    string
	Health, Class        string
	Admin                string // "" when ready
	RTT                  string
	RTTStale             bool // of the last answered probe, not the last one
	Err                  string
	Checked, CheckedAt   string
	Since, SinceAt       string
	Transitions          string // "" before the first result
	Passes, Fails        int
	Probes               uint64
	Interval             string
	Spark, SparkTitle    string
	SparkMax, SparkEmpty bool
}

func (v *statusView) link(set map[string]string) string {
	q := url.Values{}
	for k, vals := range v.query {
		q[k] = vals
	}
	for k, val := range set {
		if val == "" {
			q.Del(k)
		} else {
			q.Set(k, val)
		}
	}
	if len(q) == 0 {
		return "?"
	}
	return "?" + q.Encode()
}

func (v *statusView) pageData() *statusPageData {
	d := &statusPageData{
		CSS:     template.CSS(statusCSS),
		JS:      template.JS(statusJS),
		Refresh: int(v.refresh / time.Second),
		Now:     v.now.UTC().Format("2006-01-02 15:04:05 UTC"),
		Sum:     v.sum,
		Match:   v.match,
		Q:       v.q,
		State:   v.state,
		Page:    v.page,
		Pages:   v.pages,
	}
	count := func(label string, n int, class, state string) countLink {
		return countLink{label, n, class, label, v.link(map[string]string{"state": state, "page": ""}), v.state == state}
	}
	d.Counts = []countLink{
		count("addresses", v.sum.Addresses, "all", ""),
		count("up", v.sum.Up, "up", healthUp),
		count("down", v.sum.Down, "down", healthDown),
		count("failing", v.sum.Failing, "failing", "failing"),
		count("pending", v.sum.Pending, "pending", healthPending),
	}
	adminStates := make([]string, 0, len(v.sum.AdminStates))
	for a := range v.sum.AdminStates {
		adminStates = append(adminStates, a)
	}
	slices.Sort(adminStates)
	for _, a := range adminStates {
		d.Admin = append(d.Admin, countLink{Label: a, N: v.sum.AdminStates[a]})
	}
	for _, s := range []option{{"", "any state", false}, {healthUp, "up", false}, {healthDown, "down", false}, {"failing", "failing", false}, {healthPending, "pending", false},
		{adminDrain, "drain", false}, {adminMaint, "maint", false}} {
		s.On = s.Value == v.state
		d.States = append(d.States, s)
	}
	for _, n := range []int{50, 100, 500, 1000} {
		d.PerPage = append(d.PerPage, option{strconv.Itoa(n), strconv.Itoa(n), n == v.perPage})
	}
	if v.sort != "upstream" || v.order != "asc" {
		d.Hidden = []option{{"sort", v.sort, false}, {"order", v.order, false}}
	}
	d.ShowAdmin = len(v.sum.AdminStates) > 0
	for _, k := range statusSortKeys {
		if k.key == "admin" && !d.ShowAdmin {
			continue
		}
		c := column{Title: k.title, Key: k.key}
		order := "asc"
		if k.key == v.sort {
			if v.order == "asc" {
				c.Arrow, order = "▲", "desc"
			} else {
				c.Arrow = "▼"
			}
		}
		if k.key == "upstream" && order == "asc" {
			c.Href = v.link(map[string]string{"sort": "", "order": "", "page": ""})
		} else {
			c.Href = v.link(map[string]string{"sort": k.key, "order": order, "page": ""})
		}
		d.Cols = append(d.Cols, c)
	}
	if v.match > 0 {
		d.From = (v.page-1)*v.perPage + 1
		d.To = d.From + len(v.rows) - 1
	}
	nav := func(label, title string, page int) {
		if page < 1 || page > v.pages || page == v.page {
			d.Nav = append(d.Nav, navLink{Label: label, Title: title})
			return
		}
		pg := ""
		if page > 1 {
			pg = strconv.Itoa(page)
		}
		d.Nav = append(d.Nav, navLink{label, v.link(map[string]string{"page": pg}), title})
	}
	nav("«", "first page", 1)
	nav("‹", "previous page", v.page-1)
	nav("›", "next page", v.page+1)
	nav("»", "last page", v.pages)
	period := v.hist.period()
	d.HistFor = fmt.Sprintf("last %v, one sample every %v", period*rttHistoryLen, period)

	key := make([]byte, 0, 64)
	d.Rows = make([]statusRow, len(v.rows))
	for i, idx := range v.rows {
		s := &v.all[idx]
		r := &d.Rows[i]
		r.Upstream, r.Address = s.Upstream, s.Address
		r.Class, r.Health = healthOf(s)
		if r.Health == healthUp && s.LastError != "" {
			r.Class = "failing"
			r.Health = fmt.Sprintf("up, failing %d", s.Fails)
		}
		if s.LastRTTMicros > 0 {
			r.RTT = formatMicros(s.LastRTTMicros)
			r.RTTStale = s.LastError != ""
		}
		r.Err = s.LastError
		if s.CheckedAt != nil {
			r.Checked = ago(v.now, *s.CheckedAt)
			r.CheckedAt = s.CheckedAt.UTC().Format(time.RFC3339Nano)
			r.Transitions = strconv.FormatUint(uint64(s.Transitions), 10)
		}
		if s.Since != nil {
			r.Since = strings.TrimSuffix(ago(v.now, *s.Since), " ago")
			r.SinceAt = s.Since.UTC().Format(time.RFC3339Nano)
		}
		r.Admin = adminOf(s)
		r.Passes, r.Fails, r.Probes = s.Passes, s.Fails, s.Probes
		r.Interval = "every " + s.Interval + ", timeout " + s.Timeout
		if s.FastInterval != "" {
			r.Interval += ", fast " + s.FastInterval
		}
		if s.DownInterval != "" {
			r.Interval += ", down " + s.DownInterval
		}
		if s.Jitter != "" {
			r.Interval += ", jitter " + s.Jitter
		}
		key = historyKey(key[:0], s)
		r.Spark, r.SparkTitle, r.SparkEmpty = sparkline(v.hist.history(key))
	}
	return d
}

func formatMicros(us int64) string {
	switch {
	case us < 1000:
		return strconv.FormatInt(us, 10) + " µs"
	case us < 1000000:
		return strconv.FormatFloat(float64(us)/1e3, 'f', 2, 64) + " ms"
	}
	return strconv.FormatFloat(float64(us)/1e6, 'f', 2, 64) + " s"
}

// ago says how long before now t was: to the tenth of a second below
// 10 s, to the second below 1 h, to the minute below 2 days, then in days.
func ago(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case d < 0:
		return "just now"
	case d < 10*time.Second:
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s ago"
	case d < time.Hour:
		return d.Truncate(time.Second).String() + " ago"
	case d < 48*time.Hour:
		return strings.TrimSuffix(d.Truncate(time.Minute).String(), "0s") + " ago"
	}
	return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d ago"
}

// sparkline draws RTTs as an SVG path in a 120x24 box, one point per
// sample, scaled between the smallest and largest; gaps (no sample) break
// the line. It returns the path, a title, and whether it has no point.
func sparkline(h rttHistory) (path, title string, empty bool) {
	const w, ht = 120.0, 24.0
	lo, hi, n := int64(math.MaxInt64), int64(0), 0
	var last int64
	for _, x := range h {
		if x == 0 {
			continue
		}
		us := unpackRTT(x)
		lo, hi, last = min(lo, us), max(hi, us), us
		n++
	}
	if n == 0 {
		return "", "no RTT sampled yet", true
	}
	step := w / float64(rttHistoryLen-1)
	x0 := w - step*float64(len(h)-1) // right-aligned: the newest sample at the right edge
	b := make([]byte, 0, len(h)*12)
	pen := false
	for i, x := range h {
		if x == 0 {
			pen = false
			continue
		}
		y := ht / 2
		if hi > lo {
			y = 1 + (ht-2)*(1-float64(unpackRTT(x)-lo)/float64(hi-lo))
		}
		if pen {
			b = append(b, 'L')
		} else {
			if len(b) > 0 {
				b = append(b, ' ')
			}
			b = append(b, 'M')
		}
		b = strconv.AppendFloat(b, x0+step*float64(i), 'f', 1, 64)
		b = append(b, ' ')
		b = strconv.AppendFloat(b, y, 'f', 1, 64)
		if !pen && (i+1 == len(h) || h[i+1] == 0) { // a lone point: a dot
			b = append(b, "h0.1"...)
		}
		pen = true
	}
	title = fmt.Sprintf("RTT %d samples: min %s, max %s, last %s", n, formatMicros(lo), formatMicros(hi), formatMicros(last))
	return string(b), title, false
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Page)(nil)
	_ caddy.Validator             = (*Page)(nil)
	_ caddy.CleanerUpper          = (*Page)(nil)
	_ caddyhttp.MiddlewareHandler = (*Page)(nil)
	_ caddyfile.Unmarshaler       = (*Page)(nil)
)
