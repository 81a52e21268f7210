package caddyshaker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "shake",
		Usage: "[--timeout <duration>] [--count <n>] [--interval <duration>] [--mode connect|raw|auto] [--json] <host:port>...",
		Short: "Checks addresses with half-open TCP probes (SYN, SYN-ACK, RST)",
		Long: `
Sends half-open TCP probes, as the shaker upstream source does: a SYN, and an
RST as soon as the SYN-ACK arrives, so the application behind the port never
accepts a connection. Use it from scripts, or to see what the health checks of
a running Caddy see.

Each argument is host:port (IPv6 in brackets: [::1]:8080). A hostname is
resolved to all its addresses, IPv4 and IPv6, and each is probed.

For every probe it prints the address probed, the result (up, refused,
timeout, unreachable or error) and, when up, the round-trip time of the SYN
and SYN-ACK as the kernel measured it. With --json it prints one JSON object
a line: {"address", "target", "result", "rtt_us", "error"}.

--timeout      how long a probe waits for an answer (default 1s)
--count        probes of each address (default 1)
--interval     time between rounds when --count > 1 (default 1s)
--mode         connect (default), raw or auto: how probes are sent; raw sends
               each SYN on a raw socket and needs CAP_NET_RAW (see the probe_mode
               option of the shaker app)
--json         print JSON lines
--resolve-timeout  how long a hostname lookup may take (default 5s)

Exit status: 0 when every probe of every address was answered with a
SYN-ACK, 1 when any was not, 2 for bad usage.
`,
		CobraFunc: func(cmd *cobra.Command) {
			// Flags are parsed in runShake, so that a bad one exits
			// with status 2 rather than cobra's 1.
			cmd.DisableFlagParsing = true
			cmd.RunE = func(c *cobra.Command, args []string) error {
				return caddycmd.WrapCommandFuncForCobra(func(caddycmd.Flags) (int, error) {
					return runShake(c.Context(), args, c.OutOrStdout())
				})(c, args)
			}
		},
	})
}

// shakeResult is one probe, as `caddy shake --json` prints it.
type shakeResult struct {
	Address string `json:"address"`
	Target  string `json:"target"`
	Result  string `json:"result"`
	RTTus   int64  `json:"rtt_us"`
	Error   string `json:"error"`
}

// usageError is bad usage: exit status 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// shakeOptions is the command line of `caddy shake`, parsed.
type shakeOptions struct {
	timeout, interval, resolveTimeout time.Duration
	count                             int
	mode                              shaker.Mode
	asJSON, help                      bool
	targets                           []shakeTarget
}

// shakeTarget is one host:port argument.
type shakeTarget struct {
	given string // as given
	host  string // hostname or IP
	port  uint16
}

// shakeProbe is one address to probe, or a target whose hostname did not
// resolve (err).
type shakeProbe struct {
	given string
	addr  netip.AddrPort
	err   error
}

// runShake is `caddy shake`: it returns the exit status and, for a
// status other than 0, an error that says why.
func runShake(ctx context.Context, args []string, stdout io.Writer) (int, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	o, err := parseShake(args)
	if err != nil {
		return 2, err
	}
	if o.help {
		fmt.Fprintln(stdout, "usage: caddy shake [--timeout 1s] [--count N] [--interval 1s] [--mode connect|raw|auto] [--json] host:port...")
		return 0, nil
	}
	e, err := shaker.New(shaker.Options{DefaultTimeout: o.timeout, Mode: o.mode})
	if err != nil {
		return 1, err
	}
	defer e.Close()
	probes := resolveShake(ctx, o.targets, o.resolveTimeout)
	failed := 0
	for round := 0; round < o.count; round++ {
		if round > 0 {
			select {
			case <-time.After(o.interval):
			case <-ctx.Done():
				return 1, ctx.Err()
			}
		}
		for _, out := range probeShake(e, probes, o.timeout) {
			if out.Result != "up" {
				failed++
			}
			printShake(stdout, out, o.asJSON)
		}
	}
	if failed > 0 {
		return 1, fmt.Errorf("shake: %d of %d probes got no SYN-ACK", failed, len(probes)*o.count)
	}
	return 0, nil
}

