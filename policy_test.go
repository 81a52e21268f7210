package caddyshaker

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// fakeStates are member states a test sets.
type fakeStates struct {
	down     map[string]bool
	returned map[string]int64
	version  uint64
}

func (f *fakeStates) Member(dial string) Member {
	return Member{In: !f.down[dial], Ready: true, Returned: f.returned[dial]}
}
func (f *fakeStates) Version() uint64 { return f.version }

// markUnavailable makes Caddy see u as unhealthy, as its own active
// checker would (Upstream.setHealthy is unexported): the reference that a
// policy with u filtered out must match.
func markUnavailable(t *testing.T, u *reverseproxy.Upstream) {
	t.Helper()
	caddytest.StoreInt32(t, reflect.ValueOf(u).Elem(), "unhealthy", 1, "reverseproxy.Upstream")
	if u.Available() {
		t.Fatal("upstream still available")
	}
}

func newPool(n int) reverseproxy.UpstreamPool {
	pool := make(reverseproxy.UpstreamPool, n)
	for i := range pool {
		pool[i] = &reverseproxy.Upstream{Dial: fmt.Sprintf("127.0.0.%d:80", i+1), Host: new(reverseproxy.Host)}
	}
	return pool
}

// newInner makes a fresh, provisioned instance of a built-in policy from
// its JSON.
func newInner(t *testing.T, js string) reverseproxy.Selector {
	t.Helper()
	return caddytest.LoadInline[reverseproxy.Selector](t, "http.reverse_proxy.selection_policies", "policy", js)
}

// TestPolicyEachBuiltin: with one upstream down, the shaker policy wrapping
// each of Caddy's built-in policies chooses as that policy does alone over
// the same upstreams with the down one unavailable to Caddy: the same
// upstream for the same request where the policy is deterministic, the
// same shares where it draws at random.
func TestPolicyEachBuiltin(t *testing.T) {
	const requests = 3000
	for _, tc := range []struct {
		name   string
		js     string
		n      int
		down   int
		random bool // compare shares, not choices
	}{
		{"random", `{"policy":"random"}`, 4, 1, true},
		{"random_choose", `{"policy":"random_choose","choose":2}`, 4, 1, true},
		{"least_conn", `{"policy":"least_conn"}`, 4, 1, true},
		{"round_robin", `{"policy":"round_robin"}`, 4, 1, false},
		{"weighted_round_robin", `{"policy":"weighted_round_robin","weights":[3,1,2,4]}`, 4, 1, false},
		{"weighted_round_robin with a zero weight", `{"policy":"weighted_round_robin","weights":[3,0,2,4]}`, 5, 2, false},
		{"weighted_round_robin, first down", `{"policy":"weighted_round_robin","weights":[5,1,1]}`, 3, 0, false},
		{"weighted_round_robin, one weight", `{"policy":"weighted_round_robin","weights":[5]}`, 3, 1, false},
		{"weighted_round_robin, one weight, its upstream down", `{"policy":"weighted_round_robin","weights":[5]}`, 3, 0, false},
		{"first", `{"policy":"first"}`, 4, 0, false},
		{"ip_hash", `{"policy":"ip_hash"}`, 5, 2, false},
		{"client_ip_hash", `{"policy":"client_ip_hash"}`, 5, 2, false},
		{"uri_hash", `{"policy":"uri_hash"}`, 5, 2, false},
		{"query", `{"policy":"query","key":"k"}`, 5, 2, false},
		{"header", `{"policy":"header","field":"X-K"}`, 5, 2, false},
		{"cookie", `{"policy":"cookie","name":"lb","fallback":{"policy":"first"}}`, 5, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := newPool(tc.n)
			markUnavailable(t, ref[tc.down])
			refPolicy := newInner(t, tc.js)

			ours := newPool(tc.n)
			p := newTestPolicy(t, newInner(t, tc.js), ours, &fakeStates{down: map[string]bool{ours[tc.down].Dial: true}})

			refCount := map[string]int{}
			ourCount := map[string]int{}
			for i := range requests {
				req := httptest.NewRequest("GET", fmt.Sprintf("/p%d?k=%d", i%97, i%89), nil)
				req.RemoteAddr = fmt.Sprintf("192.0.2.%d:1234", i%101)
				req = req.WithContext(context.WithValue(req.Context(), caddyhttp.VarsCtxKey,
					map[string]any{caddyhttp.ClientIPVarKey: fmt.Sprintf("198.51.100.%d", i%103)}))
				req.Header.Set("X-K", fmt.Sprint(i%83))
				if i%3 == 0 {
					// a cookie for some upstream, as a returning client has
					req.AddCookie(&http.Cookie{Name: "lb", Value: hashCookie(ours[i%tc.n].Dial)})
				}
				a := refPolicy.Select(ref, req, httptest.NewRecorder())
				b := p.Select(ours, req, httptest.NewRecorder())
				an, bn := dialOf(a), dialOf(b)
				if bn == ours[tc.down].Dial {
					t.Fatalf("request %d: chose the upstream that is down", i)
				}
				if !tc.random && an != bn {
					t.Fatalf("request %d: %s alone chose %s, wrapped %s", i, tc.name, an, bn)
				}
				refCount[an]++
				ourCount[bn]++
			}
			if tc.random {
				for d, n := range refCount {
					// both draw from the same shares; 5 standard deviations
					// of a share near 1/3 over 3000 draws is about 130
					if diff := n - ourCount[d]; diff > 180 || diff < -180 {
						t.Errorf("%s: %d alone, %d wrapped (all: %v vs %v)", d, n, ourCount[d], refCount, ourCount)
					}
				}
			}
			if ourCount[""] > 0 && refCount[""] == 0 {
				t.Errorf("wrapped chose none %d times", ourCount[""])
			}
		})
	}
}

