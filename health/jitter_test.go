package health

import (
	"math"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// drawStats draws n jittered intervals of iv and returns their least,
// greatest and mean, and how many fell below and above iv.
func drawStats(s Settings, iv time.Duration, n int) (lo, hi time.Duration, mean float64, below, above int) {
	lo, hi = time.Duration(math.MaxInt64), time.Duration(math.MinInt64)
	var sum float64
	for range n {
		d := s.jittered(iv)
		lo, hi = min(lo, d), max(hi, d)
		sum += float64(d)
		switch {
		case d < iv:
			below++
		case d > iv:
			above++
		}
	}
	return lo, hi, sum / float64(n), below, above
}

// TestJittered: with jitter j, intervals stay within [iv-j, iv+j], spread
// over both halves of it, with the mean unchanged; a duration is capped
// at half the interval in use; no jitter is exactly the interval. The
// checks on the spread and the mean are statistical, with margins that a
// uniform draw misses with a probability far below 1e-12.
func TestJittered(t *testing.T) {
	const n = 20000
	for _, tc := range []struct {
		name string
		set  Settings
		iv   time.Duration
		j    time.Duration // expected jitter
	}{
		{"10% of the interval", Settings{JitterPercent: 10}, 2 * time.Second, 200 * time.Millisecond},
		{"25% of a fast_interval", Settings{JitterPercent: 25}, 20 * time.Millisecond, 5 * time.Millisecond},
		{"50%", Settings{JitterPercent: 50}, time.Second, 500 * time.Millisecond},
		{"duration", Settings{Jitter: 200 * time.Millisecond}, 2 * time.Second, 200 * time.Millisecond},
		// a duration meant for a 2s interval, on a 100ms fast_interval:
		// at most half of it
		{"duration capped at half a fast_interval", Settings{Jitter: time.Second}, 100 * time.Millisecond, 50 * time.Millisecond},
		{"tiny", Settings{Jitter: 1}, time.Hour, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi, mean, below, above := drawStats(tc.set, tc.iv, n)
			if lo < tc.iv-tc.j || hi > tc.iv+tc.j {
				t.Fatalf("drawn from [%v, %v], want within [%v, %v]", lo, hi, tc.iv-tc.j, tc.iv+tc.j)
			}
			if tc.j == 1 {
				// three values: each is drawn, over and over
				if lo != tc.iv-1 || hi != tc.iv+1 {
					t.Fatalf("drawn from [%v, %v], want exactly [%v, %v]", lo, hi, tc.iv-1, tc.iv+1)
				}
				return
			}
			// the spread is real: near both ends, on both sides
			if lo > tc.iv-tc.j*9/10 || hi < tc.iv+tc.j*9/10 {
				t.Fatalf("drawn from [%v, %v]: want values within 10%% of both ends of [%v, %v]", lo, hi, tc.iv-tc.j, tc.iv+tc.j)
			}
			if below < n/3 || above < n/3 {
				t.Fatalf("%d below %v, %d above, of %d: want about half each", below, tc.iv, above, n)
			}
			// the mean rate is unchanged: the mean of n draws is within
			// about j/245 of iv (one standard deviation); allow j/20
			if diff := math.Abs(mean - float64(tc.iv)); diff > float64(tc.j)/20 {
				t.Fatalf("mean %v, want %v (off by %v)", time.Duration(mean), tc.iv, time.Duration(diff))
			}
		})
	}
	t.Run("off", func(t *testing.T) {
		for _, s := range []Settings{{}, {JitterPercent: 0}, {Jitter: 0}} {
			for _, iv := range []time.Duration{time.Nanosecond, time.Millisecond, 2 * time.Second} {
				for range 100 {
					if d := s.jittered(iv); d != iv {
						t.Fatalf("%+v: jittered(%v) = %v, want it unchanged", s, iv, d)
					}
				}
			}
		}
	})
	t.Run("no overflow", func(t *testing.T) {
		const iv = time.Duration(math.MaxInt64)
		for _, s := range []Settings{{JitterPercent: 50}, {Jitter: iv / 2}} {
			for range 1000 {
				if d := s.jittered(iv); d < iv/2 {
					t.Fatalf("%+v: jittered(%v) = %v", s, iv, d)
				}
			}
		}
	})
}

