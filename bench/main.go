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
//	engine-raw-async the same in raw mode (shaker.ModeRaw: needs CAP_NET_RAW)
//	engine-1loop     engine-async with one loop
//	engine-probe     shaker.Engine.Probe from C goroutines
//	engine-raw-probe the same in raw mode
//	dialer-halfopen  net.Dialer whose Control sets TCP_QUICKACK=0 and SO_LINGER {1,0}
//	dialer-full      net.Dialer, full connect and close
//	raw-sequential   one probe at a time with raw system calls: the floor
//
// Each prober runs duration/rounds per round, the probers taking turns, so
// that a change in the machine's load hits them alike. For each it prints
// probes/s, CPU per probe (user+sys time of this process from getrusage,
// divided by probes; on loopback that includes the kernel's work for both
// ends of each probe, the same for every prober) and how many connections the
// listeners accepted, and the process's heap allocations per probe. Only
// 127.0.0.1 is probed (127.0.0.0/8 with -addresses).
//
// With -compare it also runs, in turn against the same listeners,
// long-running health checkers (-checkers): the engine at full rate in
// connect and raw mode (engine, engine-raw; stopped with Close), the engine
// on its scheduled path, one Engine.Every per address at -shaker-interval
// (engine-every, engine-raw-every), HAProxy (`server ... check`, nbthread 1,
// a child process; skipped with a note when haproxy is not installed),
// Caddy's own HTTP active health checks and Caddy with this plugin (shaker,
// shaker-raw: children built from ./cmd/caddy). For each: checks/s, CPU per
// check, what the
// listeners accepted while it ran, and what they accepted when it was
// stopped mid-run. As root, the comparison runs in a network namespace of
// its own so that the kernel's TCP counters count HAProxy's checks exactly
// (see compare.go). -plot writes the results as an SVG image.
//
//	go run ./bench -duration 6s -rounds 3 -compare -plot bench/results.svg
//
// The production-like schedule, raw mode beside connect mode and HAProxy:
//
//	go run ./bench -probers raw-sequential -compare -checkers engine-every,engine-raw-every,haproxy \
//		-listeners 1000 -addresses 10000 -shaker-interval 1s -haproxy-inter 1s -duration 30s -rounds 3 -check -targets
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func main() {
	var (
		duration    = flag.Duration("duration", 3*time.Second, "time each prober runs, over all rounds")
		rounds      = flag.Int("rounds", 3, "rounds; the probers take turns in each")
		listeners   = flag.Int("listeners", 1000, "loopback listeners to probe")
		concurrency = flag.Int("concurrency", 64, "probes in flight per prober (goroutines or chains)")
		modes       = flag.String("probers", "engine-async,engine-raw-async,engine-probe,dialer-halfopen,dialer-full,raw-sequential", "comma-separated probers to run (engine-async, engine-raw-async, engine-1loop, engine-probe, engine-raw-probe, dialer-halfopen, dialer-full, raw-sequential)")
		check       = flag.Bool("check", false, "exit 1 if any prober or checker of ours (engine-*, and with -compare engine* and shaker*) let a connection through, while running or at its stop, or was skipped; HAProxy's counts are reported, not checked")
		targets     = flag.Bool("targets", false, "with -check: also exit 1 unless the engine meets its speed targets: engine-async CPU per probe <= 0.5x dialer-halfopen and >= 100k probes/s (when both ran); raw mode on the scheduled path (engine-raw-every, shaker-raw) CPU per check <= 0.4x HAProxy's (when haproxy ran beside it: the issue's figure is at 10,000 addresses at 1 s). Off in CI: the machine's speed moves 2.5x between days")
		serve       = flag.Bool("serve", false, "internal: run the listeners (the child process)")
		serveAny    = flag.Bool("serve-any", false, "internal: the listeners bind 0.0.0.0")

		compare       = flag.Bool("compare", false, "also compare long-running health checkers (-checkers) against the same listeners: CPU per check, what the backends accepted, and what they accepted when each was stopped mid-run")
		checkerList   = flag.String("checkers", "engine,engine-raw,haproxy,haproxy-term,caddy", "with -compare: comma-separated checkers to run: "+strings.Join(checkerKinds, ", ")+" (haproxy is stopped with SIGUSR1, a soft stop as a reload does to the old process; haproxy-term with SIGTERM, a hard stop)")
		haproxyBin    = flag.String("haproxy", "haproxy", "with -compare: HAProxy binary; the haproxy checker is skipped when it is not found")
		haproxyInter  = flag.Duration("haproxy-inter", 10*time.Millisecond, "with -compare: HAProxy's `check inter` for each server")
		caddyBin      = flag.String("caddy", "", "with -compare: Caddy binary for the caddy checker (empty: go build ./cmd/caddy once; skipped if that fails)")
		caddyInterval = flag.Duration("caddy-interval", 100*time.Millisecond, "with -compare: Caddy's health_interval")
		warmup        = flag.Duration("warmup", time.Second, "with -compare: time each checker runs before its window is measured")
		useNetns      = flag.Bool("netns", true, "with -compare, as root: run everything in a network namespace of its own, so that the kernel's TCP counters count only the bench's checks")
		plotFile      = flag.String("plot", "", "write an SVG plot of the results to this file")
		addresses     = flag.Int("addresses", 0, "addresses to probe (0: one per listener); more than -listeners spreads them over 127.0.0.0/8, the listeners binding 0.0.0.0")
		shakerIval    = flag.Duration("shaker-interval", time.Second, "with -compare: the interval of the scheduled checkers: shaker, shaker-raw (Caddy with this plugin), engine-every, engine-raw-every")
		shakerLoops   = flag.Int("shaker-loops", 0, "with -compare: the loops of the scheduled checkers (0: the default, one per CPU)")
		inNetns       = flag.Bool("in-netns", false, "internal: running in the bench's own network namespace")
		backends      = flag.String("backends", "loopback", "with -compare, as root: where the listeners are: loopback (in the bench's namespace, so that each checker's CPU includes the kernel's work for both ends), or veth (in a namespace of their own behind a veth pair, their packets on the last core, each checker alone on core 0, where the kernel's work for it is measured too: see bench/netns.go); veth runs child checkers only (haproxy, haproxy-term, caddy, shaker, shaker-raw) and no probers")
		spin          = flag.Bool("spin", false, "internal: run the spinner of -backends veth (the child process)")
	)
	flag.Parse()
	if *serve {
		serveListeners(*listeners, *serveAny)
		return
	}
	if *spin {
		serveSpin()
		return
	}
	veth := *backends == "veth"
	if !veth && *backends != "loopback" {
		fmt.Fprintf(os.Stderr, "bench: -backends %q: want loopback or veth\n", *backends)
		os.Exit(2)
	}
	if veth {
		probersSet := false
		flag.Visit(func(f *flag.Flag) { probersSet = probersSet || f.Name == "probers" })
		if !probersSet {
			*modes = ""
		}
		if *modes != "" || !*compare || !*useNetns {
			fmt.Fprintln(os.Stderr, "bench: -backends veth measures -compare's child checkers only: give -compare, no -probers (or -probers ''), and keep -netns")
			os.Exit(2)
		}
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
			if !slices.Contains(checkerKinds, c) {
				fmt.Fprintf(os.Stderr, "bench: unknown checker %q (%s)\n", c, strings.Join(checkerKinds, ", "))
				os.Exit(2)
			}
			if veth && !slices.Contains(childCheckers, c) {
				fmt.Fprintf(os.Stderr, "bench: -backends veth: checker %q runs in the bench's process, which this mode keeps off the measured core; it measures %s\n", c, strings.Join(childCheckers, ", "))
				os.Exit(2)
			}
			checkerNames = append(checkerNames, c)
		}
	}
	raw := shaker.Options{Mode: shaker.ModeRaw}
	probers := map[string]prober{
		"engine-async":     engineAsync(shaker.Options{}),
		"engine-raw-async": engineAsync(raw),
		"engine-1loop":     engineAsync(shaker.Options{Loops: 1}),
		"engine-probe":     engineProbe(shaker.Options{}),
		"engine-raw-probe": engineProbe(raw),
		"dialer-halfopen":  dialer(true),
		"dialer-full":      dialer(false),
		"raw-sequential":   rawSequential,
	}
	var order []string
	for _, m := range strings.Split(*modes, ",") {
		if m == "" && *modes == "" {
			break // -probers '': none
		}
		if _, ok := probers[m]; !ok {
			fmt.Fprintf(os.Stderr, "bench: unknown prober %q\n", m)
			os.Exit(2)
		}
		order = append(order, m)
	}

	wants := func(name string) bool { return slices.Contains(checkerNames, name) }
	wantsShaker := wants("shaker") || wants("shaker-raw")

	var notes []string
	note := func(format string, args ...any) { notes = append(notes, fmt.Sprintf(format, args...)) }
	if (wants("caddy") || wantsShaker) && *caddyBin == "" {
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
			if veth {
				fmt.Fprintln(os.Stderr, "bench: -backends veth needs root (network namespaces, RPS)")
				os.Exit(2)
			}
			note("not root: no network namespace of its own, so HAProxy's checks are counted from this host's TCP counters, which other traffic also moves")
		} else {
			args := append(os.Args[1:len(os.Args):len(os.Args)], "-in-netns", "-caddy", *caddyBin)
			status, ok, err := inNewNetns(args, veth)
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
			if veth {
				fmt.Fprintf(os.Stderr, "bench: -backends veth: no network namespace of its own: %v\n", err)
				os.Exit(1)
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
	var vb *vethBackends
	if veth {
		var stop func()
		var err error
		if vb, stop, err = startVethBackends(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: -backends veth:", err)
			os.Exit(1)
		}
		defer stop()
	}
	requested := slices.Clone(checkerNames) // -check: none of ours may be skipped
	requestedProbers := slices.Clone(order)
	if slices.ContainsFunc(order, isRaw) || slices.ContainsFunc(checkerNames, isRaw) {
		// the engine's raw mode needs CAP_NET_RAW: without it, its
		// probers and checkers are skipped, with a note (and -check fails)
		if err := rawAvailable(); err != nil {
			note("raw mode skipped (engine-raw-*, shaker-raw): %v", err)
			order = slices.DeleteFunc(order, isRaw)
			checkerNames = slices.DeleteFunc(checkerNames, isRaw)
		}
	}
	if *caddyBin == "-" {
		checkerNames = slices.DeleteFunc(checkerNames, func(s string) bool { return s == "caddy" || strings.HasPrefix(s, "shaker") })
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
	ns := ""
	if vb != nil {
		ns = vb.ns
	}
	ls, err := startListeners(*listeners, *addresses > *listeners || vb != nil, ns)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	defer ls.stop()
	switch {
	case vb != nil:
		if ls.addrs, err = expandVeth(ls.addrs, *addresses); err != nil {
			fmt.Fprintln(os.Stderr, "bench: -backends veth:", err)
			os.Exit(2)
		}
	case *addresses > 0:
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
		case "engine-raw":
			return &engineChecker{c: *concurrency, opts: raw}, true
		case "engine-every":
			return &everyChecker{interval: *shakerIval, opts: shaker.Options{Loops: *shakerLoops}}, true
		case "engine-raw-every":
			return &everyChecker{interval: *shakerIval, opts: shaker.Options{Loops: *shakerLoops, Mode: shaker.ModeRaw}}, true
		case "haproxy":
			return &haproxyChecker{bin: *haproxyBin, inter: *haproxyInter, sig: syscall.SIGUSR1}, false
		case "haproxy-term":
			return &haproxyChecker{bin: *haproxyBin, inter: *haproxyInter, sig: syscall.SIGTERM}, false
		case "shaker":
			return &shakerChecker{bin: *caddyBin, interval: *shakerIval, loops: *shakerLoops}, false
		case "shaker-raw":
			return &shakerChecker{bin: *caddyBin, interval: *shakerIval, loops: *shakerLoops, mode: "raw"}, false
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
	if vb != nil {
		where = fmt.Sprintf("%s in a network namespace of their own behind a veth pair, their packets on core %d with the bench, each checker alone on core 0", vethPrefix, vb.lastCPU())
	}
	fmt.Printf("%d listeners on %s, %d addresses, %d in flight, %v per prober in %d rounds, %s\n",
		*listeners, where, len(ls.addrs), *concurrency, *duration, *rounds, time.Now().UTC().Format("2006-01-02"))
	fmt.Printf("%s\n\n", facts)
	if len(order) > 0 { // none with -backends veth
		fmt.Println("| prober | probes/s | CPU per probe | vs dialer-halfopen | accepted by backends | failed | worst SYN-ACK to close | allocs per probe |")
		fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|")
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
			fmt.Printf("| %s | %.0f | %.2f us | %s | %d | %d | %s | %.4f |\n",
				m, t.rate(), t.cpuPerProbe(), ratio, t.accepted, t.failed, worst, t.allocsPerProbe())
		}
	}
	for _, p := range [][2]string{{"engine-raw-async", "engine-async"}, {"engine-raw-probe", "engine-probe"}} {
		if a, b := totals[p[0]], totals[p[1]]; a != nil && b != nil && a.probes > 0 && b.probes > 0 {
			fmt.Printf("\n%s vs %s: CPU per probe %.2fx, probes/s %.2fx", p[0], p[1], a.cpuPerProbe()/b.cpuPerProbe(), a.rate()/b.rate())
		}
	}
	fmt.Println()

	var rows []checkerRow
	if *compare {
		fmt.Printf("\nHealth checkers compared, each in turn against the same listeners, %v measured per checker in %d rounds after a %v warm-up each; each stopped mid-run once per round:\n\n",
			*duration, *rounds, *warmup)
		fmt.Println("| checker | checks/s | CPU per check | CPU used | accepted while running | accepted at stop | worst time to stop | kernel: resets / full opens | allocs per check |")
		fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, name := range checkerNames {
			t := ctotals[name]
			row := checkerRow{name: name, label: checkerLabel(name, *concurrency, *haproxyBin, *haproxyInter, *caddyInterval, *shakerIval), m: *t}
			rows = append(rows, row)
			allocs := "-"
			if t.inProcess {
				allocs = fmt.Sprintf("%.4f", t.allocsPerCheck())
			}
			fmt.Printf("| %s | %.0f | %.2f us | %.2f cores | %d | %d in %d stops | %v | %d / %d | %s |\n",
				row.label, t.rate(), t.cpuPerCheck(), t.cores(), t.accepted, t.acceptedAtStop, t.stops, roundDuration(t.worstStop), t.resets, t.opens, allocs)
		}
		if coreSpinner != nil {
			printCore0(checkerNames, ctotals)
		}
		fmt.Println()
		for _, name := range []string{"shaker", "shaker-raw"} {
			if h, ok := heaps[name]; ok {
				fmt.Printf("%s: configured %.0f checks/s (%d addresses every %v); live heap of the Caddy process after a GC %.1f MB, %.0f bytes per address\n",
					name, float64(len(ls.addrs))/shakerIval.Seconds(), len(ls.addrs), *shakerIval, float64(h)/1e6, float64(h)/float64(len(ls.addrs)))
			}
			if wants(name) {
				printReads(name, len(ls.addrs), heaps[name])
			}
		}
		for _, r := range checkerRatios(ctotals) {
			fmt.Println(r.line())
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
		for _, name := range requestedProbers {
			if ours(name) && !slices.Contains(order, name) {
				miss = append(miss, fmt.Sprintf("prober %s was skipped, so not checked", name))
			}
		}
		if checked == 0 && len(miss) == 0 {
			fmt.Fprintln(os.Stderr, "bench: -check: no prober or checker of ours ran (engine-*, -compare with engine* or shaker*)")
			os.Exit(2)
		}
		for _, name := range checkerNames {
			if c := ctotals[name]; c != nil && strings.HasPrefix(name, "haproxy") {
				fmt.Printf("\n%s (not ours, not checked): %d accepted while running, %d at stop\n", name, c.accepted, c.acceptedAtStop)
			}
		}
		if *targets {
			m, met := speedTargets(totals, ctotals)
			miss = append(miss, m...)
			if met == 0 && len(m) == 0 {
				fmt.Println("\nspeed targets not checked: they need engine-async and dialer-halfopen, or engine-raw-every or shaker-raw beside haproxy")
			}
		} else {
			fmt.Println("\nspeed targets not checked (-targets)")
		}
		if len(miss) > 0 {
			fmt.Println("\ntargets missed:", strings.Join(miss, "; "))
			os.Exit(1)
		}
		fmt.Printf("\nchecks passed: %d of ours let no connection through\n", checked)
	}
}

// ours tells a prober or checker of this project's (the engine's probers,
// the engine checkers, Caddy with this plugin) from the comparisons
// (dialers, raw-sequential, HAProxy, Caddy's own HTTP checks).
func ours(name string) bool {
	return strings.HasPrefix(name, "engine") || strings.HasPrefix(name, "shaker")
}

// checkerKinds are the checkers -checkers may name.
var checkerKinds = []string{"engine", "engine-raw", "engine-every", "engine-raw-every", "haproxy", "haproxy-term", "caddy", "shaker", "shaker-raw"}

// isRaw tells the probers and checkers of the engine's raw mode.
func isRaw(name string) bool { return strings.Contains(name, "-raw") }

// rawAvailable is nil where the engine's raw mode can run, or why not.
func rawAvailable() error {
	e, err := shaker.New(shaker.Options{Mode: shaker.ModeRaw, Loops: 1})
	if err != nil {
		if errors.Is(err, shaker.ErrRawUnavailable) {
			return err
		}
		return fmt.Errorf("raw mode does not start here: %w", err)
	}
	return e.Close()
}
