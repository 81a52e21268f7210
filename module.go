// Package caddyshaker is a Caddy v2 plugin that gives reverse_proxy active
// health checks which backends never notice: half-open TCP probes (SYN,
// SYN-ACK, RST) run by the shaker engine. The backend's kernel answers the
// SYN, the probe resets the half-made connection, and the application's
// accept() never returns, so nothing is logged, counted or rate-limited.
//
// It registers three modules:
//
//   - shaker: the app that owns the process's one probe engine, shared by
//     every reverse_proxy handler and kept across config reloads;
//   - http.reverse_proxy.upstreams.shaker: an upstream source for
//     reverse_proxy's dynamic_upstreams that returns the addresses that are
//     up (Caddyfile: `dynamic shaker <upstreams...> { ... }`);
//   - admin.api.shaker: GET /shaker/upstreams on Caddy's admin endpoint.
package caddyshaker

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func init() {
	caddy.RegisterModule(App{})
	caddy.RegisterModule(Upstreams{})
	caddy.RegisterModule(adminAPI{})
}

// App is the `shaker` app. It owns the process's one probe engine (one
// epoll loop), which every `shaker` upstream source of every reverse_proxy
// handler shares. The engine and the health state of every address live
// across config reloads; the engine is closed, aborting the probes in
// flight at once, when the last config that uses it is unloaded (at
// shutdown, or at a reload to a config without shaker upstreams).
//
// The app needs no configuration: it is loaded as soon as a `shaker`
// upstream source is used. In JSON it may be configured under
// "apps": {"shaker": {...}}.
type App struct {
	// The cap on probes in flight at once (SYN sent, no answer yet).
	// Probes beyond it wait in a queue; they do not fail. It bounds the
	// burst of SYN-ACKs the engine must close at once, which must stay far
	// below the kernel's 200 ms delayed-ACK window. It is read when the
	// engine starts; a change takes effect when the engine restarts (Caddy
	// restart, or a reload after one without shaker upstreams).
	// Default: 1024; at most 65536.
	MaxInFlight int `json:"max_in_flight,omitempty"`

	ctx    caddy.Context
	logger *zap.Logger
	events *caddyevents.App
	*startState
}

// MaxMaxInFlight bounds max_in_flight: each probe in flight holds a file
// descriptor, and a burst of that many SYN-ACKs must still be closed far
// inside the kernel's 200 ms delayed-ACK window.
const MaxMaxInFlight = 65536

// startState is the mutable part of the app (behind a pointer, since
// Caddy copies the app to read its module info).
type startState struct {
	mu      sync.Mutex
	held    bool       // holds a reference to the engine
	started bool       // the config's apps have all started
	pending []*checker // new checkers waiting for that
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "shaker",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision starts the engine, or takes a reference to the running one.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	a.startState = new(startState)
	if err := a.Validate(); err != nil {
		return err
	}
	eventsApp, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("getting events app: %v", err)
	}
	a.events = eventsApp.(*caddyevents.App)
	// New addresses are first probed once every app of the config has
	// started (Caddy's "started" event), so that backends served by the
	// same config are listening by then.
	if err := a.events.On("started", startedHandler{a}); err != nil {
		return fmt.Errorf("subscribing to the started event: %v", err)
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if err := reg.acquireEngine(a); err != nil {
		return err
	}
	a.mu.Lock()
	a.held = true
	a.mu.Unlock()
	return nil
}

// Validate checks the app's configuration.
func (a *App) Validate() error {
	if a.MaxInFlight < 0 || a.MaxInFlight > MaxMaxInFlight {
		return fmt.Errorf("max_in_flight %d: must be from 1 to %d", a.MaxInFlight, MaxMaxInFlight)
	}
	return nil
}

// Start is part of caddy.App; the engine runs from Provision on.
func (a *App) Start() error { return nil }

// Stop is part of caddy.App; the engine is released at Cleanup, once the
// config's upstream sources have stopped using it.
func (a *App) Stop() error { return nil }

// Cleanup drops this config's reference to the engine. The last one
// closes it: every probe in flight or queued is aborted and its socket
// closed at once, so no backend accepts a connection from it.
func (a *App) Cleanup() error {
	if a.startState == nil {
		return nil
	}
	a.mu.Lock()
	held := a.held
	a.held = false
	a.pending = nil
	a.mu.Unlock()
	if !held {
		return nil
	}
	return reg.releaseEngine(a)
}

