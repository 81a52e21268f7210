package shakerl4

import (
	"encoding/json"
	"fmt"
	"math"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxy"
	"go.uber.org/zap"

	caddyshaker "github.com/caddy-shaker/caddy-shaker"
	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// fakeStates are member states a test sets.
type fakeStates struct {
	down     map[string]bool
	returned map[string]int64 // back in service at (health.Now), for slow start
	version  uint64
}

func (f *fakeStates) Member(dial string) caddyshaker.Member {
	return caddyshaker.Member{In: !f.down[dial], Ready: true, Returned: f.returned[dial]}
}
func (f *fakeStates) Version() uint64 { return f.version }

// provisionedPool returns the upstreams of a caddy-l4 proxy handler
// provisioned from js (its upstreams' JSON), with its default policy:
// their peers exist, so caddy-l4's availability applies. Its Cleanup runs
// when the returned function is called (caddy-l4 shares peers by dial
// address across handlers until then).
func provisionedPool(t *testing.T, ups string) (l4proxy.UpstreamPool, func()) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	mod, err := ctx.LoadModuleByID("layer4.handlers.proxy", json.RawMessage(`{"upstreams":`+ups+`}`))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	return mod.(*l4proxy.Handler).Upstreams, cancel
}

// setUnavailable makes caddy-l4 see u as unhealthy (or healthy again), as
// its own active checker would (peer.setHealthy is unexported): the
// reference that a policy with u filtered out must match.
func setUnavailable(t *testing.T, u *l4proxy.Upstream, down bool) {
	t.Helper()
	peers := reflect.ValueOf(u).Elem().FieldByName("peers")
	if !peers.IsValid() || peers.Len() == 0 {
		t.Fatal("l4proxy.Upstream has no provisioned peers in this caddy-l4 version")
	}
	v := int32(0)
	if down {
		v = 1
	}
	for i := range peers.Len() {
		caddytest.StoreInt32(t, peers.Index(i).Elem(), "unhealthy", v, "l4proxy peer")
	}
	if got := first.Select(l4proxy.UpstreamPool{u}, nil) == nil; got != down {
		t.Fatalf("upstream %s unavailable %v, want %v", u, got, down)
	}
}

// newInner makes a fresh, provisioned instance of a built-in policy from
// its JSON.
func newInner(t *testing.T, js string) l4proxy.Selector {
	t.Helper()
	return caddytest.LoadInline[l4proxy.Selector](t, "layer4.proxy.selection_policies", "policy", js)
}

// stubConn is a client connection from a given address.
type stubConn struct {
	net.Conn
	remote net.Addr
}

func (c stubConn) RemoteAddr() net.Addr { return c.remote }
func (c stubConn) LocalAddr() net.Addr  { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9} }

func connFrom(i int) *layer4.Connection {
	return layer4.WrapConnection(stubConn{remote: &net.TCPAddr{IP: net.IPv4(192, 0, 2, byte(i%101)), Port: 1234}}, nil, zap.NewNop())
}

