package caddytest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	// the events app, in which configs subscribe the Recorder, and the
	// rest of what the harnesses' configs run (the http app,
	// reverse_proxy)
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// Recorder is the name of the events handler module
// (events.handlers.shaker_test_recorder) that records every event it is
// subscribed to, with its "host": Subscribe makes a config's subscription.
const Recorder = "shaker_test_recorder"

// Subscribe is the JSON of an events app that sends the named events to
// the Recorder.
func Subscribe(events ...string) map[string]any {
	return map[string]any{"subscriptions": []any{map[string]any{
		"events":   events,
		"handlers": []any{map[string]any{"handler": Recorder}},
	}}}
}

// Event is one event the Recorder was handed.
type Event struct{ Name, Host string }

type recorder struct{}

func (recorder) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "events.handlers." + Recorder,
		New: func() caddy.Module { return new(recorder) },
	}
}

var recorded = struct {
	sync.Mutex
	list []Event
}{}

func (recorder) Handle(_ context.Context, e caddy.Event) error {
	host, _ := e.Data["host"].(string)
	recorded.Lock()
	recorded.list = append(recorded.list, Event{e.Name(), host})
	recorded.Unlock()
	return nil
}

func init() { caddy.RegisterModule(recorder{}) }

// Events are the events recorded so far, in the order they came (a copy).
func Events() []Event {
	recorded.Lock()
	defer recorded.Unlock()
	return append([]Event(nil), recorded.list...)
}

// ResetEvents forgets the events recorded so far.
func ResetEvents() {
	recorded.Lock()
	recorded.list = nil
	recorded.Unlock()
}

// EventCount is how many events name for host have been recorded.
func EventCount(name, host string) int {
	recorded.Lock()
	defer recorded.Unlock()
	n := 0
	for _, e := range recorded.list {
		if e.Name == name && e.Host == host {
			n++
		}
	}
	return n
}

// WaitEvent waits until more than before events name for host have been
// recorded (WaitFor), and returns how long that took.
func WaitEvent(tb testing.TB, name, host string, before int, within time.Duration) time.Duration {
	tb.Helper()
	return WaitFor(tb, within, fmt.Sprintf("event %s for %s", name, host), func() bool {
		return EventCount(name, host) > before
	})
}
