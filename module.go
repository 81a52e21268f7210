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
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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

// engineSettings are what the engine is started with, from the app's
// configuration: the zero value of each is its default.
type engineSettings struct {
	loops, maxSockets int
	mode              shaker.Mode
	ports             shaker.PortRange // the zero range: shaker.DefaultPortRange
}

// engineSettings reads the app's engine settings; its error names the bad
// value.
func (a *App) engineSettings() (engineSettings, error) {
	mode, err := parseProbeMode(a.ProbeMode)
	if err != nil {
		return engineSettings{}, err
	}
	ports, err := parseSourcePorts(a.SourcePorts)
	if err != nil {
		return engineSettings{}, err
	}
	loops := a.Loops
	if loops == 0 {
		loops = runtime.GOMAXPROCS(0)
	}
	if ports.Size() > 0 && ports.Size() < loops && mode != shaker.ModeConnect {
		return engineSettings{}, fmt.Errorf("source_ports %q: %d ports for %d loops: each loop needs one at least (give more ports, or fewer loops)",
			a.SourcePorts, ports.Size(), loops)
	}
	return engineSettings{loops: a.Loops, maxSockets: a.MaxSockets, mode: mode, ports: ports}, nil
}

// parseProbeMode reads probe_mode; "" is connect.
func parseProbeMode(s string) (shaker.Mode, error) {
	m, err := shaker.ParseMode(s)
	if err != nil {
		return 0, fmt.Errorf("probe_mode %q: must be connect (the default), raw or auto", s)
	}
	return m, nil
}

// parseSourcePorts reads source_ports; "" is the zero range (the default).
func parseSourcePorts(s string) (shaker.PortRange, error) {
	if s == "" {
		return shaker.PortRange{}, nil
	}
	r, err := shaker.ParsePortRange(s)
	if err != nil {
		return r, fmt.Errorf("source_ports %q: %s", s, strings.TrimPrefix(err.Error(), "shaker: "))
	}
	return r, nil
}

// changed names the settings that differ between s, the running engine's,
// and c, a config's: the source ports only where either asks for raw mode
// (connect mode does not use them).
func (s engineSettings) changed(c engineSettings) []string {
	var out []string
	if s.loops != c.loops {
		out = append(out, "loops")
	}
	if s.maxSockets != c.maxSockets {
		out = append(out, "max_sockets")
	}
	if s.mode != c.mode {
		out = append(out, "probe_mode")
	}
	if s.ports != c.ports && (s.mode != shaker.ModeConnect || c.mode != shaker.ModeConnect) {
		out = append(out, "source_ports")
	}
	return out
}

// MarshalLogObject writes the settings as the config names them, 0 and
// "default" for the defaults.
func (s engineSettings) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddInt("loops", s.loops)
	enc.AddInt("max_sockets", s.maxSockets)
	enc.AddString("probe_mode", s.mode.String())
	ports := "default"
	if s.ports != (shaker.PortRange{}) {
		ports = s.ports.String()
	}
	enc.AddString("source_ports", ports)
	return nil
}

// engines is the process's one engine and the apps that hold it.
var engines engineState

// engineState is the process-wide engine and the apps that hold it.
type engineState struct {
	mu     sync.Mutex
	engine *shaker.Engine
	apps   []*App // live apps, oldest first; the last one announces

	cur      atomic.Pointer[shaker.Engine]
	settings atomic.Pointer[engineSettings] // what cur was started with
	herald   atomic.Pointer[App]

	stopWatch func() // stops watchEngine and waits for it

	check     atomic.Pointer[checkResult] // the engine's self-check; nil: not run
	stopCheck func()                      // cancels the self-check and waits for it
}

// acquire takes a reference to the engine for a, starting it if needed.
func (s *engineState) acquire(a *App) error {
	want, err := a.engineSettings()
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.engine == nil {
		e, err := shaker.New(shaker.Options{Loops: want.loops, MaxSockets: want.maxSockets, Mode: want.mode, SourcePorts: want.ports})
		if err != nil {
			return fmt.Errorf("starting probe engine (probe_mode %v): %w", want.mode, err)
		}
		s.engine = e
		s.settings.Store(&want)
		s.cur.Store(e)
		stop, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			watchEngine(e.Stats, func() *zap.Logger {
				if h := s.herald.Load(); h != nil {
					return h.logger
				}
				return nil
			}, stop, watchEvery, closeDelayWarn)
		}()
		s.stopWatch = func() { close(stop); <-done }
		logStarted(a.logger, e, want.mode)
		s.apps = append(s.apps, a)
		s.herald.Store(a)
		s.startCheck(e)
		reg.SetEngine(e)
		return nil
	}
	if running := *s.settings.Load(); len(running.changed(want)) > 0 {
		a.logger.Warn(strings.Join(running.changed(want), ", ")+" changed: the running engine keeps its settings until it restarts "+
			"(a restart of Caddy, or loading a config without the shaker app first)",
			zap.Object("running", running), zap.Object("configured", want),
			zap.Stringer("probe_mode_in_use", s.engine.Mode()))
	}
	s.apps = append(s.apps, a)
	s.herald.Store(a)
	return nil
}