// TestPolicyEachBuiltin: with one upstream down (and, for the
// deterministic policies, back up halfway), the shaker policy wrapping
// each of caddy-l4's built-in policies chooses as that policy does alone
// over the same upstreams with the down one unavailable to caddy-l4: the
// same upstream for the same connection where the policy is
// deterministic, the same shares where it draws at random.
func TestPolicyEachBuiltin(t *testing.T) {
	const conns = 3000
	four := `[{"dial":["127.0.0.1:1001"]},{"dial":["127.0.0.1:1002"]},{"dial":["127.0.0.1:1003"]},{"dial":["127.0.0.1:1004"]}]`
	weighted := `[{"dial":["127.0.0.1:1001"],"weight":3},{"dial":["127.0.0.1:1002"],"weight":1},{"dial":["127.0.0.1:1003"]},{"dial":["127.0.0.1:1004"],"weight":4},{"dial":["127.0.0.1:1005"],"weight":2}]`
	for _, tc := range []struct {
		name   string
		js     string
		ups    string
		down   int
		random bool // compare shares, not choices
		also   int  // another upstream unavailable to caddy-l4 itself, in both runs (0: none; 1-based)
	}{
		{"random", `{"policy":"random"}`, four, 1, true, 0},
		{"least_conn", `{"policy":"least_conn"}`, four, 1, true, 0},
		{"round_robin", `{"policy":"round_robin"}`, four, 1, false, 0},
		{"round_robin, first down", `{"policy":"round_robin"}`, four, 0, false, 0},
		{"round_robin, last down", `{"policy":"round_robin"}`, four, 3, false, 0},
		{"weighted_round_robin", `{"policy":"weighted_round_robin"}`, weighted, 1, false, 0},
		{"weighted_round_robin, heaviest down", `{"policy":"weighted_round_robin"}`, weighted, 3, false, 0},
		{"weighted_round_robin, unweighted down", `{"policy":"weighted_round_robin"}`, weighted, 2, false, 0},
		{"first", `{"policy":"first"}`, four, 0, false, 0},
		{"ip_hash", `{"policy":"ip_hash"}`, weighted, 2, false, 0},
		// caddy-l4's own unavailability still applies to the inner policy
		{"round_robin, another unavailable to caddy-l4", `{"policy":"round_robin"}`, four, 1, false, 3},
		{"weighted_round_robin, another unavailable to caddy-l4", `{"policy":"weighted_round_robin"}`, weighted, 3, false, 1},
		{"first, another unavailable to caddy-l4", `{"policy":"first"}`, four, 0, false, 2},
		{"least_conn, another unavailable to caddy-l4", `{"policy":"least_conn"}`, four, 1, true, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// the reference: the policy alone, the down upstream unavailable
			// to caddy-l4; back up halfway for the deterministic ones
			ref, done := provisionedPool(t, tc.ups)
			refPolicy := newInner(t, tc.js)
			want := make([]string, conns)
			if tc.also > 0 {
				setUnavailable(t, ref[tc.also-1], true)
			}
			setUnavailable(t, ref[tc.down], true)
			for i := range conns {
				if !tc.random && i == conns/2 {
					setUnavailable(t, ref[tc.down], false)
				}
				want[i] = dialOf(refPolicy.Select(ref, connFrom(i)))
			}
			done() // caddy-l4 shares peers by dial address: ours are new ones

			ours, done := provisionedPool(t, tc.ups)
			defer done()
			p := &Policy{orig: newInner(t, tc.js), logger: zap.NewNop()}
			p.kind = kindOf(p.orig)
			p.setUpstreams(ours)
			if tc.also > 0 {
				setUnavailable(t, ours[tc.also-1], true)
			}
			states := &fakeStates{down: map[string]bool{ours[tc.down].Dial[0]: true}}
			p.states = states
			p.key = "test"
			got := make([]string, conns)
			for i := range conns {
				if !tc.random && i == conns/2 {
					states.down, states.version = nil, states.version+1
				}
				got[i] = dialOf(p.Select(ours, connFrom(i)))
				if i < conns/2 && got[i] == ours[tc.down].Dial[0] {
					t.Fatalf("connection %d: chose the upstream that is down", i)
				}
			}
			if !tc.random {
				for i := range conns {
					if want[i] != got[i] {
						t.Fatalf("connection %d: chose %s, the policy alone %s", i, got[i], want[i])
					}
				}
				return
			}
			compareShares(t, want, got)
		})
	}
}

func dialOf(u *l4proxy.Upstream) string {
	if u == nil {
		return "<nil>"
	}
	return u.String()
}

// compareShares checks that two runs of a random policy gave each
// upstream the same share, within 5 standard deviations.
func compareShares(t *testing.T, want, got []string) {
	t.Helper()
	count := func(xs []string) map[string]int {
		m := map[string]int{}
		for _, x := range xs {
			m[x]++
		}
		return m
	}
	w, g := count(want), count(got)
	n := float64(len(want))
	for k := range w {
		if _, ok := g[k]; !ok {
			g[k] = 0
		}
	}
	for k := range g {
		share := float64(w[k]) / n
		sd := math.Sqrt(share*(1-share)/n) + 1/n
		if d := math.Abs(float64(g[k]-w[k])) / n; d > 5*math.Sqrt2*sd {
			t.Errorf("%s: %d of %d with the policy alone, %d wrapped", k, w[k], len(want), g[k])
		}
	}
}

