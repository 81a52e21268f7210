package caddyshaker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Fuzz targets for what a user can get wrong: the Caddyfile, the JSON
// config and the upstream addresses. Under `go test` they run their seeds
// only; to fuzz one:
//
//	go test -run '^$' -fuzz '^FuzzCaddyfile$' -fuzztime 60s .
//	go test -run '^$' -fuzz '^FuzzParseUpstream$' -fuzztime 60s .
//	go test -run '^$' -fuzz '^FuzzJSONConfig$' -fuzztime 60s .
//
// None of them probes anything: a config is only loaded (provisioned,
// never started) when every upstream in it is a loopback IP address.

// fuzzBlocks are the `dynamic shaker` blocks of the Caddyfile tests,
// valid and invalid, without the "dynamic shaker" that the target adds.
var fuzzBlocks = []string{
	`10.0.0.1:8080`,
	"10.0.0.1:8080 app.internal:8080 {\n\tinterval 2s\n\ttimeout  1s\n\tpasses   2\n\tfails    3\n\tport     9000\n}",
	"{\n\tto [::1]:8080 127.0.0.1:8080\n\tto db.internal:5432\n\tresolve_interval 30s\n\tresolve_timeout 2s\n}",
	"127.0.0.1:8080 {\n\tinterval 5s\n\tfast_interval 500ms\n\tdown_interval 30s\n}",
	"127.0.0.1:8080 {\n\tpanic_threshold 50%\n}",
	"127.0.0.1:8080 {\n\tjitter 10%\n\tinterval 1s\n}",
	"127.0.0.1:8080 {\n\tjitter 200ms\n\tfast_interval 100ms\n}",
	"127.0.0.1:8080 {\n\tjitter off\n}",
	"127.0.0.1:8080 {\n\tpanic_threshold 0.25\n\tforget_after 1m\n}",
	"{\n\tinner a my-service.internal 8080 {\n\t\trefresh 10s\n\t}\n\tinterval 1s\n}",
	"{\n\tinner srv _http._tcp.example.internal\n}",
	"{\n\tinner multi {\n\t\ta one.internal 80\n\t}\n}",
	"{\n\tinner shaker 127.0.0.1:1\n}",
	"{\n\tinner a x 80\n\tinner a y 80\n}",
	"{\n\tinner nope\n}",
	"{\n\tsource a my-service.internal 8080\n}", // inner's deprecated name
	"{\n\tinner a x 80\n\tsource a y 80\n}",
	``,
	"{\n\tinterval 1s\n}",
	"a:1 {\n\tinterval 0s\n}",
	"a:1 {\n\tinterval -5s\n}",
	"a:1 {\n\tinterval soon\n}",
	"a:1 {\n\tinterval 1ns\n}",
	"127.0.0.1:1 {\n\tinterval 600000h\n}",
	"a:1 {\n\ttimeout 0\n}",
	"a:1 {\n\tpasses 0\n}",
	"a:1 {\n\tpasses 99999999999999999999\n}",
	"a:1 {\n\tfast_interval 0s\n}",
	"a:1 {\n\tjitter banana\n}",
	"a:1 {\n\tjitter 60%\n}",
	"a:1 {\n\tjitter -1s\n}",
	"a:1 {\n\tjitter 600ms\n\tinterval 1s\n}",
	"a:1 {\n\tjitter NaN%\n}",
	"a:1 {\n\tjitter\n}",
	"a:1 {\n\tpanic_threshold 0\n}",
	"a:1 {\n\tpanic_threshold 150%\n}",
	"a:1 {\n\tpanic_threshold NaN\n}",
	"a:1 {\n\tpanic_threshold half\n}",
	"a:1 {\n\tdown_interval never\n}",
	"a:1 {\n\tfails -1\n}",
	"a:1 {\n\tfails three\n}",
	"a:1 {\n\tport 65536\n}",
	"a:1 {\n\tport 0\n}",
	"a:1 {\n\trise 2\n}",
	"a:1 {\n\tinterval\n}",
	"a:1 {\n\tpasses 1 2\n}",
	`10.0.0.1`,
	`10.0.0.1:99999`,
	"{\n\tto not/a/host:80\n}",
	"{\n\tto\n}",
	`http://10.0.0.1:80`,
	`{env.HOST}:80`,
	"a:1 {\n\tinterval 2s\n",
	"a:1 }",
	"a:1 {\n\t{\n\t}\n}",
	"a:1 {\n\tinterval `2s`\n}",
	"a:1 {\n\tinterval <<EOF\n\t2s\n\tEOF\n}",
}

