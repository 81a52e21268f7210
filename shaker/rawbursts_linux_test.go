//go:build linux && !shaker_fallback

package shaker

import (
	"fmt"
	"testing"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// TestRawBursts: the burst scenario of TestCloseDelayBursts (2,000
// addresses every 100 ms, a 1.5 s timeout, a 15 Mbit/s tbf on both ends
// of the veth pair that the probes fill) with the engine in raw mode, IPv4
// and IPv6, with the machine otherwise idle and with a busy loop on every
// core. Raw mode closes nothing, so however late the loop reads its
// answers nothing can be accepted: 0 accepted is asserted in every run
// (connect mode's assert it too, unless SHAKER_BURSTS_STRICT=0; see
// testkit.BurstAccepted), and every address answered at least once.
// Unlike the connect-mode scenarios these run without SHAKER_BURSTS
// (about 6 s each, 25 s in all under -race):
// what they assert does not depend on how busy the machine is. The link
// keeps its idle rate under busy loops too (testkit.BurstRate lowers
// connect mode's): raw mode's prober fills it all the same, and it sends
// each SYN once, so at the lower rate some addresses can have every SYN
// dropped (at 8 Mbit/s, one run of two saw 1,986 of 2,000 up).
func TestRawBursts(t *testing.T) {
	for _, mode := range []string{"idle", "busy"} {
		for _, family := range []int{4, 6} {
			t.Run(fmt.Sprintf("%s/IPv%d", mode, family), func(t *testing.T) {
				r, seen := burstChild(t, mode, family, ModeRaw, testkit.BurstRate("idle"))
				what := fmt.Sprintf("raw mode, %s, IPv%d", mode, family)
				if r.accepted != 0 {
					t.Errorf("%s: listeners accepted %d connections", what, r.accepted)
				}
				if r.up == 0 || r.epollUp < r.up/2 { // EpollUp is read before the last results
					t.Errorf("%s: %d up, %d SYN-ACKs read from the raw sockets: the answers did not come through them", what, r.up, r.epollUp)
				}
				if seen != burstAddrs {
					t.Errorf("%s: %d of %d addresses seen up", what, seen, burstAddrs)
				}
			})
		}
	}
}
