package health

import (
	"net/netip"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Transition is a change of an address's health, or its first result.
type Transition struct {
	Addr netip.AddrPort
	// Name is the upstream as configured that the address is reported
	// under.
	Name string
	// Up is the new state.
	Up bool
	// First is true for the address's first result: an address counts
	// as up before it, so a first Up changes nothing.
	First bool
	// Rejoin is true for the first result after maintenance: Up when
	// the address answered, whatever its state before.
	Rejoin bool
	// Outcome and Err are the last probe's; RTT its round trip when up.
	Outcome shaker.Outcome
	Err     error
	RTT     time.Duration
	// N is the number of consecutive results that made the change.
	N int
	// Settings are the checker's.
	Settings Settings
	At       time.Time
}

// Reason says why the last probe failed, in words for logs: refused,
// "timeout after 1s", unreachable, or the error.
func (t Transition) Reason() string { return Reason(t.Outcome, t.Err, t.Settings.Timeout) }

// Reason says why a probe failed, in words for logs and the admin API.
func Reason(o shaker.Outcome, err error, timeout time.Duration) string {
	switch o {
	case shaker.Up:
		return ""
	case shaker.Refused, shaker.Unreachable:
		return o.String()
	case shaker.Timeout:
		return "timeout after " + timeout.String()
	}
	if err != nil {
		return err.Error()
	}
	return o.String()
}

// Observer is told what happens. The glue implements it: metrics, logs
// and events.
type Observer interface {
	// Probed is called with every probe's result, on the engine's loop
	// goroutine: it must be quick and must not block.
	Probed(res shaker.Result)
	// Changed is called for each transition.
	Changed(t Transition)
	// LocalFailing is called when probes start failing on this host
	// (failing true, with the error: out of file descriptors, ports or
	// memory) and when they work again, once each way.
	LocalFailing(failing bool, err error)
	// Changed and LocalFailing are called in the order the registry saw
	// the news, one call at a time, on the registry's announcer goroutine:
	// never on the engine's loop, which only queues them and never waits
	// for them. The announcer runs while there is news to hand over, and
	// SetEngine(nil), the registry's stop, returns only once it is done.
}

// SetObserver sets who is told of probes and transitions; nil for no one.
func (r *Registry) SetObserver(o Observer) {
	if o == nil {
		r.obs.Store(nil)
		return
	}
	r.obs.Store(&o)
}

func (r *Registry) observer() Observer {
	if p := r.obs.Load(); p != nil {
		return *p
	}
	return nil
}

// news is one thing the observer is told: a transition, or probes starting
// or stopping to fail on this host (local).
type news struct {
	tr      Transition
	local   bool
	failing bool
	err     error
}

// announce queues news for the observer and starts the announcer if it is
// not running. It never waits for the observer: the engine's loop calls it.
// One announcer at a time hands the queue over, in order.
func (r *Registry) announce(n news) {
	r.qmu.Lock()
	r.queue = append(r.queue, n)
	start := !r.announcing
	r.announcing = true
	r.qmu.Unlock()
	if start {
		go r.announceLoop()
	}
}

// announceLoop is the announcer: it hands the queue to the observer until
// the queue is empty, then ends.
func (r *Registry) announceLoop() {
	for {
		r.qmu.Lock()
		q := r.queue
		r.queue = nil
		if len(q) == 0 {
			r.announcing = false
			r.announced.Broadcast()
			r.qmu.Unlock()
			return
		}
		r.qmu.Unlock()
		obs := r.observer()
		for _, n := range q {
			switch {
			case obs == nil:
			case n.local:
				obs.LocalFailing(n.failing, n.err)
			default:
				obs.Changed(n.tr)
			}
		}
	}
}

// waitAnnounced waits until the announcer has handed over the queue and
// ended.
func (r *Registry) waitAnnounced() {
	r.qmu.Lock()
	for r.announcing {
		r.announced.Wait()
	}
	r.qmu.Unlock()
}

// noteLocal tells the observer when probes start and stop failing on this
// host: once each way, not once per probe.
func (r *Registry) noteLocal(obs Observer, local bool, res shaker.Result) {
	now := int64(time.Since(r.base))
	if local {
		r.lastLocal.Store(now)
	} else if r.localFailing.Load() && now-int64(res.Duration) <= r.lastLocal.Load() {
		// a probe whose SYN went out before the last local failure (it
		// had its socket already) says nothing about this host now
		return
	}
	if r.localFailing.Load() == local || r.localFailing.Swap(local) == local {
		return
	}
	if obs != nil {
		r.announce(news{local: true, failing: local, err: res.Err})
	}
}

// LocalFailing reports whether probes fail on this host now.
func (r *Registry) LocalFailing() bool { return r.localFailing.Load() }
