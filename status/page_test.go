package status

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/standard" // basic_auth and reverse_proxy, to adapt Caddyfiles

	"github.com/caddy-shaker/caddy-shaker/health"
)

var statusEpoch = time.Date(2026, 5, 4, 12, 0, 0, 0, time.UTC)

// fakeStatuses returns n addresses in upstream order, all ready, every
// tenth down (refused), every 25th (of the others) up but failing, the
// last one not probed yet.
func fakeStatuses(n int) []health.Status {
	out := make([]health.Status, n)
	for i := range out {
		t := statusEpoch.Add(-time.Duration(i%7) * time.Second)
		since := statusEpoch.Add(-time.Duration(i%50) * time.Minute)
		s := health.Status{
			Upstream:      fmt.Sprintf("app%03d.internal:8080", i/10),
			Address:       fmt.Sprintf("10.%d.%d.%d:8080", i>>16&255, i>>8&255, i&255),
			Healthy:       true,
			Health:        "up",
			AdminState:    "ready",
			Since:         &since,
			Transitions:   uint32(i % 4),
			LastRTTMicros: int64(100 + i%400),
			CheckedAt:     &t,
			Passes:        5,
			Probes:        uint64(1000 + i),
			Interval:      "2s",
			Timeout:       "1s",
		}
		switch {
		case i == n-1 && n > 1:
			s.Health, s.Since, s.Transitions = "unknown", nil, 0
			s.CheckedAt, s.LastRTTMicros, s.Probes, s.Passes = nil, 0, 0, 0
		case i%10 == 3:
			s.Healthy, s.Health, s.LastError, s.Passes, s.Fails = false, "down", "refused", 0, 7
		case i%25 == 1:
			s.LastError, s.Passes, s.Fails = "timeout after 1s", 0, 1
		}
		out[i] = s
	}
	return out
}

// testPage returns a page over list with a sampler (not running) that has
// recorded it samples times.
func testPage(list []health.Status, samples int) *Page {
	h := &rttSampler{every: DefaultRTTSampleEvery, rings: make(map[histKey]*rttRing)}
	for range samples {
		h.record(list)
	}
	return &Page{
		Refresh:  caddy.Duration(DefaultStatusRefresh),
		statuses: func() []health.Status { return list },
		history:  h,
	}
}

func serveStatus(t testing.TB, p *Page, method, target, accept string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, target, nil)
	if accept != "" {
		r.Header.Set("Accept", accept)
	}
	w := httptest.NewRecorder()
	if err := p.ServeHTTP(w, r, nil); err != nil {
		var he caddyhttp.HandlerError
		if ok := asHandlerError(err, &he); ok {
			w.Code = he.StatusCode
			return w
		}
		t.Fatal(err)
	}
	return w
}

func asHandlerError(err error, he *caddyhttp.HandlerError) bool {
	e, ok := err.(caddyhttp.HandlerError)
	if ok {
		*he = e
	}
	return ok
}

type statusJSONDoc struct {
	Summary   statusSummary    `json:"summary"`
	Matching  int              `json:"matching"`
	Page      int              `json:"page"`
	Pages     int              `json:"pages"`
	Upstreams []map[string]any `json:"upstreams"`
}

func decodeStatusJSON(t testing.TB, w *httptest.ResponseRecorder) statusJSONDoc {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q, want application/json; body %.200s", ct, w.Body.String())
	}
	var doc statusJSONDoc
	if err := json.Unmarshal(w.Body.Bytes(), &doc); err != nil {
		t.Fatalf("%v: %.300s", err, w.Body.String())
	}
	return doc
}

// TestStatusJSONShape checks that every address has every field of GET
// /shaker/upstreams, with the same values, plus its RTT history, and the
// summary counts.
func TestStatusJSONShape(t *testing.T) {
	list := fakeStatuses(30)
	p := testPage(list, 3)
	w := serveStatus(t, p, "GET", "/shaker", "application/json")
	if w.Code != 200 {
		t.Fatalf("status %d", w.Code)
	}
	if v := w.Header().Get("Vary"); v != "Accept" {
		t.Errorf("Vary %q, want Accept", v)
	}
	doc := decodeStatusJSON(t, w)
	if len(doc.Upstreams) != len(list) {
		t.Fatalf("%d upstreams, want %d", len(doc.Upstreams), len(list))
	}
	// what the admin API encodes
	admin, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	var want []map[string]any
	if err := json.Unmarshal(admin, &want); err != nil {
		t.Fatal(err)
	}
	for i, got := range doc.Upstreams {
		for _, k := range []string{"health", "admin_state", "since", "transitions"} {
			if _, ok := got[k]; !ok {
				t.Errorf("upstreams[%d] has no %s: %v", i, k, got)
			}
		}
		for k, v := range want[i] {
			if !reflect.DeepEqual(got[k], v) {
				t.Errorf("upstreams[%d].%s = %v, want %v", i, k, got[k], v)
			}
		}
		hist, ok := got["rtt_history_us"].([]any)
		if !ok || len(hist) != 3 {
			t.Errorf("upstreams[%d].rtt_history_us = %v, want 3 samples", i, got["rtt_history_us"])
			continue
		}
		for _, h := range hist {
			if list[i].Healthy && list[i].LastError == "" && list[i].CheckedAt != nil {
				if h != float64(list[i].LastRTTMicros) {
					t.Errorf("upstreams[%d]: history %v, want %d", i, hist, list[i].LastRTTMicros)
				}
			} else if h != nil {
				t.Errorf("upstreams[%d] (down, failing or pending): history %v, want nulls", i, hist)
			}
		}
	}
	// 30 addresses: down 3, 13, 23; failing 1 and 26 (i%25 == 1); pending 29
	want2 := statusSummary{Addresses: 30, Upstreams: 3, Up: 26, Down: 3, Pending: 1, Failing: 2}
	if !reflect.DeepEqual(doc.Summary, want2) {
		t.Errorf("summary %+v, want %+v", doc.Summary, want2)
	}
	if doc.Matching != 30 || doc.Page != 0 {
		t.Errorf("matching %d page %d, want 30 and no paging", doc.Matching, doc.Page)
	}

	// an empty registry: an empty list, not null
	w = serveStatus(t, testPage(nil, 0), "GET", "/", "application/json")
	if !strings.Contains(w.Body.String(), `"upstreams":[]`) {
		t.Errorf("empty: %s", w.Body.String())
	}
}

