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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
		modes       = flag.String("probers", "engine-async,engine-probe,dialer-halfopen,dialer-full,raw-sequential", "comma-separated probers to run")
		check       = flag.Bool("check", false, "exit 1 unless the engine meets its targets (0 accepted, CPU per probe <= 0.5x dialer-halfopen, >= 100k probes/s)")
		serve       = flag.Bool("serve", false, "internal: run the listeners (the child process)")
	)
	flag.Parse()
	if *serve {
		serveListeners(*listeners)
		return
	}
	if *duration <= 0 || *rounds < 1 || *listeners < 1 || *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "bench: -duration, -rounds, -listeners and -concurrency must be positive")
		os.Exit(2)
	}
	probers := map[string]prober{
		"engine-async":    engineAsync,
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

	ls, err := startListeners(*listeners)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	defer ls.stop()

	totals := map[string]*measure{}
	for _, m := range order {
		totals[m] = &measure{}
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
	}

	fmt.Printf("%d listeners on 127.0.0.1, %d in flight, %v per prober in %d rounds, %s\n\n",
		*listeners, *concurrency, *duration, *rounds, time.Now().UTC().Format("2006-01-02"))
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

	if *check {
		e, b := totals["engine-async"], totals["dialer-halfopen"]
		if e == nil || b == nil {
			fmt.Fprintln(os.Stderr, "bench: -check needs engine-async and dialer-halfopen")
			os.Exit(2)
		}
		var miss []string
		if e.accepted != 0 {
			miss = append(miss, fmt.Sprintf("backends accepted %d engine probes", e.accepted))
		}
		if r := e.cpuPerProbe() / b.cpuPerProbe(); r > 0.5 {
			miss = append(miss, fmt.Sprintf("CPU per probe %.2fx dialer-halfopen, target <= 0.5x", r))
		}
		if e.rate() < 100000 {
			miss = append(miss, fmt.Sprintf("%.0f probes/s, target >= 100000", e.rate()))
		}
		if len(miss) > 0 {
			fmt.Println("\ntargets missed:", strings.Join(miss, "; "))
			os.Exit(1)
		}
		fmt.Println("\ntargets met")
	}
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
	cpu0, wall0 := cpuTime(), time.Now()
	probes, failed, worst, err := p(ls.addrs, c, stop)
	m := measure{probes: probes, failed: failed, maxCloseDelay: worst,
		wall: time.Since(wall0), cpu: cpuTime() - cpu0}
	if err != nil {
		return m, err
	}
	// A socket left open past the kernel's 200 ms delayed-ACK timer becomes
	// a connection; wait that long before counting, then flush.
	time.Sleep(300 * time.Millisecond)
	after, err := ls.accepted()
	m.accepted = after - before
	return m, err
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func engineAsync(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
	e, err := shaker.New(shaker.Options{})
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

func startListeners(n int) (*listeners, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "-serve", "-listeners", strconv.Itoa(n))
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

// accepted asks the child how many connections it has accepted in all.
func (ls *listeners) accepted() (int64, error) {
	if _, err := io.WriteString(ls.in, "count\n"); err != nil {
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

// serveListeners is the child: n listeners on 127.0.0.1 whose addresses it
// prints, one a line; it answers "count" with the connections accepted so
// far and exits when its stdin closes.
func serveListeners(n int) {
	var total atomic.Int64
	for i := 0; i < n; i++ {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench -serve:", err)
			os.Exit(1)
		}
		fmt.Println(ln.Addr())
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				total.Add(1)
				c.Close()
			}
		}()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "count" {
			fmt.Println(total.Load())
		}
	}
}
