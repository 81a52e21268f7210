package caddyshaker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Jitter is how much every probe interval varies at random: a percentage
// of the interval in use, from 0 to 50% ("5%"), or a duration ("200ms"),
// at most half the interval; "0", "0%" and "off" turn it off, "" is the
// default. A jittered interval is never below MinInterval. In JSON it is
// a string, or an integer of nanoseconds.
type Jitter string

// UnmarshalJSON takes a string, or an integer of nanoseconds as
// caddy.Duration does.
func (j *Jitter) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*j = Jitter(s)
		return nil
	}
	var d time.Duration
	if err := json.Unmarshal(b, &d); err != nil {
		return fmt.Errorf("jitter %s: want a percentage (\"5%%\"), a duration (\"200ms\") or nanoseconds", b)
	}
	*j = Jitter(d.String())
	return nil
}

// jitter is a Jitter parsed: a percentage of the interval in use, or a
// duration; zero for both is no jitter.
type jitter struct {
	percent float64
	d       time.Duration
}

// errJitter says what a jitter may be.
var errJitter = errors.New("want a percentage of the interval (5%), a duration (200ms) or off")

// parseJitter reads a jitter: a percentage from 0 to 50 (read as
// panic_threshold reads one), "off", or a duration of Caddy's forms from
// 0 to half of interval, the interval it will be used with. Its errors
// say what is wrong, not with what value: the callers name it.
func parseJitter(s string, interval time.Duration) (jitter, error) {
	switch {
	case s == "off":
		return jitter{}, nil
	case strings.HasSuffix(s, "%"):
		pct, _, err := parseFraction(s)
		if err != nil {
			return jitter{}, errJitter
		}
		if !(pct >= 0 && pct <= 50) { // NaN too
			return jitter{}, errors.New("must be from 0 to 50%")
		}
		return jitter{percent: pct}, nil
	}
	d, err := caddy.ParseDuration(s)
	switch {
	case err != nil:
		return jitter{}, errJitter
	case d < 0:
		return jitter{}, errors.New("must not be negative")
	case d > interval/2:
		return jitter{}, fmt.Errorf("must be at most half the interval (%v)", interval/2)
	}
	return jitter{d: d}, nil
}
