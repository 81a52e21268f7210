package health

import (
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// pacer paces bursts of first probes as a shaker.Burst says: at most
// Rate a second (next), and at most Size within any Timeout, as a
// generic cell rate algorithm (tat: the theoretical arrival time of a
// probe sent at Size per Timeout). Times are on the clock of Now.
type pacer struct {
	next int64 // the earliest slot at Rate
	tat  int64
}

// slot is the earliest time from now at which a probe may start.
func (p *pacer) slot(now int64, b shaker.Burst) int64 {
	t := max(int64(b.Timeout)/int64(b.Size), 1)
	return max(now, p.next, p.tat-int64(b.Size-1)*t)
}

// take counts a probe started at slot.
func (p *pacer) take(slot int64, b shaker.Burst) {
	p.next = slot + int64(float64(time.Second)/b.Rate)
	p.tat = max(p.tat, slot) + max(int64(b.Timeout)/int64(b.Size), 1)
}

// firstProbe says when a new checker's first probe goes, from now: at
// its paced slot (slot from now), unless the even spread over the
// interval puts it sooner (spread from now; a rate too low for the pool);
// paced says which. Its second probe goes second after the first, where
// the spread puts it: at spread, or an interval after the first probe
// when that is not later.
func firstProbe(slot, spread, interval time.Duration) (first, second time.Duration, paced bool) {
	first, paced = slot, true
	if first > spread {
		first, paced = spread, false
	}
	second = spread - first
	if second <= 0 {
		second = interval
	}
	return first, second, paced
}

// afterFirst is the time from a probe's due time to the next probe's,
// with next the interval in use (see nextIntervalLocked), jittered. But
// after a first probe sent early (second > 0, see Start) the second probe
// goes where the spread over the interval puts it, or sooner if a shorter
// fast_interval or down_interval is in use. A first probe that took longer
// than that (a timeout: took is from its SYN to its result) moves its
// second on by whole intervals, past the result: the engine starts a next
// probe whose time has passed at once, so the dead addresses of a Start
// would be probed in one burst from then on.
func (c *Checker) afterFirst(next, second, took time.Duration) time.Duration {
	d := c.set.jittered(next)
	if second <= 0 {
		return d
	}
	if second <= took {
		iv := c.set.Interval
		second += ((took-second)/iv + 1) * iv
	}
	if next < c.set.Interval && d > took && d < second {
		return d
	}
	return second
}
