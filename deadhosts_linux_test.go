//go:build linux

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// The dead-hosts scenario: 1,000 live addresses and 5,000 whose SYNs are
// dropped (nftables, in a namespace of the test's own), probed every 1 s
// with a 1 s timeout and fails 3. Probes waiting for their timeout must
// hold no other address back: every address keeps its schedule, and a
// live backend that dies is marked down within interval x fails +
// timeout.
const (
	deadN      = 5000
	liveN      = 1000
	deadPort   = 9999 // below the ephemeral range: replies never match the rule
	deadWindow = 5 * time.Second
)

// deadRuleset drops SYNs to 127.2.0.0/16, port deadPort.
var deadRuleset = fmt.Sprintf(`
table inet shaker_dead {
	chain in {
		type filter hook input priority 0; policy accept;
		ip daddr 127.2.0.0/16 tcp dport %d drop
	}
}
`, deadPort)

// deadModeEnv names the child's probe mode (shaker.Mode's String).
const deadModeEnv = "CADDYSHAKER_DEAD_MODE"

// TestDeadHostsKeepSchedule runs the scenario in a child process in its
// own namespace, once per probe mode, and checks the probe rate and the
// time to mark a killed backend down. Both modes hold the same bounds and
// outcomes: in raw mode a probe waiting for its timeout holds no socket,
// only a slot of its loop, and its deadline and SYN retransmissions (1 s,
// 3 s...) are the loop's own timers, not the kernel's, so dead addresses
// must hold nothing back there either.
func TestDeadHostsKeepSchedule(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: 6,001 addresses for about 15 s per probe mode")
	}
	for _, mode := range []shaker.Mode{shaker.ModeConnect, shaker.ModeRaw} {
		t.Run(mode.String(), func(t *testing.T) {
			if mode == shaker.ModeRaw {
				testkit.NeedRaw(t)
			}
			deadHostsKeepSchedule(t, mode)
		})
	}
}

func deadHostsKeepSchedule(t *testing.T, mode shaker.Mode) {
	ns := testkit.Netns(t, true, deadRuleset)
	out := testkit.RunTest(t, ns, "TestFaultsHelper", faultsHelperEnv+"=deadhosts", deadModeEnv+"="+mode.String())
	res := testkit.ResultsByName(out)
	rate, down, acc, used, oc := res["rate"], res["down"], res["accepted"], res["mode"], res["outcomes"]
	if len(rate) < 2 || len(down) < 2 || len(acc) < 1 || len(used) < 1 || len(oc) < 3 {
		t.Fatalf("helper printed no results:\n%s", out)
	}
	// The engine must run in the mode asked for (a config that asks for
	// raw gets raw or fails to load; this says the scenario was raw).
	if used[0] != mode.String() {
		t.Fatalf("the child's engine ran in %s mode, want %s", used[0], mode)
	}
	achieved, _ := strconv.ParseFloat(rate[0], 64)
	configured, _ := strconv.ParseFloat(rate[1], 64)
	d, _ := time.ParseDuration(down[0])
	bound, _ := time.ParseDuration(down[1])
	up, _ := strconv.ParseFloat(oc[0], 64)
	timeouts, _ := strconv.ParseFloat(oc[1], 64)
	t.Logf("%s mode: %d live + %d dead at 1s/1s/fails 3: %.0f probes/s of %.0f configured (%.1f%%; %.0f up/s, %.0f timeouts/s, %s other); killed backend marked down after %v (bound %v)",
		mode, liveN, deadN, achieved, configured, 100*achieved/configured, up, timeouts, oc[2], d, bound)
	// The targets (99% of the rate, the bound plus 10%) are checked with
	// room for a race-instrumented build on a busy machine.
	if achieved < 0.97*configured {
		t.Errorf("%.0f probes/s of %.0f configured: addresses lost their schedule", achieved, configured)
	}
	if d > bound+bound/10+fSlack {
		t.Errorf("killed backend marked down after %v: bound %v", d, bound)
	}
	if acc[0] != "0" {
		t.Errorf("live listeners accepted %s connections", acc[0])
	}
	// In the measured window every live address answers and every dead
	// one times out, in either mode (the same Outcome values): anything
	// else (refused, unreachable, a local error) means the SYNs did not
	// meet the scenario's listeners and drop rule.
	if oc[2] != "0" || up == 0 || timeouts == 0 {
		t.Errorf("outcomes in the measured window: %.0f up/s, %.0f timeouts/s, %s others; want both up and timeouts, and no other", up, timeouts, oc[2])
	}
}

