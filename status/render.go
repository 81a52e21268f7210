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
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

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
	RTTSampleEvery string `json:"rtt_sample_every"`
	// CloseDelay is how soon the engine closed answered probes; absent
	// when no engine in connect mode runs.
	CloseDelay *CloseDelays  `json:"close_delay,omitempty"`
	Upstreams  []statusEntry `json:"upstreams"`
}

func (v *statusView) writeJSON(w *bufio.Writer) error {
	doc := statusDoc{
		GeneratedAt:    v.now.UTC(),
		Summary:        v.sum,
		Matching:       v.match,
		RTTSampleEvery: v.hist.period().String(),
		CloseDelay:     v.delays,
		Upstreams:      make([]statusEntry, len(v.rows)),
	}
	if v.paged {
		doc.Page, doc.Pages = v.page, v.pages
	}
	for i := range v.rows {
		doc.Upstreams[i] = statusEntry{Status: v.rows[i].st, RTTHistory: v.hist.historyOf(v.rows[i].key)}
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

	// Delays is the close delays, formatted; nil when there are none.
	Delays *delaysShown

	// ShowAdmin is true when an address (of all, not only of this page)
	// is not ready: then the page has an Admin column.
	ShowAdmin bool
}

// delaysShown is the close delays as the page shows them.
type delaysShown struct {
	P99, Worst string
	Title      string
	Late       bool // the worst is past closeDelayLate
}

// closeDelayLate is the worst close delay the page marks as late: a
// quarter of the kernel's 200 ms, past which a busier moment turns
// probes into connections.
const closeDelayLate = 50.0 // ms

// formatMs shows a delay in ms: below 1 ms as it is (to the us, like
// the bucket bounds 0.01, 0.025, 0.25), below 10 to a tenth, above in
// whole ms.
func formatMs(ms float64) string {
	if ms < 1 {
		return strconv.FormatFloat(ms, 'f', -1, 64) + " ms"
	}
	if ms < 10 {
		return strconv.FormatFloat(ms, 'f', 1, 64) + " ms"
	}
	return strconv.FormatFloat(ms, 'f', 0, 64) + " ms"
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
	if c := v.delays; c != nil {
		d.Delays = &delaysShown{
			P99: formatMs(c.P99Ms), Worst: formatMs(c.WorstMs), Late: c.WorstMs > closeDelayLate,
			Title: fmt.Sprintf("SYN-ACK to close, over %d answered probes since the engine started: p50 %s, p99 %s, p99.9 %s, worst %s; at 200 ms a probe becomes a connection the backend accepts",
				c.Count, formatMs(c.P50Ms), formatMs(c.P99Ms), formatMs(c.P999Ms), formatMs(c.WorstMs)),
		}
	}
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

	d.Rows = make([]statusRow, len(v.rows))
	for i := range v.rows {
		s := &v.rows[i].st
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
		r.Spark, r.SparkTitle, r.SparkEmpty = sparkline(v.hist.historyOf(v.rows[i].key))
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
