package caddyshaker

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// adaptDynamic adapts a reverse_proxy block and returns its
// dynamic_upstreams object.
func adaptDynamic(t *testing.T, block string) (map[string]any, error) {
	t.Helper()
	d, err := adaptProxy(t, "", block, "dynamic_upstreams")
	if err == nil && d == nil {
		t.Fatalf("no dynamic_upstreams in the config of %q", block)
	}
	return d, err
}

// adaptProxy adapts a site with one reverse_proxy (upstreams on its line,
// each followed by a space) whose block is block, and returns the first
// object under key in the JSON (findKey): nil if there is none.
func adaptProxy(t *testing.T, upstreams, block, key string) (map[string]any, error) {
	t.Helper()
	src := ":8080 {\n\treverse_proxy " + upstreams + "{\n" + block + "\n\t}\n}\n"
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
	if err != nil {
		return nil, err
	}
	var cfg any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	return findKey(cfg, key), nil
}

// validateProxy validates (caddy.Validate: provisioned, then cleaned up)
// a config whose one route is a reverse_proxy handler with the fields
// given, JSON without the braces (`"dynamic_upstreams":{...}`).
func validateProxy(t testing.TB, fields string) error {
	t.Helper()
	cfg := `{"admin":{"disabled":true},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:0"],"routes":[{"handle":[{"handler":"reverse_proxy",` + fields + `}]}]}}}}}`
	var c caddy.Config
	if err := json.Unmarshal([]byte(cfg), &c); err != nil {
		t.Fatalf("%s: %v", cfg, err)
	}
	return caddy.Validate(&c)
}

// findKey returns the first object found under key, depth first.
func findKey(v any, key string) map[string]any {
	switch v := v.(type) {
	case map[string]any:
		if d, ok := v[key].(map[string]any); ok {
			return d
		}
		for _, x := range v {
			if d := findKey(x, key); d != nil {
				return d
			}
		}
	case []any:
		for _, x := range v {
			if d := findKey(x, key); d != nil {
				return d
			}
		}
	}
	return nil
}