// hashCookie is the cookie value Caddy's cookie policy sets for dial with
// no secret (its hashCookie).
func hashCookie(dial string) string {
	h := hmac.New(sha256.New, nil)
	h.Write([]byte(dial))
	return hex.EncodeToString(h.Sum(nil))
}

func dialOf(u *reverseproxy.Upstream) string {
	if u == nil {
		return ""
	}
	return u.Dial
}

// TestPolicyPoolRebuiltOnTransitions: Select reuses the list in service
// until the states' version moves; then it sees the change.
func TestPolicyPoolRebuiltOnTransitions(t *testing.T) {
	pool := newPool(3)
	st := &fakeStates{down: map[string]bool{}}
	p := newTestPolicy(t, reverseproxy.FirstSelection{}, pool, st)
	req := httptest.NewRequest("GET", "/", nil)
	if got := p.Select(pool, req, nil); got != pool[0] {
		t.Fatalf("chose %v", dialOf(got))
	}
	first := p.pools.Peek()
	st.down[pool[0].Dial] = true
	if got := p.Select(pool, req, nil); got != pool[0] || p.pools.Peek() != first {
		t.Fatalf("rebuilt without a version change")
	}
	st.version++
	if got := p.Select(pool, req, nil); got != pool[1] {
		t.Fatalf("after the transition chose %v, want %v", dialOf(got), pool[1].Dial)
	}
	// a pool other than the handler's (a dynamic source's) is handed on
	other := newPool(3)
	if got := p.Select(other, req, nil); got != other[0] {
		t.Fatalf("dynamic pool: chose %v, want its first", dialOf(got))
	}
	// all down: none
	st.down[pool[1].Dial], st.down[pool[2].Dial] = true, true
	st.version++
	if got := p.Select(pool, req, nil); got != nil {
		t.Fatalf("all down: chose %v", got.Dial)
	}
}

func TestPolicyCaddyfile(t *testing.T) {
	lb := func(block string) (map[string]any, error) {
		return adaptProxy(t, "127.0.0.1:9001 127.0.0.1:9002 ", block, "selection_policy")
	}
	for _, tc := range []struct{ block, want string }{
		{`lb_policy shaker`, `{"policy":"shaker"}`},
		{`lb_policy shaker round_robin`, `{"inner":{"policy":"round_robin"},"policy":"shaker"}`},
		{`lb_policy shaker weighted_round_robin 3 1 {
			interval 1s
			fails 2
		}`, `{"fails":2,"inner":{"policy":"weighted_round_robin","weights":[3,1]},"interval":1000000000,"policy":"shaker"}`},
		{`lb_policy shaker {
			inner cookie lb s3cret {
				fallback first
			}
			slow_start 30s
			panic_threshold 50%
			jitter off
		}`, `{"inner":{"fallback":{"policy":"first"},"name":"lb","policy":"cookie","secret":"s3cret"},"jitter":"off","panic_threshold":0.5,"policy":"shaker","slow_start":30000000000}`},
	} {
		got, err := lb(tc.block)
		if err != nil {
			t.Errorf("%s: %v", tc.block, err)
			continue
		}
		b, _ := json.Marshal(got)
		if string(b) != tc.want {
			t.Errorf("%s:\ngot  %s\nwant %s", tc.block, b, tc.want)
		}
	}
	for _, tc := range []struct{ block, want string }{
		{`lb_policy shaker shaker`, "cannot wrap another shaker policy"},
		{`lb_policy shaker nosuch`, "http.reverse_proxy.selection_policies.nosuch"},
		{`lb_policy shaker round_robin {
			inner first
		}`, "inner policy already given"},
		{`lb_policy shaker {
			rise 2
		}`, "unrecognized shaker policy option 'rise'"},
		{`lb_policy shaker {
			interval 0s
		}`, "interval '0s': must be positive"},
		{`lb_policy shaker {
			interval 1s
			jitter 600ms
		}`, `jitter "600ms": must be at most half the interval (500ms)`},
		{`lb_policy shaker {
			inner
		}`, "wrong argument count"},
	} {
		_, err := lb(tc.block)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.block, err, tc.want)
		}
	}
}