// fuzzUpstreams are upstream and dial strings, good and bad, from the
// address tests.
var fuzzUpstreams = []string{
	"10.0.0.1:8080", "[::1]:443", "[::ffff:127.0.0.1]:80", "App.Internal:8080",
	"localhost:1", "db_1.svc.:5432", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536",
	"10.0.0.1:http", "http://10.0.0.1:80", "{env.X}:80", "bad host:80",
	"-x.example:80", "[::1:80", "", "127.0.0.1:+80", "127.0.0.1:0080",
	"[fe80::1%eth0]:80", "[foo]:80", ":80", "a..b:80", "x.:1",
	"tcp/[::1]:443", "tcp4/10.0.0.1:80", "tcp6/[::1]:443", "Backend.Internal.:5432",
	"unix//run/app.sock", "udp/10.0.0.1:53", "{http.request.host}:80", "ip:1/2",
}

// FuzzParseUpstream: parseUpstream (configured upstreams) and parseDial
// (upstreams another source returns) never panic; what they accept has a
// port from 1 to 65535 and either an IP address or a valid host name, in a
// form that parses again to the same; parseUpstream's errors quote the
// bad value.
func FuzzParseUpstream(f *testing.F) {
	for _, s := range fuzzUpstreams {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		checkParseUpstream(t, s)
		checkParseDial(t, s)
	})
}

func checkParseUpstream(t *testing.T, s string) {
	spec, err := parseUpstream(s)
	if err != nil {
		if !strings.Contains(err.Error(), strconv.Quote(s)) {
			t.Fatalf("parseUpstream(%q): error %q does not quote the value", s, err)
		}
		return
	}
	if spec.raw != s || spec.port == 0 {
		t.Fatalf("parseUpstream(%q): raw %q port %d", s, spec.raw, spec.port)
	}
	var host string
	switch {
	case spec.ip.IsValid():
		if spec.host != "" || spec.ip.Is4In6() {
			t.Fatalf("parseUpstream(%q): ip %v and host %q", s, spec.ip, spec.host)
		}
		host = spec.ip.String()
	default:
		if !validHostName(spec.host) || spec.host != strings.ToLower(spec.host) || strings.HasSuffix(spec.host, ".") {
			t.Fatalf("parseUpstream(%q): host %q", s, spec.host)
		}
		host = spec.host
	}
	// the address it stands for (as it is dialled) is accepted as well,
	// and means the same
	norm := net.JoinHostPort(host, strconv.Itoa(int(spec.port)))
	again, err := parseUpstream(norm)
	if err != nil || again.ip != spec.ip || again.host != spec.host || again.port != spec.port {
		t.Fatalf("parseUpstream(%q) = %+v, but its address %q parses to %+v, %v", s, spec, norm, again, err)
	}
	// and a shaker source that discovers it probes it the same way
	d := parseDial(norm)
	if !d.probe || d.ip != spec.ip || d.host != spec.host || d.port != spec.port {
		t.Fatalf("parseUpstream(%q) = %+v, but parseDial(%q) = probe %v ip %v host %q port %d",
			s, spec, norm, d.probe, d.ip, d.host, d.port)
	}
}