// logStarted logs the start of engine e, asked for the probe mode asked:
// its settings, and with auto which mode it chose and why not raw.
func logStarted(l *zap.Logger, e *shaker.Engine, asked shaker.Mode) {
	st := e.Stats()
	fields := []zap.Field{
		zap.Bool("half_open", shaker.HalfOpen()),
		zap.Int("loops", st.Loops),
		zap.Int("max_sockets", st.MaxSockets),
		zap.Stringer("probe_mode", e.Mode()),
	}
	if asked != e.Mode() {
		fields = append(fields, zap.Stringer("probe_mode_asked", asked))
	}
	if e.Mode() == shaker.ModeRaw {
		fields = append(fields, zap.Stringer("source_ports", e.SourcePorts()))
	}
	l.Info("probe engine started", fields...)
	if asked != shaker.ModeAuto {
		return
	}
	rawErr := e.RawError()
	switch {
	case rawErr == nil:
		l.Info("probe_mode auto chose raw: raw sockets can be opened here, so SYN-ACKs are reset by the kernel and no probe can become a connection",
			zap.Stringer("probe_mode", e.Mode()), zap.Stringer("source_ports", e.SourcePorts()))
	case errors.Is(rawErr, shaker.ErrRawUnavailable):
		l.Info("probe_mode auto chose connect: raw sockets are refused here",
			zap.Stringer("probe_mode", e.Mode()), zap.String("reason", rawErr.Error()))
	default:
		// raw sockets opened, and something else failed: a source port
		// held by another socket, say; the operator can fix that
		l.Warn("probe_mode auto chose connect: raw mode could not start",
			zap.Stringer("probe_mode", e.Mode()), zap.String("reason", rawErr.Error()))
	}
}

// release drops a's reference; the last one closes the engine.
func (s *engineState) release(a *App) error {
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
	s.settings.Store(nil)
	stopWatch := s.stopWatch
	s.stopWatch = nil
	stopCheck := s.stopCheck
	s.stopCheck = nil
	s.check.Store(nil)
	s.mu.Unlock()
	if e == nil {
		return nil
	}
	stopWatch()
	err := e.Close()
	stopCheck() // after Close: a check still probing gets ErrClosed
	reg.SetEngine(nil)
	st := e.Stats()
	a.logger.Info("probe engine stopped",
		zap.Stringer("probe_mode", e.Mode()),
		zap.Uint64("probes", st.Total()),
		zap.Duration("max_close_delay", st.MaxCloseDelay))
	return err
}

// The self-check (shaker's SelfCheck) runs once per engine, when it starts:
// it probes a listener of its own on 127.0.0.1 and watches it for longer
// than the kernel's delayed-ACK timer. selfCheck is a variable for tests.
var (
	selfCheck        = (*shaker.Engine).SelfCheck
	selfCheckTimeout = 5 * time.Second
)

// The states of the self-check, as GET /shaker/engine shows them.
const (
	checkNotRun  = "not run" // no engine, or it closed before the check ended
	checkPending = "pending"
	checkOK      = "ok"
	checkFailed  = "failed"
)

// checkResult is the state of the running engine's self-check.
type checkResult struct {
	state string
	err   string // when failed
}

// selfCheckState returns the running engine's self-check state, its error
// text when it failed, and whether probes are half-open: true where they
// are by construction (shaker.HalfOpen) and the check did not fail (while
// it is pending, or without an engine, construction alone says).
func selfCheckState() (state, errText string, halfOpen bool) {
	r := engines.check.Load()
	if r == nil {
		return checkNotRun, "", shaker.HalfOpen()
	}
	return r.state, r.err, shaker.HalfOpen() && r.state != checkFailed
}