// TestPolicyLoadErrors: the policy checks where it is and what it wraps
// at load, and its settings as `dynamic shaker` does.
func TestPolicyLoadErrors(t *testing.T) {
	for _, tc := range []struct{ lb, want string }{
		{`{"policy":"shaker","interval":"-1s"}`, "interval -1s: must be at least 1ms"},
		{`{"policy":"shaker","passes":-1}`, "passes -1"},
		{`{"policy":"shaker","jitter":"banana"}`, `jitter "banana"`},
		{`{"policy":"shaker","panic_threshold":2}`, "panic_threshold 2"},
		{`{"policy":"shaker","inner":{"policy":"shaker"}}`, "cannot wrap another shaker policy"},
		{`{"policy":"shaker","inner":{"policy":"nosuch"}}`, "nosuch"},
		{`{"policy":"cookie","fallback":{"policy":"shaker"}}`, "goes directly in a reverse_proxy handler's load_balancing"},
		{`{"policy":"shaker","rise":1}`, `unknown field "rise"`},
	} {
		err := validateProxy(t, `"upstreams":[{"dial":"127.0.0.1:1"}],"load_balancing":{"selection_policy":`+tc.lb+`}`)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.lb, err, tc.want)
		}
	}
}

// BenchmarkPolicySelect is one Select with the policy, against the inner
// policy alone, over the same pool of n up upstreams, with a request that
// carries Caddy's replacer as reverse_proxy's do.
func BenchmarkPolicySelect(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		pool := newPool(n)
		p := newTestPolicy(b, reverseproxy.RandomSelection{}, pool, &fakeStates{})
		req := httptest.NewRequest("GET", "/", nil)
		repl := caddy.NewReplacer()
		req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
		b.Run(fmt.Sprintf("n=%d/random", n), func(b *testing.B) {
			for b.Loop() {
				reverseproxy.RandomSelection{}.Select(pool, req, nil)
			}
		})
		b.Run(fmt.Sprintf("n=%d/shaker", n), func(b *testing.B) {
			for b.Loop() {
				p.Select(pool, req, nil)
			}
		})
	}
}

// newTestPolicy is a policy over pool with inner, whose member states the
// test sets.
func newTestPolicy(t testing.TB, inner reverseproxy.Selector, pool reverseproxy.UpstreamPool, st *fakeStates) *Policy {
	t.Helper()
	p := &Policy{orig: inner, static: pool, states: st}
	if err := p.fitInner(); err != nil {
		t.Fatal(err)
	}
	p.pos = p.choosable()
	p.probe = make([]bool, len(p.pos))
	for k := range p.probe {
		p.probe[k] = true
	}
	return p
}

// TestPolicySlowStart: an upstream half-way through its ramp is in about
// half of the choices; once the ramp is over, in all of them.
func TestPolicySlowStart(t *testing.T) {
	pool := newPool(2)
	const slow = time.Hour
	st := &fakeStates{returned: map[string]int64{pool[0].Dial: health.Now() - int64(slow/2)}}
	p := newTestPolicy(t, reverseproxy.FirstSelection{}, pool, st)
	p.SlowStart = caddy.Duration(slow)
	req := httptest.NewRequest("GET", "/", nil)
	const n = 4000
	got := 0
	for range n {
		if p.Select(pool, req, nil) == pool[0] {
			got++
		}
	}
	// 4 standard deviations of a share of 1/2 over 4000 draws: 0.032
	if share := float64(got) / n; share < 0.468 || share > 0.532 {
		t.Errorf("half-way through its ramp: in %.3f of the choices, want about 0.5", share)
	}
	// the ramp over: always (the state is rebuilt when the ramp ends)
	st.returned[pool[0].Dial] = health.Now() - int64(slow) - 1
	st.version++
	for range 100 {
		if p.Select(pool, req, nil) != pool[0] {
			t.Fatal("after the ramp: left out")
		}
	}
}

// TestPolicyPanicThreshold: below the threshold, every ready upstream is
// handed on, down or not; above it again, only those up.
func TestPolicyPanicThreshold(t *testing.T) {
	pool := newPool(4)
	st := &fakeStates{down: map[string]bool{pool[0].Dial: true, pool[1].Dial: true, pool[2].Dial: true}}
	p := newTestPolicy(t, reverseproxy.FirstSelection{}, pool, st)
	p.PanicThreshold = 0.5
	p.logger = zap.NewNop()
	req := httptest.NewRequest("GET", "/", nil)
	if got := p.Select(pool, req, nil); got != pool[0] {
		t.Fatalf("1 of 4 up, threshold 0.5: chose %v, want the first (failing open)", dialOf(got))
	}
	delete(st.down, pool[1].Dial)
	st.version++
	if got := p.Select(pool, req, nil); got != pool[1] {
		t.Fatalf("2 of 4 up: chose %v, want the first up", dialOf(got))
	}
}
