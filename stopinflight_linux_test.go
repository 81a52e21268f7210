//go:build linux

package caddyshaker

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// The stop tests: Caddy stopped (caddy.Stop), sent SIGTERM (a process of
// its own), and reloaded (forced, and to a config that closes the engine,
// then to one that starts a new engine with other settings) while
// thousands of answered probes are in flight on the epoll path. On
// loopback the SYN-ACK arrives inside connect(), so nothing answered is in
// flight at a stop; here Caddy probes backends across a testkit.SlowPath,
// whose tbf queues the SYN-ACKs for most of a second: at the stop,
// thousands of probes wait in epoll for an answer that is on its way. A
// socket leaked then gets its SYN-ACK, and the kernel completes the
// handshake itself at the end of its 200 ms delayed-ACK window: the
// backend accepts it.
//
// Each test checks that its scenario was real: at the moment of the stop,
// the engine had at least stopMinInFlight probes in flight and B's tbf at
// least stopMinQueued SYN-ACKs queued, and after it B's kernel counted an
// embryonic reset for most of those answers (the prober's kernel resets a
// SYN-ACK for a socket that is gone).

const (
	stopHelperEnv = "CADDYSHAKER_STOP_HELPER"
	stopPathEnv   = "CADDYSHAKER_STOP" // the SlowPath's (SlowPath.Env)

	// The path and the load: 2,000 addresses every 400 ms (5,000 probes/s)
	// against a tbf that passes about 3,400 IPv4 SYN-ACKs a second
	// (2,700 IPv6) and queues them for up to 600 ms; the rest it drops,
	// and those probes time out. The timeout outlasts the queue and is
	// below the SYN's first retransmission (1 s).
	stopRate     = "2mbit"
	stopLatency  = "600ms"
	stopAddrs    = 2000
	stopPorts    = 8
	stopInterval = "400ms"
	stopTimeout  = "900ms"

	// what makes the scenario real
	stopMinInFlight = 1500
	stopMinQueued   = 1000
)

// stopFamilies are the address families the stop tests run with.
var stopFamilies = []int{4, 6}

// TestStopInFlightHelper is the body of the stop tests' child processes,
// which run in namespace A of a SlowPath (testkit.ChildSlowPath):
// Caddy in this process stopped or reloaded ("stop", "reload", "engine"),
// or Caddy's own main ("caddy").
func TestStopInFlightHelper(t *testing.T) {
	inCaddy := func(mode string) func(*testing.T) {
		return func(t *testing.T) {
			p, family := testkit.ChildSlowPath(stopPathEnv)
			stopInFlightMain(t, p, family, mode)
		}
	}
	testkit.Child(t, stopHelperEnv, "the stop tests", map[string]func(*testing.T){
		"caddy": func(*testing.T) {
			os.Args = []string{"caddy", "run", "--config", os.Getenv("CADDYSHAKER_STOP_CONFIG")}
			caddycmd.Main() // exits the process
		},
		"stop":   inCaddy("stop"),
		"reload": inCaddy("reload"),
		"engine": inCaddy("engine"),
	})
}

// stopListeners starts stopPorts counting listeners on the wildcard
// address of family in namespace ns, and returns them and the stopAddrs
// addresses of the SlowPath's prefix that they answer.
func stopListeners(t testing.TB, ns string, family int) (testkit.Listeners, []string) {
	t.Helper()
	ls, addrs := testkit.SlowListeners(t, ns, family, stopPorts, stopAddrs)
	ups := make([]string, len(addrs))
	for i, a := range addrs {
		ups[i] = a.String()
	}
	return ls, ups
}

