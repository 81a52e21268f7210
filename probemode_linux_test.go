//go:build linux

package caddyshaker

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Source ports of the raw-mode tests: outside the ephemeral range and
// apart from the default range, which other engines of this host may
// reserve too.
const testSourcePorts = "61600-61663"

// logLine returns the one line logged with message msg, failing the test
// unless there is exactly one; its fields by key.
func logLine(t *testing.T, logs *observer.ObservedLogs, level zapcore.Level, msg string) map[string]any {
	t.Helper()
	lines := logs.FilterMessage(msg).All()
	if len(lines) != 1 {
		t.Fatalf("%d lines %q, want 1; the log: %v", len(lines), msg, logs.All())
	}
	if lines[0].Level != level {
		t.Errorf("%q logged at %v, want %v", msg, lines[0].Level, level)
	}
	return lines[0].ContextMap()
}

// TestProbeModeEngine: the app starts the engine in the mode it asks for,
// logs it, and GET /shaker/engine and caddy_shaker_probe_mode say it; a
// later config keeps the running engine and warns about each setting it
// changes, naming it; auto chooses raw where raw sockets open, and
// connect (logged, with the reason) where raw mode cannot start.
func TestProbeModeEngine(t *testing.T) {
	testkit.NeedRaw(t)
	if engines.cur.Load() != nil {
		t.Fatal("an engine is already running")
	}
	defaults, err := shaker.DefaultPortRange()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("raw", func(t *testing.T) {
		a := &App{ProbeMode: "raw"}
		logs := acquireTestApp(t, a)
		e := engines.cur.Load()
		if e.Mode() != shaker.ModeRaw || e.SourcePorts() != defaults {
			t.Fatalf("engine mode %v, source ports %v; want raw, %v (the default)", e.Mode(), e.SourcePorts(), defaults)
		}
		f := logLine(t, logs, zapcore.InfoLevel, "probe engine started")
		if f["probe_mode"] != "raw" || f["source_ports"] != defaults.String() || f["probe_mode_asked"] != nil {
			t.Errorf("probe engine started: %v; want probe_mode raw, source_ports %v, no probe_mode_asked", f, defaults)
		}
		es := engineStatus()
		if es.ProbeMode != "raw" || es.ProbeModeAsked != "raw" || es.SourcePorts != defaults.String() || es.RawError != "" || es.Sockets != 0 ||
			es.CloserPriority != "none" {
			t.Errorf("engine status %+v: want probe_mode raw, asked raw, source_ports %v, no raw_error, 0 sockets, closer_priority none", es, defaults)
		}
		if g := gauges(t, "caddy_shaker_probe_mode"); len(g) != 2 || g["raw"] != 1 || g["connect"] != 0 {
			t.Errorf("caddy_shaker_probe_mode %v: want raw 1, connect 0", g)
		}

		// later configs: the engine stays, each change is named
		for _, tc := range []struct {
			app  App
			want string // the warning's start; "": none
			mode string // the configured probe_mode it names
		}{
			{App{ProbeMode: "raw"}, "", "raw"},
			{App{ProbeMode: "raw", CloserPriority: "normal"}, "", "raw"}, // raw mode has no closers
			{App{ProbeMode: "connect"}, "probe_mode changed", "connect"},
			{App{}, "probe_mode changed", "connect"},
			{App{ProbeMode: "raw", SourcePorts: testSourcePorts}, "source_ports changed", "raw"},
			{App{ProbeMode: "auto", Loops: 2}, "loops, probe_mode changed", "auto"},
		} {
			b := tc.app
			logs := acquireTestApp(t, &b)
			if engines.cur.Load() != e {
				t.Fatalf("%+v: the engine was replaced", tc.app)
			}
			warns := logs.FilterLevelExact(zapcore.WarnLevel).All()
			if tc.want == "" {
				if len(warns) != 0 {
					t.Errorf("%+v: warned %v", tc.app, warns)
				}
				continue
			}
			if len(warns) != 1 || !strings.HasPrefix(warns[0].Message, tc.want+": the running engine keeps its settings until it restarts") {
				t.Errorf("%+v: warnings %v, want one %q", tc.app, warns, tc.want)
				continue
			}
			f := warns[0].ContextMap()
			running, _ := f["running"].(map[string]any)
			configured, _ := f["configured"].(map[string]any)
			if running["probe_mode"] != "raw" || running["source_ports"] != "default" || f["probe_mode_in_use"] != "raw" ||
				configured["probe_mode"] != tc.mode {
				t.Errorf("%+v: warning fields %v", tc.app, f)
			}
		}
		if es := engineStatus(); es.ProbeMode != "raw" || es.ProbeModeAsked != "raw" {
			t.Errorf("after later configs, engine status %+v: want raw, asked raw (the engine's own)", es)
		}
	})
	if engines.cur.Load() != nil {
		t.Fatal("the engine still runs after every app released it")
	}
	if g := gauges(t, "caddy_shaker_probe_mode"); g["raw"] != 0 || g["connect"] != 0 {
		t.Errorf("caddy_shaker_probe_mode %v without an engine: want 0 and 0", g)
	}

	t.Run("auto chooses raw", func(t *testing.T) {
		logs := acquireTestApp(t, &App{ProbeMode: "auto", SourcePorts: testSourcePorts})
		f := logLine(t, logs, zapcore.InfoLevel, "probe engine started")
		if f["probe_mode"] != "raw" || f["probe_mode_asked"] != "auto" || f["source_ports"] != testSourcePorts {
			t.Errorf("probe engine started: %v; want probe_mode raw, probe_mode_asked auto, source_ports %s", f, testSourcePorts)
		}
		logLine(t, logs, zapcore.InfoLevel, "probe_mode auto chose raw: raw sockets can be opened here, so SYN-ACKs are reset by the kernel and no probe can become a connection")
		es := engineStatus()
		if es.ProbeMode != "raw" || es.ProbeModeAsked != "auto" || es.SourcePorts != testSourcePorts || es.RawError != "" {
			t.Errorf("engine status %+v: want raw, asked auto, source_ports %s, no raw_error", es, testSourcePorts)
		}
	})

	t.Run("auto falls back", func(t *testing.T) {
		// a listener without SO_REUSEPORT holds the one source port
		l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
		port := fmt.Sprint(l.Addr.Port())
		logs := acquireTestApp(t, &App{ProbeMode: "auto", Loops: 1, SourcePorts: port})
		e := engines.cur.Load()
		if e.Mode() != shaker.ModeConnect || e.RawError() == nil || errors.Is(e.RawError(), shaker.ErrRawUnavailable) {
			t.Fatalf("engine mode %v, raw error %v: want connect, for the port held", e.Mode(), e.RawError())
		}
		f := logLine(t, logs, zapcore.InfoLevel, "probe engine started")
		if f["probe_mode"] != "connect" || f["probe_mode_asked"] != "auto" || f["source_ports"] != nil {
			t.Errorf("probe engine started: %v; want probe_mode connect, probe_mode_asked auto, no source_ports", f)
		}
		f = logLine(t, logs, zapcore.WarnLevel, "probe_mode auto chose connect: raw mode could not start")
		if r, _ := f["reason"].(string); !strings.Contains(r, "reserving source port "+port) || r != e.RawError().Error() {
			t.Errorf("reason %q, want the engine's raw error %q", r, e.RawError())
		}
		es := engineStatus()
		if es.ProbeMode != "connect" || es.ProbeModeAsked != "auto" || es.SourcePorts != "" || es.RawError != e.RawError().Error() {
			t.Errorf("engine status %+v: want connect, asked auto, no source_ports, raw_error %q", es, e.RawError())
		}
		if g := gauges(t, "caddy_shaker_probe_mode"); g["raw"] != 0 || g["connect"] != 1 {
			t.Errorf("caddy_shaker_probe_mode %v: want raw 0, connect 1", g)
		}
		if n := l.ProbeAccepts(t); n != 0 {
			t.Errorf("the listener holding the port accepted %d connections", n)
		}
	})
}

