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