// TestStatusEscaping feeds hostile upstream names and errors (upstream
// names can come from DNS) and a hostile query, and checks that nothing
// gets through as markup, that the page's only script and style are its
// own, and that the CSP's hashes match them.
func TestStatusEscaping(t *testing.T) {
	list := fakeStatuses(5)
	list[0].Upstream = `<script>alert(1)</script>:80`
	list[1].Upstream = `"><img src=x onerror=alert(2)>`
	list[2].Upstream = `x' onmouseover='alert(3)`
	list[3].LastError = `</td><script>alert(4)</script>`
	list[4].Upstream = "javascript:alert(5)//\u2028"
	p := testPage(list, 2)

	w := serveStatus(t, p, "GET", `/s?q=%3C%2Fscript%3E%3Cscript%3Ealert(6)%3C%2Fscript%3E&state=%22%3E%3Cb%3E`, "text/html")
	body := w.Body.String()
	for _, bad := range []string{"<script>alert", "<img", "onerror=alert", "' onmouseover='", "</td><script>", `"><b>`} {
		if strings.Contains(body, bad) {
			t.Errorf("page contains %q unescaped", bad)
		}
	}
	if n := strings.Count(body, "<script"); n != 1 {
		t.Errorf("%d <script elements, want only the page's own", n)
	}
	// the filter matched nothing; try without it to see every name
	w = serveStatus(t, p, "GET", "/s", "")
	body = w.Body.String()
	for _, want := range []string{
		"&lt;script&gt;alert(1)&lt;/script&gt;:80",
		"&#34;&gt;&lt;img src=x onerror=alert(2)&gt;",
		"x&#39; onmouseover=&#39;alert(3)",
		"&lt;/td&gt;&lt;script&gt;alert(4)&lt;/script&gt;",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks the escaped %q", want)
		}
	}
	for _, bad := range []string{"<script>alert", "<img", "' onmouseover='", "</td><script>"} {
		if strings.Contains(body, bad) {
			t.Errorf("page contains %q unescaped", bad)
		}
	}
	csp := w.Header().Get("Content-Security-Policy")
	for _, tag := range []string{"script", "style"} {
		open, close := "<"+tag+">", "</"+tag+">"
		i, j := strings.Index(body, open), strings.Index(body, close)
		if i < 0 || j < i {
			t.Fatalf("no %s element", tag)
		}
		h := sha256.Sum256([]byte(body[i+len(open) : j]))
		if want := "'sha256-" + base64.StdEncoding.EncodeToString(h[:]) + "'"; !strings.Contains(csp, tag+"-src "+want) {
			t.Errorf("CSP %q does not allow the page's %s (%s)", csp, tag, want)
		}
	}
	if !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("CSP %q", csp)
	}
	// JSON: no raw markup characters, and the names come back as they are
	w = serveStatus(t, p, "GET", "/s", "application/json")
	if strings.ContainsAny(w.Body.String(), "<>") {
		t.Errorf("JSON has raw < or >: %.300s", w.Body.String())
	}
	doc := decodeStatusJSON(t, w)
	if doc.Upstreams[0]["upstream"] != list[0].Upstream || doc.Upstreams[3]["last_error"] != list[3].LastError {
		t.Errorf("JSON changed the names: %v", doc.Upstreams[0])
	}
	if w.Header().Get("X-Content-Type-Options") != "nosniff" {
		t.Error("no X-Content-Type-Options: nosniff")
	}
}

