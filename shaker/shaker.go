// Package shaker runs half-open TCP health probes (SYN, SYN-ACK, RST) by the
// thousand from a few epoll loops.
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
// An Engine is one or more loops (Options.Loops; by default one per CPU the
// Go runtime uses), each an epoll instance and a goroutine of its own. Every
// address is probed by one loop, chosen by a hash of the address. A loop owns
// each of its probes' file descriptors from connect() to close(): nothing
// else closes one, and deadlines fire inside the loop. The fallback engine
// (off Linux, or built with the shaker_fallback tag) has no epoll: each probe
// runs on a goroutine of its own. Callers give IP addresses (netip.AddrPort);
// resolving names is their business, with their own timeout.
//
// # Raw mode
//
// With Options.Mode ModeRaw (Linux, CAP_NET_RAW) a loop writes each SYN
// itself on a raw socket, from a source port of Options.SourcePorts that
// the engine holds with a socket bound to it and never listening. The
// kernel then finds no socket for the SYN-ACK and answers it with an RST
// itself, in softirq: nothing is left to close, and no probe can become a
// connection however late the loop runs (a stopped process, a throttled
// container, a GC pause). The answers are read on one raw socket per
// protocol and family (TCP, ICMP, ICMPv6), each filtered in the kernel by
// a BPF program that passes only SYN-ACKs and RSTs to the reserved ports
// and ICMP errors quoting a SYN from them; the first loop reads them and
// hands each answer to its probe's loop. A probe's sequence number encodes
// its slot under a key of the engine's, so that a stale or forged answer
// never counts. Results, schedules and Stats are those of connect mode;
// RTT comes from the kernel's receive timestamp (SO_TIMESTAMPNS), the SYN
// is sent again at 1 s, 3 s... as connect() would, ICMP errors map to the
// errnos connect() gets. ModeAuto uses raw mode where it can, and connect
// mode elsewhere ([Engine.Mode], [Engine.RawError]).
//
//	e, err := shaker.New(shaker.Options{Mode: shaker.ModeRaw}) // SourcePorts: DefaultPortRange
//	if errors.Is(err, shaker.ErrRawUnavailable) { ... } // no CAP_NET_RAW: the error says what to grant
//
// Probes are truly half-open only on Linux. Elsewhere the engine falls back
// to a full connect closed with a zero linger (HalfOpen reports which), and
// some Linux-like kernels, such as gVisor's, ignore the delayed ACK:
// SelfCheck finds out at run time.
//
// # Usage
//
//	e, err := shaker.New(shaker.Options{}) // one epoll loop per CPU, each a goroutine
//	if err != nil { ... }
//	defer e.Close()
//
//	// Blocking: ctx's deadline is the probe's timeout (none: Options.DefaultTimeout, 1s).
//	r := e.Probe(ctx, netip.MustParseAddrPort("127.0.0.1:5432"))
//	if r.Err == nil {
//		fmt.Println("up, SYN to SYN-ACK", r.RTT)
//	}
//
//	// Asynchronous: done runs once, on the loop goroutine; it must not
//	// block, and may call ProbeAsync again to re-arm without a goroutine hop.
//	e.ProbeAsync(addr, time.Second, func(r shaker.Result) { ... })
//
//	// Periodic: registered once, fired by the loop from its own timer heap.
//	// fn runs on the loop; it returns the time to the next probe (0: Interval).
//	s := e.Every(addr, shaker.Period{Interval: time.Second, Timeout: time.Second, First: spread},
//		func(r shaker.Result) time.Duration { ...; return 0 })
//	s.Now()  // probe at once, out of schedule (nothing while one is in flight)
//	s.Stop() // cheap, from any goroutine
//
// A [Result] holds Addr, Outcome, Err, RTT and Duration. [Outcome] is the one
// classification every consumer reads (Up, Refused, Timeout, Unreachable,
// Local, Failed, Closed; String gives the names used in logs and metrics).
// Err is nil (SYN-ACK), or matches [ErrRefused] (RST), [ErrTimeout] (no
// answer: firewall drop, dead host, full accept queue), [ErrUnreachable]
// (ICMP; also matches syscall.EHOSTUNREACH or ENETUNREACH) or [ErrClosed]
// (engine closed first) with errors.Is, or wraps the errno of the failing
// call (EMFILE, EADDRNOTAVAIL, ...); such an error also matches [ErrLocal]
// when the failure is this host's (out of fds, ports or memory), so that a
// health checker need not blame the backend. RTT is the kernel's tcpi_rtt of
// the SYN / SYN-ACK exchange.
//
// The zero [Options] works: Loops one per CPU the Go runtime uses,
// MaxSockets three quarters of RLIMIT_NOFILE, DefaultTimeout 1s. A probe due
// when MaxSockets sockets are waiting for answers waits for one (it shows as
// overdue in [Stats]); its timeout starts with its SYN.
//
// [Engine.Every]'s probes start in due order, in slices: a loop starts probes
// and runs callbacks for at most 2 ms since it last looked at epoll, then
// looks again and closes what has answered before it goes on, so a SYN-ACK
// waits about one slice. A probe may wait up to a 64th of the
// shortest interval on its loop (at most 10 ms) to share a wake-up. After
// [Schedule.Stop] or [Engine.Close], fn is not called again, and it is never
// called with a Closed result. [Engine.Burst] says how fast the first probes
// of many new addresses may be started without holding more than half of
// MaxSockets.
//
// [Engine.Stats] reports probes by outcome, in flight, queued, sockets,
// schedules, the start delay of periodic probes (a histogram), how many
// started late, how many are overdue and how late the worst is, and the delay
// between a SYN-ACK's arrival (by the kernel's clocks, or as the loop saw
// it) and the close of its socket (the worst, and a histogram).
//
// [HalfOpen] says whether probes here are half-open by construction (Linux).
// [Engine.SelfCheck] probes a listener of its own on 127.0.0.1 and fails if it
// accepted anything within 250 ms, longer than the kernel's delayed-ACK timer
// (that error matches [ErrNotHalfOpen]; any other means the check could not
// run). On Linux, go test -tags shaker_fallback ./shaker builds and tests the
// fallback engine instead of the epoll one.
package shaker

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"
)

