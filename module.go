// Package caddyshaker is a Caddy v2 plugin that gives reverse_proxy active
// health checks which backends never notice: half-open TCP probes (SYN,
// SYN-ACK, RST) run by the shaker engine. The backend's kernel answers the
// SYN, the probe resets the half-made connection, and the application's
// accept() never returns, so nothing is logged, counted or rate-limited.
//
// It registers four modules:
//
//   - shaker: the app that owns the process's one probe engine, shared by
//     every reverse_proxy handler and kept across config reloads;
//   - http.reverse_proxy.upstreams.shaker: an upstream source for
//     reverse_proxy's dynamic_upstreams that returns the addresses that are
//     up (Caddyfile: `dynamic shaker <upstreams...> { ... }`);
//   - admin.api.shaker: /shaker/upstreams on Caddy's admin endpoint;
//   - http.handlers.shaker_status: the status page (Caddyfile:
//     `shaker_status`).
package caddyshaker

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func init() {
	caddy.RegisterModule(App{})
	caddy.RegisterModule(Upstreams{})
	caddy.RegisterModule(adminAPI{})
}

// App is the `shaker` app. It owns the process's one probe engine (its
// loops: see Loops), which every `shaker` upstream source of every
// reverse_proxy handler shares. The engine and the health state of every address live
// across config reloads; the engine is closed, aborting the probes in
// flight at once, when the last config that uses it is unloaded (at
// shutdown, or at a reload to a config without shaker upstreams).
//
// The app needs no configuration: it is loaded as soon as a `shaker`
// upstream source is used. In JSON it may be configured under
// "apps": {"shaker": {...}}.
type App struct {
	// The number of probe loops (epoll instances, each a goroutine of its
	// own). Each address is probed by one loop, chosen by a hash of the
	// address. A loop runs on one core at a time; more loops can use more
	// cores. It is read when the engine starts; a change takes effect when the
	// engine restarts (Caddy restart, or a reload after one without
	// shaker upstreams). Default: one per CPU the Go runtime uses
	// (GOMAXPROCS).
	Loops int `json:"loops,omitempty"`

	// The most probe sockets open at once: probes waiting for an answer,
	// which on dead or firewalled addresses wait for their timeout. A
	// probe due when they are all taken waits for one (it shows as
	// overdue); it does not fail. Read when the engine starts, like
	// loops. Default: three quarters of the process's open-file limit
	// (RLIMIT_NOFILE), leaving the rest to Caddy's own connections.
	// In raw mode (probe_mode) a probe holds no socket, and max_sockets
	// bounds the probes in flight; default there: 65,536.
	MaxSockets int `json:"max_sockets,omitempty"`

	// How the engine sends its probes: "connect" (the default), "raw"
	// or "auto". connect: a socket per probe, connect() and then close()
	// as soon as the SYN-ACK has come; the engine must close it within
	// the kernel's 200 ms delayed-ACK window, or the backend accepts a
	// connection. raw: each SYN goes out on a raw socket from a source
	// port (source_ports) that no socket listens on, so that the kernel
	// itself answers every SYN-ACK with an RST, at once: no probe can
	// become a connection, however late the engine runs. It needs
	// CAP_NET_RAW (and Linux); without it the config fails to load, with
	// an error that says what to grant. auto: raw where raw sockets can be
	// opened, connect elsewhere; the log and GET /shaker/engine say which
	// was chosen, and why not raw. Read when the engine starts, like
	// loops.
	ProbeMode string `json:"probe_mode,omitempty"`

	// The source ports raw mode sends from, "first-last" (or one port),
	// at most 16384 of them. The engine binds a socket to each, never
	// listening on it, so that no other socket takes them; each holds a
	// file descriptor while the engine runs, and each loop needs one at
	// least. Pick them outside the kernel's ephemeral range
	// (net.ipv4.ip_local_port_range) and unused by anything else.
	// Unused in connect mode. Read when the engine starts, like loops.
	// Default: 512 ports just above the ephemeral range (61000-61511
	// with Linux's usual 32768-60999).
	SourcePorts string `json:"source_ports,omitempty"`

	// The scheduling of connect mode's closers, the threads that close
	// answered probe sockets within the kernel's 200 ms delayed-ACK
	// window: "auto" (the default), "realtime" or "normal". realtime
	// runs each as SCHED_FIFO priority 1, the lowest real-time priority,
	// above every ordinary thread, so that a busy Caddy or machine does
	// not delay a close; a closer runs only while answers wait to be
	// closed, and the kernel's real-time throttling (95% of each second
	// by default) bounds it besides. It needs
	// CAP_SYS_NICE or an RLIMIT_RTPRIO of 1 (systemd: LimitRTPRIO=1;
	// Docker: --ulimit rtprio=1); without, the config fails to load with
	// an error that says so. auto: realtime where the process may, normal
	// elsewhere; the log and GET /shaker/engine say which, and why not.
	// normal: the closers run at Caddy's own priority. Unused in raw mode.
	// Read when the engine starts, like loops.
	CloserPriority string `json:"closer_priority,omitempty"`

	// Retired: accepted, ignored, and warned about. It capped the probes
	// in flight, which let probes waiting for their timeout on dead
	// addresses hold back every other address. The engine now bounds
	// the SYNs it starts between two reads of answers (64) and the
	// sockets it holds (max_sockets).
	MaxInFlight int `json:"max_in_flight,omitempty"`

	// How many probed addresses get a series of their own in the
	// metrics (caddy_shaker_upstream_healthy{address}): a number, "all",
	// or "off". While more addresses than that are probed, none has a
	// series of its own, and Caddy warns once per config saying so;
	// caddy_shaker_upstreams counts them by health and admin state at any
	// number of addresses. Each series costs every scrape about 60 bytes
	// and some microseconds of CPU, and the Prometheus server a series to
	// keep: at 1,000,000 addresses, "all" makes scrapes of about 60 MB
	// and tens of seconds of CPU. Read at every scrape, from the newest
	// config. Default: 1000.
	PerAddressMetrics SeriesCap `json:"per_address_metrics,omitempty"`

	ctx    caddy.Context
	logger *zap.Logger
	events *caddyevents.App
	*startState
}

