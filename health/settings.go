package health

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Settings say how an address is probed and judged.
type Settings struct {
	// Interval is the time between the starts of two probes.
	Interval time.Duration
	// Timeout is how long a probe waits for a SYN-ACK.
	Timeout time.Duration
	// FastInterval, when set, is used while the address is changing
	// state (failures counted while it is up, answers while it is down),
	// as HAProxy's fastinter.
	FastInterval time.Duration
	// DownInterval, when set, is used while the address is down, as
	// HAProxy's downinter.
	DownInterval time.Duration
	// Passes is the consecutive answered probes that bring a down
	// address back up.
	Passes int
	// Fails is the consecutive failed probes that take an up address
	// down.
	Fails int
	// JitterPercent and Jitter vary every interval used (Interval,
	// FastInterval or DownInterval) at random, as Envoy's
	// interval_jitter and HAProxy's spread-checks, so that many proxies
	// probing the same backends do not fall into step: each is drawn
	// uniformly from [iv-j, iv+j], so the mean rate does not change.
	// With JitterPercent, j is that percentage of the interval in use
	// (0 to 50); with Jitter, j is that duration, but at most half the
	// interval in use (Jitter itself at most half of Interval). Give at
	// most one; zero for both means no jitter.
	JitterPercent float64
	Jitter        time.Duration
}

// Validate reports settings the state machine cannot use.
func (s Settings) Validate() error {
	switch {
	case s.Interval <= 0:
		return fmt.Errorf("interval %v: must be positive", s.Interval)
	case s.Timeout <= 0:
		return fmt.Errorf("timeout %v: must be positive", s.Timeout)
	case s.Passes < 1:
		return fmt.Errorf("passes %d: must be at least 1", s.Passes)
	case s.Fails < 1:
		return fmt.Errorf("fails %d: must be at least 1", s.Fails)
	case s.FastInterval < 0:
		return fmt.Errorf("fast_interval %v: must be positive", s.FastInterval)
	case s.DownInterval < 0:
		return fmt.Errorf("down_interval %v: must be positive", s.DownInterval)
	case !(s.JitterPercent >= 0 && s.JitterPercent <= 50): // NaN too
		return fmt.Errorf("jitter %v%%: must be from 0 to 50%%", s.JitterPercent)
	case s.Jitter < 0:
		return fmt.Errorf("jitter %v: must not be negative", s.Jitter)
	case s.Jitter > s.Interval/2:
		return fmt.Errorf("jitter %v: must be at most half the interval (%v)", s.Jitter, s.Interval/2)
	case s.Jitter > 0 && s.JitterPercent > 0:
		return fmt.Errorf("jitter %v and %v%%: give a duration or a percentage, not both", s.Jitter, s.JitterPercent)
	}
	return nil
}

// jittered returns iv varied by the jitter: drawn uniformly from
// [iv-j, iv+j], with j as Settings.JitterPercent or Settings.Jitter
// say, never more than iv/2; iv itself without jitter. It runs on the
// engine's loop for every probe: math/rand/v2's global source is cheap,
// safe for concurrent use and allocates nothing.
func (s *Settings) jittered(iv time.Duration) time.Duration {
	var j time.Duration
	switch {
	case s.JitterPercent > 0:
		j = time.Duration(float64(iv) * s.JitterPercent / 100)
	case s.Jitter > 0:
		j = s.Jitter
	}
	j = min(j, iv/2)
	if j <= 0 {
		return iv
	}
	lo := iv - j
	d := lo + time.Duration(rand.Int64N(2*int64(j)+1)) // 2j+1 <= iv+1: no overflow
	if d < lo {
		return math.MaxInt64 // iv+j past the end of time.Duration
	}
	return max(d, min(iv, MinInterval)) // never below MinInterval (nor iv, if shorter)
}