// DefaultTimeout is the timeout of a probe started by Probe with a context
// that has no deadline, and of a ProbeAsync call with a timeout <= 0, when
// Options.DefaultTimeout is zero.
const DefaultTimeout = time.Second

// Options configures an Engine. The zero value is ready to use.
type Options struct {
	// Loops is the number of epoll loops, each a goroutine of its own
	// with its own epoll instance. Every address is probed by one loop,
	// chosen by a hash of the address. Zero means one loop per CPU the Go
	// runtime uses (runtime.GOMAXPROCS).
	Loops int

	// MaxSockets bounds the probe sockets open at once, over all loops:
	// probes waiting for an answer (a few more per loop are kept open
	// for reuse).
	// A probe due when the bound is reached waits (it shows as overdue
	// in Stats) until a socket is free; it does not fail. Zero means
	// three quarters of the RLIMIT_NOFILE soft limit (Go raises it to the
	// hard limit at start), leaving the rest to the process's own files
	// and connections; see DefaultMaxSockets. In raw mode a probe holds
	// no socket, and MaxSockets bounds the probes in flight (zero means
	// DefaultRawInFlight).
	MaxSockets int

	// DefaultTimeout is the timeout of probes that are given none: Probe
	// with a context without deadline, ProbeAsync with a timeout <= 0,
	// Every with Period.Timeout <= 0. Zero means DefaultTimeout.
	DefaultTimeout time.Duration

	// Mode is how probes are sent: ModeConnect (the zero value), ModeRaw
	// or ModeAuto; see Mode. With ModeRaw, New fails (the error matches
	// ErrRawUnavailable) where raw sockets cannot be opened.
	Mode Mode

	// CloserPriority is the scheduling of connect mode's closers:
	// PriorityAuto (the zero value: real-time where the process may),
	// PriorityRealtime (New fails where it may not) or PriorityNormal.
	// Raw mode has no closers, nor has a build with the race detector.
	CloserPriority Priority

	// SourcePorts is the range of source ports raw mode sends from and
	// reserves by binding a socket to each (without listen()), so that
	// no other socket takes them and the kernel answers every SYN-ACK to
	// them with an RST. The zero range means DefaultPortRange. The loops
	// share it, each a part of at least one port; it should lie outside
	// the kernel's ephemeral range. Unused in connect mode.
	SourcePorts PortRange

	// epollOnly, for tests: always wait for the answer through epoll,
	// even when the handshake finished inside connect().
	epollOnly bool
}

// MaxBurstRate is the most SYNs per second a Burst allows: 64 connect()
// calls per millisecond, which take well under a millisecond. A loop
// starts probes for at most about 2 ms before it reads answers again, so a
// burst paced at this rate leaves most of the loop's time to reading
// answers (closing a SYN-ACKed socket at once is what keeps a probe
// half-open) and to the probes already scheduled.
const MaxBurstRate = 64_000

