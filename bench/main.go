//go:build linux

// Command bench measures half-open probers side by side in one run, against
// loopback listeners that it starts in a child process of its own and that
// count every connection they accept.
//
//	go run ./bench [-duration 3s] [-rounds 3] [-listeners 1000] [-concurrency 64]
//
// Probers:
//
//	engine-async     shaker.Engine.ProbeAsync, C chains re-armed from done
//	engine-probe     shaker.Engine.Probe from C goroutines
//	dialer-halfopen  net.Dialer whose Control sets TCP_QUICKACK=0 and SO_LINGER {1,0}
//	dialer-full      net.Dialer, full connect and close
//	raw-sequential   one probe at a time with raw system calls: the floor
//
// Each prober runs duration/rounds per round, the probers taking turns, so
// that a change in the machine's load hits them alike. For each it prints
// probes/s, CPU per probe (user+sys time of this process from getrusage,
// divided by probes; on loopback that includes the kernel's work for both
// ends of each probe, the same for every prober) and how many connections the
// listeners accepted. Only 127.0.0.1 is probed.
//
// With -compare it also runs, in turn against the same listeners, three
// long-running health checkers: the engine (stopped with Close), HAProxy
// (`server ... check`, nbthread 1, a child process; skipped with a note when
// haproxy is not installed) and Caddy's own HTTP active health checks (a
// child built from ./cmd/caddy). For each: checks/s, CPU per check, what the
// listeners accepted while it ran, and what they accepted when it was
// stopped mid-run. As root, the comparison runs in a network namespace of
// its own so that the kernel's TCP counters count HAProxy's checks exactly
// (see compare.go). -plot writes the results as an SVG image.
//
//	go run ./bench -duration 6s -rounds 3 -compare -plot bench/results.svg
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func main() {
	var (
		duration    = flag.Duration("duration", 3*time.Second, "time each prober runs, over all rounds")
		rounds      = flag.Int("rounds", 3, "rounds; the probers take turns in each")
		listeners   = flag.Int("listeners", 1000, "loopback listeners to probe")
		concurrency = flag.Int("concurrency", 64, "probes in flight per prober (goroutines or chains)")
		modes       = flag.String("probers", "engine-async,engine-probe,dialer-halfopen,dialer-full,raw-sequential", "comma-separated probers to run")
		check       = flag.Bool("check", false, "exit 1 if any prober or checker of ours (engine-*, and with -compare engine and shaker) let a connection through, while running or at its stop; HAProxy's counts are reported, not checked")
		targets     = flag.Bool("targets", false, "with -check: also exit 1 unless the engine meets its speed targets (CPU per probe <= 0.5x dialer-halfopen, >= 100k probes/s; needs engine-async and dialer-halfopen). Off in CI: the machine's speed moves 2.5x between days")
		serve       = flag.Bool("serve", false, "internal: run the listeners (the child process)")
		serveAny    = flag.Bool("serve-any", false, "internal: the listeners bind 0.0.0.0")

		compare       = flag.Bool("compare", false, "also compare long-running health checkers (-checkers) against the same listeners: CPU per check, what the backends accepted, and what they accepted when each was stopped mid-run")
		checkerList   = flag.String("checkers", "engine,haproxy,haproxy-term,caddy", "with -compare: comma-separated checkers to run (haproxy is stopped with SIGUSR1, a soft stop as a reload does to the old process; haproxy-term with SIGTERM, a hard stop)")
		haproxyBin    = flag.String("haproxy", "haproxy", "with -compare: HAProxy binary; the haproxy checker is skipped when it is not found")
		haproxyInter  = flag.Duration("haproxy-inter", 10*time.Millisecond, "with -compare: HAProxy's `check inter` for each server")
		caddyBin      = flag.String("caddy", "", "with -compare: Caddy binary for the caddy checker (empty: go build ./cmd/caddy once; skipped if that fails)")
		caddyInterval = flag.Duration("caddy-interval", 100*time.Millisecond, "with -compare: Caddy's health_interval")
		warmup        = flag.Duration("warmup", time.Second, "with -compare: time each checker runs before its window is measured")
		useNetns      = flag.Bool("netns", true, "with -compare, as root: run everything in a network namespace of its own, so that the kernel's TCP counters count only the bench's checks")
		plotFile      = flag.String("plot", "", "write an SVG plot of the results to this file")
		addresses     = flag.Int("addresses", 0, "addresses to probe (0: one per listener); more than -listeners spreads them over 127.0.0.0/8, the listeners binding 0.0.0.0")
		shakerIval    = flag.Duration("shaker-interval", time.Second, "with -compare: the shaker checker's interval (Caddy with this plugin)")
		shakerLoops   = flag.Int("shaker-loops", 0, "with -compare: the shaker checker's loops (0: the default, one per CPU)")
		inNetns       = flag.Bool("in-netns", false, "internal: running in the bench's own network namespace")
	)
	flag.Parse()
	if *serve {
		serveListeners(*listeners, *serveAny)
		return
	}
	if *duration <= 0 || *rounds < 1 || *listeners < 1 || *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "bench: -duration, -rounds, -listeners and -concurrency must be positive")
		os.Exit(2)
	}
	if *compare && (*haproxyInter <= 0 || *caddyInterval <= 0 || *warmup < 0) {
		fmt.Fprintln(os.Stderr, "bench: -haproxy-inter and -caddy-interval must be positive, -warmup not negative")
		os.Exit(2)
	}
	var checkerNames []string
	if *compare {
		for _, c := range strings.Split(*checkerList, ",") {
			switch c {
			case "engine", "haproxy", "haproxy-term", "caddy", "shaker":
				checkerNames = append(checkerNames, c)
			default:
				fmt.Fprintf(os.Stderr, "bench: unknown checker %q (engine, haproxy, haproxy-term, caddy, shaker)\n", c)
				os.Exit(2)
			}
		}
	}
	probers := map[string]prober{
		"engine-async":    engineAsync,
		"engine-1loop":    engineAsyncLoops(1),
		"engine-probe":    engineProbe,
		"dialer-halfopen": dialer(true),
		"dialer-full":     dialer(false),
		"raw-sequential":  rawSequential,
	}
	var order []string
	for _, m := range strings.Split(*modes, ",") {
		if _, ok := probers[m]; !ok {
			fmt.Fprintf(os.Stderr, "bench: unknown prober %q\n", m)
			os.Exit(2)
		}
		order = append(order, m)
	}

	wants := func(name string) bool { return slices.Contains(checkerNames, name) }

	var notes []string
	note := func(format string, args ...any) { notes = append(notes, fmt.Sprintf(format, args...)) }
	if (wants("caddy") || wants("shaker")) && *caddyBin == "" {
		dir, err := os.MkdirTemp("", "bench-caddy-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, "bench: building ./cmd/caddy for the caddy checker")
		if bin, err := buildCaddy(dir); err != nil {
			note("caddy skipped: %v", err)
			*caddyBin = "-"
		} else {
			*caddyBin = bin
		}
	}
	if *compare && *useNetns && !*inNetns {
		if os.Geteuid() != 0 {
			note("not root: no network namespace of its own, so HAProxy's checks are counted from this host's TCP counters, which other traffic also moves")
		} else {
			args := append(os.Args[1:len(os.Args):len(os.Args)], "-in-netns", "-caddy", *caddyBin)
			status, ok, err := inNewNetns(args)
			if ok {
				if err != nil {
					fmt.Fprintln(os.Stderr, "bench:", err)
					status = 1
				}
				if dir := filepath.Dir(*caddyBin); strings.HasPrefix(filepath.Base(dir), "bench-caddy-bin-") {
					os.RemoveAll(dir)
				}
				os.Exit(status)
			}
			note("no network namespace of its own (%v): HAProxy's checks are counted from this host's TCP counters, which other traffic also moves", err)
		}
	}
	if *inNetns {
		if err := loopbackUp(); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
	requested := slices.Clone(checkerNames) // -check: none of ours may be skipped
	if *caddyBin == "-" {
		checkerNames = slices.DeleteFunc(checkerNames, func(s string) bool { return s == "caddy" || s == "shaker" })
		if !slices.ContainsFunc(notes, func(n string) bool { return strings.HasPrefix(n, "caddy skipped") }) {
			note("caddy skipped: ./cmd/caddy did not build")
		}
	}
	if wants("haproxy") || wants("haproxy-term") {
		if p, err := exec.LookPath(*haproxyBin); err != nil {
			note("haproxy skipped: %s not found (Debian package haproxy)", *haproxyBin)
			checkerNames = slices.DeleteFunc(checkerNames, func(s string) bool { return strings.HasPrefix(s, "haproxy") })
		} else {
			*haproxyBin = p
		}
	}
	if wants("caddy") {
		if v := toolVersion(*caddyBin, "version", 0); v != "" {
			caddyVersionOf = v
		}
	}
	facts := machineFacts()
	ls, err := startListeners(*listeners, *addresses > *listeners)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	defer ls.stop()
	if *addresses > 0 {
		ls.addrs = expandAddrs(ls.addrs, *addresses)
	}
	heaps := map[string]int64{}

	totals := map[string]*measure{}
	for _, m := range order {
		totals[m] = &measure{}
	}
	ctotals := map[string]*cmeasure{}
	for _, c := range checkerNames {
		ctotals[c] = &cmeasure{}
	}
	newChecker := func(name string) (checker, bool) {
		switch name {
		case "engine":
			return &engineChecker{c: *concurrency}, true
		case "haproxy":
			return &haproxyChecker{bin: *haproxyBin, inter: *haproxyInter, sig: syscall.SIGUSR1}, false
		case "haproxy-term":
			return &haproxyChecker{bin: *haproxyBin, inter: *haproxyInter, sig: syscall.SIGTERM}, false
		case "shaker":
			return &shakerChecker{bin: *caddyBin, interval: *shakerIval, loops: *shakerLoops}, false
		default:
			return &caddyChecker{bin: *caddyBin, interval: *caddyInterval}, false
		}
	}

	per := *duration / time.Duration(*rounds)
	for r := 0; r < *rounds; r++ {
		for _, m := range order {
			got, err := run(probers[m], ls, per, *concurrency)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: %s: %v\n", m, err)
				os.Exit(1)
			}
			totals[m].add(got)
		}
		for _, name := range checkerNames {
			c, ownCount := newChecker(name)
			if sc, ok := c.(*shakerChecker); ok {
				sc.onWindowEnd = func() {
					if h, err := sc.heapAfterGC(); err == nil {
						heaps[name] = max(heaps[name], h)
					} else {
						note("shaker heap: %v", err)
					}
				}
			}
			got, err := runChecker(c, ls, per, *warmup, ownCount)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: %s: %v\n", name, err)
				os.Exit(1)
			}
			ctotals[name].add(got)
		}
	}

	where := "127.0.0.1"
	if *inNetns {
		where += " in a network namespace of the bench's own"
	}
	fmt.Printf("%d listeners on %s, %d addresses, %d in flight, %v per prober in %d rounds, %s\n",
		*listeners, where, len(ls.addrs), *concurrency, *duration, *rounds, time.Now().UTC().Format("2006-01-02"))
	fmt.Printf("%s\n\n", facts)
	fmt.Println("| prober | probes/s | CPU per probe | vs dialer-halfopen | accepted by backends | failed | worst SYN-ACK to close |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|")
	base := totals["dialer-halfopen"]
	for _, m := range order {
		t := totals[m]
		ratio := "-"
		if base != nil && base.probes > 0 && t.probes > 0 {
			ratio = fmt.Sprintf("%.2fx", t.cpuPerProbe()/base.cpuPerProbe())
		}
		worst := "-"
		if t.maxCloseDelay > 0 {
			worst = t.maxCloseDelay.Round(time.Microsecond).String()
		}
		fmt.Printf("| %s | %.0f | %.2f us | %s | %d | %d | %s |\n",
			m, t.rate(), t.cpuPerProbe(), ratio, t.accepted, t.failed, worst)
	}

	var rows []checkerRow
	if *compare {
		fmt.Printf("\nHealth checkers compared, each in turn against the same listeners, %v measured per checker in %d rounds after a %v warm-up each; each stopped mid-run once per round:\n\n",
			*duration, *rounds, *warmup)
		fmt.Println("| checker | checks/s | CPU per check | CPU used | accepted while running | accepted at stop | worst time to stop | kernel: resets / full opens |")
		fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|")
		for _, name := range checkerNames {
			t := ctotals[name]
			row := checkerRow{name: name, label: checkerLabel(name, *concurrency, *haproxyBin, *haproxyInter, *caddyInterval, *shakerIval), m: *t}
			rows = append(rows, row)
			fmt.Printf("| %s | %.0f | %.2f us | %.2f cores | %d | %d in %d stops | %v | %d / %d |\n",
				row.label, t.rate(), t.cpuPerCheck(), t.cores(), t.accepted, t.acceptedAtStop, t.stops, roundDuration(t.worstStop), t.resets, t.opens)
		}
		fmt.Println()
		if h, ok := heaps["shaker"]; ok {
			fmt.Printf("shaker: configured %.0f checks/s (%d addresses every %v); live heap of the Caddy process after a GC %.1f MB, %.0f bytes per address\n",
				float64(len(ls.addrs))/shakerIval.Seconds(), len(ls.addrs), *shakerIval, float64(h)/1e6, float64(h)/float64(len(ls.addrs)))
		}
		if wants("shaker") {
			printReads(len(ls.addrs), heaps["shaker"])
		}
		if a, b := ctotals["shaker"], ctotals["haproxy"]; a != nil && b != nil && a.checks > 0 && b.checks > 0 {
			fmt.Printf("shaker vs HAProxy, CPU per check: %.2fx\n", a.cpuPerCheck()/b.cpuPerCheck())
		}
		if a, b := totals["engine-async"], totals["engine-1loop"]; a != nil && b != nil && b.probes > 0 {
			fmt.Printf("engine-async (%d loops) vs engine-1loop, probes/s: %.2fx\n", runtime.GOMAXPROCS(0), a.rate()/b.rate())
		}
		fmt.Println("Checks: the engine counts its own; HAProxy's are the kernel's count of half-made connections its RSTs dropped (TcpExt EmbryonicRsts) plus full connections (Tcp PassiveOpens); Caddy's are the connections the listeners accepted (each HTTP check is one). CPU is user+sys time of the checker's process over the window (/proc/PID/stat for the children, getrusage for the engine, which runs in the bench process); on loopback it includes the kernel's work for both ends. \"Accepted at stop\": connections the listeners accepted from the stop until 300 ms after the process exited (or Close returned), past the kernel's 200 ms delayed-ACK timer.")
		if wants("haproxy") || wants("haproxy-term") {
			fmt.Println("HAProxy runs with nbthread 1: one event loop, like the engine.")
		}
		if !*inNetns {
			fmt.Println("Not in a network namespace of its own: the kernel counters are this host's, and other TCP traffic adds to them.")
		}
	}
	for _, n := range notes {
		fmt.Println("note:", n)
	}
	if *plotFile != "" {
		title := fmt.Sprintf("caddy-shaker bench, %s: %s loopback listeners, %v per checker", time.Now().UTC().Format("2006-01-02"), thousands(float64(*listeners)), *duration)
		var err error
		if len(rows) > 0 {
			err = writeCheckerPlot(*plotFile, title, facts, rows)
		} else {
			var prows []checkerRow
			for _, m := range order {
				t := totals[m]
				prows = append(prows, checkerRow{name: m, label: m, m: cmeasure{checks: t.probes, accepted: t.accepted, wall: t.wall, cpu: t.cpu}})
			}
			err = writeCheckerPlot(*plotFile, title, facts, prows)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: -plot:", err)
			os.Exit(1)
		}
		fmt.Println("plot written to", *plotFile)
	}

	if *check {
		miss, checked := checkOurs(order, totals, checkerNames, ctotals)
		for _, name := range requested {
			if ours(name) && !slices.Contains(checkerNames, name) {
				miss = append(miss, fmt.Sprintf("checker %s was skipped, so not checked", name))
			}
		}
		if checked == 0 {
			fmt.Fprintln(os.Stderr, "bench: -check: no prober or checker of ours ran (engine-*, -compare with engine or shaker)")
			os.Exit(2)
		}
		for _, name := range checkerNames {
			if c := ctotals[name]; c != nil && strings.HasPrefix(name, "haproxy") {
				fmt.Printf("\n%s (not ours, not checked): %d accepted while running, %d at stop\n", name, c.accepted, c.acceptedAtStop)
			}
		}
		if e, b := totals["engine-async"], totals["dialer-halfopen"]; !*targets {
			fmt.Println("\nspeed targets not checked (-targets)")
		} else if e != nil && b != nil {
			if r := e.cpuPerProbe() / b.cpuPerProbe(); r > 0.5 {
				miss = append(miss, fmt.Sprintf("CPU per probe %.2fx dialer-halfopen, target <= 0.5x", r))
			}
			if e.rate() < 100000 {
				miss = append(miss, fmt.Sprintf("%.0f probes/s, target >= 100000", e.rate()))
			}
		} else {
			fmt.Println("\nspeed targets not checked: they need engine-async and dialer-halfopen")
		}
		if len(miss) > 0 {
			fmt.Println("\ntargets missed:", strings.Join(miss, "; "))
			os.Exit(1)
		}
		fmt.Printf("\nchecks passed: %d of ours let no connection through\n", checked)
	}
}