// TestRawModeInCaddy: Caddy with probe_mode raw (and auto, which must
// choose raw here) probes real backends: they come up, a stopped one goes
// down (refused) and comes back, GET /shaker/engine and the gauge say
// raw, the self-check passes, a reload that asks for connect keeps the
// raw engine, and no backend ever accepted a connection.
func TestRawModeInCaddy(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	testkit.NeedRaw(t)
	for _, mode := range []string{"raw", "auto"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarnessApp(t, 3, map[string]any{"probe_mode": mode, "source_ports": testSourcePorts})
			b2 := h.backends[1]
			st := h.waitProbes(nil, 10, 10*tInterval+5*time.Second)
			for _, b := range h.backends {
				if s := st[b.addr]; !s.Healthy || s.LastError != "" {
					t.Errorf("%s: status %+v, want healthy", b.name, s)
				}
			}
			es := h.awaitSelfCheck()
			if es.SelfCheck != checkOK || !es.HalfOpen || es.ProbeMode != "raw" || es.ProbeModeAsked != mode ||
				es.SourcePorts != testSourcePorts || es.RawError != "" || es.Sockets != 0 {
				t.Fatalf("GET /shaker/engine %+v: want self_check ok, probe_mode raw, asked %s, source_ports %s, no raw_error, 0 sockets",
					es, mode, testSourcePorts)
			}
			h.checkMetrics(`caddy_shaker_probe_mode{mode="raw"} 1`, `caddy_shaker_probe_mode{mode="connect"} 0`,
				"caddy_shaker_half_open 1")
			if n := h.probeAccepts(); n != 0 {
				t.Fatalf("backends accepted %d connections from raw probes alone", n)
			}
			if seen := h.servedBy(30); len(seen) != 3 {
				t.Errorf("requests reached %v, want all 3 backends", seen)
			}
			acc0 := h.probeAccepts() // the proxy's connections

			b2.stop()
			waitFor(t, 5*time.Second, "b2 down", func() bool { return !h.statuses()[b2.addr].Healthy })
			if s := h.statuses()[b2.addr]; s.LastError != "refused" {
				t.Errorf("stopped b2: status %+v, want last_error refused", s)
			}
			b2.start()
			waitFor(t, 5*time.Second, "b2 up again", func() bool { return h.statuses()[b2.addr].Healthy })

			// a reload asking for connect: the raw engine goes on
			e := engines.cur.Load()
			h.app = map[string]any{"probe_mode": "connect"}
			h.extraKnob++
			h.load(tInterval)
			h.waitProbes(h.statuses(), 3, 5*time.Second)
			if engines.cur.Load() != e {
				t.Error("the reload replaced the engine")
			}
			if es := h.awaitSelfCheck(); es.ProbeMode != "raw" || es.ProbeModeAsked != mode {
				t.Errorf("after the reload, GET /shaker/engine %+v: want probe_mode raw, asked %s", es, mode)
			}
			if n := h.probeAccepts() - acc0; n != 0 {
				t.Errorf("backends accepted %d connections from raw probes, since the requests", n)
			}
			h.noLeakedProbes()
		})
	}
}