// stopConfig is the Caddy config of the stop tests: loadConfig's proxy
// over ups with the stop tests' interval and timeout, knob to make a
// reload a real one, loops for the shaker app (0: the default), admin on
// the unix socket given ("": no admin endpoint). With ups nil, the proxy
// has no shaker source at all (a static upstream): loading it closes the
// engine.
func stopConfig(t testing.TB, ups []string, knob, loops int, admin string) []byte {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(loadConfig(t, ups, stopInterval, knob), &cfg); err != nil {
		t.Fatal(err)
	}
	rp := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)["p"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[1].(map[string]any)
	if ups == nil {
		delete(rp, "dynamic_upstreams")
		rp["upstreams"] = []any{map[string]any{"dial": "127.0.0.1:9"}}
	} else {
		rp["dynamic_upstreams"].(map[string]any)["timeout"] = stopTimeout
	}
	if loops != 0 {
		cfg["apps"].(map[string]any)["shaker"] = map[string]any{"loops": loops}
	}
	cfg["admin"] = map[string]any{"disabled": true, "config": map[string]any{"persist": false}}
	if admin != "" {
		cfg["admin"] = map[string]any{"listen": "unix/" + admin, "config": map[string]any{"persist": false}}
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stopMoment is the scenario at the moment of a stop.
type stopMoment struct {
	inFlight, sockets int   // the engine's
	queued            int   // SYN-ACKs in B's tbf
	resets            int64 // B's EmbryonicRsts
}

// waitFull waits, boundedly, until inFlight reports at least
// stopMinInFlight probes in flight and B's tbf holds stopMinQueued
// SYN-ACKs, and returns the moment. If that never comes, it fails the
// test, saying how many connections ls accepted meanwhile (an engine that
// closes late, say, fills neither and lets many through).
func waitFull(t testing.TB, p *testkit.SlowPath, ls testkit.Listeners, inFlight func() (int, int)) stopMoment {
	t.Helper()
	var m, best stopMoment
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		m.inFlight, m.sockets = inFlight()
		if m.inFlight >= stopMinInFlight/2 {
			m.queued = testkit.Backlog(t, p.B, p.DevB)
		}
		if m.inFlight >= stopMinInFlight && m.queued >= stopMinQueued {
			break
		}
		if m.inFlight > best.inFlight {
			best.inFlight = m.inFlight
		}
		best.queued = max(best.queued, m.queued)
		if time.Now().After(deadline) {
			t.Fatalf("the path never filled in 15 s: at most %d probes in flight and %d SYN-ACKs queued, want %d and %d; listeners accepted %d connections meanwhile",
				best.inFlight, best.queued, stopMinInFlight, stopMinQueued, ls.SoFar())
		}
	}
	m.resets, _ = testkit.NetnsCounters(t, p.B)
	return m
}

// checkAfterStop waits past the kernel's window (SlowPath.Settle), counts
// what the listeners accepted, and checks that the answers queued at the
// moment m of the stop arrived after it and were reset. It returns the
// accepts and the resets counted after the stop.
func checkAfterStop(t testing.TB, p *testkit.SlowPath, ls testkit.Listeners, m stopMoment, what string) (accepted, resets int64) {
	t.Helper()
	settle := p.Settle(t)
	accepted = ls.ProbeAcceptsIn(t, p.B)
	r, _ := testkit.NetnsCounters(t, p.B)
	resets = r - m.resets
	t.Logf("%s: %d probes in flight (%d sockets) and %d SYN-ACKs queued at the stop; after it (%v to settle): %d embryonic resets, %d accepted",
		what, m.inFlight, m.sockets, m.queued, settle.Round(time.Millisecond), resets, accepted)
	if accepted != 0 {
		t.Errorf("%s: listeners accepted %d connections", what, accepted)
	}
	// Most answers queued at the stop reach a socket that is gone, and
	// the prober's kernel resets them, or a socket that was leaked, and
	// the backend accepts it. Fewer would mean nothing answered was in
	// flight, and the test proved nothing.
	if resets+accepted < int64(m.queued)/2 {
		t.Errorf("%s: %d embryonic resets and %d accepts after the stop, want at least half the %d SYN-ACKs queued at it: the scenario was not real",
			what, resets, accepted, m.queued)
	}
	return accepted, resets
}

// engineInFlight reads the running engine's probes in flight and sockets.
func engineInFlight() (int, int) {
	if e := engines.cur.Load(); e != nil {
		st := e.Stats()
		return st.InFlight, st.Sockets
	}
	return 0, 0
}

// checkClosed fails the test if engine e, which a stop or a reload
// should have closed, holds a probe or a socket.
func checkClosed(t testing.TB, e *shaker.Engine, what string) {
	t.Helper()
	st := e.Stats()
	t.Logf("%s: the engine's worst SYN-ACK-to-close delay: %v", what, st.MaxCloseDelay)
	if st.InFlight != 0 || st.Sockets != 0 || st.Queued != 0 {
		t.Errorf("%s: the old engine still holds %d probes in flight, %d sockets, %d queued: not closed", what, st.InFlight, st.Sockets, st.Queued)
	}
}

// stopInFlightMain runs in namespace A: Caddy in this process probes
// stopAddrs addresses of B, then:
//   - "stop": caddy.Stop with thousands of answered probes in flight;
//   - "reload": five forced reloads (caddy.Load(cfg, true), a changed
//     config) with thousands in flight: the engine is kept and its probes
//     finish normally; then caddy.Stop;
//   - "engine": a reload to a config without shaker upstreams, which closes
//     the engine with thousands in flight; a reload to one with loops 1,
//     which starts a new engine; then caddy.Stop.
//
// Accepts are counted after the kernel's window (SlowPath.Settle), after
// every stop or reload that closes an engine.
func stopInFlightMain(t *testing.T, p *testkit.SlowPath, family int, mode string) {
	ls, ups := stopListeners(t, p.B, family)
	t.Cleanup(func() { caddy.Stop() })
	if err := caddy.Load(stopConfig(t, ups, 0, 0, ""), true); err != nil {
		t.Fatal(err)
	}
	tag := fmt.Sprintf("IPv%d %s", family, mode)
	switch mode {
	case "stop":
		m, took, acc, rsts := stopWhenFull(t, p, ls, engines.cur.Load(), tag)
		fmt.Printf("RESULT stop %d %d %d %d %d %v\n", m.inFlight, m.sockets, m.queued, rsts, acc, took)

	case "reload":
		e0 := engines.cur.Load()
		var worst stopMoment
		for i := 1; i <= 5; i++ {
			m := waitFull(t, p, ls, engineInFlight)
			if err := caddy.Load(stopConfig(t, ups, i, 0, ""), true); err != nil {
				t.Fatalf("reload %d: %v", i, err)
			}
			if engines.cur.Load() != e0 {
				t.Fatalf("reload %d replaced the engine", i)
			}
			if i == 1 || m.inFlight < worst.inFlight {
				worst = m
			}
		}
		// Probes in flight at the reloads finished normally: past the
		// kernel's window (the queue's 600 ms, then 200 ms) none became
		// a connection. Probing goes on meanwhile.
		time.Sleep(time.Second) // the queue's latency plus the kernel's window: a timer, not an event
		during := ls.ProbeAcceptsIn(t, p.B)
		if during != 0 {
			t.Errorf("%s: listeners accepted %d connections after 5 forced reloads", tag, during)
		}
		m, _, acc, rsts := stopWhenFull(t, p, ls, e0, tag+" (then stop)")
		fmt.Printf("RESULT reload %d %d %d %d %d %d\n", worst.inFlight, worst.queued, during, m.inFlight, rsts, acc)

	case "engine":
		m := waitFull(t, p, ls, engineInFlight)
		old := engines.cur.Load()
		if err := caddy.Load(stopConfig(t, nil, 1, 0, ""), true); err != nil {
			t.Fatal(err)
		}
		if engines.cur.Load() != nil {
			t.Fatal("engine running after a reload to a config without shaker upstreams")
		}
		checkClosed(t, old, tag+" (reload without shaker)")
		acc1, rsts1 := checkAfterStop(t, p, ls, m, tag+" (reload without shaker)")
		if err := caddy.Load(stopConfig(t, ups, 2, 1, ""), true); err != nil {
			t.Fatal(err)
		}
		e2 := engines.cur.Load()
		if e2 == nil || e2 == old || e2.Stats().Loops != 1 {
			t.Fatalf("after a reload with loops 1: engine %p (old %p), want a new one with 1 loop", e2, old)
		}
		m2, _, acc2, rsts2 := stopWhenFull(t, p, ls, e2, tag+" (new engine, then stop)")
		fmt.Printf("RESULT engine %d %d %d %d %d %d %d %d\n", m.inFlight, m.queued, rsts1, acc1, m2.inFlight, m2.queued, rsts2, acc2)
	}
}

// stopWhenFull waits until the engine e has its fill of answered probes
// in flight (waitFull), stops Caddy (took: how long caddy.Stop took),
// checks that no engine runs and that e closed every socket
// (checkClosed), and counts past the kernel's window what the listeners
// accepted and reset (checkAfterStop).
func stopWhenFull(t *testing.T, p *testkit.SlowPath, ls testkit.Listeners, e *shaker.Engine, what string) (m stopMoment, took time.Duration, accepted, resets int64) {
	t.Helper()
	m = waitFull(t, p, ls, engineInFlight)
	t0 := time.Now()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	took = time.Since(t0)
	if engines.cur.Load() != nil {
		t.Fatalf("%s: engine running after caddy.Stop", what)
	}
	checkClosed(t, e, what)
	accepted, resets = checkAfterStop(t, p, ls, m, what)
	return m, took, accepted, resets
}

// runStopHelper runs TestStopInFlightHelper in mode on a new SlowPath, for
// each address family, and logs its RESULT lines.
func runStopHelper(t *testing.T, mode string) {
	if testing.Short() {
		t.Skip("namespaces and thousands of probes a second")
	}
	for _, family := range stopFamilies {
		t.Run(fmt.Sprintf("IPv%d", family), func(t *testing.T) {
			p := testkit.NewSlowPath(t, stopRate, stopLatency)
			start := time.Now()
			out := testkit.RunTest(t, p.A, "TestStopInFlightHelper", append(p.Env(stopPathEnv, family), stopHelperEnv+"="+mode)...)
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "SYN-ACKs queued at the stop") || strings.Contains(line, "worst SYN-ACK-to-close") || strings.HasPrefix(line, "RESULT") {
					t.Log(strings.TrimSpace(line))
				}
			}
			t.Logf("child took %v", time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestStopWithAnsweredInFlight: caddy.Stop with thousands of answered
// probes in flight on the epoll path closes every one: 0 accepted past the
// kernel's window, the old engine holds no socket.
func TestStopWithAnsweredInFlight(t *testing.T) { runStopHelper(t, "stop") }

// TestReloadWithAnsweredInFlight: five forced reloads with thousands of
// answered probes in flight keep the engine, and its probes finish
// normally: 0 accepted; then a stop as in TestStopWithAnsweredInFlight.
func TestReloadWithAnsweredInFlight(t *testing.T) { runStopHelper(t, "reload") }

// TestReloadNewEngineWithAnsweredInFlight: a reload to a config without
// shaker upstreams closes the engine with thousands of answered probes in
// flight (0 accepted, the old engine holds no socket); a reload to a
// config with other engine settings (loops 1) starts a new engine, and a
// stop closes it as well.
func TestReloadNewEngineWithAnsweredInFlight(t *testing.T) { runStopHelper(t, "engine") }

// TestSIGTERMWithAnsweredInFlight: a Caddy process of its own (the test
// binary running Caddy's main, `caddy run`), sent SIGTERM with thousands of
// answered probes in flight, exits cleanly and leaves no connection: 0
// accepted past the kernel's window. The listeners are this process's, in
// B; Caddy's admin endpoint is a unix socket, which crosses namespaces.
func TestSIGTERMWithAnsweredInFlight(t *testing.T) {
	if testing.Short() {
		t.Skip("namespaces and thousands of probes a second")
	}
	for _, family := range stopFamilies {
		t.Run(fmt.Sprintf("IPv%d", family), func(t *testing.T) {
			p := testkit.NewSlowPath(t, stopRate, stopLatency)
			ls, ups := stopListeners(t, p.B, family)
			dir := t.TempDir()
			sock := filepath.Join(dir, "admin.sock")
			cfgPath := filepath.Join(dir, "caddy.json")
			// at INFO: the log says when the engine stopped
			var cfg map[string]any
			if err := json.Unmarshal(stopConfig(t, ups, 0, 0, sock), &cfg); err != nil {
				t.Fatal(err)
			}
			cfg["logging"].(map[string]any)["logs"].(map[string]any)["default"].(map[string]any)["level"] = "INFO"
			raw, _ := json.Marshal(cfg)
			if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd, err := testkit.TestCommand(ctx, p.A, "TestStopInFlightHelper", stopHelperEnv+"=caddy",
				"CADDYSHAKER_STOP_CONFIG="+cfgPath, "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
			if err != nil {
				t.Fatal(err)
			}
			out := &faultsOutput{ready: make(chan string, 1)}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() {
				select {
				case <-exited:
				default:
					syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
					<-exited
				}
			})
			admin := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, "unix", sock)
				},
			}}
			inFlight := func() (int, int) {
				resp, err := admin.Get("http://admin/shaker/engine")
				if err != nil {
					return 0, 0 // not up yet
				}
				defer resp.Body.Close()
				var es EngineStatus
				if json.NewDecoder(resp.Body).Decode(&es) != nil {
					return 0, 0
				}
				return es.InFlight, es.Sockets
			}
			m := waitFull(t, p, ls, inFlight)
			admin.CloseIdleConnections() // Caddy's admin server would wait for it at exit
			t0 := time.Now()
			if err := syscall.Kill(cmd.Process.Pid, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				exited <- err // for the cleanup
				if err != nil {
					t.Fatalf("caddy after SIGTERM: %v\n%s", err, out)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("caddy still running 20 s after SIGTERM\n%s", out)
			}
			took := time.Since(t0)
			closed := engineStoppedAt(t, out.String()).Sub(t0)
			acc, rsts := checkAfterStop(t, p, ls, m, fmt.Sprintf("IPv%d SIGTERM", family))
			t.Logf("RESULT sigterm %d %d %d %d %d %v %v", m.inFlight, m.sockets, m.queued, rsts, acc,
				closed.Round(time.Millisecond), took.Round(time.Millisecond))
		})
	}
}

// engineStoppedAt is the time of Caddy's "probe engine stopped" log line
// in out (JSON lines, ts in seconds). It fails the test if there is none.
func engineStoppedAt(t testing.TB, out string) time.Time {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		var l struct {
			TS  float64 `json:"ts"`
			Msg string  `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "probe engine stopped" {
			sec := int64(l.TS)
			return time.Unix(sec, int64((l.TS-float64(sec))*1e9))
		}
	}
	t.Fatalf("no \"probe engine stopped\" in Caddy's log:\n%s", out)
	return time.Time{}
}
