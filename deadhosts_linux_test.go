//go:build linux

package caddyshaker

import (
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
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

// TestDeadHostsKeepSchedule runs the scenario in a child process in its
// own namespace and checks the probe rate and the time to mark a killed
// backend down.
func TestDeadHostsKeepSchedule(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: 6,001 addresses for about 15 s")
	}
	ns := testkit.Netns(t, true, deadRuleset)
	out := testkit.RunTest(t, ns, "TestFaultsHelper", faultsHelperEnv+"=deadhosts")
	res := testkit.ResultsByName(out)
	rate, down, acc := res["rate"], res["down"], res["accepted"]
	if len(rate) < 2 || len(down) < 2 || len(acc) < 1 {
		t.Fatalf("helper printed no results:\n%s", out)
	}
	achieved, _ := strconv.ParseFloat(rate[0], 64)
	configured, _ := strconv.ParseFloat(rate[1], 64)
	d, _ := time.ParseDuration(down[0])
	bound, _ := time.ParseDuration(down[1])
	t.Logf("%d live + %d dead at 1s/1s/fails 3: %.0f probes/s of %.0f configured (%.1f%%); killed backend marked down after %v (bound %v)",
		liveN, deadN, achieved, configured, 100*achieved/configured, d, bound)
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
}

// faultsDeadHostsMain is the child of TestDeadHostsKeepSchedule.
func faultsDeadHostsMain(t *testing.T) {
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
	raw, _ := json.Marshal(cfg)
	if err := caddy.Load(raw, true); err != nil {
		t.Fatal(err)
	}
	defer caddy.Stop()
	n := len(ups)
	// Two full rounds (the dead addresses' first results come after their
	// timeout), then a measured window.
	waitFor(t, 30*time.Second, "two rounds of probes", func() bool { return engineProbes() >= uint64(2*n) })
	p0, t0 := engineProbes(), time.Now()
	time.Sleep(deadWindow) // the measured window: not a synchronisation
	achieved := float64(engineProbes()-p0) / time.Since(t0).Seconds()
	fmt.Printf("RESULT rate %.1f %.1f\n", achieved, float64(n)/interval.Seconds())

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
