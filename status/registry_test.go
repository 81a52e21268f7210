package status

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// testRegistry returns a registry of n checkers without an engine, in the
// states of fakeStatuses: every tenth down (refused), every 25th of the
// others up but failing (a timeout), the last one not probed yet; with
// drain and maint when admin is set, and a second checker (other
// settings) of address 0.
func testRegistry(tb testing.TB, n int, admin bool) *health.Registry {
	tb.Helper()
	r := health.NewRegistry()
	set := health.Settings{Interval: 2 * time.Second, Timeout: time.Second, Passes: 1, Fails: 3}
	ws := make([]health.Want, n, n+1)
	for i := range ws {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if i%17 == 5 {
			a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)})
		}
		ws[i] = health.Want{Addr: netip.AddrPortFrom(a, 8080), Settings: set, Name: fmt.Sprintf("app%03d.internal:8080", i/10)}
	}
	other := set
	other.Interval, other.Jitter = 5*time.Second, 100*time.Millisecond
	ws = append(ws, health.Want{Addr: ws[0].Addr, Settings: other, Name: ws[0].Name})
	all, _ := r.Acquire(ws)
	refused := shaker.Result{Err: shaker.ErrRefused, Outcome: shaker.Refused}
	timeout := shaker.Result{Err: shaker.ErrTimeout, Outcome: shaker.Timeout}
	for i, c := range all {
		if i == n-1 && n > 1 {
			continue // not probed yet
		}
		c.Observe(shaker.Result{Addr: c.Addr(), RTT: time.Duration(100+i%400) * time.Microsecond, Outcome: shaker.Up})
		switch {
		case i%10 == 3:
			for range 3 {
				c.Observe(refused)
			}
		case i%25 == 1:
			c.Observe(timeout)
		}
	}
	if admin {
		for i := 7; i < n-1; i += 40 {
			st := health.Drain
			if i%80 == 7 {
				st = health.Maint
			}
			if _, err := r.SetAdminState(ws[i].Addr, st); err != nil {
				tb.Fatal(err)
			}
		}
	}
	return r
}

// TestStatusFromCheckers: over the registry's checkers (Briefs, a Status
// only for the rows shown, the history by checker), the page shows what
// it shows over the registry's Statuses, for every sort, filter and page.
func TestStatusFromCheckers(t *testing.T) {
	r := testRegistry(t, 300, true)
	list := r.Statuses()
	fromList := testPage(list, 3)
	fromCheckers := testPage(nil, 0)
	fromCheckers.statuses, fromCheckers.checkers = nil, r.Checkers
	for range 3 {
		fromCheckers.history.recordCheckers(r.Checkers())
	}
	now := statusEpoch.Add(time.Hour)
	queries := []string{"", "page=2", "page=99", "per_page=7&page=3", "per_page=1000", "q=APP01", "q=db8", "q=timeout", "q=nothing",
		"state=up", "state=down", "state=pending", "state=failing", "state=drain", "state=maint", "state=down&q=app02&page=2&per_page=3"}
	for _, k := range statusSortKeys {
		for _, o := range []string{"asc", "desc"} {
			queries = append(queries, "sort="+k.key+"&order="+o, "sort="+k.key+"&order="+o+"&page=3&per_page=11&state=up")
		}
	}
	for _, q := range queries {
		vals, _ := url.ParseQuery(q)
		for _, asJSON := range []bool{false, true} {
			render := func(p *Page) string {
				v := p.build(vals, now, asJSON)
				var b bytes.Buffer
				w := bufio.NewWriter(&b)
				if asJSON {
					if err := v.writeJSON(w); err != nil {
						t.Fatal(err)
					}
				} else if err := statusTemplate.Execute(w, v.pageData()); err != nil {
					t.Fatal(err)
				}
				w.Flush()
				return b.String()
			}
			want, got := render(fromList), render(fromCheckers)
			if got != want {
				i := 0
				for i < len(got) && i < len(want) && got[i] == want[i] {
					i++
				}
				t.Errorf("?%s (json %v): from checkers differs at byte %d:\n got %.300q\nwant %.300q", q, asJSON, i, got[max(0, i-100):], want[max(0, i-100):])
			}
		}
	}
}