// ours tells a prober or checker of this project's (the engine's probers,
// the engine checker, Caddy with this plugin) from the comparisons
// (dialers, raw-sequential, HAProxy, Caddy's own HTTP checks).
func ours(name string) bool {
	return strings.HasPrefix(name, "engine") || name == "shaker"
}

// checkOurs returns, for -check, what each prober and checker of ours that
// ran let through: no connection may be accepted from any of them, while it
// ran or at its stop. checked is how many of ours ran.
func checkOurs(order []string, totals map[string]*measure, checkerNames []string, ctotals map[string]*cmeasure) (miss []string, checked int) {
	for _, m := range order {
		if t := totals[m]; ours(m) && t != nil {
			checked++
			if t.accepted != 0 {
				miss = append(miss, fmt.Sprintf("backends accepted %d connections from prober %s", t.accepted, m))
			}
		}
	}
	for _, name := range checkerNames {
		if c := ctotals[name]; ours(name) && c != nil {
			checked++
			if c.accepted+c.acceptedAtStop != 0 {
				miss = append(miss, fmt.Sprintf("backends accepted %d connections from checker %s (%d at stop)", c.accepted+c.acceptedAtStop, name, c.acceptedAtStop))
			}
		}
	}
	return miss, checked
}

// measure is what one prober did.
type measure struct {
	probes, failed, accepted int64
	wall, cpu                time.Duration
	maxCloseDelay            time.Duration
}

