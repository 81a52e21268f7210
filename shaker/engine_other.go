//go:build !linux || shaker_fallback

package shaker

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// halfOpen: without TCP_QUICKACK the kernel acknowledges the SYN-ACK at
// once, so a probe is a full connect, closed with an RST.
const halfOpen = false

// Engine runs probes. On this system each probe is a full TCP connect from
// its own goroutine, closed with a zero linger (an RST); see HalfOpen.
// Its methods are safe for concurrent use.
type Engine struct {
	maxInFlight    int // Options.MaxSockets
	defaultTimeout time.Duration
	base           time.Time
	mode           Mode      // ModeConnect or ModeRaw
	rawErr         error     // why raw mode is not in use (ModeAuto)
	ports          PortRange // raw mode's source ports
	closers        bool      // never: there are no closers here
	closerRT       bool
	closerRTErr    error

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	queue    ring
	closed   bool
	inFlight int

	outcomes  outcomeCounts
	scheduled atomic.Int64
}

// errNoRawHere: raw mode is built only for Linux's epoll engine.
var errNoRawHere = errors.New("raw probes are built only on Linux, without the shaker_fallback tag")

// New creates an engine. Call Close to stop it.
func New(opts Options) (*Engine, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	e := &Engine{maxInFlight: opts.MaxSockets, defaultTimeout: opts.DefaultTimeout, base: time.Now()}
	switch opts.Mode {
	case ModeRaw:
		return nil, &rawError{"raw sockets", errNoRawHere, ""}
	case ModeAuto:
		e.rawErr = &rawError{"raw sockets", errNoRawHere, ""}
	}
	if e.maxInFlight == 0 {
		e.maxInFlight = DefaultMaxSockets()
	}
	if e.defaultTimeout == 0 {
		e.defaultTimeout = DefaultTimeout
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	return e, nil
}

func (e *Engine) submit(req request) {
	if req.done == nil {
		panic("shaker: ProbeAsync with a nil done")
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		e.outcomes.add(Closed)
		req.done(result(Result{Addr: req.addr, Err: ErrClosed}))
		return
	}
	if e.inFlight >= e.maxInFlight {
		e.queue.push(req)
		e.mu.Unlock()
		return
	}
	e.inFlight++
	e.wg.Add(1)
	e.mu.Unlock()
	go e.run(req)
}

// run probes, then starts the next queued probe, if any, on the same goroutine.
func (e *Engine) run(req request) {
	defer e.wg.Done()
	for {
		res := result(e.probe(req))
		e.outcomes.add(res.Outcome)
		// Take the next queued probe, or leave InFlight, before done
		// runs: Stats seen from done is then up to date.
		e.mu.Lock()
		var next []request
		if !e.closed {
			next = e.queue.popN(nil, 1)
		}
		if len(next) == 0 {
			e.inFlight--
		}
		e.mu.Unlock()
		req.done(res)
		if len(next) == 0 {
			return
		}
		req = next[0]
	}
}

func (e *Engine) probe(req request) Result {
	res := Result{Addr: req.addr}
	if !req.addr.IsValid() || req.addr.Port() == 0 {
		res.Err = errInvalidAddr
		return res
	}
	ctx, cancel := context.WithTimeout(e.ctx, req.timeout)
	defer cancel()
	var d net.Dialer
	start := time.Now()
	c, err := d.DialContext(ctx, "tcp", req.addr.String())
	res.Duration = time.Since(start)
	if err == nil {
		res.RTT = res.Duration
		tc := c.(*net.TCPConn)
		tc.SetLinger(0)
		tc.Close()
		return res
	}
	var errno syscall.Errno
	switch {
	case e.ctx.Err() != nil:
		res.Err = ErrClosed
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		res.Err = ErrTimeout
	case errors.As(err, &errno):
		res.Err = classify("connect", errno)
	default:
		res.Err = err
	}
	return res
}

// now is the engine's monotonic clock, in ns.
func (e *Engine) now() int64 { return int64(time.Since(e.base)) }

// Close aborts every probe in flight or queued (done gets ErrClosed) and
// waits for their goroutines. Close is idempotent.
func (e *Engine) Close() error {
	e.mu.Lock()
	e.closed = true
	queued := e.queue.popN(nil, e.queue.n)
	e.mu.Unlock()
	e.cancel()
	for _, req := range queued {
		e.outcomes.add(Closed)
		req.done(result(Result{Addr: req.addr, Err: ErrClosed}))
	}
	e.wg.Wait()
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
	return burstOf(e.maxInFlight, timeout)
}

// Stats returns a snapshot of the engine's counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	q, n := e.queue.n, e.inFlight
	e.mu.Unlock()
	s := Stats{
		Mode: ModeConnect, Loops: 1, InFlight: n, Queued: q, Sockets: n, MaxSockets: e.maxInFlight,
		Scheduled:  int(e.scheduled.Load()),
		StartDelay: Histogram{Counts: make([]uint64, numDelayBuckets)},
		CloseDelay: Histogram{Counts: make([]uint64, numCloseBuckets)},
	}
	e.outcomes.addTo(&s)
	return s
}

// DefaultMaxSockets is the bound on probes in flight when
// Options.MaxSockets is zero.
func DefaultMaxSockets() int { return 768 }