// parseShake parses the command line; bad usage is a usageError that
// names the bad value. With --help it stops before checking the rest.
func parseShake(args []string) (shakeOptions, error) {
	var o shakeOptions
	fs := pflag.NewFlagSet("shake", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.DurationVar(&o.timeout, "timeout", time.Second, "")
	fs.IntVar(&o.count, "count", 1, "")
	fs.DurationVar(&o.interval, "interval", time.Second, "")
	fs.BoolVar(&o.asJSON, "json", false, "")
	mode := fs.String("mode", "connect", "")
	fs.DurationVar(&o.resolveTimeout, "resolve-timeout", 5*time.Second, "")
	fs.BoolVarP(&o.help, "help", "h", false, "")
	if err := fs.Parse(args); err != nil {
		return o, usageError{"shake: " + err.Error()}
	}
	if o.help {
		return o, nil
	}
	var merr error
	if o.mode, merr = shaker.ParseMode(*mode); merr != nil || *mode == "" {
		return o, usageError{fmt.Sprintf("shake: --mode %q: must be connect, raw or auto", *mode)}
	}
	switch {
	case o.timeout <= 0:
		return o, usageError{fmt.Sprintf("shake: --timeout %v: must be positive", o.timeout)}
	case o.count < 1:
		return o, usageError{fmt.Sprintf("shake: --count %d: must be at least 1", o.count)}
	case o.interval <= 0:
		return o, usageError{fmt.Sprintf("shake: --interval %v: must be positive", o.interval)}
	case o.resolveTimeout <= 0:
		return o, usageError{fmt.Sprintf("shake: --resolve-timeout %v: must be positive", o.resolveTimeout)}
	case fs.NArg() == 0:
		return o, usageError{"shake: no address given; usage: caddy shake [flags] host:port..."}
	}
	for _, a := range fs.Args() {
		s, err := parseUpstream(a)
		if err != nil {
			return o, usageError{"shake: " + err.Error() + " (want host:port, IPv6 in brackets)"}
		}
		host := s.host
		if host == "" {
			host = s.ip.String()
		}
		o.targets = append(o.targets, shakeTarget{a, host, s.port})
	}
	return o, nil
}

// resolveShake resolves the targets once: every address of every target,
// or the target with the error that its lookup, bounded by within, gave.
func resolveShake(ctx context.Context, targets []shakeTarget, within time.Duration) []shakeProbe {
	var probes []shakeProbe
	for _, t := range targets {
		if ip, err := netip.ParseAddr(t.host); err == nil {
			probes = append(probes, shakeProbe{given: t.given, addr: netip.AddrPortFrom(ip.Unmap(), t.port)})
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, within)
		ips, err := net.DefaultResolver.LookupNetIP(rctx, "ip", t.host)
		cancel()
		if err == nil && len(ips) == 0 {
			err = fmt.Errorf("no addresses")
		}
		if err != nil {
			probes = append(probes, shakeProbe{given: t.given, err: fmt.Errorf("resolving %s: %w", t.host, err)})
			continue
		}
		for _, ip := range ips {
			probes = append(probes, shakeProbe{given: t.given, addr: netip.AddrPortFrom(ip.Unmap(), t.port)})
		}
	}
	return probes
}

// probeShake probes every address once, all at the same time, and returns
// the results in the order of probes; a target that did not resolve is an
// "error" result.
func probeShake(e *shaker.Engine, probes []shakeProbe, timeout time.Duration) []shakeResult {
	results := make([]shaker.Result, len(probes))
	done := make(chan struct{}, len(probes))
	for i, p := range probes {
		if p.err != nil {
			done <- struct{}{}
			continue
		}
		e.ProbeAsync(p.addr, timeout, func(r shaker.Result) {
			results[i] = r
			done <- struct{}{}
		})
	}
	for range probes {
		<-done
	}
	outs := make([]shakeResult, len(probes))
	for i, p := range probes {
		outs[i] = shakeOutcome(p, results[i], timeout)
	}
	return outs
}

// shakeOutcome is what `caddy shake` says of probe p's result r.
func shakeOutcome(p shakeProbe, r shaker.Result, timeout time.Duration) shakeResult {
	out := shakeResult{Target: p.given}
	switch {
	case p.err != nil:
		out.Address, out.Result, out.Error = p.given, "error", p.err.Error()
		return out
	case r.Err == nil:
		out.RTTus = r.RTT.Microseconds()
	case errors.Is(r.Err, shaker.ErrTimeout):
		out.Error = fmt.Sprintf("no answer within %v", timeout)
	default:
		out.Error = r.Err.Error()
	}
	out.Address, out.Result = p.addr.String(), r.Outcome.String()
	return out
}

// printShake prints one result: a JSON line, or a line for people.
func printShake(w io.Writer, out shakeResult, asJSON bool) {
	if asJSON {
		json.NewEncoder(w).Encode(out)
		return
	}
	line := fmt.Sprintf("%-24s %-11s", out.Address, out.Result)
	if out.Result == "up" {
		line += fmt.Sprintf(" rtt %v", time.Duration(out.RTTus)*time.Microsecond)
	} else if r := out.Result; r == "timeout" || r == "error" || r == "local_error" {
		line += " " + out.Error // refused and unreachable say it all
	}
	if out.Address != out.Target {
		line += "  (" + out.Target + ")"
	}
	fmt.Fprintln(w, strings.TrimRight(line, " "))
}