func TestCaddyfileAdapt(t *testing.T) {
	for _, tc := range []struct {
		name, block, want string
	}{
		{
			"defaults",
			`dynamic shaker 10.0.0.1:8080`,
			`{"source":"shaker","upstreams":["10.0.0.1:8080"]}`,
		},
		{
			"issue example",
			`dynamic shaker 10.0.0.1:8080 app.internal:8080 {
				interval 2s
				timeout  1s
				passes   2
				fails    3
				port     9000
			}`,
			`{"fails":3,"interval":2000000000,"passes":2,"port":9000,"source":"shaker","timeout":1000000000,"upstreams":["10.0.0.1:8080","app.internal:8080"]}`,
		},
		{
			"to lines and resolve options",
			`dynamic shaker {
				to [::1]:8080 127.0.0.1:8080
				to db.internal:5432
				resolve_interval 30s
				resolve_timeout 2s
			}`,
			`{"resolve_interval":30000000000,"resolve_timeout":2000000000,"source":"shaker","upstreams":["[::1]:8080","127.0.0.1:8080","db.internal:5432"]}`,
		},
		{
			"fast and down intervals",
			`dynamic shaker 127.0.0.1:8080 {
				interval 5s
				fast_interval 500ms
				down_interval 30s
			}`,
			`{"down_interval":30000000000,"fast_interval":500000000,"interval":5000000000,"source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			"jitter as a percentage",
			`dynamic shaker 127.0.0.1:8080 {
				jitter 10%
			}`,
			`{"jitter":"10%","source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			// checked against the interval given after it
			"jitter as a duration",
			`dynamic shaker 127.0.0.1:8080 {
				jitter 2s
				interval 5s
			}`,
			`{"interval":5000000000,"jitter":"2s","source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			"jitter off",
			`dynamic shaker 127.0.0.1:8080 {
				jitter off
			}`,
			`{"jitter":"off","source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			"panic threshold as a percentage",
			`dynamic shaker 127.0.0.1:8080 {
				panic_threshold 50%
			}`,
			`{"panic_threshold":0.5,"source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			"panic threshold as a fraction",
			`dynamic shaker 127.0.0.1:8080 {
				panic_threshold 0.25
			}`,
			`{"panic_threshold":0.25,"source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
		{
			"slow start",
			`dynamic shaker 127.0.0.1:8080 {
				slow_start 30s
			}`,
			`{"slow_start":30000000000,"source":"shaker","upstreams":["127.0.0.1:8080"]}`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := adaptDynamic(t, tc.block)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(got)
			if string(b) != tc.want {
				t.Errorf("got  %s\nwant %s", b, tc.want)
			}
		})
	}
}

func TestCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ block, want string }{
		{`dynamic shaker`, "no upstreams"},
		{`dynamic shaker {
			interval 1s
		}`, "no upstreams"},
		{`dynamic shaker a:1 {
			interval 0s
		}`, "interval '0s': must be positive"},
		{`dynamic shaker a:1 {
			interval -5s
		}`, "interval '-5s'"},
		{`dynamic shaker a:1 {
			interval soon
		}`, "interval 'soon'"},
		{`dynamic shaker a:1 {
			timeout 0
		}`, "timeout '0'"},
		{`dynamic shaker a:1 {
			passes 0
		}`, "passes '0': must be at least 1"},
		{`dynamic shaker a:1 {
			fast_interval 0s
		}`, "fast_interval '0s': must be positive"},
		{`dynamic shaker a:1 {
			jitter banana
		}`, `jitter "banana": want a percentage of the interval (5%), a duration (200ms) or off, at Caddyfile:4`},
		{`dynamic shaker a:1 {
			jitter 60%
		}`, `jitter "60%": must be from 0 to 50%`},
		{`dynamic shaker a:1 {
			jitter -1%
		}`, `jitter "-1%": must be from 0 to 50%`},
		{`dynamic shaker a:1 {
			jitter NaN%
		}`, `jitter "NaN%": must be from 0 to 50%`},
		{`dynamic shaker a:1 {
			jitter %
		}`, `jitter "%": want a percentage`},
		{`dynamic shaker a:1 {
			jitter -1s
		}`, `jitter "-1s": must not be negative`},
		{`dynamic shaker a:1 {
			jitter 1.5s
		}`, `jitter "1.5s": must be at most half the interval (1s)`},
		// the error is on the jitter's line, though the interval comes after
		{`dynamic shaker a:1 {
			jitter 600ms
			interval 1s
		}`, `jitter "600ms": must be at most half the interval (500ms), at Caddyfile:4`},
		{`dynamic shaker a:1 {
			jitter
		}`, "wrong argument count"},
		{`dynamic shaker a:1 {
			jitter 5% 10%
		}`, "wrong argument count"},
		{`dynamic shaker a:1 {
			panic_threshold 0
		}`, "panic_threshold '0': must be a fraction above 0 and at most 1"},
		{`dynamic shaker a:1 {
			panic_threshold 150%
		}`, "panic_threshold '150%'"},
		{`dynamic shaker a:1 {
			panic_threshold half
		}`, "panic_threshold 'half'"},
		{`dynamic shaker a:1 {
			down_interval never
		}`, "down_interval 'never'"},
		{`dynamic shaker a:1 {
			slow_start 0s
		}`, "slow_start '0s': must be positive"},
		{`dynamic shaker a:1 {
			slow_start gradually
		}`, "slow_start 'gradually'"},
		{`dynamic shaker a:1 {
			fails -1
		}`, "fails '-1': must be at least 1"},
		{`dynamic shaker a:1 {
			fails three
		}`, "fails 'three': not an integer"},
		{`dynamic shaker a:1 {
			port 65536
		}`, "port '65536': out of range 1-65535"},
		{`dynamic shaker a:1 {
			port 0
		}`, "port '0'"},
		{`dynamic shaker a:1 {
			rise 2
		}`, "unrecognized shaker option 'rise'"},
		{`dynamic shaker a:1 {
			interval
		}`, "wrong argument count"},
		{`dynamic shaker a:1 {
			passes 1 2
		}`, "wrong argument count"},
		{`dynamic shaker 10.0.0.1`, `upstream "10.0.0.1": missing port`},
		{`dynamic shaker 10.0.0.1:99999`, `upstream "10.0.0.1:99999": port "99999"`},
		{`dynamic shaker {
			to not/a/host:80
		}`, `upstream "not/a/host:80"`},
		{`dynamic shaker {
			to
		}`, "wrong argument count"},
	} {
		_, err := adaptDynamic(t, tc.block)
		if err == nil {
			t.Errorf("%s: no error", tc.block)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %q\nwant  %q", tc.block, err, tc.want)
		}
	}
}

func TestCaddyfileGlobalOption(t *testing.T) {
	adapt := func(src string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
		return string(out), err
	}
	out, err := adapt("{\n\tshaker {\n\t\tloops 3\n\t\tmax_sockets 5000\n\t\tmax_in_flight 256\n\t}\n}\n:8080 {\n\treverse_proxy {\n\t\tdynamic shaker 127.0.0.1:9001\n\t}\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, `"shaker":{"loops":3,"max_sockets":5000,"max_in_flight":256}`) {
		t.Errorf("no shaker app in %s", out)
	}
	for arg, want := range map[string]string{"all": `"all"`, "off": `"off"`, "50000": `50000`} {
		out, err := adapt("{\n\tshaker {\n\t\tper_address_metrics " + arg + "\n\t}\n}\n:8080 {\n\treverse_proxy {\n\t\tdynamic shaker 127.0.0.1:9001\n\t}\n}\n")
		if err != nil || !strings.Contains(out, `"shaker":{"per_address_metrics":`+want+`}`) {
			t.Errorf("per_address_metrics %s: %v, no shaker app with it in %s", arg, err, out)
		}
	}
	for _, mode := range []string{"connect", "raw", "auto"} {
		out, err := adapt("{\n\tshaker {\n\t\tprobe_mode " + mode + "\n\t\tsource_ports 61000-61511\n\t\tcloser_priority normal\n\t}\n}\n:8080 {\n\treverse_proxy {\n\t\tdynamic shaker 127.0.0.1:9001\n\t}\n}\n")
		if err != nil || !strings.Contains(out, `"shaker":{"probe_mode":"`+mode+`","source_ports":"61000-61511","closer_priority":"normal"}`) {
			t.Errorf("probe_mode %s: %v, no shaker app with it in %s", mode, err, out)
		}
	}
	for src, want := range map[string]string{
		"{\n\tshaker {\n\t\tprobe_mode syn\n\t}\n}\n":           `probe_mode "syn": must be connect (the default), raw or auto`,
		"{\n\tshaker {\n\t\tcloser_priority rt\n\t}\n}\n":       `closer_priority "rt": must be auto (the default), realtime or normal`,
		"{\n\tshaker {\n\t\tcloser_priority\n\t}\n}\n":          "wrong argument count",
		"{\n\tshaker {\n\t\tprobe_mode\n\t}\n}\n":               "wrong argument count",
		"{\n\tshaker {\n\t\tprobe_mode raw auto\n\t}\n}\n":      "wrong argument count",
		"{\n\tshaker {\n\t\tsource_ports 61000-99999\n\t}\n}\n": `source_ports "61000-99999": port range "61000-99999": want first-last, ports from 1 to 65535`,
		"{\n\tshaker {\n\t\tsource_ports 61511-61000\n\t}\n}\n": `source_ports "61511-61000": port range 61511-61000: the last port is below the first`,
		"{\n\tshaker {\n\t\tsource_ports 61000 61511\n\t}\n}\n": "wrong argument count",
		"{\n\tshaker {\n\t\tloops 0\n\t}\n}\n":                  "loops '0': must be an integer from 1 to 256",
		"{\n\tshaker {\n\t\tloops 1000\n\t}\n}\n":               "loops '1000': must be an integer from 1 to 256",
		"{\n\tshaker {\n\t\tmax_sockets many\n\t}\n}\n":         "max_sockets 'many'",
		"{\n\tshaker {\n\t\tmax_sockets 1 2\n\t}\n}\n":          "wrong argument count",
		"{\n\tshaker {\n\t\tmax_in_flight 0\n\t}\n}\n":          "max_in_flight '0'",
		"{\n\tshaker {\n\t\tmax_in_fly 10\n\t}\n}\n":            "unrecognized shaker global option 'max_in_fly'",
		"{\n\tshaker {\n\t\tper_address_metrics 0\n\t}\n}\n":    `per_address_metrics "0": must be a number of addresses from 1 to 2147483647, all or off`,
		"{\n\tshaker {\n\t\tper_address_metrics most\n\t}\n}\n": `per_address_metrics "most"`,
		"{\n\tshaker {\n\t\tper_address_metrics\n\t}\n}\n":      "wrong argument count",
		"{\n\tshaker {\n\t\tper_address_metrics 1 2\n\t}\n}\n":  "wrong argument count",
	} {
		if _, err := adapt(src); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want %q", src, err, want)
		}
	}
}