// startCheck runs e's self-check on a goroutine of its own, so that
// neither Provision nor a reload waits for its 250 ms, and records the
// result for the metrics and the admin API while e runs. It logs once:
// a line when it passes, an error when it fails. An engine closed before
// the check ends leaves it "not run". Called with s.mu held.
func (s *engineState) startCheck(e *shaker.Engine) {
	pending := &checkResult{state: checkPending}
	s.check.Store(pending)
	ctx, cancel := context.WithTimeout(context.Background(), selfCheckTimeout)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer cancel()
		start := time.Now()
		err := selfCheck(e, ctx)
		took := time.Since(start)
		var res *checkResult
		switch {
		case err == nil:
			res = &checkResult{state: checkOK}
		case errors.Is(err, shaker.ErrClosed) || errors.Is(err, context.Canceled):
			res = nil // the engine closed first: no verdict
		default:
			res = &checkResult{state: checkFailed, err: err.Error()}
		}
		// The engine may have been released meanwhile (release clears
		// the state): then this result is nobody's.
		if !s.check.CompareAndSwap(pending, res) || res == nil {
			return
		}
		h := s.herald.Load()
		if h == nil {
			return
		}
		switch {
		case res.state == checkOK:
			h.logger.Info("self-check passed: probes are half-open, backends never accept() them",
				zap.Stringer("probe_mode", e.Mode()),
				zap.Duration("took", took))
		default:
			msg := "self-check FAILED: it could not probe its own listener on 127.0.0.1, so it is not known " +
				"whether probes here are half-open; if they are not, each backend accept()s a real connection per probe " +
				"and will log and count the health checks. " +
				"Possible causes besides the error: a kernel without delayed ACK (gVisor), a non-Linux system, " +
				"or something that handles connections in front of the kernel (a userland network stack or proxy)"
			if errors.Is(err, shaker.ErrNotHalfOpen) {
				msg = "self-check FAILED: probes here are NOT half-open: every health probe completes the TCP handshake, " +
					"so each backend accept()s a real connection per probe and will log and count the health checks " +
					"(connection logs, aborted-connection counters, rate limits). " +
					"Likely cause: a kernel without delayed ACK (gVisor), a non-Linux system, " +
					"or something that completes handshakes in front of the kernel (a userland network stack or proxy). " +
					"Run Caddy directly on a Linux kernel to keep probes invisible"
			}
			h.logger.Error(msg,
				zap.Stringer("probe_mode", e.Mode()),
				zap.Bool("half_open_by_construction", shaker.HalfOpen()),
				zap.Duration("took", took),
				zap.Error(err))
		}
	}()
	s.stopCheck = func() { cancel(); <-done }
}

// A probe's socket closed long after its SYN-ACK is a warning sign: at
// about 200 ms the kernel completes the handshake itself and the backend
// accepts a connection. The engine keeps the worst delay it has seen; the
// app checks it every watchEvery and warns when it passes closeDelayWarn,
// and again each time it grows.
//
// Probes that start late are the other sign of an engine that cannot keep
// up: the app warns once when probes start later than a quarter of their
// interval (an episode), and says when they are on time again.
var (
	closeDelayWarn = 50 * time.Millisecond
	watchEvery     = 5 * time.Second
)

// watchEngine logs, until stop is closed: a warning each time the engine's
// worst SYN-ACK-to-close delay passes warn and the worst already
// reported; a warning when probes start running late, and a line when
// they are on time again.
func watchEngine(stats func() shaker.Stats, logger func() *zap.Logger, stop <-chan struct{}, every, warn time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	reported := warn
	prev := stats()
	late := false
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		st := stats()
		l := logger()
		if worst := st.MaxCloseDelay; worst > reported {
			reported = worst
			if l != nil {
				l.Warn("probes closed late: at 200 ms after a SYN-ACK the kernel completes the handshake and the backend accepts a connection; the machine may be overloaded",
					zap.Duration("worst_synack_to_close", worst))
			}
		}
		newLate := st.Late - prev.Late
		switch {
		case newLate > 0 && !late:
			late = true
			if l != nil {
				l.Warn("probes starting late: addresses are probed less often than configured and failures are seen later; "+
					"give Caddy more CPU, raise loops (one per core), raise max_sockets if it is reached, or probe less often",
					zap.Uint64("late_probes", newLate),
					zap.Duration("lag", st.Lag),
					zap.Int("overdue", st.Overdue),
					zap.Int("loops", st.Loops),
					zap.Int("sockets", st.Sockets),
					zap.Int("max_sockets", st.MaxSockets))
			}
		case newLate == 0 && late:
			late = false
			if l != nil {
				l.Info("probes on time again")
			}
		}
		prev = st
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
