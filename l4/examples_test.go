package shakerl4

import (
	"bufio"
	"encoding/json"
	"net"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// TestExamplesAdapt: examples/Caddyfile adapts without warnings to the
// config of examples/caddy.json (durations aside, which the Caddyfile
// gives in nanoseconds), both validate, and each runs as it is: a
// connection through the proxy is echoed, and the upstream where nothing
// listens is found down (the load part is skipped when the example's
// ports are taken on this machine; the admin endpoint is moved to a free
// port).
func TestExamplesAdapt(t *testing.T) {
	src := caddytest.MustRead(t, "examples/Caddyfile")
	out, warn, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": "examples/Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	if len(warn) > 0 {
		t.Errorf("warnings: %v", warn)
	}
	twin := caddytest.MustRead(t, "examples/caddy.json")
	if a, b := normalized(t, out), normalized(t, twin); !reflect.DeepEqual(a, b) {
		t.Errorf("the Caddyfile adapts to\n%s\nnot to caddy.json's config", out)
	}
	for name, raw := range map[string][]byte{"Caddyfile": out, "caddy.json": twin} {
		var c caddy.Config
		if err := json.Unmarshal(raw, &c); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := caddy.Validate(&c); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if testing.Short() {
		return
	}
	for _, port := range []string{"9432", "9433", "9434"} {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+port)
		if err != nil {
			t.Skipf("port %s taken here: not running the examples (%v)", port, err)
		}
		ln.Close()
	}
	for name, raw := range map[string][]byte{"Caddyfile": out, "caddy.json": twin} {
		t.Run(name, func(t *testing.T) {
			var cfg map[string]any
			if err := json.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			h := newHarness(t)
			cfg["admin"] = map[string]any{"listen": h.admin}
			cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}}
			b, _ := json.Marshal(cfg)
			if err := caddy.Load(b, true); err != nil {
				t.Fatal(err)
			}
			defer caddy.Stop()
			waitFor(t, 10*time.Second, "127.0.0.1:9435 down", func() bool {
				st, ok := h.statuses()["127.0.0.1:9435"]
				return ok && st.Health == "down"
			})
			for range 20 {
				if got := echoThrough(t, "127.0.0.1:9432"); got != "hello" {
					t.Fatalf("through the proxy: %q, want the echo", got)
				}
			}
		})
	}
}

// echoThrough sends a line through the proxy at addr and returns the line
// echoed.
func echoThrough(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("through the proxy: %v", err)
	}
	return line[:len(line)-1]
}

// normalized is a config as a tree, with its duration strings as
// nanoseconds.
func normalized(t *testing.T, raw []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	var walk func(any) any
	walk = func(v any) any {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				if s, ok := e.(string); ok && (k == "interval" || k == "try_duration" || k == "timeout") {
					if d, err := caddy.ParseDuration(s); err == nil {
						x[k] = float64(d)
						continue
					}
				}
				x[k] = walk(e)
			}
		case []any:
			for i, e := range x {
				x[i] = walk(e)
			}
		}
		return v
	}
	return walk(v)
}
