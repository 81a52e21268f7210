//go:build linux && !shaker_fallback

package shaker

import (
	"net/netip"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	_ "unsafe" // go:linkname

	"golang.org/x/sys/unix"
)

// halfOpen: on Linux, TCP_QUICKACK off keeps the kernel from acknowledging
// the SYN-ACK before the socket is closed.
const halfOpen = true

// Engine runs half-open probes from one or more epoll loops, each a
// goroutine that owns its probes' sockets from connect() to close().
// Its methods are safe for concurrent use.
type Engine struct {
	defaultTimeout time.Duration
	maxSockets     int
	base           int64 // nanotime at New: engine time 0
	loops          []*loop
	mode           Mode       // ModeConnect or ModeRaw
	rawErr         error      // why raw mode is not in use (ModeAuto)
	ports          PortRange  // raw mode's source ports
	raw            *rawShared // raw mode's reserved ports; nil in connect mode
	closers        bool       // the loops have closers
	closerRT       bool       // the closers run at real-time priority
	closerRTErr    error      // why not, where PriorityAuto asked for it
}

// New creates an engine: its loops, each with an epoll instance and a
// goroutine. Call Close to stop it.
func New(opts Options) (*Engine, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	n := opts.Loops
	if n == 0 {
		n = runtime.GOMAXPROCS(0)
	}
	e := &Engine{
		defaultTimeout: opts.DefaultTimeout,
		maxSockets:     opts.MaxSockets,
		base:           nanotime(),
	}
	if e.defaultTimeout == 0 {
		e.defaultTimeout = DefaultTimeout
	}
	if opts.Mode != ModeConnect {
		err := e.build(opts, n, true)
		switch {
		case err == nil:
		case opts.Mode == ModeAuto:
			e.rawErr = err
		default:
			return nil, err
		}
	}
	if e.raw == nil {
		if err := e.build(opts, n, false); err != nil {
			return nil, err
		}
	}
	if err := e.startClosers(opts.CloserPriority); err != nil {
		for _, l := range e.loops {
			l.close()
		}
		return nil, err
	}
	for _, l := range e.loops {
		go l.run()
	}
	return e, nil
}

// startClosers starts the loops' closers, at real-time priority where
// prio asks for it and the process may: all of them, or, with
// PriorityAuto, none if one may not. Where PriorityRealtime asked and one
// may not, it fails, and none runs.
func (e *Engine) startClosers(prio Priority) error {
	ready, start := make(chan error), make(chan closerStart)
	n := 0
	for _, l := range e.loops {
		if l.cl != nil {
			go l.cl.run(prio != PriorityNormal, ready, start)
			n++
		}
	}
	var err error
	for i := 0; i < n; i++ {
		if cerr := <-ready; err == nil {
			err = cerr
		}
	}
	fail := prio == PriorityRealtime && err != nil
	st := closerStart{serve: !fail, realtime: err == nil && prio != PriorityNormal}
	for i := 0; i < n; i++ {
		start <- st
	}
	if fail {
		for _, l := range e.loops {
			if l.cl != nil {
				<-l.cl.done
			}
		}
		return err
	}
	e.closers = n > 0
	e.closerRTErr = err
	e.closerRT = st.realtime && n > 0
	return nil
}

// build makes the engine's loops, in raw mode or not; on failure it
// leaves none.
func (e *Engine) build(opts Options, n int, raw bool) error {
	var shared *rawShared
	e.maxSockets = opts.MaxSockets
	if raw {
		var err error
		if shared, err = newRawShared(opts.SourcePorts, n); err != nil {
			return err
		}
		if e.maxSockets == 0 {
			e.maxSockets = DefaultRawInFlight
		}
	} else if e.maxSockets == 0 {
		e.maxSockets = DefaultMaxSockets()
	}
	per := max(e.maxSockets/n, 1)
	for i := 0; i < n; i++ {
		l, err := newLoop(e, per, opts.epollOnly)
		if err == nil && shared != nil {
			err = l.openRaw(shared, i, n)
		} else if err == nil {
			err = l.openCloser()
		}
		if err != nil {
			if l != nil {
				l.close()
			}
			for _, l := range e.loops {
				l.close()
			}
			e.loops = nil
			shared.close()
			return err
		}
		e.loops = append(e.loops, l)
	}
	if shared != nil {
		e.raw, e.mode, e.ports = shared, ModeRaw, shared.ports
	}
	return nil
}

// DefaultRawInFlight is the bound on probes in flight in raw mode when
// Options.MaxSockets is zero. A raw probe holds no file descriptor, only
// a slot of about 100 bytes, so the bound is far above the fd limit's.
const DefaultRawInFlight = 1 << 16

