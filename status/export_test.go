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

// CurrentStatuses is the Status of every checker the page reads from its
// Source.
func CurrentStatuses() []health.Status {
	var out []health.Status
	for _, c := range currentCheckers() {
		out = append(out, c.Status())
	}
	return out
}

// HistoryLen is how many RTT samples the process's sampler holds of s's
// checker (its address and settings).
func HistoryLen(s *health.Status) int {
	want := string(historyKey(nil, s))
	for _, c := range currentCheckers() {
		if st := c.Status(); string(historyKey(nil, &st)) == want {
			return len(sampler.historyOf(histKey{c: c}))
		}
	}
	return 0
}

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
