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
		Usage: "[--timeout <duration>] [--count <n>] [--interval <duration>] [--json] <host:port>...",
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

// runShake is `caddy shake`: it returns the exit status and, for a
// status other than 0, an error that says why.
func runShake(ctx context.Context, args []string, stdout io.Writer) (int, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	fs := pflag.NewFlagSet("shake", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	timeout := fs.Duration("timeout", time.Second, "")
	count := fs.Int("count", 1, "")
	interval := fs.Duration("interval", time.Second, "")
	asJSON := fs.Bool("json", false, "")
	resolveTimeout := fs.Duration("resolve-timeout", 5*time.Second, "")
	help := fs.BoolP("help", "h", false, "")
	if err := fs.Parse(args); err != nil {
		return 2, usageError{"shake: " + err.Error()}
	}
	if *help {
		fmt.Fprintln(stdout, "usage: caddy shake [--timeout 1s] [--count N] [--interval 1s] [--json] host:port...")
		return 0, nil
	}
	switch {
	case *timeout <= 0:
		return 2, usageError{fmt.Sprintf("shake: --timeout %v: must be positive", *timeout)}
	case *count < 1:
		return 2, usageError{fmt.Sprintf("shake: --count %d: must be at least 1", *count)}
	case *interval <= 0:
		return 2, usageError{fmt.Sprintf("shake: --interval %v: must be positive", *interval)}
	case *resolveTimeout <= 0:
		return 2, usageError{fmt.Sprintf("shake: --resolve-timeout %v: must be positive", *resolveTimeout)}
	case fs.NArg() == 0:
		return 2, usageError{"shake: no address given; usage: caddy shake [flags] host:port..."}
	}
	type target struct {
		given string
		host  string
		port  uint16
	}
	var targets []target
	for _, a := range fs.Args() {
		s, err := parseUpstream(a)
		if err != nil {
			return 2, usageError{"shake: " + err.Error() + " (want host:port, IPv6 in brackets)"}
		}
		host := s.host
		if host == "" {
			host = s.ip.String()
		}
		targets = append(targets, target{a, host, s.port})
	}

	e, err := shaker.New(shaker.Options{DefaultTimeout: *timeout})
	if err != nil {
		return 1, err
	}
	defer e.Close()

	// Resolve once: every address of every target.
	type probeTarget struct {
		given string
		addr  netip.AddrPort
		err   error // resolution failed
	}
	var probes []probeTarget
	for _, t := range targets {
		if ip, err := netip.ParseAddr(t.host); err == nil {
			probes = append(probes, probeTarget{given: t.given, addr: netip.AddrPortFrom(ip.Unmap(), t.port)})
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, *resolveTimeout)
		ips, err := net.DefaultResolver.LookupNetIP(rctx, "ip", t.host)
		cancel()
		if err == nil && len(ips) == 0 {
			err = fmt.Errorf("no addresses")
		}
		if err != nil {
			probes = append(probes, probeTarget{given: t.given, err: fmt.Errorf("resolving %s: %w", t.host, err)})
			continue
		}
		for _, ip := range ips {
			probes = append(probes, probeTarget{given: t.given, addr: netip.AddrPortFrom(ip.Unmap(), t.port)})
		}
	}

	failed := 0
	enc := json.NewEncoder(stdout)
	for round := 0; round < *count; round++ {
		if round > 0 {
			select {
			case <-time.After(*interval):
			case <-ctx.Done():
				return 1, ctx.Err()
			}
		}
		results := make([]shaker.Result, len(probes))
		done := make(chan struct{}, len(probes))
		for i, p := range probes {
			if p.err != nil {
				done <- struct{}{}
				continue
			}
			e.ProbeAsync(p.addr, *timeout, func(r shaker.Result) {
				results[i] = r
				done <- struct{}{}
			})
		}
		for range probes {
			<-done
		}
		for i, p := range probes {
			out := shakeResult{Target: p.given}
			if p.err != nil {
				out.Address, out.Result, out.Error = p.given, "error", p.err.Error()
			} else {
				r := results[i]
				out.Address = p.addr.String()
				out.Result = r.Outcome.String()
				if r.Err == nil {
					out.RTTus = r.RTT.Microseconds()
				} else if errors.Is(r.Err, shaker.ErrTimeout) {
					out.Error = fmt.Sprintf("no answer within %v", *timeout)
				} else {
					out.Error = r.Err.Error()
				}
			}
			if out.Result != "up" {
				failed++
			}
			if *asJSON {
				enc.Encode(out)
				continue
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
			fmt.Fprintln(stdout, strings.TrimRight(line, " "))
		}
	}
	if failed > 0 {
		return 1, fmt.Errorf("shake: %d of %d probes got no SYN-ACK", failed, len(probes)**count)
	}
	return 0, nil
}