func (m *measure) add(o measure) {
	m.probes += o.probes
	m.failed += o.failed
	m.accepted += o.accepted
	m.wall += o.wall
	m.cpu += o.cpu
	m.maxCloseDelay = max(m.maxCloseDelay, o.maxCloseDelay)
}

func (m *measure) rate() float64 { return float64(m.probes) / m.wall.Seconds() }

func (m *measure) cpuPerProbe() float64 {
	return float64(m.cpu.Microseconds()) / float64(max(m.probes, 1))
}

// prober probes addrs with c in flight until stop is closed; it returns
// probes made, probes failed and the worst SYN-ACK to close delay it knows.
type prober func(addrs []netip.AddrPort, c int, stop <-chan struct{}) (probes, failed int64, worst time.Duration, err error)

func run(p prober, ls *listeners, d time.Duration, c int) (measure, error) {
	before, err := ls.accepted()
	if err != nil {
		return measure{}, err
	}
	stop := make(chan struct{})
	t := time.AfterFunc(d, func() { close(stop) })
	defer t.Stop()
	cpu0, wall0 := testkit.CPUTime(), time.Now()
	probes, failed, worst, err := p(ls.addrs, c, stop)
	m := measure{probes: probes, failed: failed, maxCloseDelay: worst,
		wall: time.Since(wall0), cpu: testkit.CPUTime() - cpu0}
	if err != nil {
		return m, err
	}
	// A socket left open past the kernel's 200 ms delayed-ACK timer becomes
	// a connection: the count waits that window out (see settled).
	after, err := ls.settled()
	m.accepted = after - before
	return m, err
}