// schedule starts the probes of new checkers once the config has started.
func (a *App) schedule(fresh []*checker) {
	if len(fresh) == 0 {
		return
	}
	a.mu.Lock()
	if !a.started {
		a.pending = append(a.pending, fresh...)
		a.mu.Unlock()
		return
	}
	a.mu.Unlock()
	arm(fresh)
}

// startedHandler arms the checkers that waited for the config to start.
type startedHandler struct{ a *App }

// Handle takes Caddy's "started" event.
func (h startedHandler) Handle(context.Context, caddy.Event) error {
	h.a.mu.Lock()
	h.a.started = true
	p := h.a.pending
	h.a.pending = nil
	h.a.mu.Unlock()
	arm(p)
	return nil
}

// engineState is the process-wide engine and the apps that hold it.
type engineState struct {
	mu          sync.Mutex
	engine      *shaker.Engine
	maxInFlight int    // the engine's setting
	apps        []*App // live apps, oldest first; the last one announces

	cur    atomic.Pointer[shaker.Engine]
	herald atomic.Pointer[App]

	stopWatch func() // stops watchCloseDelay and waits for it
}

// acquireEngine takes a reference to the engine for a, starting it if
// needed.
func (s *engineState) acquireEngine(a *App) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.engine == nil {
		e, err := shaker.New(shaker.Options{MaxInFlight: a.MaxInFlight})
		if err != nil {
			return fmt.Errorf("starting probe engine: %v", err)
		}
		s.engine = e
		s.maxInFlight = a.MaxInFlight
		s.cur.Store(e)
		stop, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			watchCloseDelay(e.Stats, func() *zap.Logger {
				if h := s.herald.Load(); h != nil {
					return h.logger
				}
				return nil
			}, stop, closeDelayCheckEvery, closeDelayWarn)
		}()
		s.stopWatch = func() { close(stop); <-done }
		a.logger.Info("probe engine started",
			zap.Bool("half_open", shaker.HalfOpen()),
			zap.Int("max_in_flight", a.MaxInFlight))
	} else if a.MaxInFlight != s.maxInFlight {
		a.logger.Warn("max_in_flight changed: the running engine keeps its setting until it restarts",
			zap.Int("running", s.maxInFlight), zap.Int("configured", a.MaxInFlight))
	}
	s.apps = append(s.apps, a)
	s.herald.Store(a)
	return nil
}

// releaseEngine drops a's reference; the last one closes the engine.
func (s *engineState) releaseEngine(a *App) error {
	s.mu.Lock()
	for i, x := range s.apps {
		if x == a {
			s.apps = append(s.apps[:i], s.apps[i+1:]...)
			break
		}
	}
	if len(s.apps) > 0 {
		s.herald.Store(s.apps[len(s.apps)-1])
		s.mu.Unlock()
		return nil
	}
	s.herald.Store(nil)
	e := s.engine
	s.engine = nil
	s.cur.Store(nil)
	stopWatch := s.stopWatch
	s.stopWatch = nil
	s.mu.Unlock()
	if e == nil {
		return nil
	}
	stopWatch()
	st := e.Stats()
	err := e.Close()
	a.logger.Info("probe engine stopped",
		zap.Uint64("probes", st.Total()),
		zap.Duration("max_close_delay", st.MaxCloseDelay))
	return err
}

// A probe's socket closed long after its SYN-ACK is a warning sign: at
// about 200 ms the kernel completes the handshake itself and the backend
// accepts a connection. The engine keeps the worst delay it has seen; the
// app checks it every closeDelayCheckEvery and warns when it passes
// closeDelayWarn, and again each time it grows.
var (
	closeDelayWarn       = 50 * time.Millisecond
	closeDelayCheckEvery = 5 * time.Second
)

// watchCloseDelay logs a warning each time the engine's worst
// SYN-ACK-to-close delay passes warn and the worst already reported, until
// stop is closed.
func watchCloseDelay(stats func() shaker.Stats, logger func() *zap.Logger, stop <-chan struct{}, every, warn time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	reported := warn
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		worst := stats().MaxCloseDelay
		if worst <= reported {
			continue
		}
		reported = worst
		if l := logger(); l != nil {
			l.Warn("probes closed late: at 200 ms after a SYN-ACK the kernel completes the handshake and the backend accepts a connection; the machine may be overloaded, or max_in_flight too high",
				zap.Duration("worst_synack_to_close", worst))
		}
	}
}

// Interface guards
var (
	_ caddy.App           = (*App)(nil)
	_ caddy.Provisioner   = (*App)(nil)
	_ caddy.Validator     = (*App)(nil)
	_ caddy.CleanerUpper  = (*App)(nil)
	_ caddyevents.Handler = startedHandler{}
)