// TestJSONLoadErrors checks that a bad JSON config fails at load with an
// error that names the value.
func TestJSONLoadErrors(t *testing.T) {
	for _, tc := range []struct{ dyn, want string }{
		{`{"source":"shaker"}`, "no upstreams"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"-1s"}`, "interval -1s"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"timeout":"-2s"}`, "timeout -2s"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"passes":-1}`, "passes -1"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"fast_interval":"-1ms"}`, "fast_interval -1ms"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"1ns"}`, "interval 1ns: must be at least 1ms (or 0 for the default, 2s)"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"down_interval":"500us"}`, "down_interval 500µs: must be at least 1ms (or 0 for none)"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"banana"}`, `jitter "banana": want a percentage of the interval (5%), a duration (200ms) or off`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"60%"}`, `jitter "60%": must be from 0 to 50%`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"-1s"}`, `jitter "-1s": must not be negative`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":-1000000000}`, `jitter "-1s": must not be negative`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"1.5s"}`, `jitter "1.5s": must be at most half the interval (1s)`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"1s","jitter":"600ms"}`, `jitter "600ms": must be at most half the interval (500ms)`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":true}`, `jitter true: want a percentage`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":0.5}`, `jitter 0.5: want a percentage`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"panic_threshold":1.5}`, "panic_threshold 1.5: must be a fraction from 0 to 1"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"panic_threshold":-0.1}`, "panic_threshold -0.1"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"down_interval":"-1m"}`, "down_interval -1m0s"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"fails":-3}`, "fails -3"},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"port":65536}`, "port 65536"},
		{`{"source":"shaker","upstreams":["127.0.0.1"]}`, `upstream "127.0.0.1": missing port`},
		{`{"source":"shaker","upstreams":["127.0.0.1:1"],"rise":2}`, `unknown field "rise"`},
	} {
		err := validateProxy(t, `"dynamic_upstreams":`+tc.dyn)
		if err == nil {
			t.Errorf("%s: no error", tc.dyn)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %q\nwant  %q", tc.dyn, err, tc.want)
		}
	}
}