// faultsDeadHostsMain is the child of TestDeadHostsKeepSchedule, in the
// probe mode deadModeEnv names.
func faultsDeadHostsMain(t *testing.T) {
	mode, err := shaker.ParseMode(os.Getenv(deadModeEnv))
	if err != nil {
		t.Fatal(err)
	}
	live := testkit.NewListener(t, "tcp4", "127.0.0.1:0") // on 127.0.0.1 ...
	wild := testkit.NewListener(t, "tcp4", "0.0.0.0:0")   // ... and one that answers every 127.x.y.z
	anyPort := wild.Addr.Port()
	victim, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ups := []string{victim.Addr().String()}
	for i := 0; i < liveN-1; i++ {
		ups = append(ups, fmt.Sprintf("127.1.%d.%d:%d", i>>8, i&255, anyPort))
	}
	ups = append(ups, live.Addr.String())
	for i := 0; i < deadN; i++ {
		ups = append(ups, fmt.Sprintf("127.2.%d.%d:%d", i>>8, i&255, deadPort))
	}
	const interval, timeout, fails = time.Second, time.Second, 3
	cfg := map[string]any{}
	if err := json.Unmarshal(loadConfig(t, ups, interval.String(), 0), &cfg); err != nil {
		t.Fatal(err)
	}
	dyn := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)["p"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[1].(map[string]any)["dynamic_upstreams"].(map[string]any)
	dyn["timeout"], dyn["fails"] = timeout.String(), fails
	if mode != shaker.ModeConnect {
		// the namespace is the child's own: the default source ports are free
		cfg["apps"].(map[string]any)["shaker"] = map[string]any{"probe_mode": mode.String()}
	}
	raw, _ := json.Marshal(cfg)
	if err := caddy.Load(raw, true); err != nil {
		t.Fatal(err)
	}
	defer caddy.Stop()
	n := len(ups)
	// Two full rounds (the dead addresses' first results come after their
	// timeout), then a measured window.
	waitFor(t, 30*time.Second, "two rounds of probes", func() bool { return engineProbes() >= uint64(2*n) })
	e := engines.cur.Load()
	fmt.Printf("RESULT mode %s\n", e.Mode())
	s0, t0 := e.Stats(), time.Now()
	time.Sleep(deadWindow) // the measured window: not a synchronisation
	s1 := e.Stats()
	secs := time.Since(t0).Seconds()
	achieved := float64(s1.Total()-s0.Total()) / secs
	fmt.Printf("RESULT rate %.1f %.1f\n", achieved, float64(n)/interval.Seconds())
	up, timeouts := s1.Up-s0.Up, s1.Timeout-s0.Timeout
	fmt.Printf("RESULT outcomes %.1f %.1f %d\n", float64(up)/secs, float64(timeouts)/secs, s1.Total()-s0.Total()-up-timeouts)

	victimAddr := victim.Addr().String()
	isDown := func() bool {
		for _, s := range reg.Statuses() {
			if s.Address == victimAddr {
				return !s.Healthy
			}
		}
		return false
	}
	if isDown() {
		t.Fatal("victim down before it was killed")
	}
	victim.Close()
	tk := time.Now()
	waitFor(t, 30*time.Second, "the killed backend marked down", isDown)
	fmt.Printf("RESULT down %v %v\n", time.Since(tk), interval*fails+timeout)
	// Stop probing, then count what the listeners accepted past the
	// kernel's 200 ms delayed-ACK timer: ProbeAccepts waits out that window
	// (testkit.Window), once for both, before it flushes their queues.
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	accepted := (testkit.Listeners{live, wild}).ProbeAccepts(t)
	fmt.Printf("RESULT accepted %d\n", accepted)
}