func engineAsync(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
	return engineAsyncLoops(0)(addrs, c, stop)
}

// engineAsyncLoops is engine-async with that many loops (0: the default).
func engineAsyncLoops(loops int) prober {
	return func(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
		return engineChains(shaker.Options{Loops: loops}, addrs, c, stop)
	}
}

func engineChains(opts shaker.Options, addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
	e, err := shaker.New(opts)
	if err != nil {
		return 0, 0, 0, err
	}
	var n, failed atomic.Int64
	var stopped atomic.Bool
	go func() { <-stop; stopped.Store(true) }()
	var wg sync.WaitGroup
	wg.Add(c)
	for i := 0; i < c; i++ {
		k := i
		var done func(shaker.Result)
		done = func(r shaker.Result) {
			n.Add(1)
			if r.Err != nil {
				failed.Add(1)
			}
			if stopped.Load() {
				wg.Done()
				return
			}
			k += c
			e.ProbeAsync(addrs[k%len(addrs)], time.Second, done)
		}
		e.ProbeAsync(addrs[k%len(addrs)], time.Second, done)
	}
	wg.Wait()
	worst := e.Stats().MaxCloseDelay
	return n.Load(), failed.Load(), worst, e.Close()
}

func engineProbe(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
	e, err := shaker.New(shaker.Options{})
	if err != nil {
		return 0, 0, 0, err
	}
	n, failed := goroutines(addrs, c, stop, func(a netip.AddrPort) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return e.Probe(ctx, a).Err
	})
	worst := e.Stats().MaxCloseDelay
	return n, failed, worst, e.Close()
}