// TestPolicyMultiDial: an upstream with several dial addresses (caddy-l4
// dials them all) is out of service when one of them is down; a dial
// address that cannot be probed counts as up.
func TestPolicyMultiDial(t *testing.T) {
	ups, done := provisionedPool(t, `[{"dial":["127.0.0.1:1001","127.0.0.1:1002"]},{"dial":["127.0.0.1:1003","unix//tmp/shaker-l4-test.sock"]},{"dial":["127.0.0.1:1004"]}]`)
	defer done()
	p := &Policy{orig: newInner(t, `{"policy":"first"}`), logger: zap.NewNop()}
	p.kind = kindOf(p.orig)
	p.setUpstreams(ups)
	if got := p.slots[1].dials; len(got) != 1 || got[0] != "127.0.0.1:1003" {
		t.Fatalf("dials probed of upstream 1: %v, want only 127.0.0.1:1003", got)
	}
	states := &fakeStates{down: map[string]bool{"127.0.0.1:1002": true}}
	p.states = states
	if got := dialOf(p.Select(ups, connFrom(1))); got != ups[1].String() {
		t.Fatalf("one dial of the first upstream down: chose %s, want %s", got, ups[1])
	}
	states.down, states.version = map[string]bool{"127.0.0.1:1003": true}, 1
	if got := dialOf(p.Select(ups, connFrom(1))); got != ups[0].String() {
		t.Fatalf("chose %s, want %s", got, ups[0])
	}
	states.down, states.version = map[string]bool{"127.0.0.1:1001": true, "127.0.0.1:1003": true}, 2
	if got := dialOf(p.Select(ups, connFrom(1))); got != ups[2].String() {
		t.Fatalf("chose %s, want %s", got, ups[2])
	}
}

// TestPolicyRefusesInner: random_choose and shaker are refused as inner
// policies, in JSON and in the Caddyfile, with an error that says why.
func TestPolicyRefusesInner(t *testing.T) {
	for _, name := range []string{"random_choose", "shaker"} {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		_, err := ctx.LoadModuleByID("layer4.handlers.proxy", json.RawMessage(
			`{"upstreams":[{"dial":["127.0.0.1:1001"]}],"load_balancing":{"selection":{"policy":"shaker","inner":{"policy":"`+name+`"}}}}`))
		cancel()
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("JSON inner %s: error %v", name, err)
		}
		if name == "random_choose" && !strings.Contains(fmt.Sprint(err), "panic") {
			t.Errorf("JSON inner random_choose: error %v does not say why", err)
		}
		for _, src := range []string{
			"proxy 127.0.0.1:1001 {\n\tlb_policy shaker " + name + "\n}",
			"proxy 127.0.0.1:1001 {\n\tlb_policy shaker {\n\t\tinner " + name + "\n\t}\n}",
		} {
			h := new(l4proxy.Handler)
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src))
			if err == nil || !strings.Contains(err.Error(), name) {
				t.Errorf("%q: error %v", src, err)
			}
		}
	}
}

// TestPolicyParent: the policy fails to load, with a clear error, where
// its parent is not a layer4 proxy handler.
func TestPolicyParent(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	_, err := ctx.LoadModuleByID("layer4.proxy.selection_policies.shaker", json.RawMessage(`{}`))
	if err == nil || !strings.Contains(err.Error(), "layer4 proxy handler") {
		t.Fatalf("error %v", err)
	}
}