func TestStatusAccept(t *testing.T) {
	for _, tc := range []struct {
		accept string
		json   bool
	}{
		{"", false},
		{"*/*", false},
		{"text/html", false},
		{"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", false},
		{"application/json", true},
		{"Application/JSON", true},
		{"application/json; charset=utf-8", true},
		{"application/json, text/plain, */*", true},
		{"application/*", true},
		{"application/json;q=0.5, text/html", false},
		{"text/html;q=0.5, application/json", true},
		{"application/json;q=0.8, */*;q=0.8", true},
		{"application/json;q=0", false},
		{"application/json;q=0, */*", false},
		{"application/json;q=bogus", false},
		{"text/*, application/json;q=0.9", false},
		{"garbage;;;, application/json", true},
	} {
		if got := wantsJSON([]string{tc.accept}); got != tc.json {
			t.Errorf("Accept %q: JSON %v, want %v", tc.accept, got, tc.json)
		}
	}
	if !wantsJSON([]string{"text/html;q=0.1", "application/json"}) {
		t.Error("two Accept headers: not merged")
	}

	p := testPage(fakeStatuses(3), 1)
	for accept, ct := range map[string]string{
		"application/json": "application/json",
		"":                 "text/html; charset=utf-8",
		"*/*":              "text/html; charset=utf-8",
	} {
		w := serveStatus(t, p, "GET", "/", accept)
		if got := w.Header().Get("Content-Type"); got != ct {
			t.Errorf("Accept %q: Content-Type %q, want %q", accept, got, ct)
		}
	}
	w := serveStatus(t, p, "POST", "/", "")
	if w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("POST: %d, Allow %q; want 405, GET, HEAD", w.Code, w.Header().Get("Allow"))
	}
	if w := serveStatus(t, p, "HEAD", "/", ""); w.Code != 200 {
		t.Errorf("HEAD: %d", w.Code)
	}
}

// rowAddresses returns the addresses of the page's rows, in order.
func rowAddresses(body string) []string {
	var out []string
	for _, part := range strings.Split(body, `<td class="addr"`)[1:] {
		i := strings.IndexByte(part, '>')
		j := strings.Index(part, "</td>")
		out = append(out, part[i+1:j])
	}
	return out
}

func TestStatusPagingSortingFiltering(t *testing.T) {
	list := fakeStatuses(250)
	p := testPage(list, 1)
	page := func(q string) (string, []string) {
		t.Helper()
		w := serveStatus(t, p, "GET", "/shaker?"+q, "")
		if w.Code != 200 {
			t.Fatalf("%s: %d", q, w.Code)
		}
		return w.Body.String(), rowAddresses(w.Body.String())
	}
	body, rows := page("")
	if len(rows) != 100 || rows[0] != list[0].Address || rows[99] != list[99].Address {
		t.Errorf("first page: %d rows from %v", len(rows), rows[:1])
	}
	if !strings.Contains(body, "Rows 1–100 of 250") || !strings.Contains(body, "page 1 of 3") {
		t.Errorf("first page: no pager text")
	}
	if _, rows = page("page=3"); len(rows) != 50 || rows[0] != list[200].Address {
		t.Errorf("page 3: %d rows", len(rows))
	}
	if _, rows = page("page=99"); len(rows) != 50 {
		t.Errorf("page 99: %d rows, want the last page's 50", len(rows))
	}
	if _, rows = page("per_page=100000"); len(rows) != 250 {
		t.Errorf("per_page=100000: %d rows, want all 250 (capped at 1000)", len(rows))
	}
	body, rows = page("state=down")
	if len(rows) != 25 {
		t.Errorf("state=down: %d rows, want 25", len(rows))
	}
	if strings.Contains(body, `class="badge up"`) {
		t.Error("state=down shows an up address")
	}
	if _, rows = page("state=pending"); len(rows) != 1 || rows[0] != list[249].Address {
		t.Errorf("state=pending: %v", rows)
	}
	if _, rows = page("q=APP007"); len(rows) != 10 || rows[0] != list[70].Address {
		t.Errorf("q=APP007: %v", rows)
	}
	if _, rows = page("q=timeout"); len(rows) != 10 { // i%25 == 1: 1, 26, ..., 226, none of them down (i%10 == 1 or 6)
		t.Errorf("q=timeout: %d rows, want 10", len(rows))
	}
	// sort by RTT, largest first: i%400 largest at i=249 (pending: 0) ... so 248
	if _, rows = page("sort=rtt&order=desc"); rows[0] != list[248].Address {
		t.Errorf("sort=rtt desc: first %s, want %s", rows[0], list[248].Address)
	}
	// sort by health: down first, in upstream order
	if _, rows = page("sort=health"); rows[0] != list[3].Address || rows[24] != list[243].Address || rows[25] != list[249].Address {
		t.Errorf("sort=health: %v", rows[:27])
	}
	// links keep the filter, and the values are query-escaped
	body, _ = page("q=app&state=up&sort=probes&order=desc")
	if !strings.Contains(body, `<a href="?order=desc&amp;page=2&amp;q=app&amp;sort=probes&amp;state=up"`) {
		t.Errorf("next-page link does not keep the filter and the order")
	}
	body, _ = page("q=a%26b&state=up&sort=probes&order=desc")
	if !strings.Contains(body, `<a href="?order=asc&amp;q=a%26b&amp;sort=probes&amp;state=up"`) {
		t.Errorf("the sorted column's link does not keep the filter or turn the order")
	}
	// JSON: all by default, paged when asked
	doc := decodeStatusJSON(t, serveStatus(t, p, "GET", "/", "application/json"))
	if len(doc.Upstreams) != 250 {
		t.Errorf("JSON: %d upstreams", len(doc.Upstreams))
	}
	doc = decodeStatusJSON(t, serveStatus(t, p, "GET", "/?state=down&per_page=10&page=2", "application/json"))
	if len(doc.Upstreams) != 10 || doc.Matching != 25 || doc.Page != 2 || doc.Pages != 3 || doc.Upstreams[0]["address"] != list[103].Address {
		t.Errorf("JSON paged: %d upstreams, matching %d, page %d of %d", len(doc.Upstreams), doc.Matching, doc.Page, doc.Pages)
	}
}