// Burst says how fast a burst of new probes (the first probes of many new
// addresses, say) may be started: at most Rate a second, and at most Size
// within any Timeout, so that probes which all time out (addresses that
// drop SYNs each hold a socket for the timeout) never hold more than half
// of MaxSockets, and neither wait for sockets nor make the probes already
// scheduled wait. A burst of at most Size thus goes out at Rate; a larger
// one goes on at Size per Timeout.
type Burst struct {
	Rate    float64       // SYNs per second: MaxBurstRate
	Size    int           // half of MaxSockets, at least 1
	Timeout time.Duration // the probes' timeout
}

// burstOf is the Burst of an engine of maxSockets sockets.
func burstOf(maxSockets int, timeout time.Duration) Burst {
	return Burst{Rate: MaxBurstRate, Size: max(maxSockets/2, 1), Timeout: timeout}
}

// Result is the outcome of one probe.
type Result struct {
	// Addr is the address probed.
	Addr netip.AddrPort

	// Outcome classifies Err: Up when Err is nil. Every consumer reads
	// this one classification instead of matching errors itself.
	Outcome Outcome

	// Err is nil when the port answered with a SYN-ACK. Otherwise it
	// matches one of ErrRefused, ErrTimeout, ErrUnreachable or ErrClosed
	// with errors.Is, or it wraps the syscall.Errno of the failing
	// system call (EMFILE, EADDRNOTAVAIL, ...), and also matches ErrLocal
	// when that failure is this host's. ErrUnreachable errors also match
	// their syscall.Errno (EHOSTUNREACH, ENETUNREACH).
	Err error

	// RTT is the kernel's measure (tcpi_rtt) of the SYN to SYN-ACK round
	// trip, when Err is nil. In raw mode it is the SYN-ACK's receive
	// timestamp less the time the last SYN was sent: after a
	// retransmission, an answer to the first SYN reads short.
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

// Stats is a snapshot of an Engine's counters, summed over its loops and
// read one by one while the engine runs: a probe being started may be
// missing from both Queued and InFlight for an instant, and a probe's
// result is counted before it leaves InFlight.
type Stats struct {
	Up          uint64 // probes answered with a SYN-ACK
	Refused     uint64 // probes answered with an RST
	Timeout     uint64 // probes that timed out
	Unreachable uint64 // probes answered with an ICMP error
	Local       uint64 // probes that failed on this host (ErrLocal: EMFILE, ...)
	Failed      uint64 // probes that failed otherwise
	Closed      uint64 // probes aborted by Close

	Mode       Mode // the mode in use: ModeConnect or ModeRaw
	Loops      int  // epoll loops
	InFlight   int  // probes whose SYN is out and whose result is not known
	Queued     int  // one-off probes (Probe, ProbeAsync) waiting to start
	Sockets    int  // probe sockets open: in flight, plus a few kept for reuse
	MaxSockets int  // the bound on Sockets (Options.MaxSockets)

	// Scheduled is the number of periodic probes registered with Every
	// and not stopped.
	Scheduled int
	// Overdue is the number of periodic probes whose start time has
	// passed and that have not started, as last counted (at most every
	// 100 ms while there are any). It is 0 while every loop keeps up.
	Overdue int
	// Lag is how late the most overdue periodic probe that has not
	// started is, now: 0 while every loop keeps up. It grows while a loop
	// cannot keep its schedule (too few CPUs, too few loops, MaxSockets
	// reached) or is kept off the CPU.
	Lag time.Duration
	// Late counts periodic probes that started later than a quarter of
	// their interval (and at least LateMin late).
	Late uint64
	// StartDelay is the distribution of how late periodic probes
	// started, from their due time to their SYN.
	StartDelay Histogram

	// MaxCloseDelay is the worst delay seen between a SYN-ACK's arrival
	// and the close of its socket (the RST). Where the first SYN was
	// answered, the arrival is the SYN's time (read just before
	// connect()) plus TCP_INFO's tcpi_rtt, the kernel's microsecond
	// clock: the earliest it can have been, so the delay is not
	// understated. Where a retransmitted SYN was answered (that RTT
	// would read up to a second early), where the kernel gives no RTT,
	// where that clock puts the answer after the loop saw it, and before
	// Linux 4.20 (another clock), it is the earliest the other clocks
	// allow, not understated either: a whole tick before what
	// tcpi_last_ack_recv says (whole ticks of the kernel's clock, 1-10
	// ms), but not before the last look at epoll that left no answer
	// behind, made with the socket on it, nor before the SYN. It must
	// stay far below the kernel's 200 ms delayed-ACK window; a probe
	// whose delay reached it became a real connection.
	MaxCloseDelay time.Duration
	// CloseDelay is the distribution of those delays, one per probe
	// answered with a SYN-ACK, over CloseDelayBuckets: the tail, where
	// MaxCloseDelay is only the worst.
	CloseDelay Histogram
	// EpollUp counts the probes answered with a SYN-ACK that came after
	// connect() had returned, through epoll (a path with some delay: a
	// veth pair, a network); the others' handshakes finished inside
	// connect() (loopback) and their sockets were closed there.
	EpollUp uint64
	// MaxReady is the most answers one look at epoll has returned: how
	// large a burst of SYN-ACKs a loop has had to close at once. In raw
	// mode it counts ready raw sockets (one to four), not answers:
	// nothing is closed there.
	MaxReady int
}

// Total is the number of probes with a result.
func (s Stats) Total() uint64 {
	return s.Up + s.Refused + s.Timeout + s.Unreachable + s.Local + s.Failed + s.Closed
}

// LateMin is the least start delay that counts as late (Stats.Late), so
// that very short intervals do not count the loop's normal jitter.
const LateMin = 2 * time.Millisecond

// StartDelayBuckets are the upper bounds of Histogram's buckets: a start
// delay d falls in the first bucket with d <= bound, or in the last,
// unbounded, one.
var StartDelayBuckets = []time.Duration{
	time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
	250 * time.Millisecond, 500 * time.Millisecond, time.Second,
	2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// numDelayBuckets is len(StartDelayBuckets)+1, for arrays of counters.
const numDelayBuckets = 13

// CloseDelayBuckets are the upper bounds of Stats.CloseDelay's buckets,
// fine between 1 ms and the kernel's 200 ms, and below 1 ms down to
// 10 us, where most delays fall (the microsecond clock times them: see
// MaxCloseDelay).
var CloseDelayBuckets = []time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond,
	5 * time.Millisecond, 7500 * time.Microsecond, 10 * time.Millisecond,
	15 * time.Millisecond, 20 * time.Millisecond, 30 * time.Millisecond,
	50 * time.Millisecond, 75 * time.Millisecond, 100 * time.Millisecond,
	150 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond,
}

// numCloseBuckets is len(CloseDelayBuckets)+1, for arrays of counters.
const numCloseBuckets = 22

// Histogram is a distribution of durations over a list of bucket bounds:
// StartDelayBuckets for Stats.StartDelay, CloseDelayBuckets for
// Stats.CloseDelay.
type Histogram struct {
	// Counts has one entry per bound, plus one; each counts the
	// observations of its bucket alone (not cumulative). The last one
	// counts those above every bound.
	Counts []uint64
	// Sum is the sum of the observations.
	Sum time.Duration
}

// Count is the number of observations.
func (h Histogram) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// Quantile is the upper bound, among bounds (the histogram's own), of
// the bucket that holds the q-th quantile of the observations (0 < q <=
// 1): at least that fraction of them were at most that long. It is 0 with
// no observation, and -1 when the quantile falls above every bound.
func (h Histogram) Quantile(q float64, bounds []time.Duration) time.Duration {
	n := h.Count()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	rank = min(max(rank, 1), n)
	var cum uint64
	for i, c := range h.Counts {
		cum += c
		if cum >= rank {
			if i < len(bounds) {
				return bounds[i]
			}
			break
		}
	}
	return -1
}

// closeBucketOf is the index of d's bucket in CloseDelayBuckets.
func closeBucketOf(d time.Duration) int {
	for i, b := range CloseDelayBuckets {
		if d <= b {
			return i
		}
	}
	return len(CloseDelayBuckets)
}

// bucketOf is the index of d's bucket.
func bucketOf(d time.Duration) int {
	for i, b := range StartDelayBuckets {
		if d <= b {
			return i
		}
	}
	return len(StartDelayBuckets)
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
	if o.Loops < 0 {
		return fmt.Errorf("shaker: Loops %d is negative", o.Loops)
	}
	if o.MaxSockets < 0 {
		return fmt.Errorf("shaker: MaxSockets %d is negative", o.MaxSockets)
	}
	if o.DefaultTimeout < 0 {
		return fmt.Errorf("shaker: DefaultTimeout %v is negative", o.DefaultTimeout)
	}
	if o.Mode > ModeAuto {
		return fmt.Errorf("shaker: Mode %v is unknown", o.Mode)
	}
	if o.CloserPriority > PriorityNormal {
		return fmt.Errorf("shaker: CloserPriority %v is unknown", o.CloserPriority)
	}
	if o.SourcePorts != (PortRange{}) {
		if err := o.SourcePorts.check(); err != nil {
			return err
		}
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

func zoneIndex(zone string) (uint32, error) {
	if n, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(n), nil
	}
	ifi, err := net.InterfaceByName(zone)
	if err != nil {
		return 0, &zoneError{zone, err}
	}
	return uint32(ifi.Index), nil
}