func dialer(halfOpen bool) prober {
	d := net.Dialer{Timeout: time.Second}
	if halfOpen {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 0)
				if serr == nil {
					serr = syscall.SetsockoptLinger(int(fd), syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1})
				}
			})
			return errors.Join(err, serr)
		}
	}
	return func(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
		n, failed := goroutines(addrs, c, stop, func(a netip.AddrPort) error {
			conn, err := d.Dial("tcp", a.String())
			if err != nil {
				return err
			}
			return conn.Close()
		})
		return n, failed, 0, nil
	}
}

// goroutines runs probe from c goroutines over addrs until stop.
func goroutines(addrs []netip.AddrPort, c int, stop <-chan struct{}, probe func(netip.AddrPort) error) (int64, int64) {
	var n, failed atomic.Int64
	var wg sync.WaitGroup
	wg.Add(c)
	for i := 0; i < c; i++ {
		go func(k int) {
			defer wg.Done()
			for ; ; k += c {
				select {
				case <-stop:
					return
				default:
				}
				if probe(addrs[k%len(addrs)]) != nil {
					failed.Add(1)
				}
				n.Add(1)
			}
		}(i)
	}
	wg.Wait()
	return n.Load(), failed.Load()
}

// listeners is the child process that holds the listeners.
type listeners struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	addrs []netip.AddrPort
}