// statusRowOf returns the HTML of the page's row of address, "" if none.
func statusRowOf(body, address string) string {
	for _, row := range strings.Split(body, "<tr class=")[1:] {
		row, _, _ = strings.Cut(row, "</tr>")
		if strings.Contains(row, `<td class="addr" title="`) && strings.Contains(row, ">"+address+"</td>") {
			return "<tr class=" + row
		}
	}
	return ""
}

// renderStatusAt renders the page for the query as of now.
func renderStatusAt(t testing.TB, p *Page, query string, now time.Time) string {
	t.Helper()
	q, err := url.ParseQuery(query)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := statusTemplate.Execute(&b, p.build(q, now, false).pageData()); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// TestStatusAdminSinceTransitions checks the admin state, since and
// transitions of each address on the page: an Admin column, with a badge
// for the addresses not ready, only when there are some; a maint
// address's health unknown and counted as pending; how long each address
// has been in its health state, and its number of transitions once it has
// a result; the summary's counts of admin states, in HTML and JSON.
func TestStatusAdminSinceTransitions(t *testing.T) {
	at := func(d time.Duration) *time.Time { x := statusEpoch.Add(-d); return &x }
	base := func(i int) health.Status {
		return health.Status{
			Upstream: "app.internal:8080", Address: fmt.Sprintf("10.0.0.%d:8080", i+1),
			Healthy: true, Health: "up", AdminState: "ready",
			Since: at(time.Hour), Transitions: 1, CheckedAt: at(time.Second),
			LastRTTMicros: 100, Passes: 3, Probes: 10, Interval: "2s", Timeout: "1s",
		}
	}
	list := []health.Status{base(0), base(1), base(2), base(3), base(4)}
	// drained: up, its health tracked
	list[1].AdminState, list[1].Since, list[1].Transitions = "drain", at(90*time.Second), 3
	// in maintenance: no probes, health unknown, out of service
	list[2].AdminState, list[2].Health, list[2].Healthy = "maint", "unknown", false
	list[2].Since, list[2].Transitions = at(5*time.Minute), 7
	// ready, down
	list[3].Health, list[3].Healthy, list[3].LastError, list[3].Fails, list[3].Passes = "down", false, "refused", 4, 0
	list[3].Since, list[3].Transitions = at(20*time.Second), 2
	// never probed
	list[4].Health, list[4].Since, list[4].Transitions, list[4].CheckedAt = "unknown", nil, 0, nil
	list[4].LastRTTMicros, list[4].Probes, list[4].Passes = 0, 0, 0
	p := testPage(list, 0)

	body := renderStatusAt(t, p, "", statusEpoch)
	if !strings.Contains(body, `<th data-col="admin"><a href="?order=asc&amp;sort=admin" rel="nofollow">Admin</a></th>`) {
		t.Error("no Admin column with addresses not ready")
	}
	for _, col := range []string{`<th data-col="since">`, `<th data-col="transitions">`} {
		if !strings.Contains(body, col) {
			t.Errorf("no %s column", col)
		}
	}
	if n := strings.Count(body, `<span class="badge admin">`); n != 2 {
		t.Errorf("%d admin badges, want 2 (drain and maint)", n)
	}
	for i, tc := range []struct {
		class string   // the row's
		has   []string // cells
	}{
		0: {"up", []string{
			`<td class="admin"></td>`,
			`<span class="badge up">up</span>`,
			`<time datetime="2026-05-04T11:00:00Z" title="since 2026-05-04T11:00:00Z">1h0m</time>`,
			`<td class="num trans">1</td>`}},
		1: {"up", []string{
			`<td class="admin"><span class="badge admin">drain</span></td>`,
			`<span class="badge up">up</span>`,
			`<td class="since"><time datetime="2026-05-04T11:58:30Z" title="since 2026-05-04T11:58:30Z">1m30s</time></td>`,
			`<td class="num trans">3</td>`}},
		2: {"pending", []string{
			`<td class="admin"><span class="badge admin">maint</span></td>`,
			`<span class="badge pending">unknown</span>`,
			`<time datetime="2026-05-04T11:55:00Z" title="since 2026-05-04T11:55:00Z">5m0s</time>`,
			`<td class="num trans">7</td>`}},
		3: {"down", []string{
			`<td class="admin"></td>`,
			`<span class="badge down">down</span>`,
			`title="since 2026-05-04T11:59:40Z">20s</time>`,
			`<td class="num trans">2</td>`}},
		4: {"pending", []string{
			`<td class="admin"></td>`,
			`<span class="badge pending">pending</span>`,
			`<td class="since"></td>`,
			`<td class="num trans"></td>`}}, // no result, nothing to count
	} {
		row := statusRowOf(body, list[i].Address)
		if !strings.HasPrefix(row, `<tr class="`+tc.class+`">`) {
			t.Errorf("row %d (%s): not of class %q: %s", i, list[i].AdminState, tc.class, row)
		}
		for _, want := range tc.has {
			if !strings.Contains(row, want) {
				t.Errorf("row %d (%s): no %s in\n%s", i, list[i].AdminState, want, row)
			}
		}
	}
	// counts: the maint address is pending, like the one not probed yet
	for key, want := range map[string]int{"addresses": 5, "up": 2, "down": 1, "pending": 2, "failing": 0} {
		m := regexp.MustCompile(`data-count="` + key + `"><span class="n">(\d+)</span>`).FindStringSubmatch(body)
		if m == nil || m[1] != strconv.Itoa(want) {
			t.Errorf("count %s: %v, want %d", key, m, want)
		}
	}
	for _, want := range []string{
		`<span class="count admin"><span class="n">1</span> drain</span>`,
		`<span class="count admin"><span class="n">1</span> maint</span>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("no %s in the summary", want)
		}
	}
	if strings.Contains(body, "> ready</span>") {
		t.Error("the summary counts ready addresses")
	}
	// the state filter: pending is the unknown and the never probed
	if rows := rowAddresses(serveStatus(t, p, "GET", "/shaker?state=pending", "").Body.String()); !slices.Equal(rows, []string{list[2].Address, list[4].Address}) {
		t.Errorf("state=pending: %v", rows)
	}
	// and by admin state: drain and maint, in HTML and JSON, and offered
	for state, want := range map[string]string{"drain": list[1].Address, "maint": list[2].Address} {
		body := serveStatus(t, p, "GET", "/shaker?state="+state, "").Body.String()
		if rows := rowAddresses(body); !slices.Equal(rows, []string{want}) {
			t.Errorf("state=%s: %v, want [%s]", state, rows, want)
		}
		if opt := `<option value="` + state + `" selected>` + state + `</option>`; !strings.Contains(body, opt) {
			t.Errorf("state=%s: no %s in the state filter", state, opt)
		}
		doc := decodeStatusJSON(t, serveStatus(t, p, "GET", "/shaker?state="+state, "application/json"))
		if len(doc.Upstreams) != 1 || doc.Upstreams[0]["address"] != want {
			t.Errorf("JSON state=%s: %+v, want only %s", state, doc.Upstreams, want)
		}
	}
	// sorted by admin state, maint first; by since, the longest first
	if rows := rowAddresses(serveStatus(t, p, "GET", "/shaker?sort=admin&order=desc", "").Body.String()); len(rows) != 5 || rows[0] != list[2].Address || rows[1] != list[1].Address {
		t.Errorf("sort=admin desc: %v", rows)
	}
	if rows := rowAddresses(serveStatus(t, p, "GET", "/shaker?sort=since", "").Body.String()); !slices.Equal(rows, []string{list[4].Address, list[0].Address, list[2].Address, list[1].Address, list[3].Address}) {
		t.Errorf("sort=since: %v", rows)
	}
	if rows := rowAddresses(serveStatus(t, p, "GET", "/shaker?sort=transitions&order=desc", "").Body.String()); len(rows) != 5 || rows[0] != list[2].Address {
		t.Errorf("sort=transitions desc: %v", rows)
	}

	// JSON: the fields as they are, and the counts
	doc := decodeStatusJSON(t, serveStatus(t, p, "GET", "/shaker", "application/json"))
	want := statusSummary{Addresses: 5, Upstreams: 1, Up: 2, Down: 1, Pending: 2, AdminStates: map[string]int{"drain": 1, "maint": 1}}
	if !reflect.DeepEqual(doc.Summary, want) {
		t.Errorf("JSON summary %+v, want %+v", doc.Summary, want)
	}
	if u := doc.Upstreams[2]; u["admin_state"] != "maint" || u["health"] != "unknown" || u["since"] != "2026-05-04T11:55:00Z" || u["transitions"] != 7.0 {
		t.Errorf("JSON of the maint address: %v", u)
	}

	// all ready: no Admin column, no admin count; For and Transitions stay
	for i := range list {
		list[i].AdminState = "ready"
	}
	list[2].Health, list[2].Healthy = "up", true
	body = serveStatus(t, p, "GET", "/shaker", "").Body.String()
	for _, bad := range []string{`data-col="admin"`, `class="admin"`, `badge admin`, `count admin`, ">Admin<"} {
		if strings.Contains(body, bad) {
			t.Errorf("all ready: the page has %s", bad)
		}
	}
	for _, want := range []string{`<th data-col="since">`, `<th data-col="transitions">`, `<td class="num trans">7</td>`} {
		if !strings.Contains(body, want) {
			t.Errorf("all ready: no %s", want)
		}
	}
	if doc := decodeStatusJSON(t, serveStatus(t, p, "GET", "/shaker", "application/json")); doc.Summary.AdminStates != nil {
		t.Errorf("all ready: JSON admin_states %v", doc.Summary.AdminStates)
	}
	if w := serveStatus(t, p, "GET", "/shaker", "application/json"); strings.Contains(w.Body.String(), `"admin_states"`) {
		t.Error("all ready: JSON has admin_states")
	}
}

func TestStatusCaddyfile(t *testing.T) {
	adapt := func(src string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
		return string(out), err
	}
	// outside a route block, with and without a matcher, and as the README
	// shows it: behind basic_auth in a handle block
	for _, tc := range []struct{ src, want string }{
		{":8080 {\n\tshaker_status\n}\n", `{"handler":"shaker_status"}`},
		{":8080 {\n\tshaker_status /status*\n\trespond ok\n}\n", `"match":[{"path":["/status*"]}],"handle":[{"handler":"shaker_status"}]`},
		{":8080 {\n\tshaker_status {\n\t\trefresh 30s\n\t}\n}\n", `{"handler":"shaker_status","refresh":30000000000}`},
		{":8080 {\n\thandle /shaker* {\n\t\tbasic_auth {\n\t\t\tadmin $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG\n\t\t}\n\t\tshaker_status\n\t}\n\treverse_proxy 127.0.0.1:9\n}\n",
			`"handler":"authentication"`},
		{":8080 {\n\t@ops {\n\t\tpath /shaker*\n\t\tremote_ip 127.0.0.1/8 10.0.0.0/8\n\t}\n\tshaker_status @ops\n}\n",
			`"remote_ip":{"ranges":["127.0.0.1/8","10.0.0.0/8"]}}],"handle":[{"handler":"shaker_status"}]`},
	} {
		out, err := adapt(tc.src)
		if err != nil {
			t.Errorf("%q: %v", tc.src, err)
			continue
		}
		if !strings.Contains(out, tc.want) {
			t.Errorf("%q: adapted to %s, want %s in it", tc.src, out, tc.want)
		}
	}
	// the order: after basic_auth, before reverse_proxy
	out, err := adapt(":8080 {\n\treverse_proxy 127.0.0.1:9\n\tshaker_status /s\n\tbasic_auth /s {\n\t\tadmin $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG\n\t}\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	a, s, r := strings.Index(out, `"authentication"`), strings.Index(out, `"shaker_status"`), strings.Index(out, `"reverse_proxy"`)
	if !(a < s && s < r) {
		t.Errorf("order: basic_auth %d, shaker_status %d, reverse_proxy %d in %s", a, s, r, out)
	}

	for _, tc := range []struct{ src, want string }{
		{"shaker_status foo", `takes no arguments, got "foo"`},
		{"shaker_status /s extra", `takes no arguments, got "extra"`},
		{"shaker_status {\n\t\tbogus\n\t}", `unrecognized shaker_status subdirective "bogus"`},
		{"shaker_status {\n\t\trefresh\n\t}", "wrong argument count"},
		{"shaker_status {\n\t\trefresh 1s 2s\n\t}", "wrong argument count"},
		{"shaker_status {\n\t\trefresh 10ms\n\t}", "refresh 10ms: must be from 1s to 1h0m0s"},
		{"shaker_status {\n\t\trefresh soon\n\t}", `refresh "soon"`},
	} {
		_, err := adapt(":8080 {\n\t" + tc.src + "\n}\n")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.src, err, tc.want)
		}
	}
	// JSON: refresh out of range
	p := &Page{Refresh: caddy.Duration(time.Millisecond)}
	if err := p.Validate(); err == nil {
		t.Error("refresh 1ms accepted")
	}
}

func TestAgo(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:                                "just now",
		1500 * time.Millisecond:                     "1.5s ago",
		75*time.Second + time.Millisecond:           "1m15s ago",
		3*time.Hour + 5*time.Minute + 7*time.Second: "3h5m ago",
		200 * 24 * time.Hour:                        "200d ago",
	} {
		if got := ago(statusEpoch, statusEpoch.Add(-d)); got != want {
			t.Errorf("ago(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestRTTPacking(t *testing.T) {
	prev := uint16(0)
	for _, us := range []int64{-5, 0, 1, 2, 100, 2047, 2048, 2049, 4095, 4096, 123456, 999999, 1 << 30, 1 << 40, 1 << 62} {
		x := packRTT(us)
		if x == 0 || x < prev {
			t.Errorf("packRTT(%d) = %d: zero or not monotonic", us, x)
		}
		prev = x
		got := unpackRTT(x)
		switch {
		case us < 1:
			if got != 1 {
				t.Errorf("%d: %d", us, got)
			}
		case us < 2048:
			if got != us {
				t.Errorf("%d: %d, want exact", us, got)
			}
		case us < 1<<41:
			if got > us || float64(us-got) > float64(us)/1024 {
				t.Errorf("%d: %d, error above 0.1%%", us, got)
			}
		default:
			if x != 0xffff {
				t.Errorf("%d: %d, want the largest", us, x)
			}
		}
	}
}

func TestRTTSampler(t *testing.T) {
	list := fakeStatuses(4) // 0 up, 1 up but failing, 2 up, 3 pending
	s := &rttSampler{every: time.Hour, rings: make(map[histKey]*rttRing)}
	key := func(i int) []byte { return historyKey(nil, &list[i]) }
	for i := range rttHistoryLen + 5 {
		list[0].LastRTTMicros = int64(i + 1)
		list[2].Healthy = i%2 == 0 // down every other sample
		s.record(list)
	}
	h0 := s.history(key(0))
	if len(h0) != rttHistoryLen || unpackRTT(h0[0]) != 6 || unpackRTT(h0[rttHistoryLen-1]) != rttHistoryLen+5 {
		t.Errorf("ring: len %d, oldest %d, newest %d; want %d from 6 to %d", len(h0), unpackRTT(h0[0]), unpackRTT(h0[len(h0)-1]), rttHistoryLen, rttHistoryLen+5)
	}
	h2 := s.history(key(2))
	if h2[len(h2)-1] == 0 || h2[len(h2)-2] != 0 {
		t.Errorf("down samples are not gaps: %v", h2[len(h2)-4:])
	}
	if h := s.history(key(1)); h[len(h)-1] != 0 {
		t.Errorf("failing address has an RTT: %v", h)
	}
	if h := s.history(key(3)); h[len(h)-1] != 0 {
		t.Errorf("pending address has an RTT: %v", h)
	}
	// an address with other settings is another history
	other := list[0]
	other.Interval = "5s"
	if s.history(historyKey(nil, &other)) != nil {
		t.Error("history shared between settings")
	}
	// gone addresses are dropped
	s.record(list[:1])
	if len(s.rings) != 1 || s.history(key(1)) != nil {
		t.Errorf("%d histories after 3 addresses went away, want 1", len(s.rings))
	}

	// reference counting: the goroutine runs while referenced and stops
	// at the last release; the history survives a reload (acquire, then
	// release of the old config)
	g := &rttSampler{every: time.Millisecond}
	calls := make(chan struct{}, 1)
	src := func(s *rttSampler) {
		select {
		case calls <- struct{}{}:
		default:
		}
		s.record(list)
	}
	g.acquire(src)
	<-calls
	<-calls // sampling repeats
	g.acquire(src)
	g.release()
	if g.history(key(0)) == nil {
		t.Error("history lost while still referenced")
	}
	done := g.done
	g.release()
	select {
	case <-done:
	default:
		t.Error("sampler goroutine still running after the last release")
	}
	if g.rings != nil || g.history(key(0)) != nil {
		t.Error("history kept after the last release")
	}
}

// Benchmarks. The page's target: 10,000 addresses in well under a second
// of server time per request.

func benchStatus(b *testing.B, target, accept string) { benchStatusAt(b, 10000, target, accept) }

// benchStatusAt serves target over a registry of n checkers (no engine;
// testRegistry), each with a full RTT history (up to rttHistoryMax).
func benchStatusAt(b *testing.B, n int, target, accept string) {
	r := benchRegistry(b, n)
	p := testPage(nil, 0)
	p.statuses, p.checkers = nil, r.Checkers
	for range rttHistoryLen {
		p.history.recordCheckers(r.Checkers())
	}
	req := httptest.NewRequest("GET", target, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	w := &discardWriter{h: make(http.Header)}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := p.ServeHTTP(w, req, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(w.n)/float64(b.N), "bytes/page")
}

// benchRegistries are the benchmarks' registries, by size: built once.
var benchRegistries = map[int]*health.Registry{}

func benchRegistry(b *testing.B, n int) *health.Registry {
	if r := benchRegistries[n]; r != nil {
		return r
	}
	r := testRegistry(b, n, true)
	benchRegistries[n] = r
	return r
}

type discardWriter struct {
	h http.Header
	n int64
}

func (w *discardWriter) Header() http.Header { return w.h }
func (w *discardWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}
func (w *discardWriter) WriteHeader(int) {}

var _ io.Writer = (*discardWriter)(nil)

// BenchmarkStatusPage10k renders the page over 10,000 addresses, each with
// a full RTT history: the default view (summary over all, first 100 rows),
// the largest page (1,000 rows), a filtered and sorted view, and the JSON
// of all 10,000.
func BenchmarkStatusPage10k(b *testing.B) {
	b.Run("html", func(b *testing.B) { benchStatus(b, "/shaker", "") })
	b.Run("html-1000-rows", func(b *testing.B) { benchStatus(b, "/shaker?per_page=1000", "") })
	b.Run("html-down-by-rtt", func(b *testing.B) { benchStatus(b, "/shaker?state=down&sort=rtt&order=desc&q=app", "") })
	b.Run("json-all", func(b *testing.B) { benchStatus(b, "/shaker", "application/json") })
}

// BenchmarkStatusPage100k and BenchmarkStatusPage1M: the default view
// (HTML, and its JSON: page 1), a page deep in the list, and a filtered
// and sorted view, at 100,000 and 1,000,000 addresses. A read is a look
// at each address's Brief, and a Status for each row shown.
func BenchmarkStatusPage100k(b *testing.B) { benchStatusLarge(b, 100_000) }

func BenchmarkStatusPage1M(b *testing.B) { benchStatusLarge(b, 1_000_000) }

func benchStatusLarge(b *testing.B, n int) {
	b.Run("html", func(b *testing.B) { benchStatusAt(b, n, "/shaker", "") })
	b.Run("json-page", func(b *testing.B) { benchStatusAt(b, n, "/shaker?page=1", "application/json") })
	b.Run("html-page-500", func(b *testing.B) { benchStatusAt(b, n, "/shaker?page=500", "") })
	b.Run("html-down-by-rtt", func(b *testing.B) { benchStatusAt(b, n, "/shaker?state=down&sort=rtt&order=desc&q=app", "") })
}

// BenchmarkRTTHistory10k records one sample of 10,000 addresses and
// reports the history's memory per address.
func BenchmarkRTTHistory10k(b *testing.B) { benchRTTHistory(b, 10000) }

// BenchmarkRTTHistory1M: one sample of 1,000,000 checkers, what the
// sampler costs every 5 s while a page is configured (history kept for
// rttHistoryMax of them).
func BenchmarkRTTHistory1M(b *testing.B) { benchRTTHistory(b, 1_000_000) }

func benchRTTHistory(b *testing.B, n int) {
	cs := benchRegistry(b, n).Checkers()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	s := &rttSampler{every: time.Hour, rings: make(map[histKey]*rttRing)}
	s.recordCheckers(cs)
	runtime.GC()
	runtime.ReadMemStats(&after)
	perAddr := float64(after.HeapAlloc-before.HeapAlloc) / float64(len(s.rings))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		s.recordCheckers(cs)
	}
	b.ReportMetric(perAddr, "heap-bytes/address")
	runtime.KeepAlive(s)
}

// TestStatusCloseDelays: the page shows the engine's close delays (p99
// and worst, marked late past closeDelayLate) in its summary, and the
// JSON carries them; with none to show, neither does.
func TestStatusCloseDelays(t *testing.T) {
	for _, tc := range []struct {
		name string
		d    CloseDelays
		ok   bool
		p99  string
		late bool
	}{
		{"none", CloseDelays{}, false, "", false},
		{"prompt", CloseDelays{Count: 12345, WorstMs: 16, P50Ms: 0.5, P99Ms: 5, P999Ms: 10}, true, "5.0 ms", false},
		{"sub-ms", CloseDelays{Count: 500, WorstMs: 1.234, P50Ms: 0.05, P99Ms: 0.25, P999Ms: 1}, true, "0.25 ms", false},
		{"late", CloseDelays{Count: 7, WorstMs: 132.5, P50Ms: 1, P99Ms: 75, P999Ms: 100}, true, "75 ms", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := testPage(fakeStatuses(5), 1)
			p.delays = func() (CloseDelays, bool) { return tc.d, tc.ok }
			html := serveStatus(t, p, "GET", "/", "text/html").Body.String()
			shown := strings.Contains(html, `data-count="close-delay"`)
			if shown != tc.ok {
				t.Fatalf("close delays shown %v, want %v:\n%.3000s", shown, tc.ok, html)
			}
			if tc.ok {
				if want := `<span class="n">` + tc.p99 + `</span> p99`; !strings.Contains(html, want) {
					t.Errorf("no %q in the page", want)
				}
				if late := strings.Contains(html, `closedelay late`); late != tc.late {
					t.Errorf("marked late %v, want %v", late, tc.late)
				}
				if want := fmt.Sprintf("over %d answered probes", tc.d.Count); !strings.Contains(html, want) {
					t.Errorf("no %q in the page's title", want)
				}
			}
			var doc struct {
				CloseDelay *CloseDelays `json:"close_delay"`
			}
			w := serveStatus(t, p, "GET", "/", "application/json")
			if err := json.Unmarshal(w.Body.Bytes(), &doc); err != nil {
				t.Fatal(err)
			}
			switch {
			case !tc.ok && doc.CloseDelay != nil:
				t.Errorf("JSON close_delay %+v, want none", doc.CloseDelay)
			case tc.ok && (doc.CloseDelay == nil || *doc.CloseDelay != tc.d):
				t.Errorf("JSON close_delay %+v, want %+v", doc.CloseDelay, tc.d)
			}
		})
	}
}