// TestJitterJSON: the forms "jitter" takes in JSON, and what they mean;
// Caddy's adapter writes the Caddyfile's value as a string, and it comes
// back the same.
func TestJitterJSON(t *testing.T) {
	for _, tc := range []struct {
		json    string
		percent float64
		d       time.Duration
	}{
		{`{}`, DefaultJitterPercent, 0},
		{`{"jitter":""}`, DefaultJitterPercent, 0},
		{`{"jitter":null}`, DefaultJitterPercent, 0},
		{`{"jitter":"10%"}`, 10, 0},
		{`{"jitter":"2.5%"}`, 2.5, 0},
		{`{"jitter":"50%"}`, 50, 0},
		{`{"jitter":"200ms"}`, 0, 200 * time.Millisecond},
		{`{"jitter":"1s"}`, 0, time.Second},
		{`{"jitter":200000000}`, 0, 200 * time.Millisecond}, // nanoseconds, as caddy.Duration
		{`{"jitter":"off"}`, 0, 0},
		{`{"jitter":"0"}`, 0, 0},
		{`{"jitter":"0%"}`, 0, 0},
		{`{"jitter":"0s"}`, 0, 0},
		{`{"jitter":0}`, 0, 0},
		{`{"interval":"10s","jitter":"5s"}`, 0, 5 * time.Second},
	} {
		var su Upstreams
		if err := caddy.StrictUnmarshalJSON([]byte(tc.json), &su); err != nil {
			t.Errorf("%s: %v", tc.json, err)
			continue
		}
		j, err := su.jitterSetting()
		if err != nil || j.percent != tc.percent || j.d != tc.d {
			t.Errorf("%s: jitter %v%% %v, %v; want %v%% %v", tc.json, j.percent, j.d, err, tc.percent, tc.d)
		}
		b, _ := json.Marshal(&su)
		var again Upstreams
		if err := caddy.StrictUnmarshalJSON(b, &again); err != nil || again.Jitter != su.Jitter {
			t.Errorf("%s: round trip %s: jitter %q, %v; want %q", tc.json, b, again.Jitter, err, su.Jitter)
		}
	}
}

// TestExamplesAdapt checks that the examples load as they are.
func TestExamplesAdapt(t *testing.T) {
	for _, ex := range []struct{ caddyfile, json string }{
		{"examples/Caddyfile", "examples/caddy.json"},
		{"examples/policy.Caddyfile", "examples/policy.json"},
	} {
		src, err := os.ReadFile(ex.caddyfile)
		if err != nil {
			t.Fatal(err)
		}
		out, warn, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": ex.caddyfile})
		if err != nil {
			t.Fatal(err)
		}
		if len(warn) > 0 {
			t.Errorf("%s: warnings: %v", ex.caddyfile, warn)
		}
		for name, raw := range map[string][]byte{ex.caddyfile: out, ex.json: caddytest.MustRead(t, ex.json)} {
			var c caddy.Config
			if err := json.Unmarshal(raw, &c); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if err := caddy.Validate(&c); err != nil {
				t.Errorf("%s: %v", name, err)
			}
		}
	}
}
