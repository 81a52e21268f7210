// Package shaker runs half-open TCP health probes (SYN, SYN-ACK, RST) by the
// thousand from one epoll loop.
//
// A probe sends a SYN to an address and waits for the answer. A SYN-ACK means
// that a listener exists; the probe then closes its socket at once with a
// zero linger, which sends an RST. The socket was set to delayed-ACK mode
// (TCP_QUICKACK off) before connect(), so the kernel never sends the final
// ACK of the handshake, the backend's accept() never returns, and the
// application behind the port never sees, logs or counts the probe.
//
// The kernel sends that ACK itself about 200 ms after the SYN-ACK if the
// socket is still open, so the engine closes every probe's socket as soon as
// its result is known, before it starts new probes, and at Close.
//
// One Engine is one epoll instance and one loop goroutine. The loop owns each
// probe's file descriptor from connect() to close(): nothing else closes one,
// and deadlines fire inside the loop. Callers give IP addresses
// (netip.AddrPort); resolving names is their business, with their own
// timeout.
//
// Probes are truly half-open only on Linux. Elsewhere the engine falls back
// to a full connect closed with a zero linger (HalfOpen reports which), and
// some Linux-like kernels, such as gVisor's, ignore the delayed ACK:
// SelfCheck finds out at run time.
package shaker

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"syscall"
	"time"
)

// DefaultTimeout is the timeout of a probe started by Probe with a context
// that has no deadline, and of a ProbeAsync call with a timeout <= 0, when
// Options.DefaultTimeout is zero.
const DefaultTimeout = time.Second

// DefaultMaxInFlight is the cap on probes in flight when
// Options.MaxInFlight is zero.
const DefaultMaxInFlight = 1024

// Options configures an Engine. The zero value is ready to use.
type Options struct {
	// MaxInFlight caps the probes whose SYN has been sent and whose result
	// is not known yet. Probes beyond the cap wait in a queue, in the order
	// they were asked for; they do not fail, and their timeout starts when
	// their SYN is sent. The cap bounds the burst of SYN-ACKs the loop may
	// have to close at once, which must stay far below the kernel's
	// 200 ms delayed-ACK window. Zero means DefaultMaxInFlight.
	MaxInFlight int

	// DefaultTimeout is the timeout of probes that are given none: Probe
	// with a context without deadline, ProbeAsync with a timeout <= 0.
	// Zero means DefaultTimeout.
	DefaultTimeout time.Duration

	// epollOnly, for tests: always wait for the answer through epoll,
	// even when the handshake finished inside connect().
	epollOnly bool
}

// Result is the outcome of one probe.
type Result struct {
	// Addr is the address probed.
	Addr netip.AddrPort

	// Err is nil when the port answered with a SYN-ACK. Otherwise it
	// matches one of ErrRefused, ErrTimeout, ErrUnreachable or ErrClosed
	// with errors.Is, or it wraps the syscall.Errno of the failing
	// system call (EMFILE, EADDRNOTAVAIL, ...), and also matches ErrLocal
	// when that failure is this host's. ErrUnreachable errors also match
	// their syscall.Errno (EHOSTUNREACH, ENETUNREACH).
	Err error

	// RTT is the kernel's measure (tcpi_rtt) of the SYN to SYN-ACK round
	// trip, when Err is nil.
	RTT time.Duration

	// Duration is the time from the SYN (connect) to the result. It is
	// zero when no SYN was sent (closed engine, socket errors).
	Duration time.Duration
}

// Up reports whether the port answered with a SYN-ACK.
func (r Result) Up() bool { return r.Err == nil }

// Errors a Result may carry; compare with errors.Is.
var (
	// ErrRefused: the address answered the SYN with an RST (nothing listens
	// on the port).
	ErrRefused = errors.New("shaker: connection refused")
	// ErrTimeout: no answer before the deadline (a dropped SYN: firewall,
	// dead host, or a listener whose accept queue is full).
	ErrTimeout = errors.New("shaker: timeout")
	// ErrUnreachable: an ICMP error (host or network unreachable) answered
	// the SYN.
	ErrUnreachable = errors.New("shaker: unreachable")
	// ErrClosed: the engine was closed before the probe had a result.
	ErrClosed = errors.New("shaker: engine closed")
	// ErrLocal: the probe could not be made on this host: out of file
	// descriptors, local ports or memory. The error also wraps the errno.
	// It says nothing about the backend, so a health checker should not
	// count it against one.
	ErrLocal = errors.New("shaker: probe failed on this host")
)

