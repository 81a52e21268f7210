package shaker

import (
	"errors"
	"strconv"
	"sync/atomic"
)

// Outcome is what a probe found: the one classification of results that
// every consumer (counters, health state, logs, metrics) reads, like
// HAProxy's table of check statuses.
type Outcome uint8

// The outcomes of a probe.
const (
	// Up: the port answered with a SYN-ACK (Result.Err is nil).
	Up Outcome = iota
	// Refused: the port answered with an RST (ErrRefused).
	Refused
	// Timeout: no answer before the deadline (ErrTimeout).
	Timeout
	// Unreachable: an ICMP error answered (ErrUnreachable).
	Unreachable
	// Local: the probe could not be made on this host (ErrLocal): it
	// says nothing about the backend.
	Local
	// Failed: another error, such as an invalid address.
	Failed
	// Closed: the engine was closed first (ErrClosed).
	Closed

	numOutcomes = iota
)

var outcomeNames = [numOutcomes]string{"up", "refused", "timeout", "unreachable", "local_error", "error", "closed"}

// String is the outcome's name in logs and metrics: up, refused, timeout,
// unreachable, local_error, error or closed.
func (o Outcome) String() string {
	if int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return "outcome(" + strconv.Itoa(int(o)) + ")"
}

// Backend reports whether the outcome says something about the backend:
// false for Local and Closed, which are this host's.
func (o Outcome) Backend() bool { return o != Local && o != Closed }

// outcomeOf classifies a Result's error. The engine's own errors are
// matched by identity first, so that the hot path does not walk error
// chains.
func outcomeOf(err error) Outcome {
	switch {
	case err == nil:
		return Up
	case err == ErrRefused:
		return Refused
	case err == ErrTimeout:
		return Timeout
	case err == errHostUnreach || err == errNetUnreach:
		return Unreachable
	case err == ErrClosed:
		return Closed
	case errors.Is(err, ErrLocal):
		return Local
	case errors.Is(err, ErrTimeout):
		return Timeout
	case errors.Is(err, ErrUnreachable):
		return Unreachable
	case errors.Is(err, ErrRefused):
		return Refused
	case errors.Is(err, ErrClosed):
		return Closed
	}
	return Failed
}

// result builds a Result with its Outcome.
func result(res Result) Result {
	res.Outcome = outcomeOf(res.Err)
	return res
}

// outcomeCounts counts results by outcome.
type outcomeCounts [numOutcomes]atomic.Uint64

func (c *outcomeCounts) add(o Outcome) { c[o].Add(1) }

// addTo adds the counts to s.
func (c *outcomeCounts) addTo(s *Stats) {
	s.Up += c[Up].Load()
	s.Refused += c[Refused].Load()
	s.Timeout += c[Timeout].Load()
	s.Unreachable += c[Unreachable].Load()
	s.Local += c[Local].Load()
	s.Failed += c[Failed].Load()
	s.Closed += c[Closed].Load()
}
