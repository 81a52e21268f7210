package caddyshaker

import (
	"encoding/json"
	"runtime"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestProbeModeJSON: the app's probe_mode and source_ports in JSON, what
// they mean, and the errors of bad values, which name them.
func TestProbeModeJSON(t *testing.T) {
	for _, tc := range []struct {
		json  string
		mode  shaker.Mode
		ports shaker.PortRange
	}{
		{`{}`, shaker.ModeConnect, shaker.PortRange{}},
		{`{"probe_mode":""}`, shaker.ModeConnect, shaker.PortRange{}},
		{`{"probe_mode":"connect"}`, shaker.ModeConnect, shaker.PortRange{}},
		{`{"probe_mode":"raw"}`, shaker.ModeRaw, shaker.PortRange{}},
		{`{"probe_mode":"auto"}`, shaker.ModeAuto, shaker.PortRange{}},
		{`{"probe_mode":"raw","source_ports":"61000-61511"}`, shaker.ModeRaw, shaker.PortRange{First: 61000, Last: 61511}},
		{`{"probe_mode":"raw","loops":1,"source_ports":"62000"}`, shaker.ModeRaw, shaker.PortRange{First: 62000, Last: 62000}},
		// unused in connect mode: accepted (Provision warns), whatever the loops
		{`{"loops":4,"source_ports":"62000-62001"}`, shaker.ModeConnect, shaker.PortRange{First: 62000, Last: 62001}},
	} {
		var a App
		if err := caddy.StrictUnmarshalJSON([]byte(tc.json), &a); err != nil {
			t.Errorf("%s: %v", tc.json, err)
			continue
		}
		if err := a.Validate(); err != nil {
			t.Errorf("%s: %v", tc.json, err)
			continue
		}
		s, err := a.engineSettings()
		if err != nil || s.mode != tc.mode || s.ports != tc.ports {
			t.Errorf("%s: mode %v ports %v, %v; want %v %v", tc.json, s.mode, s.ports, err, tc.mode, tc.ports)
		}
		b, _ := json.Marshal(&a)
		var again App
		if err := caddy.StrictUnmarshalJSON(b, &again); err != nil || again.ProbeMode != a.ProbeMode || again.SourcePorts != a.SourcePorts {
			t.Errorf("%s: round trip %s: %q %q, %v", tc.json, b, again.ProbeMode, again.SourcePorts, err)
		}
	}
	for _, tc := range []struct{ json, want string }{
		{`{"probe_mode":"rawr"}`, `probe_mode "rawr": must be connect (the default), raw or auto`},
		{`{"probe_mode":"RAW"}`, `probe_mode "RAW": must be connect (the default), raw or auto`},
		{`{"probe_mode":"raw","source_ports":"70000-70001"}`, `source_ports "70000-70001": port range "70000-70001": want first-last, ports from 1 to 65535`},
		{`{"probe_mode":"raw","source_ports":"lots"}`, `source_ports "lots": port range "lots": want first-last`},
		{`{"probe_mode":"raw","source_ports":"62000-61000"}`, `source_ports "62000-61000": port range 62000-61000: the last port is below the first`},
		{`{"probe_mode":"raw","source_ports":"0-100"}`, `source_ports "0-100": port range 0-100: port 0 is not a port`},
		{`{"probe_mode":"raw","source_ports":"1000-30000"}`, `source_ports "1000-30000": port range 1000-30000: 29001 ports, more than 16384`},
		{`{"source_ports":"5-1"}`, `source_ports "5-1"`}, // checked in connect mode too
		{`{"probe_mode":"raw","loops":4,"source_ports":"62000-62002"}`, `source_ports "62000-62002": 3 ports for 4 loops: each loop needs one at least`},
		{`{"probe_mode":"auto","loops":2,"source_ports":"62000"}`, `source_ports "62000": 1 ports for 2 loops`},
		{`{"closer_priority":"fifo"}`, `closer_priority "fifo": must be auto (the default), realtime or normal`},
		{`{"closer_priority":"Realtime"}`, `closer_priority "Realtime"`},
	} {
		var a App
		if err := caddy.StrictUnmarshalJSON([]byte(tc.json), &a); err != nil {
			t.Errorf("%s: %v", tc.json, err)
			continue
		}
		if err := a.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.json, err, tc.want)
		}
	}
	for js, want := range map[string]shaker.Priority{`{}`: shaker.PriorityAuto, `{"closer_priority":"auto"}`: shaker.PriorityAuto,
		`{"closer_priority":"realtime"}`: shaker.PriorityRealtime, `{"closer_priority":"normal"}`: shaker.PriorityNormal} {
		var a App
		if err := caddy.StrictUnmarshalJSON([]byte(js), &a); err != nil {
			t.Fatalf("%s: %v", js, err)
		}
		if s, err := a.engineSettings(); err != nil || s.priority != want {
			t.Errorf("%s: closer priority %v, %v; want %v", js, s.priority, err, want)
		}
	}
	// with the default loops (one per CPU), the ports are checked against
	// that number
	if n := runtime.GOMAXPROCS(0); n > 1 {
		a := App{ProbeMode: "raw", SourcePorts: "62000"}
		if err := a.Validate(); err == nil || !strings.Contains(err.Error(), "1 ports for") {
			t.Errorf("one source port for %d default loops: error %v", n, err)
		}
	}
}

