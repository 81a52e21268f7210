package shaker

import (
	"context"
	"net/netip"
	"time"
)

// Probe probes addr and blocks until the result. The deadline of ctx bounds
// the call and is the probe's timeout; without one, the timeout is
// Options.DefaultTimeout. When ctx ends first, Probe returns at once with
// ErrTimeout (deadline) or ctx.Err() (cancellation); the probe itself is
// still closed by the engine.
func (e *Engine) Probe(ctx context.Context, addr netip.AddrPort) Result {
	if err := ctx.Err(); err != nil {
		return result(Result{Addr: addr, Err: ctxError(err)})
	}
	req := request{addr: addr, timeout: e.defaultTimeout}
	if d, ok := ctx.Deadline(); ok {
		left := time.Until(d)
		req.timeout = left
		req.deadline = e.now() + int64(left)
	}
	ch := make(chan Result, 1)
	req.done = func(r Result) { ch <- r }
	e.submit(req)
	select {
	case r := <-ch:
		return r
	case <-ctx.Done():
		return result(Result{Addr: addr, Err: ctxError(ctx.Err())})
	}
}

// ProbeAsync starts a probe of addr and returns at once. The timeout runs
// from the probe's SYN (time spent queued, waiting for a socket under
// MaxSockets, does not count); timeout <= 0 means Options.DefaultTimeout.
//
// done is called exactly once with the result, on the engine's loop
// goroutine (with the fallback engine of other systems, on the probe's
// goroutine): it must not block, nor call Close. It may call ProbeAsync, to
// re-arm a probe without a goroutine hop. After Close, done is called with
// ErrClosed before ProbeAsync returns, so a done that re-arms must stop on
// ErrClosed.
func (e *Engine) ProbeAsync(addr netip.AddrPort, timeout time.Duration, done func(Result)) {
	if timeout <= 0 {
		timeout = e.defaultTimeout
	}
	e.submit(request{addr: addr, timeout: timeout, done: done})
}