// DefaultMaxSockets is the bound on probe sockets when Options.MaxSockets
// is zero: the RLIMIT_NOFILE soft limit, less a quarter of it (at least
// 256, at most half) for the process's own files and connections.
func DefaultMaxSockets() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == 0 {
		return 768
	}
	soft := int(min(rl.Cur, 1<<30))
	reserve := min(max(soft/4, 256), soft/2)
	return max(soft-reserve, 1)
}

// loopOf is the loop that probes addr: the same one every time.
func (e *Engine) loopOf(addr netip.AddrPort) *loop {
	if len(e.loops) == 1 {
		return e.loops[0]
	}
	// FNV-1a over the address and port.
	b := addr.Addr().As16()
	h := uint32(2166136261)
	for _, c := range b {
		h = (h ^ uint32(c)) * 16777619
	}
	p := addr.Port()
	h = (h ^ uint32(p>>8)) * 16777619
	h = (h ^ uint32(p&0xff)) * 16777619
	return e.loops[h%uint32(len(e.loops))]
}

func (e *Engine) submit(req request) {
	if req.done == nil {
		panic("shaker: ProbeAsync with a nil done")
	}
	req.scope, req.err = scopeOf(req.addr)
	l := e.loopOf(req.addr)
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.outcomes.add(Closed)
		req.done(result(Result{Addr: req.addr, Err: ErrClosed}))
		return
	}
	l.queue.push(req)
	l.queued.Add(1)
	l.wakeLocked()
	l.mu.Unlock()
}

// Close aborts every probe in flight or queued, closing their sockets at
// once (one-off probes' done gets ErrClosed; schedules' callbacks are not
// called again), stops the loops and releases their descriptors. After
// Close returns, no backend can accept a connection from this engine.
// Every loop is told to stop before Close waits for any. Close is
// idempotent. It must not be called from a callback.
func (e *Engine) Close() error {
	for _, l := range e.loops {
		l.mu.Lock()
		if !l.closed {
			l.closed = true
			l.sleeping = true // force the write
			l.wakeLocked()
		}
		l.mu.Unlock()
	}
	for _, l := range e.loops {
		<-l.done
	}
	e.raw.close() // the reserved ports, once no loop sends from them
	return nil
}

// Burst says how fast a burst of new probes with the given timeout (<= 0:
// the engine's default) may be started, such as the first probes of many
// new addresses (see health.Registry.Start); periodic probes spread over
// their interval need no pacing.
func (e *Engine) Burst(timeout time.Duration) Burst {
	if timeout <= 0 {
		timeout = e.defaultTimeout
	}
	return burstOf(e.maxSockets, timeout)
}

// Stats returns a snapshot of the engine's counters, summed over its
// loops.
func (e *Engine) Stats() Stats {
	s := Stats{Mode: e.mode, Loops: len(e.loops), MaxSockets: e.maxSockets}
	s.StartDelay.Counts = make([]uint64, len(StartDelayBuckets)+1)
	s.CloseDelay.Counts = make([]uint64, len(CloseDelayBuckets)+1)
	now := e.now()
	for _, l := range e.loops {
		l.outcomes.addTo(&s)
		s.InFlight += int(l.inFlight.Load())
		s.Queued += int(l.queued.Load())
		s.Sockets += int(l.sockets.Load())
		s.Scheduled += int(l.scheduled.Load())
		s.Overdue += int(l.overdue.Load())
		if lag := time.Duration(now - l.headDue.Load()); lag > s.Lag {
			s.Lag = lag
		}
		s.Late += l.late.Load()
		for i := range l.delays {
			s.StartDelay.Counts[i] += l.delays[i].Load()
		}
		s.StartDelay.Sum += time.Duration(l.delaySum.Load())
		s.MaxCloseDelay = max(s.MaxCloseDelay, time.Duration(l.maxCloseDelay.Load()))
		for i := range l.closeDelays {
			s.CloseDelay.Counts[i] += l.closeDelays[i].Load()
		}
		s.CloseDelay.Sum += time.Duration(l.closeSum.Load())
		s.EpollUp += l.epollUp.Load()
		s.MaxReady = max(s.MaxReady, int(l.maxReady.Load()))
		if l.cl != nil {
			s.MaxReady = max(s.MaxReady, int(atomic.LoadInt64(&l.cl.maxReady)))
		}
	}
	return s
}

// now is engine time: ns since New, on the monotonic clock.
//
//go:nosplit
func (e *Engine) now() int64 { return nanotime() - e.base }

// nanotime is the Go runtime's monotonic clock (CLOCK_MONOTONIC, through
// the vDSO), the clock of time.Now's monotonic reading. Unlike time.Now
// it is nosplit, so the SYN's window (synwindow_linux.go) can read it.
//
//go:linkname nanotime runtime.nanotime
func nanotime() int64

func errnoOf(err error) syscall.Errno {
	if errno, ok := err.(syscall.Errno); ok {
		return errno
	}
	return syscall.EINVAL
}