func startListeners(n int, any bool) (*listeners, error) {
	cmd, err := testkit.Command(context.Background(), "", "-serve", "-listeners", strconv.Itoa(n), "-serve-any="+strconv.FormatBool(any))
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ls := &listeners{cmd: cmd, in: in, out: bufio.NewReader(out)}
	for len(ls.addrs) < n {
		line, err := ls.out.ReadString('\n')
		if err != nil {
			ls.stop()
			return nil, fmt.Errorf("listener process: %w", err)
		}
		a, err := netip.ParseAddrPort(strings.TrimSpace(line))
		if err != nil {
			ls.stop()
			return nil, fmt.Errorf("listener process said %q", line)
		}
		ls.addrs = append(ls.addrs, a)
	}
	return ls, nil
}

// accepted asks the child how many connections it has accepted in all, its
// accept queues flushed: a mark inside a run that goes on, such as the
// start and end of a checker's window. The end of every run of ours, once
// its probing has stopped, is counted with settled, so that the marks and
// that end together cover every connection.
func (ls *listeners) accepted() (int64, error) { return ls.ask("count") }

// settled is accepted past the kernel's delayed-ACK window from now: the
// child waits testkit.Window before it counts (SettledAccepts). A socket
// left open with a SYN-ACK in hand in the last 200 ms is a connection by
// then.
func (ls *listeners) settled() (int64, error) { return ls.ask("settled") }

func (ls *listeners) ask(what string) (int64, error) {
	if _, err := io.WriteString(ls.in, what+"\n"); err != nil {
		return 0, err
	}
	line, err := ls.out.ReadString('\n')
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(line), 10, 64)
}

// stop closes the child's stdin, on which it exits, and waits for it.
func (ls *listeners) stop() {
	ls.in.Close()
	done := make(chan struct{})
	go func() { ls.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		ls.cmd.Process.Kill()
		<-done
	}
}

// serveListeners is the child: n listeners on 127.0.0.1 (or 0.0.0.0, which
// answers every 127.x.y.z, with any) whose addresses, on 127.0.0.1, it
// prints, one a line; it answers "count" with the connections accepted so
// far (its accept queues flushed), "settled" with the same past the kernel's
// delayed-ACK window from now (Listeners.SettledAccepts), and exits when its
// stdin closes.
func serveListeners(n int, any bool) {
	host := "127.0.0.1"
	if any {
		host = "0.0.0.0"
	}
	ls, err := testkit.ListenMany(n, "tcp4", host+":0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench -serve:", err)
		os.Exit(1)
	}
	for _, l := range ls {
		fmt.Println(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), l.Addr.Port()))
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var n int64
		var err error
		switch sc.Text() {
		case "count":
			n, err = ls.Snapshot()
		case "settled":
			n, err = ls.SettledAccepts()
		default:
			continue
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench -serve:", err)
			os.Exit(1)
		}
		fmt.Println(n)
	}
}
