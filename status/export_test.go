package status

import (
	"os"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddyhome"
)

// TestMain runs the tests with Caddy's autosave and storage in a
// temporary directory: the browser test runs Caddy in-process.
func TestMain(m *testing.M) { os.Exit(caddyhome.Main(m)) }

// What the browser test (package status_test, which loads the plugin)
// sees of the page's insides.

// Summary is the JSON's summary counts.
type Summary = statusSummary

// RTTHistoryLen is how many samples a full RTT history has.
const RTTHistoryLen = rttHistoryLen

// CurrentStatuses is what the page reads from its Source.
var CurrentStatuses = currentStatuses

// HistoryLen is how many RTT samples the process's sampler holds of s.
func HistoryLen(s *health.Status) int { return len(sampler.history(historyKey(nil, s))) }

// SampleEvery makes the process's RTT sampler, not running yet, sample
// every d until the test and its cleanups (Caddy's stop) are done.
func SampleEvery(t *testing.T, d time.Duration) {
	sampler.mu.Lock()
	if sampler.refs != 0 {
		sampler.mu.Unlock()
		t.Fatal("the RTT sampler is already running")
	}
	old := sampler.every
	sampler.every = d
	sampler.mu.Unlock()
	t.Cleanup(func() { // after Caddy stops
		sampler.mu.Lock()
		sampler.every = old
		sampler.mu.Unlock()
	})
}
