package caddyshaker

// The engine's lifetime: the process has one, which the apps of the live
// configs share; it starts with the first and closes with the last.

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// engineSettings are what the engine is started with, from the app's
// configuration: the zero value of each is its default.
type engineSettings struct {
	loops, maxSockets int
	mode              shaker.Mode
	ports             shaker.PortRange // the zero range: shaker.DefaultPortRange
	priority          shaker.Priority
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
	prio, err := parseCloserPriority(a.CloserPriority)
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
	return engineSettings{loops: a.Loops, maxSockets: a.MaxSockets, mode: mode, ports: ports, priority: prio}, nil
}

// parseProbeMode reads probe_mode; "" is connect.
func parseProbeMode(s string) (shaker.Mode, error) {
	m, err := shaker.ParseMode(s)
	if err != nil {
		return 0, fmt.Errorf("probe_mode %q: must be connect (the default), raw or auto", s)
	}
	return m, nil
}

// parseCloserPriority reads closer_priority; "" is auto.
func parseCloserPriority(s string) (shaker.Priority, error) {
	p, err := shaker.ParsePriority(s)
	if err != nil {
		return 0, fmt.Errorf("closer_priority %q: must be auto (the default), realtime or normal", s)
	}
	return p, nil
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
// (connect mode does not use them), the closer priority only where either
// does not ask for raw mode (raw mode has no closers).
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
	if s.priority != c.priority && (s.mode != shaker.ModeRaw || c.mode != shaker.ModeRaw) {
		out = append(out, "closer_priority")
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
	enc.AddString("closer_priority", s.priority.String())
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
		e, err := shaker.New(shaker.Options{Loops: want.loops, MaxSockets: want.maxSockets, Mode: want.mode, SourcePorts: want.ports,
			CloserPriority: want.priority})
		if err != nil {
			return fmt.Errorf("starting probe engine (probe_mode %v, closer_priority %v): %w", want.mode, want.priority, err)
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
		logStarted(a.logger, e, want)
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

// logStarted logs the start of engine e, started with want: its
// settings, with probe_mode auto which mode it chose and why not raw, and
// with closer_priority auto why not realtime where it is not.
func logStarted(l *zap.Logger, e *shaker.Engine, want engineSettings) {
	st := e.Stats()
	asked := want.mode
	_, rtErr := e.CloserRealtime()
	fields := []zap.Field{
		zap.Bool("half_open", shaker.HalfOpen()),
		zap.Int("loops", st.Loops),
		zap.Int("max_sockets", st.MaxSockets),
		zap.Stringer("probe_mode", e.Mode()),
		zap.String("closer_priority", closerPriorityInUse(e)),
	}
	if asked != e.Mode() {
		fields = append(fields, zap.Stringer("probe_mode_asked", asked))
	}
	if e.Mode() == shaker.ModeRaw {
		fields = append(fields, zap.Stringer("source_ports", e.SourcePorts()))
	}
	l.Info("probe engine started", fields...)
	if rtErr != nil {
		l.Info("closer_priority auto: the closers run at normal priority: their threads could not be made real-time",
			zap.String("reason", rtErr.Error()))
	}
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

// closerPriorityInUse names how e's closers run: "realtime", "normal",
// or "none" (raw mode has none, nor has a build with the race detector).
func closerPriorityInUse(e *shaker.Engine) string {
	switch realtime, _ := e.CloserRealtime(); {
	case realtime:
		return "realtime"
	case !e.HasClosers():
		return "none"
	}
	return "normal"
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
