package caddyshaker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// getUpstreams calls GET /shaker/upstreams's handler with query q.
func getUpstreams(t testing.TB, q string) (*httptest.ResponseRecorder, []Status, error) {
	t.Helper()
	w := httptest.NewRecorder()
	err := (adminAPI{}).handleUpstreams(w, httptest.NewRequest(http.MethodGet, "/shaker/upstreams"+q, nil))
	if err != nil {
		return w, nil, err
	}
	var list []Status
	if err := json.Unmarshal(w.Body.Bytes(), &list); err != nil {
		t.Fatalf("%s: %v: %.300s", q, err, w.Body.String())
	}
	return w, list, nil
}

// TestAdminUpstreamsPaging: GET /shaker/upstreams answers a page of 1000
// rows by default, sorted by upstream then address, with X-Total-Count and
// Link; per_page=all answers every row; filters by health, admin state
// and upstream.
func TestAdminUpstreamsPaging(t *testing.T) {
	emptyRegistry(t)
	acquireMany(t, 600, 1500, "b") // acquired first: the order is the sort's
	a := acquireMany(t, 1500, 0, "a")
	a[0].Observe(upResult)
	a[1].Observe(refusedResult)
	a[2].Observe(refusedResult)
	setAdminState(t, a[3].Addr(), health.Drain)
	setAdminState(t, a[4].Addr(), health.Maint)

	w, list, err := getUpstreams(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != DefaultUpstreamsPerPage {
		t.Fatalf("default page: %d rows, want %d", len(list), DefaultUpstreamsPerPage)
	}
	total := w.Header().Get("X-Total-Count")
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	link := w.Header().Get("Link")
	for _, want := range []string{
		`</shaker/upstreams?page=1&per_page=1000>; rel="first"`,
		`</shaker/upstreams?page=2&per_page=1000>; rel="next"`,
	} {
		if !strings.Contains(link, want) {
			t.Errorf("Link %q: no %s", link, want)
		}
	}
	if strings.Contains(link, `rel="prev"`) {
		t.Errorf("Link %q: a prev on the first page", link)
	}
	// a sorts first, then by address
	for i := 1; i < len(list); i++ {
		x, y := list[i-1], list[i]
		if x.Upstream != "a" || y.Upstream != "a" {
			t.Fatalf("row %d: upstream %q, want a first", i, y.Upstream)
		}
		if x.Address == y.Address {
			t.Fatalf("row %d: %s twice", i, y.Address)
		}
	}
	if list[0].Address != a[0].Addr().String() {
		t.Errorf("first row %s, want %s", list[0].Address, a[0].Addr())
	}

	// every page, walked by the next links, gives every row once
	seen := map[string]bool{}
	var walked []string
	next := "?per_page=700"
	pages := 0
	for next != "" {
		w, list, err := getUpstreams(t, next)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, s := range list {
			k := s.Upstream + " " + s.Address
			if seen[k] {
				t.Fatalf("%s twice", k)
			}
			seen[k] = true
			walked = append(walked, k)
		}
		next = ""
		for l := range strings.SplitSeq(w.Header().Get("Link"), ", ") {
			if u, ok := strings.CutSuffix(l, `>; rel="next"`); ok {
				next = strings.TrimPrefix(u, "</shaker/upstreams")
			}
		}
	}
	if len(seen) != 2100 || pages != 3 || total != "2100" {
		t.Fatalf("%d rows in %d pages, X-Total-Count %s; want 2100 in 3", len(seen), pages, total)
	}
	// in the order of per_page=all, which sorts everything
	_, all, err := getUpstreams(t, "?per_page=all")
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range all {
		if k := s.Upstream + " " + s.Address; walked[i] != k {
			t.Fatalf("row %d: %s in pages, %s in all", i, walked[i], k)
		}
	}

	for _, tc := range []struct {
		q     string
		n     int
		total string
		link  string // in Link
	}{
		{"?per_page=all", 2100, "2100", ""},
		{"?page=3&per_page=1000", 100, "2100", `</shaker/upstreams?page=2&per_page=1000>; rel="prev"`},
		{"?page=4", 0, "2100", `</shaker/upstreams?page=3&per_page=1000>; rel="last"`},
		{"?health=up", 1, "1", ""},
		{"?health=down", 2, "2", ""},
		{"?health=down,up", 3, "3", ""},
		{"?health=down&health=up&upstream=a", 3, "3", ""},
		{"?health=down&upstream=b", 0, "0", ""},
		{"?health=unknown&upstream=b", 600, "600", ""},
		{"?admin_state=drain", 1, "1", ""},
		{"?admin_state=maint&health=unknown", 1, "1", ""},
		{"?admin_state=drain,maint", 2, "2", ""},
		{"?admin_state=ready&upstream=a&per_page=all", 1498, "1498", ""},
		{"?admin_state=ready&upstream=a", 1000, "1498", `rel="next"`},
		{"?upstream=b&per_page=100&page=2", 100, "600", `</shaker/upstreams?page=3&per_page=100&upstream=b>; rel="next"`},
		{"?upstream=c", 0, "0", ""},
	} {
		w, list, err := getUpstreams(t, tc.q)
		if err != nil {
			t.Fatalf("%s: %v", tc.q, err)
		}
		if len(list) != tc.n || w.Header().Get("X-Total-Count") != tc.total {
			t.Errorf("%s: %d rows, X-Total-Count %q; want %d, %s", tc.q, len(list), w.Header().Get("X-Total-Count"), tc.n, tc.total)
		}
		if l := w.Header().Get("Link"); tc.link == "" && l != "" || !strings.Contains(l, tc.link) {
			t.Errorf("%s: Link %q, want %q", tc.q, l, tc.link)
		}
		if list == nil {
			t.Errorf("%s: null, want []", tc.q)
		}
	}
	if _, list, _ := getUpstreams(t, "?health=down"); list[0].Address != a[1].Addr().String() || list[1].Address != a[2].Addr().String() {
		t.Errorf("down: %s, %s; want %s, %s", list[0].Address, list[1].Address, a[1].Addr(), a[2].Addr())
	}
}

// TestAdminUpstreamsBadQuery: a bad or unknown parameter is a 400 that
// names it and its value.
func TestAdminUpstreamsBadQuery(t *testing.T) {
	for q, want := range map[string]string{
		"?health=sick":            `health "sick": must be up, down or unknown`,
		"?health=up,":             `health "": must be up, down or unknown`,
		"?admin_state=off":        `admin_state "off": must be ready, drain or maint`,
		"?page=0":                 `page "0": must be a whole number from 1`,
		"?page=two":               `page "two"`,
		"?page=1&page=2":          "page given 2 times",
		"?per_page=-5":            `per_page "-5": must be a whole number from 1, or all`,
		"?per_page=everything":    `per_page "everything"`,
		"?state=down":             `unknown parameter "state": use health, admin_state, upstream, page or per_page`,
		"?per_page=10&sort=rtt":   `unknown parameter "sort"`,
		"?health=up&health=maint": `health "maint"`,
	} {
		_, _, err := getUpstreams(t, q)
		var ae caddy.APIError
		if !asAPIError(err, &ae) || ae.HTTPStatus != http.StatusBadRequest || !strings.Contains(ae.Err.Error(), want) {
			t.Errorf("%s: %v, want 400 %q", q, err, want)
		}
	}
	w := httptest.NewRecorder()
	err := (adminAPI{}).handleUpstreams(w, httptest.NewRequest(http.MethodPost, "/shaker/upstreams?page=1", nil))
	var ae caddy.APIError
	if !asAPIError(err, &ae) || ae.HTTPStatus != http.StatusMethodNotAllowed {
		t.Errorf("POST: %v, want 405", err)
	}
}

func asAPIError(err error, ae *caddy.APIError) bool {
	e, ok := err.(caddy.APIError)
	if ok {
		*ae = e
	}
	return ok
}

// BenchmarkAdminUpstreams times GET /shaker/upstreams at 1,000,000
// addresses: the default page, a filter that matches few, and every row.
func BenchmarkAdminUpstreams(b *testing.B) {
	emptyRegistry(b)
	cs := acquireMany(b, 1_000_000, 0, "bench")
	for _, c := range cs[:10] {
		c.Observe(refusedResult)
	}
	for _, q := range []string{"", "?health=down", "?per_page=all"} {
		b.Run(fmt.Sprintf("query=%q", q), func(b *testing.B) {
			cpu0 := processCPU()
			var n int
			for b.Loop() {
				w := httptest.NewRecorder()
				if err := (adminAPI{}).handleUpstreams(w, httptest.NewRequest(http.MethodGet, "/shaker/upstreams"+q, nil)); err != nil {
					b.Fatal(err)
				}
				n = w.Body.Len()
			}
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
			b.ReportMetric(float64(n), "bytes/answer")
		})
	}
}

// TestAdminUpstreamsBytes: a page is the bytes json.Encoder made of the
// whole list before paging.
func TestAdminUpstreamsBytes(t *testing.T) {
	emptyRegistry(t)
	acquireMany(t, 3, 0, "x")
	w, _, err := getUpstreams(t, "")
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	if err := json.NewEncoder(&want).Encode(reg.Statuses()); err != nil {
		t.Fatal(err)
	}
	if got := w.Body.String(); got != want.String() {
		t.Fatalf("got\n%s\nwant\n%s", got, want.String())
	}
}