func checkParseDial(t *testing.T, s string) {
	d := parseDial(s)
	if d.dial != s {
		t.Fatalf("parseDial(%q): dial %q", s, d.dial)
	}
	if !d.probe {
		if d.port != 0 || d.host != "" || d.ip.IsValid() {
			t.Fatalf("parseDial(%q): not probed, but port %d host %q ip %v", s, d.port, d.host, d.ip)
		}
		return
	}
	if d.port == 0 {
		t.Fatalf("parseDial(%q): probed at port 0", s)
	}
	if d.ip.IsValid() == (d.host != "") {
		t.Fatalf("parseDial(%q): ip %v and host %q: want exactly one", s, d.ip, d.host)
	}
	if d.ip.Is4In6() {
		t.Fatalf("parseDial(%q): ip %v not unmapped", s, d.ip)
	}
	if d.host != "" && (!validHostName(d.host) || d.host != strings.ToLower(d.host) || strings.HasSuffix(d.host, ".")) {
		t.Fatalf("parseDial(%q): host %q", s, d.host)
	}
}

// FuzzCaddyfile feeds text after `dynamic shaker` to the Caddyfile
// unmarshaler. It never panics; an error names the place in the file; a
// block it accepts has upstreams or a source (not both) that parse,
// round-trips through JSON, and either validates or fails Validate with
// a message that names the setting. Blocks it accepts whose upstreams
// are all loopback IP addresses are also loaded by Caddy (see
// checkDynamicJSON).
func FuzzCaddyfile(f *testing.F) {
	for _, b := range fuzzBlocks {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, text string) {
		su, err := unmarshalShaker(text)
		if errors.Is(err, errLexer) {
			return // Caddy's lexer rejects it: it never reaches us
		}
		if err != nil {
			msg := err.Error()
			// Caddy's errors from the Dispenser name file and line;
			// an inner source's own errors are its module's business
			if !strings.Contains(msg, "Testfile:") && !strings.Contains(text, "source") && !strings.Contains(text, "inner") {
				t.Fatalf("error %q does not say where", msg)
			}
			return
		}
		if (len(su.Upstreams) > 0) == (su.InnerRaw != nil) {
			t.Fatalf("accepted with upstreams %q and source %s: want one of them", su.Upstreams, su.InnerRaw)
		}
		if _, err := parseUpstreams(su.Upstreams); err != nil {
			t.Fatalf("accepted an upstream that does not parse: %v", err)
		}
		for name, d := range map[string]caddy.Duration{
			"interval": su.Interval, "fast_interval": su.FastInterval, "down_interval": su.DownInterval,
			"timeout": su.Timeout, "resolve_interval": su.ResolveInterval, "resolve_timeout": su.ResolveTimeout,
			"forget_after": su.ForgetAfter,
		} {
			if d < 0 {
				t.Fatalf("accepted %s %v", name, d)
			}
		}
		if _, err := su.jitterSetting(); err != nil {
			t.Fatalf("accepted %v", err)
		}
		if su.Passes < 0 || su.Fails < 0 || su.Port < 0 || su.Port > 65535 ||
			!(su.PanicThreshold >= 0 && su.PanicThreshold <= 1) {
			t.Fatalf("accepted passes %d fails %d port %d panic_threshold %v", su.Passes, su.Fails, su.Port, su.PanicThreshold)
		}

		// JSON round trip, decoded the strict way Caddy decodes modules
		b1, err := json.Marshal(su)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var su2 Upstreams
		if err := caddy.StrictUnmarshalJSON(b1, &su2); err != nil {
			t.Fatalf("%s does not decode: %v", b1, err)
		}
		b2, _ := json.Marshal(&su2)
		if !bytes.Equal(b1, b2) {
			t.Fatalf("JSON round trip:\n%s\n%s", b1, b2)
		}
		if err := su2.Validate(); err != nil {
			checkNamesSetting(t, err)
		}
		// as the adapter writes it: the module's fields plus its name
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(b1, &obj); err != nil {
			t.Fatal(err)
		}
		obj["source"] = json.RawMessage(`"shaker"`)
		dyn, _ := json.Marshal(obj)
		checkDynamicJSON(t, dyn)
	})
}

