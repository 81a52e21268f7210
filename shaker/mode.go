package shaker

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Mode is how an engine sends its probes (Options.Mode).
type Mode uint8

const (
	// ModeConnect probes with a socket per probe: connect() with the
	// delayed ACK on, then close() with a zero linger as soon as the
	// SYN-ACK has come. The loop must close each answered socket within
	// the kernel's 200 ms delayed-ACK window. The default.
	ModeConnect Mode = iota
	// ModeRaw sends each SYN itself on a raw socket, from a source port
	// that the engine reserves by bind() without listen(), and reads the
	// answers (SYN-ACK, RST, ICMP errors) on raw sockets filtered in the
	// kernel. No socket exists for the answer's destination, so the
	// kernel itself answers a SYN-ACK with an RST, at once, in softirq:
	// no probe can become a connection, however late the engine is.
	// It needs CAP_NET_RAW, and Linux.
	ModeRaw
	// ModeAuto is ModeRaw where raw sockets can be opened, and
	// ModeConnect elsewhere; Engine.Mode says which was chosen and
	// Engine.RawError why raw was not.
	ModeAuto
)

// String is the mode's name: "connect", "raw" or "auto".
func (m Mode) String() string {
	switch m {
	case ModeConnect:
		return "connect"
	case ModeRaw:
		return "raw"
	case ModeAuto:
		return "auto"
	}
	return "Mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode is the Mode of a name String gives; "" is ModeConnect.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "", "connect":
		return ModeConnect, nil
	case "raw":
		return ModeRaw, nil
	case "auto":
		return ModeAuto, nil
	}
	return 0, fmt.Errorf("shaker: probe mode %q: must be connect, raw or auto", s)
}

// ErrRawUnavailable: raw mode was asked for and raw sockets cannot be
// used here (no CAP_NET_RAW, not Linux, a sandbox that refuses them). The
// error New returns matches it with errors.Is and says what to grant.
var ErrRawUnavailable = errors.New("shaker: raw probe mode unavailable")

// rawNeeds is what an error about missing raw sockets tells the operator.
const rawNeeds = "raw mode needs CAP_NET_RAW: Docker grants it by default; " +
	"a systemd unit needs AmbientCapabilities=CAP_NET_RAW (and CAP_NET_RAW in CapabilityBoundingSet); " +
	"or use the connect mode"

// rawError is the error of raw sockets that could not be opened.
type rawError struct {
	op   string
	err  error
	hint string // what to do: rawNeeds, or nothing
}

func (e *rawError) Error() string {
	msg := "shaker: " + e.op + ": " + e.err.Error()
	if e.hint != "" {
		msg += "; " + e.hint
	}
	return msg
}

func (e *rawError) Unwrap() []error { return []error{ErrRawUnavailable, e.err} }

// PortRange is a range of TCP ports, First to Last inclusive.
type PortRange struct {
	First, Last uint16
}

// Size is the number of ports in the range (0 for the zero range).
func (r PortRange) Size() int {
	if r.First == 0 || r.Last < r.First {
		return 0
	}
	return int(r.Last) - int(r.First) + 1
}

// String is "First-Last".
func (r PortRange) String() string {
	return strconv.Itoa(int(r.First)) + "-" + strconv.Itoa(int(r.Last))
}

// ParsePortRange parses "First-Last" (or one port).
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, found := strings.Cut(s, "-")
	if !found {
		hi = lo
	}
	first, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	last, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err1 != nil || err2 != nil {
		return PortRange{}, fmt.Errorf("shaker: port range %q: want first-last, ports from 1 to 65535", s)
	}
	r := PortRange{uint16(first), uint16(last)}
	if err := r.check(); err != nil {
		return PortRange{}, err
	}
	return r, nil
}

// check rejects a range that cannot serve as source ports.
func (r PortRange) check() error {
	switch {
	case r.First == 0:
		return fmt.Errorf("shaker: port range %v: port 0 is not a port", r)
	case r.Last < r.First:
		return fmt.Errorf("shaker: port range %v: the last port is below the first", r)
	case r.Size() > MaxSourcePorts:
		return fmt.Errorf("shaker: port range %v: %d ports, more than %d", r, r.Size(), MaxSourcePorts)
	}
	return nil
}

// DefaultSourcePorts is how many source ports raw mode reserves when
// Options.SourcePorts is the zero range.
const DefaultSourcePorts = 512

// MaxSourcePorts bounds Options.SourcePorts: each port holds one socket
// (a file descriptor) for as long as the engine runs.
const MaxSourcePorts = 16384

// localPortRange is where the kernel picks ephemeral ports.
const localPortRange = "/proc/sys/net/ipv4/ip_local_port_range"

// DefaultPortRange is the range raw mode reserves when Options.SourcePorts
// is the zero range: DefaultSourcePorts ports just above the kernel's
// ephemeral range (net.ipv4.ip_local_port_range), or just below it if
// there is no room above, so that no outgoing connection of the host
// needs them. It fails when neither side has room (the ephemeral range
// covers nearly every port): then Options.SourcePorts must name a range.
func DefaultPortRange() (PortRange, error) {
	b, err := os.ReadFile(localPortRange)
	if err != nil {
		return PortRange{}, fmt.Errorf("shaker: reading %s: %v; name the source ports", localPortRange, err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return PortRange{}, fmt.Errorf("shaker: %s: %q is not two ports; name the source ports", localPortRange, b)
	}
	lo, err1 := strconv.Atoi(f[0])
	hi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil {
		return PortRange{}, fmt.Errorf("shaker: %s: %q is not two ports; name the source ports", localPortRange, b)
	}
	return defaultRangeAround(lo, hi)
}

// defaultRangeAround picks DefaultSourcePorts ports outside lo-hi.
func defaultRangeAround(lo, hi int) (PortRange, error) {
	const n = DefaultSourcePorts
	switch {
	case hi+n <= 65535:
		return PortRange{uint16(hi + 1), uint16(hi + n)}, nil
	case lo-n >= 1024:
		return PortRange{uint16(lo - n), uint16(lo - 1)}, nil
	}
	return PortRange{}, fmt.Errorf("shaker: the ephemeral port range %d-%d leaves no %d ports outside it above 1023; name the source ports", lo, hi, n)
}

// Mode is the mode the engine's probes use: ModeConnect or ModeRaw (never
// ModeAuto: that one is resolved by New).
func (e *Engine) Mode() Mode { return e.mode }

// RawError says why the engine does not use raw mode: nil when it does,
// or when connect mode was asked for; with ModeAuto, the failure that
// made New choose connect mode (it matches ErrRawUnavailable when raw
// sockets were refused).
func (e *Engine) RawError() error { return e.rawErr }

// SourcePorts is the range of source ports raw mode reserves and sends
// from: the zero range in connect mode.
func (e *Engine) SourcePorts() PortRange { return e.ports }