// TestPolicyCaddyfile: lb_policy shaker inside a layer4 proxy, in
// caddy-l4's own syntax, gives the JSON of the selection policy.
func TestPolicyCaddyfile(t *testing.T) {
	for _, tc := range []struct{ src, want string }{
		{"proxy 127.0.0.1:1001 127.0.0.1:1002 {\n\tlb_policy shaker\n}",
			`{"policy":"shaker"}`},
		{"proxy 127.0.0.1:1001 {\n\tlb_policy shaker least_conn {\n\t\tinterval 1s\n\t\tfails 2\n\t\tslow_start 10s\n\t}\n\tlb_try_duration 2s\n}",
			`{"inner":{"policy":"least_conn"},"interval":1000000000,"fails":2,"slow_start":10000000000,"policy":"shaker"}`},
		{"proxy 127.0.0.1:1001 {\n\tlb_policy shaker {\n\t\tinner round_robin\n\t\tjitter 10%\n\t\tpanic_threshold 50%\n\t}\n}",
			`{"inner":{"policy":"round_robin"},"jitter":"10%","panic_threshold":0.5,"policy":"shaker"}`},
	} {
		h := new(l4proxy.Handler)
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.src)); err != nil {
			t.Fatalf("%q: %v", tc.src, err)
		}
		if h.LoadBalancing == nil {
			t.Fatalf("%q: no load_balancing", tc.src)
		}
		var got, want any
		if err := json.Unmarshal(h.LoadBalancing.SelectionPolicyRaw, &got); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(tc.want), &want); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%q:\n got %s\nwant %s", tc.src, h.LoadBalancing.SelectionPolicyRaw, tc.want)
		}
	}
	for _, bad := range []string{
		"proxy 127.0.0.1:1001 {\n\tlb_policy shaker {\n\t\tinterval nope\n\t}\n}",
		"proxy 127.0.0.1:1001 {\n\tlb_policy shaker {\n\t\tbogus 1\n\t}\n}",
		"proxy 127.0.0.1:1001 {\n\tlb_policy shaker first {\n\t\tinner first\n\t}\n}",
		"proxy 127.0.0.1:1001 {\n\tlb_policy shaker {\n\t\tjitter 3s\n\t}\n}",
	} {
		h := new(l4proxy.Handler)
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// TestPolicyPanicAndSlowStart: the one in-service rule applies to the
// layer-4 pools too, with both ways of handing the inner policy its
// upstreams (a pool; by position): failing open below panic_threshold
// uses every upstream, and an upstream back in service under slow_start
// gets a share of the choices that starts near none.
func TestPolicyPanicAndSlowStart(t *testing.T) {
	for _, js := range []string{`{"policy":"random"}`, `{"policy":"round_robin"}`, `{"policy":"weighted_round_robin"}`} {
		t.Run(js, func(t *testing.T) {
			ups, done := provisionedPool(t, `[{"dial":["127.0.0.1:1001"]},{"dial":["127.0.0.1:1002"]},{"dial":["127.0.0.1:1003"]},{"dial":["127.0.0.1:1004"]}]`)
			defer done()
			p := &Policy{orig: newInner(t, js), logger: zap.NewNop()}
			p.kind = kindOf(p.orig)
			p.PanicThreshold = 0.5
			p.SlowStart = caddy.Duration(time.Hour)
			if err := p.SetDefaults(); err != nil {
				t.Fatal(err)
			}
			p.setUpstreams(ups)
			states := &fakeStates{down: map[string]bool{"127.0.0.1:1001": true, "127.0.0.1:1002": true, "127.0.0.1:1003": true}}
			p.states = states
			got := map[string]int{}
			for i := range 400 {
				got[dialOf(p.Select(ups, connFrom(i)))]++
			}
			if len(got) != 4 {
				t.Fatalf("1 of 4 up, panic_threshold 0.5: chose %v, want all 4 (failing open)", got)
			}
			// 1001 back just now under a slow start of an hour; 1002 down
			states.down = map[string]bool{"127.0.0.1:1002": true}
			states.returned = map[string]int64{"127.0.0.1:1001": health.Now()}
			states.version++
			got = map[string]int{}
			for i := range 400 {
				got[dialOf(p.Select(ups, connFrom(i)))]++
			}
			if got["127.0.0.1:1002"] != 0 || got["127.0.0.1:1001"] > 8 || got["127.0.0.1:1003"] == 0 || got["127.0.0.1:1004"] == 0 {
				t.Fatalf("1001 ramping up, 1002 down: chose %v, want 1001 hardly ever, 1002 never", got)
			}
		})
	}
}