var errLexer = errors.New("lexer error")

// unmarshalShaker unmarshals text after `dynamic shaker` as reverse_proxy
// does: the dispenser it gets starts at the module name.
func unmarshalShaker(text string) (*Upstreams, error) {
	tokens, err := caddyfile.Tokenize([]byte("shaker "+text), "Testfile")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errLexer, err)
	}
	su := new(Upstreams)
	return su, su.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
}

// TestFuzzCaddyfileHarness: the fuzz target's way in accepts the valid
// seeds and rejects the invalid ones, as the adapter does.
func TestFuzzCaddyfileHarness(t *testing.T) {
	for i, text := range fuzzBlocks {
		_, err := unmarshalShaker(text)
		src := ":8080 {\n\treverse_proxy {\n\t\tdynamic shaker " + text + "\n\t}\n}\n"
		_, _, adaptErr := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
		if (err == nil) != (adaptErr == nil) {
			t.Errorf("seed %d %q: unmarshal error %v, adapter error %v", i, text, err, adaptErr)
		}
		if i < 6 && err != nil {
			t.Errorf("valid seed %d %q: %v", i, text, err)
		}
	}
}

// settingNames are the JSON names of the source's settings.
var settingNames = []string{
	"upstreams", "interval", "fast_interval", "down_interval", "timeout",
	"resolve_interval", "resolve_timeout", "forget_after", "passes", "fails",
	"port", "panic_threshold", "jitter", "no upstreams", "inner",
}

// checkNamesSetting fails unless err starts with the name of a setting.
func checkNamesSetting(t *testing.T, err error) {
	t.Helper()
	for _, n := range settingNames {
		if strings.HasPrefix(err.Error(), n+" ") || strings.HasPrefix(err.Error(), n+":") {
			return
		}
	}
	t.Fatalf("error %q does not name the setting", err)
}

// fuzzJSONSeeds are dynamic_upstreams objects, good and bad, from the
// JSON tests.
var fuzzJSONSeeds = []string{
	`{"source":"shaker","upstreams":["127.0.0.1:1"]}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1","[::1]:2"],"interval":"50ms","timeout":"40ms","passes":2,"fails":3,"port":9000}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"fast_interval":"10ms","down_interval":"1s","panic_threshold":0.5,"forget_after":"1m"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":9000000000000000000}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":2000000000000000000}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"passes":1.0,"port":8e3}`,
	`{"source":"shaker"}`,
	`{"source":"shaker","upstreams":[]}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"-1s"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"timeout":"-2s"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"passes":-1}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"fast_interval":"-1ms"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"1ns"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"down_interval":"500us"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"10%"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"interval":"1s","jitter":"500ms"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":200000000}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"off"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"banana"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"60%"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"-1s"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":"1.5s"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"jitter":true}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"panic_threshold":1.5}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"panic_threshold":-0.1}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"down_interval":"-1m"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"fails":-3}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"port":65536}`,
	`{"source":"shaker","upstreams":["127.0.0.1"]}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"rise":2}`,
	`{"source":"shaker","upstreams":["10.0.0.1:80"]}`,
	`{"source":"shaker","upstreams":["app.internal:80"],"interval":"-1s"}`,
	`{"source":"shaker","upstreams":["127.0.0.1:1"],"inner":{"source":"a","name":"x","port":"80"}}`,
	`{"source":"shaker","inner":{"source":"shaker_test_list","list":"x"}}`,
	`{"source":"shaker","discover":{"source":"a","name":"x","port":"80"}}`, // inner's deprecated name
	`{"source":"shaker","inner":{"source":"a","name":"x","port":"80"},"discover":{"source":"a","name":"y","port":"80"}}`,
	`{"source":"shaker","upstreams":"127.0.0.1:1"}`,
	`{"source":"shaker","upstreams":[1]}`,
	`{"source":"shaker","interval":true}`,
	`[]`,
	`"shaker"`,
	`null`,
}

