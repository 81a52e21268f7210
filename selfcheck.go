package caddyshaker

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

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