// TestObserveJitters: the interval the checker returns to the engine,
// whichever the state machine picks, carries the jitter; and only there:
// nextIntervalLocked itself stays exact.
func TestObserveJitters(t *testing.T) {
	const j = 10 * time.Second
	c := testChecker(t, 2, 3)
	c.set.FastInterval, c.set.DownInterval = time.Minute, 10*time.Minute
	c.set.Jitter = j
	local := shaker.Result{Err: shaker.ErrLocal, Outcome: shaker.Local}
	for i, s := range []struct {
		res  shaker.Result
		want time.Duration
	}{
		{up, time.Hour},             // up, steady: interval
		{refused, time.Minute},      // changing: fast_interval
		{refused, time.Minute},      // changing
		{refused, 10 * time.Minute}, // down: down_interval
		{up, time.Minute},           // changing
		{up, time.Hour},             // up again
		{local, time.Hour},          // this host's failure: the interval
	} {
		got := c.Observe(s.res)
		if got < s.want-j || got > s.want+j {
			t.Fatalf("step %d (%v): next probe after %v, want %v ± %v", i, s.res.Outcome, got, s.want, j)
		}
		// one value of 2 x 10^10 + 1 is s.want itself
		if got == s.want {
			t.Fatalf("step %d (%v): next probe after exactly %v: no jitter", i, s.res.Outcome, got)
		}
		if !s.res.Outcome.Backend() {
			continue
		}
		c.mu.Lock()
		exact := c.nextIntervalLocked()
		c.mu.Unlock()
		if exact != s.want {
			t.Fatalf("step %d: nextIntervalLocked %v, want %v exactly", i, exact, s.want)
		}
	}
}

func TestSettingsValidateJitter(t *testing.T) {
	base := Settings{Interval: 2 * time.Second, Timeout: time.Second, Passes: 2, Fails: 3}
	for _, tc := range []struct {
		pct     float64
		d       time.Duration
		wantErr string // "" for valid
	}{
		{0, 0, ""},
		{5, 0, ""},
		{50, 0, ""},
		{0, time.Second, ""},
		{0, 200 * time.Millisecond, ""},
		{60, 0, "jitter 60%: must be from 0 to 50%"},
		{-1, 0, "jitter -1%: must be from 0 to 50%"},
		{math.NaN(), 0, "jitter NaN%: must be from 0 to 50%"},
		{0, -time.Second, "jitter -1s: must not be negative"},
		{0, time.Second + 1, "jitter 1.000000001s: must be at most half the interval (1s)"},
		{5, time.Millisecond, "jitter 1ms and 5%: give a duration or a percentage, not both"},
	} {
		s := base
		s.JitterPercent, s.Jitter = tc.pct, tc.d
		err := s.Validate()
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%v%% / %v: %v", tc.pct, tc.d, err)
		case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr):
			t.Errorf("%v%% / %v: error %v, want %q", tc.pct, tc.d, err, tc.wantErr)
		}
	}
}

// TestJitteredFloor: jitter never takes an interval below MinInterval,
// however much it may vary an interval of MinInterval or just above it;
// an interval already below MinInterval (the health layer allows one) is
// never shortened by it.
func TestJitteredFloor(t *testing.T) {
	for _, tc := range []struct {
		set   Settings
		iv    time.Duration
		floor time.Duration
	}{
		{Settings{JitterPercent: 50}, MinInterval, MinInterval},
		{Settings{JitterPercent: 5}, MinInterval, MinInterval},
		{Settings{Jitter: time.Millisecond}, 3 * MinInterval / 2, MinInterval},
		{Settings{JitterPercent: 50}, MinInterval / 2, MinInterval / 2},
	} {
		lo, hi, _, _, above := drawStats(tc.set, tc.iv, 2000)
		if lo < tc.floor {
			t.Errorf("%+v: jittered(%v) went down to %v, below %v", tc.set, tc.iv, lo, tc.floor)
		}
		// the jitter still varies it upwards
		if above == 0 || hi <= tc.iv {
			t.Errorf("%+v: jittered(%v) never above it (at most %v)", tc.set, tc.iv, hi)
		}
	}
}