// FuzzJSONConfig: any JSON value as the dynamic_upstreams of a
// reverse_proxy handler (with "source":"shaker" when it is an object)
// never panics, and Caddy accepts it exactly when the source's own
// checks (decoding, Validate, address parsing) accept it, with their
// message when they do not.
func FuzzJSONConfig(f *testing.F) {
	for _, s := range fuzzJSONSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if !json.Valid(data) {
			return // not JSON: it could not be spliced into a config
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal(data, &obj) == nil && obj != nil {
			obj["source"] = json.RawMessage(`"shaker"`)
			data, _ = json.Marshal(obj)
		}
		checkDynamicJSON(t, data)
	})
}

// checkDynamicJSON checks one dynamic_upstreams value (valid JSON): the
// source's own checks and Caddy's loading agree. Caddy is only asked to
// load it (caddy.Validate: provision, never start, so nothing is
// probed) when the source's own checks reject it before anything would
// be resolved, or when it has no inner source and every upstream is
// a loopback IP address.
func checkDynamicJSON(t *testing.T, dyn []byte) {
	t.Helper()
	// Decode as Caddy does: the inline "source" key is removed by
	// decoding into map[string]any and encoding again, then the module
	// is decoded strictly.
	var ownErr error
	var su Upstreams
	var m map[string]any
	if err := json.Unmarshal(dyn, &m); err != nil || m == nil {
		ownErr = fmt.Errorf("not an object")
	} else {
		delete(m, "source")
		raw, err := json.Marshal(m)
		if err != nil {
			ownErr = err
		} else {
			ownErr = caddy.StrictUnmarshalJSON(raw, &su)
		}
	}
	decoded := ownErr == nil
	var checkErr error // Validate or parseUpstreams: what Provision does first
	if decoded {
		if checkErr = su.Validate(); checkErr != nil {
			checkNamesSetting(t, checkErr)
		} else if _, checkErr = parseUpstreams(su.Upstreams); checkErr != nil &&
			!strings.HasPrefix(checkErr.Error(), "upstream ") {
			t.Fatalf("parseUpstreams error %q does not name the upstream", checkErr)
		}
	}
	loopbackOnly := decoded && su.InnerRaw == nil && su.DiscoverRaw == nil
	for _, u := range su.Upstreams {
		s, err := parseUpstream(u)
		if err == nil && !(s.ip.IsValid() && s.ip.IsLoopback()) {
			loopbackOnly = false
		}
	}
	if !(decoded && checkErr != nil) && !loopbackOnly {
		return // Caddy would resolve names or load other modules: not here
	}

	cfg := []byte(`{"logging":{"logs":{"default":{"level":"ERROR"}}},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:0"],` +
		`"automatic_https":{"disable":true},"routes":[{"handle":[{"handler":"reverse_proxy","dynamic_upstreams":` +
		string(dyn) + `}]}]}}}}}`)
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatalf("config does not decode: %v\n%s", err, cfg)
	}
	idle := engines.cur.Load() == nil
	err := caddy.Validate(&c)
	switch {
	case checkErr != nil && err == nil:
		t.Fatalf("%s: loaded, but Validate or parseUpstreams said %v", dyn, checkErr)
	case checkErr != nil && !strings.Contains(err.Error(), checkErr.Error()):
		t.Fatalf("%s: load error %q, want it to say %q", dyn, err, checkErr)
	case checkErr == nil && err != nil:
		t.Fatalf("%s: the source's checks pass, but loading failed: %v", dyn, err)
	}
	if idle {
		// a config that was only validated leaves nothing running
		n := reg.Len()
		if n != 0 || engines.cur.Load() != nil {
			t.Fatalf("%s: after validation: %d checkers, engine running %v", dyn, n, engines.cur.Load() != nil)
		}
	}
}
