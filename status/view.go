package status

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

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
// health layer's. A ready address shows no admin state (adminOf).
var (
	adminDrain = health.Drain.String()
	adminMaint = health.Maint.String()
)

// healthOf returns the address's state as the page counts and filters it
// (up, down or pending), and the health it shows: pending when never
// probed, unknown when its health is (in maintenance, or back from it
// until its first result).
func healthOf(s *health.Status) (state, shown string) {
	if s.CheckedAt == nil {
		return healthPending, healthPending
	}
	switch h, _ := health.ParseHealth(s.Health); h {
	case health.Up:
		return healthUp, healthUp
	case health.Down:
		return healthDown, healthDown
	default: // unknown
		return healthPending, healthUnknown
	}
}

// adminOf returns the address's admin state when it is not ready (in
// service as its health allows), "" when it is.
func adminOf(s *health.Status) string {
	if a, err := health.ParseAdminState(s.AdminState); err == nil && a == health.Ready {
		return ""
	}
	return s.AdminState
}

// statusView is one request's answer: the filtered, sorted, paged rows.
type statusView struct {
	json    bool
	now     time.Time
	refresh time.Duration
	sum     statusSummary
	rows    []shownRow // the page's rows, in order
	match   int        // rows matching the filter
	hist    *rttSampler
	delays  *CloseDelays // nil: none to show

	q, state, sort, order string
	page, pages, perPage  int
	paged                 bool
	query                 url.Values
}

// shownRow is a row of the page: its Status, built for it alone, and
// whose RTT history it shows.
type shownRow struct {
	st  health.Status
	key histKey
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
		hist:    p.history,
		q:       strings.TrimSpace(q.Get("q")),
		state:   q.Get("state"),
		sort:    q.Get("sort"),
		order:   q.Get("order"),
	}
	if v.refresh == 0 {
		v.refresh = DefaultStatusRefresh
	}
	if p.delays != nil {
		if d, ok := p.delays(); ok {
			v.delays = &d
		}
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

	// summary over everything, and the rows that match: a look at each
	// address's Brief, keeping the rows up to the end of the page in a
	// heap (health.Top); a Status only for the rows shown
	names := make(map[string]struct{})
	lq := strings.ToLower(v.q)
	needErr := lq != "" || v.sort == "error"
	desc := v.order == "desc"
	order := func(a, b entry) int {
		if v.sort == "upstream" && !desc { // the default order (a list's own)
			return compareDefault(&a, &b)
		}
		c := compareKey(v.sort, &a, &b)
		if desc {
			c = -c
		}
		if c == 0 { // ties keep the default order
			c = compareDefault(&a, &b)
		}
		return c
	}
	n, each := p.snapshot()
	keep := n // every row, unpaged
	if v.paged {
		// the rows up to the end of the page; past the last page there
		// can be, up to the end of that one, which holds the last page
		// of the rows that match
		keep = min(v.page, max(1, (n+v.perPage-1)/v.perPage)) * v.perPage
	}
	top := health.NewTop(keep, keep, order)
	var addr [64]byte
	each(func(e *entry) {
		h := e.state()
		v.sum.Addresses++
		if _, ok := names[e.Name]; !ok {
			names[e.Name] = struct{}{}
		}
		switch h {
		case healthUp:
			v.sum.Up++
			if !e.LastOK {
				v.sum.Failing++
			}
		case healthDown:
			v.sum.Down++
		case healthPending:
			v.sum.Pending++
		}
		if a := e.admin(); a != "" {
			if v.sum.AdminStates == nil {
				v.sum.AdminStates = make(map[string]int)
			}
			v.sum.AdminStates[a]++
		}
		switch v.state {
		case "":
		case "failing":
			if h != healthUp || e.LastOK {
				return
			}
		case adminDrain, adminMaint:
			if e.adminState() != v.state {
				return
			}
		default:
			if h != v.state {
				return
			}
		}
		if needErr {
			e.err = e.lastError()
		}
		if lq != "" && !containsFold(e.Name, lq) && !containsFold(e.appendAddr(addr[:0]), lq) && !containsFold(e.err, lq) {
			return
		}
		v.match++
		top.Add(*e)
	})
	rows := top.Sorted()
	v.sum.Upstreams = len(names)
	v.pages = max(1, (v.match+v.perPage-1)/v.perPage)
	if v.paged {
		v.page = min(v.page, v.pages)
		lo := min((v.page-1)*v.perPage, len(rows))
		rows = rows[lo:min(lo+v.perPage, len(rows))]
	}
	v.rows = make([]shownRow, len(rows))
	for i := range rows {
		v.rows[i] = shownRow{rows[i].status(), rows[i].key()}
	}
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
func containsFold[S string | []byte](s S, lower string) bool {
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

// compareKey compares by one sort key; ties are broken by the caller. A
// plain function, not one chosen per key, so that its entries stay on
// the stack.
func compareKey(key string, a, b *entry) int {
	switch key {
	case "address":
		return compareAddr(a, b)
	case "health":
		ra, rb := healthRank(a.state()), healthRank(b.state())
		if ra == rb && ra == 2 { // failing before fine
			return boolCmp(a.LastOK, b.LastOK)
		}
		return ra - rb
	case "rtt":
		return cmpInt(a.LastRTT.Microseconds(), b.LastRTT.Microseconds())
	case "error":
		return strings.Compare(a.err, b.err)
	case "checked": // no result yet (0) first, then oldest first
		return cmpInt(a.CheckedAt, b.CheckedAt)
	case "probes":
		return cmpInt(a.Probes, b.Probes)
	case "admin": // ready first, then drain, then maint
		return cmpInt(a.AdminState, b.AdminState)
	case "since": // none yet (0) first, then oldest first
		return cmpInt(a.Since, b.Since)
	case "transitions":
		return cmpInt(a.Transitions, b.Transitions)
	}
	return strings.Compare(a.Name, b.Name)
}

// healthRank orders the states: down, pending, up.
func healthRank(state string) int {
	switch state {
	case healthDown:
		return 0
	case healthPending:
		return 1
	}
	return 2
}

func cmpInt[T int64 | uint64 | uint32 | int | health.AdminState](a, b T) int {
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