// TestRawModeNeedsCapNetRaw: without CAP_NET_RAW (the test binary runs
// again as user nobody, with no capabilities), a config with probe_mode
// raw fails to load with the engine's error, which says what to grant,
// and starts no engine; one with probe_mode auto loads, probes in connect
// mode, logs why (Info), and GET /shaker/engine's raw_error says it too.
func TestRawModeNeedsCapNetRaw(t *testing.T) {
	l := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	out := runAsNobody(t, "rawmode", "SHAKER_SECURITY_ADDR="+l.Addr.String())
	res := testkit.ResultsByName(out)
	checkPrivileges(t, res)
	rawErr := strings.Join(res["rawload"], " ")
	for _, want := range []string{"starting probe engine (probe_mode raw, closer_priority auto)", "raw mode needs CAP_NET_RAW",
		"Docker grants it by default", "AmbientCapabilities=CAP_NET_RAW", "; engine false"} {
		if !strings.Contains(rawErr, want) {
			t.Errorf("probe_mode raw without CAP_NET_RAW: %q does not say %q", rawErr, want)
		}
	}
	if r := res["auto"]; len(r) != 4 || r[0] != "connect" || r[1] != "auto" || r[2] != "true" || r[3] != "true" {
		t.Errorf("probe_mode auto without CAP_NET_RAW (mode, asked, raw_error says CAP_NET_RAW, healthy): %v; want connect auto true true", r)
	}
	// Caddy's own log, at INFO: the choice and its reason
	var chose bool
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, `"msg":"probe_mode auto chose connect: raw sockets are refused here"`) {
			chose = strings.Contains(line, `"level":"info"`) && strings.Contains(line, `"reason":"shaker: socket(AF_INET, SOCK_RAW, IPPROTO_TCP): operation not permitted; raw mode needs CAP_NET_RAW`)
		}
	}
	if !chose {
		t.Error("no info line 'probe_mode auto chose connect: raw sockets are refused here' with the reason in the child's log")
	}
	if n := l.ProbeAccepts(t); n != 0 {
		t.Errorf("the listener accepted %d connections", n)
	}
}