// errnoError is an error that matches both a category (ErrUnreachable) and
// the errno it came from.
type errnoError struct {
	kind  error
	errno syscall.Errno
	msg   string
}

func (e *errnoError) Error() string   { return e.msg }
func (e *errnoError) Unwrap() []error { return []error{e.kind, e.errno} }

// Preallocated, so that the hot path does not allocate.
var (
	errHostUnreach = &errnoError{ErrUnreachable, syscall.EHOSTUNREACH, "shaker: host unreachable"}
	errNetUnreach  = &errnoError{ErrUnreachable, syscall.ENETUNREACH, "shaker: network unreachable"}
)

// opError wraps an errno that is none of the known outcomes.
type opError struct {
	op    string
	errno syscall.Errno
}

func (e *opError) Error() string { return fmt.Sprintf("shaker: %s: %v", e.op, e.errno) }

func (e *opError) Unwrap() []error {
	if e.local() {
		return []error{e.errno, ErrLocal}
	}
	return []error{e.errno}
}

// local reports whether the error is this host's, not the backend's: any
// failure of a call other than connect, and connect's own lack of ports,
// buffers or memory.
func (e *opError) local() bool {
	if e == errInvalidAddr {
		return false
	}
	if e.op != "connect" {
		return true
	}
	switch e.errno {
	case syscall.EADDRNOTAVAIL, syscall.EAGAIN, syscall.ENOBUFS, syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE:
		return true
	}
	return false
}

// classify maps the errno of a failed connect to a Result error.
func classify(op string, errno syscall.Errno) error {
	switch errno {
	case syscall.ECONNREFUSED:
		return ErrRefused
	case syscall.EHOSTUNREACH:
		return errHostUnreach
	case syscall.ENETUNREACH:
		return errNetUnreach
	case syscall.ETIMEDOUT:
		return ErrTimeout
	}
	return &opError{op, errno}
}

// Stats is a snapshot of an Engine's counters, read one by one while the
// engine runs: a probe being started may be missing from both Queued and
// InFlight for an instant, and a probe's result is counted before it leaves
// InFlight.
type Stats struct {
	Up          uint64 // probes answered with a SYN-ACK
	Refused     uint64 // probes answered with an RST
	Timeout     uint64 // probes that timed out
	Unreachable uint64 // probes answered with an ICMP error
	Failed      uint64 // probes that failed otherwise (EMFILE, ...)
	Closed      uint64 // probes aborted by Close

	InFlight int // probes whose SYN is out and whose result is not known
	Queued   int // probes waiting for a place under MaxInFlight

	// MaxCloseDelay is the worst delay seen between a SYN-ACK's arrival
	// (estimated as the SYN time plus the kernel's RTT) and the close of
	// its socket. It must stay far below the kernel's 200 ms delayed-ACK
	// window; a probe whose delay reached it became a real connection.
	MaxCloseDelay time.Duration
}

// Total is the number of probes with a result.
func (s Stats) Total() uint64 {
	return s.Up + s.Refused + s.Timeout + s.Unreachable + s.Failed + s.Closed
}

// errInvalidAddr is the error of a probe of an invalid address or port 0.
var errInvalidAddr = &opError{"probe: invalid address or port 0", syscall.EINVAL}

// zoneError: an IPv6 zone that names no interface.
type zoneError struct {
	zone string
	err  error
}

func (e *zoneError) Error() string {
	return "shaker: IPv6 zone " + strconv.Quote(e.zone) + ": " + e.err.Error()
}
func (e *zoneError) Unwrap() error { return e.err }

// check rejects options that make no sense.
func (o Options) check() error {
	if o.MaxInFlight < 0 {
		return fmt.Errorf("shaker: MaxInFlight %d is negative", o.MaxInFlight)
	}
	if o.DefaultTimeout < 0 {
		return fmt.Errorf("shaker: DefaultTimeout %v is negative", o.DefaultTimeout)
	}
	return nil
}

// ctxError is the Result error of a Probe whose context ended first.
func ctxError(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return ErrTimeout
	}
	return err
}

// HalfOpen reports whether probes on this system are half-open by
// construction: true on Linux, where the engine keeps the kernel from
// acknowledging the SYN-ACK. Elsewhere each probe is a full connect closed
// with an RST, and the backend's accept() returns. SelfCheck verifies the
// claim at run time.
func HalfOpen() bool { return halfOpen }