// MaxLoops bounds loops: more loops than cores only add wake-ups.
const MaxLoops = 256

// startState is the mutable part of the app (behind a pointer, since
// Caddy copies the app to read its module info).
type startState struct {
	mu      sync.Mutex
	held    bool              // holds a reference to the engine
	started bool              // the config's apps have all started
	pending []*health.Checker // new checkers waiting for that

	warnedSeries atomic.Bool // warned that per-address series are off (metrics.go)
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
	if want, _ := a.engineSettings(); want.mode == shaker.ModeConnect && want.ports != (shaker.PortRange{}) {
		a.logger.Warn("source_ports is unused in probe_mode connect: only raw mode (probe_mode raw or auto) sends from them",
			zap.String("source_ports", a.SourcePorts), zap.Stringer("probe_mode", want.mode))
	}
	if a.MaxInFlight != 0 {
		a.logger.Warn("max_in_flight is retired and ignored: probes waiting for their timeout no longer hold others back; "+
			"the engine bounds the SYNs it starts per turn and the sockets it holds (max_sockets)",
			zap.Int("max_in_flight", a.MaxInFlight))
	}
	// New addresses are first probed once every app of the config has
	// started (Caddy's "started" event), so that backends served by the
	// same config are listening by then.
	if err := a.events.On("started", startedHandler{a}); err != nil {
		return fmt.Errorf("subscribing to the started event: %v", err)
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if err := engines.acquire(a); err != nil {
		return err
	}
	a.mu.Lock()
	a.held = true
	a.mu.Unlock()
	return nil
}

// Validate checks the app's configuration.
func (a *App) Validate() error {
	if a.Loops < 0 || a.Loops > MaxLoops {
		return fmt.Errorf("loops %d: must be from 0 (the default: one per CPU) to %d", a.Loops, MaxLoops)
	}
	if a.MaxSockets < 0 {
		return fmt.Errorf("max_sockets %d: must not be negative (0 for the default: three quarters of the open-file limit)", a.MaxSockets)
	}
	if _, err := a.engineSettings(); err != nil {
		return err
	}
	if err := a.PerAddressMetrics.validate(); err != nil {
		return err
	}
	if a.MaxInFlight < 0 {
		return fmt.Errorf("max_in_flight %d: must not be negative (and it is retired: see max_sockets)", a.MaxInFlight)
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
	return engines.release(a)
}

// schedule starts the probes of new checkers once the config has started.
func (a *App) schedule(fresh []*health.Checker) {
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
	reg.Start(fresh)
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
	reg.Start(p)
	return nil
}

// Interface guards
var (
	_ caddy.App           = (*App)(nil)
	_ caddy.Provisioner   = (*App)(nil)
	_ caddy.Validator     = (*App)(nil)
	_ caddy.CleanerUpper  = (*App)(nil)
	_ caddyevents.Handler = startedHandler{}
)