// helperRawModeNoCap is TestRawModeNeedsCapNetRaw's child: it loads a
// config with probe_mode raw (RESULT rawload: the error, and whether an
// engine runs after), then
// one with auto (RESULT auto: the mode in use, the mode asked, whether
// raw_error names CAP_NET_RAW, whether the upstream came up).
func helperRawModeNoCap(t *testing.T) {
	printPrivileges(t)
	addr := os.Getenv("SHAKER_SECURITY_ADDR")
	config := func(mode string) []byte {
		return []byte(fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
		"logging":{"logs":{"default":{"level":"INFO","writer":{"output":"stdout"},"encoder":{"format":"json"}}}},
		"apps":{"shaker":{"probe_mode":%q},"http":{"servers":{"p":{"listen":["127.0.0.1:0"],"automatic_https":{"disable":true},
		"routes":[{"handle":[{"handler":"reverse_proxy","dynamic_upstreams":{
			"source":"shaker","upstreams":[%q],"interval":"10ms","timeout":"1s"}}]}]}}}}}`, mode, addr))
	}
	err := caddy.Load(config("raw"), true)
	if err == nil {
		caddy.Stop()
		t.Fatal("probe_mode raw loaded without CAP_NET_RAW")
	}
	fmt.Printf("RESULT rawload %s; engine %v\n", err, engines.cur.Load() != nil)

	if err := caddy.Load(config("auto"), true); err != nil {
		t.Fatalf("probe_mode auto without CAP_NET_RAW: %v", err)
	}
	defer caddy.Stop()
	var s Status
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if l := reg.Statuses(); len(l) == 1 {
			if s = l[0]; s.Probes >= 3 {
				break
			}
		}
	}
	es := engineStatus()
	fmt.Printf("RESULT auto %s %s %v %v\n", es.ProbeMode, es.ProbeModeAsked,
		strings.Contains(es.RawError, "CAP_NET_RAW"), s.Healthy && s.Probes >= 3 && s.LastError == "")
}

// TestCloserPriorityEngine: in connect mode the closers run at real-time
// priority by default where the process may (root, CI), which the log and
// GET /shaker/engine say, and at normal priority with closer_priority
// normal; a later config that changes it is warned about, naming it.
func TestCloserPriorityEngine(t *testing.T) {
	if engines.cur.Load() != nil {
		t.Fatal("an engine is already running")
	}
	for _, asks := range []string{"auto", "normal"} {
		app := App{CloserPriority: asks}
		if asks == "auto" {
			app = App{} // the default
		}
		logs := acquireTestApp(t, &app)
		want, refused := "normal", false
		switch {
		case !engines.cur.Load().HasClosers():
			want = "none" // a build with the race detector
		case asks == "auto" && os.Geteuid() == 0:
			want = "realtime"
		case asks == "auto":
			refused = true // and auto says why
		}
		f := logLine(t, logs, zapcore.InfoLevel, "probe engine started")
		es := engineStatus()
		if f["closer_priority"] != want || es.CloserPriority != want || es.CloserPriorityAsked != asks ||
			(es.CloserPriorityError != "") != refused {
			t.Errorf("closer_priority %s: logged %v; engine status %q asked %q error %q; want %s, asked %s, an error %v",
				asks, f["closer_priority"], es.CloserPriority, es.CloserPriorityAsked, es.CloserPriorityError, want, asks, refused)
		}
		later := App{CloserPriority: map[string]string{"auto": "realtime", "normal": "auto"}[asks]}
		logs = acquireTestApp(t, &later)
		if warns := logs.FilterLevelExact(zapcore.WarnLevel).All(); len(warns) != 1 || !strings.HasPrefix(warns[0].Message, "closer_priority changed") {
			t.Errorf("a later config with closer_priority %s: warnings %v, want one naming closer_priority", later.CloserPriority, warns)
		}
		engines.release(&later)
		engines.release(&app)
		if engines.cur.Load() != nil {
			t.Fatal("the engine still runs after every app released it")
		}
	}
}
