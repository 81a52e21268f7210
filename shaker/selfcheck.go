package shaker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// selfCheckWait is how long SelfCheck watches its listener after its probes:
// longer than the kernel's 200 ms delayed-ACK timer, so that a probe socket
// left open too long would have become a connection by then.
const selfCheckWait = 250 * time.Millisecond

// selfCheckProbes is how many probes SelfCheck sends.
const selfCheckProbes = 3

// ErrNotHalfOpen: SelfCheck's listener accepted a probe's connection, so
// probes on this system reach the accept() of the applications they probe.
// SelfCheck's other errors mean that it could not tell (a probe of its own
// listener failed, or ctx ended first).
var ErrNotHalfOpen = errors.New("probes are not half-open on this system")

// SelfCheck verifies that this engine's probes stay invisible on this
// system. It opens its own listener on 127.0.0.1, probes it a few times,
// and watches it for about 250 ms (longer than the kernel's delayed-ACK
// timer). It returns an error if a probe failed or if the listener accepted
// anything, as it does on kernels that ignore the delayed ACK (gVisor) and
// on systems without TCP_QUICKACK (see HalfOpen); that error matches
// ErrNotHalfOpen. When the engine is closed during the check, the error
// matches ErrClosed, or SelfCheck passes if its probes had finished.
func (e *Engine) SelfCheck(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("shaker: self-check: %w", err)
	}
	defer ln.Close()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()

	accepted := make(chan struct{}, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return // the listener was closed: nothing accepted
		}
		c.Close()
		accepted <- struct{}{}
	}()

	for i := 0; i < selfCheckProbes; i++ {
		if r := e.Probe(ctx, addr); r.Err != nil {
			return fmt.Errorf("shaker: self-check: probe of its own listener %v failed: %w", addr, r.Err)
		}
	}
	t := time.NewTimer(selfCheckWait)
	defer t.Stop()
	select {
	case <-accepted:
		return fmt.Errorf("shaker: self-check: the listener on %v accepted a probe's connection: "+
			"%w (half-open by construction: %v)", addr, ErrNotHalfOpen, HalfOpen())
	case <-ctx.Done():
		return fmt.Errorf("shaker: self-check: %w", ctx.Err())
	case <-t.C:
		return nil
	}
}