// TestProbeModeLoadError: a bad probe_mode fails the load of a whole
// config, naming the value, before any engine starts.
func TestProbeModeLoadError(t *testing.T) {
	for _, tc := range []struct{ app, want string }{
		{`{"probe_mode":"syn"}`, `probe_mode "syn": must be connect (the default), raw or auto`},
		{`{"probe_mode":"raw","source_ports":"61000-"}`, `source_ports "61000-"`},
	} {
		cfg := `{"admin":{"disabled":true},"apps":{"shaker":` + tc.app + `,"http":{"servers":{"s":{"listen":["127.0.0.1:0"],"routes":[{"handle":[{"handler":"reverse_proxy","dynamic_upstreams":{"source":"shaker","upstreams":["127.0.0.1:1"]}}]}]}}}}}`
		var c caddy.Config
		if err := json.Unmarshal([]byte(cfg), &c); err != nil {
			t.Fatal(err)
		}
		if err := caddy.Validate(&c); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\nerror %v\nwant  %q", tc.app, err, tc.want)
		}
		if engines.cur.Load() != nil {
			t.Fatalf("%s: an engine runs after the failed load", tc.app)
		}
	}
}

// TestEngineSettingsChanged: what a reload's warning names.
func TestEngineSettingsChanged(t *testing.T) {
	raw := shaker.ModeRaw
	ports := shaker.PortRange{First: 62000, Last: 62063}
	for _, tc := range []struct {
		running, configured engineSettings
		want                string
	}{
		{engineSettings{}, engineSettings{}, ""},
		{engineSettings{loops: 2}, engineSettings{loops: 3, maxSockets: 10}, "loops,max_sockets"},
		{engineSettings{}, engineSettings{mode: raw}, "probe_mode"},
		{engineSettings{mode: shaker.ModeAuto}, engineSettings{mode: raw}, "probe_mode"},
		{engineSettings{mode: raw}, engineSettings{mode: raw, ports: ports}, "source_ports"},
		{engineSettings{}, engineSettings{mode: raw, ports: ports}, "probe_mode,source_ports"},
		// connect mode uses no source ports: nothing to warn about
		{engineSettings{}, engineSettings{ports: ports}, ""},
	} {
		if got := strings.Join(tc.running.changed(tc.configured), ","); got != tc.want {
			t.Errorf("%+v -> %+v: changed %q, want %q", tc.running, tc.configured, got, tc.want)
		}
	}
}
