//go:build linux

package main

// The comparison (-compare): three health checkers that run for as long as
// they are left running, each against the same listeners, taking turns over
// the rounds:
//
//	engine   this repository's engine, ProbeAsync chains at full rate,
//	         in this process; stopped with Close
//	haproxy  HAProxy (`server ... check`, a half-open TCP check), a child
//	         process with nbthread 1; stopped with SIGUSR1 (soft stop, what
//	         a reload sends the old process)
//	haproxy-term  the same, stopped with SIGTERM (hard stop)
//	caddy    Caddy's own HTTP active health checks (health_uri /), a child
//	         process built from ./cmd/caddy; stopped with SIGTERM
//
// Each round starts the checker, lets it warm up, measures a window (its CPU,
// its checks, what the listeners accepted), then stops it while it is still
// probing at full rate and counts what the listeners accepted from the stop
// until 300 ms after it, past the kernel's 200 ms delayed-ACK timer.
//
// Checks are counted exactly: the engine counts its own; for the others the
// comparison runs in a network namespace of its own (as root), where nothing
// else moves the kernel's TCP counters, and a half-open check is one TcpExt
// EmbryonicRsts (the listener's kernel got the prober's RST for a half-made
// connection) while a full connection is one Tcp PassiveOpens.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// checker is one long-running health checker under comparison.
type checker interface {
	// start begins checking every address and returns once it runs.
	start(addrs []netip.AddrPort) error
	// alive reports an error if the checker died on its own.
	alive() error
	// cpu is the checker's CPU time (user+sys) so far.
	cpu() (time.Duration, error)
	// own returns the checks the checker counted itself, if it counts.
	own() (int64, bool)
	// stop stops it as an operator would, mid-run, and returns once it has
	// stopped (its process exited, or Close returned).
	stop() error
	// cleanup releases whatever start left behind, after stop or a failure.
	cleanup()
}

// compareConfig is what the -compare flags say.
type compareConfig struct {
	concurrency   int
	haproxyBin    string
	haproxyInter  time.Duration
	caddyBin      string
	caddyInterval time.Duration
	warmup        time.Duration
}

// cmeasure is what one checker did over the rounds.
type cmeasure struct {
	checks         int64 // as counted for the table (see countedBy)
	ownChecks      int64
	resets, opens  int64 // kernel: TcpExt EmbryonicRsts, Tcp PassiveOpens
	accepted       int64 // by the listeners during the windows
	acceptedAtStop int64 // by the listeners from each stop to 300 ms after it
	stops          int
	mallocs        uint64 // heap allocations over the windows, for checkers in this process
	inProcess      bool   // it runs in the bench's process: mallocs is its
	wall, cpu      time.Duration
	worstStop      time.Duration // longest from the stop to its process's exit (or Close's return)
	core0          time.Duration // -backends veth: all it cost core 0, the kernel's work there included (netns.go)
}

func (m *cmeasure) rate() float64 { return float64(m.checks) / m.wall.Seconds() }

func (m *cmeasure) cpuPerCheck() float64 {
	return float64(m.cpu.Microseconds()) / float64(max(m.checks, 1))
}

// allocsPerCheck is the bench process's heap allocations per check over
// the windows, for a checker in this process (the engine's).
func (m *cmeasure) allocsPerCheck() float64 {
	return float64(m.mallocs) / float64(max(m.checks, 1))
}

// core0PerCheck is core0 per check, in microseconds (-backends veth).
func (m *cmeasure) core0PerCheck() float64 {
	return float64(m.core0.Microseconds()) / float64(max(m.checks, 1))
}

// cores is the CPU it used, in cores.
func (m *cmeasure) cores() float64 { return m.cpu.Seconds() / m.wall.Seconds() }

// coreSpinner is the spinner on core 0 with -backends veth (netns.go), or
// nil.
var coreSpinner *spinner

// runChecker runs one round of one checker: warm-up, a window of d, a stop.
// With a spinner on core 0 (-backends veth), m.core0 is the checker's
// process's CPU over the window plus the kernel's work on core 0 beyond
// its rate alone, read for spinBase before the start and after the stop
// (core0Meter).
func runChecker(c checker, ls *listeners, d, warmup time.Duration, ownCount bool) (cmeasure, error) {
	var m cmeasure
	core0 := core0Meter{s: coreSpinner}
	core0.alone()
	if err := c.start(ls.addrs); err != nil {
		c.cleanup()
		return m, err
	}
	defer c.cleanup()
	time.Sleep(warmup)
	if err := c.alive(); err != nil {
		return m, err
	}
	// first: its flush's sentinel connections are full opens to the kernel,
	// which must not fall inside the window's counters
	acc0, err := ls.accepted() // marks: the stop's count below waits the window out
	if err != nil {
		return m, err
	}
	core0.mark()
	cpu0, err := c.cpu()
	if err != nil {
		return m, err
	}
	r0, o0, err := ls.kernelCounters()
	if err != nil {
		return m, err
	}
	own0, _ := c.own()
	ac, inProcess := c.(interface{ mallocs() uint64 })
	var malloc0 uint64
	if inProcess {
		malloc0 = ac.mallocs()
	}
	t0 := time.Now()
	if w, ok := c.(interface{ windowStart() }); ok {
		w.windowStart() // the shaker checker starts reading its Caddy
	}

	time.Sleep(d)

	cpu1, err := c.cpu()
	if err != nil {
		return m, err
	}
	core0.mark()
	r1, o1, err := ls.kernelCounters()
	if err != nil {
		return m, err
	}
	own1, _ := c.own()
	if inProcess {
		m.mallocs, m.inProcess = ac.mallocs()-malloc0, true
	}
	m.wall = time.Since(t0)
	acc1, err := ls.accepted()
	if err != nil {
		return m, err
	}
	if err := c.alive(); err != nil {
		return m, err
	}
	m.cpu, m.resets, m.opens, m.accepted, m.ownChecks = cpu1-cpu0, r1-r0, o1-o0, acc1-acc0, own1-own0
	m.checks = m.resets + m.opens
	if ownCount {
		m.checks = m.ownChecks
	}

	if w, ok := c.(interface{ windowEnd() }); ok {
		w.windowEnd() // after the window's figures are read, before the stop
	}

	// Stop it while it probes at full rate, then count past the kernel's
	// 200 ms delayed-ACK timer (settled waits it out): any socket it left
	// open with a SYN-ACK in hand is a connection by then. From acc0 to
	// accAfter the counts cover every connection, the window's last 200 ms
	// included.
	accStop, err := ls.accepted()
	if err != nil {
		return m, err
	}
	ts := time.Now()
	if err := c.stop(); err != nil {
		return m, err
	}
	m.worstStop = time.Since(ts)
	accAfter, err := ls.settled()
	if err != nil {
		return m, err
	}
	m.acceptedAtStop, m.stops = accAfter-accStop, 1
	if coreSpinner != nil {
		core0.alone()
		extra, err := core0.extra()
		if err != nil {
			return m, err
		}
		m.core0 = m.cpu + extra
	}
	return m, nil
}

func (m *cmeasure) add(o cmeasure) {
	m.checks += o.checks
	m.ownChecks += o.ownChecks
	m.resets += o.resets
	m.opens += o.opens
	m.accepted += o.accepted
	m.acceptedAtStop += o.acceptedAtStop
	m.stops += o.stops
	m.mallocs += o.mallocs
	m.inProcess = m.inProcess || o.inProcess
	m.wall += o.wall
	m.cpu += o.cpu
	m.worstStop = max(m.worstStop, o.worstStop)
	m.core0 += o.core0
}

// engineChecker: the engine in this process, c ProbeAsync chains at full
// rate, stopped with Close while they run (engine; engine-raw with
// opts.Mode ModeRaw).
type engineChecker struct {
	inProcess
	c    int
	opts shaker.Options
}

// inProcess is what the checkers that run the engine in this process
// share: it counts its own checks, its CPU is this process's, and Close
// stops it.
type inProcess struct {
	e      *shaker.Engine
	n      atomic.Int64
	failed atomic.Int64
}

func (k *inProcess) cpu() (time.Duration, error) { return testkit.CPUTime(), nil }
func (k *inProcess) own() (int64, bool)          { return k.n.Load(), true }
func (k *inProcess) stop() error                 { return k.e.Close() }
func (k *inProcess) mallocs() uint64             { return mallocs() }
func (k *inProcess) cleanup() {
	if k.e != nil {
		k.e.Close()
	}
}

func (k *engineChecker) start(addrs []netip.AddrPort) error {
	e, err := shaker.New(k.opts)
	if err != nil {
		return err
	}
	k.e = e
	for i := 0; i < k.c; i++ {
		j := i
		var done func(shaker.Result)
		done = func(r shaker.Result) {
			if errors.Is(r.Err, shaker.ErrClosed) {
				return
			}
			k.n.Add(1)
			if r.Err != nil {
				k.failed.Add(1)
			}
			j += k.c
			e.ProbeAsync(addrs[j%len(addrs)], time.Second, done)
		}
		e.ProbeAsync(addrs[j%len(addrs)], time.Second, done)
	}
	return nil
}

func (k *engineChecker) alive() error {
	if f := k.failed.Load(); f > 0 {
		return fmt.Errorf("%d probes failed", f)
	}
	return nil
}

// everyChecker: the engine in this process on its scheduled path, as the
// plugin drives it: one Engine.Every per address at interval (timeout
// 1 s), the first probes spread over the interval; stopped with Close
// (engine-every; engine-raw-every with opts.Mode ModeRaw). The health
// layer and Caddy are not in it: the shaker checkers measure those.
type everyChecker struct {
	inProcess
	interval time.Duration
	opts     shaker.Options
	firstErr atomic.Pointer[shaker.Result]
}

func (k *everyChecker) start(addrs []netip.AddrPort) error {
	e, err := shaker.New(k.opts)
	if err != nil {
		return err
	}
	k.e = e
	fn := func(r shaker.Result) time.Duration {
		k.n.Add(1)
		if r.Err != nil && k.failed.Add(1) == 1 {
			first := r // a copy: storing &r would move every r to the heap
			k.firstErr.Store(&first)
		}
		return 0
	}
	for i, a := range addrs {
		first := k.interval * time.Duration(i) / time.Duration(len(addrs))
		e.Every(a, shaker.Period{Interval: k.interval, Timeout: time.Second, First: first}, fn)
	}
	return nil
}

func (k *everyChecker) alive() error {
	if f := k.failed.Load(); f > 0 {
		r := k.firstErr.Load()
		return fmt.Errorf("%d probes failed, the first of %v with %v", f, r.Addr, r.Err)
	}
	return nil
}

// child is a checker running as a child process.
type child struct {
	name string
	cmd  *exec.Cmd
	dir  string
	log  string
	done chan struct{}
	err  error // from Wait, once done is closed
}

// prepare names the child and gives it a temporary directory and a free
// port on 127.0.0.1 for the listener its config needs.
func (ch *child) prepare(name string) (dir string, port int, err error) {
	ch.name = name
	if dir, err = os.MkdirTemp("", "bench-"+name+"-"); err != nil {
		return "", 0, err
	}
	ch.dir = dir
	port, err = testkit.LoopbackPort()
	return dir, port, err
}

func (ch *child) run(dir, bin string, args ...string) error {
	ch.dir = dir
	ch.log = dir + "/" + ch.name + ".log"
	logf, err := os.Create(ch.log)
	if err != nil {
		return err
	}
	defer logf.Close()
	ch.cmd = exec.Command(bin, args...)
	ch.cmd.Dir = dir
	ch.cmd.Stdout, ch.cmd.Stderr = logf, logf
	ch.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	ch.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // if the bench dies
	start := ch.cmd.Start
	if checkerCPU >= 0 {
		start = func() error { return startOn(checkerCPU, ch.cmd) }
	}
	if err := start(); err != nil {
		return err
	}
	ch.done = make(chan struct{})
	go func() { ch.err = ch.cmd.Wait(); close(ch.done) }()
	return nil
}

func (ch *child) alive() error {
	select {
	case <-ch.done:
		return fmt.Errorf("%s exited: %v; its output ends with:\n%s", ch.name, ch.err, ch.tail())
	default:
		return nil
	}
}

func (ch *child) tail() string {
	b, _ := os.ReadFile(ch.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

func (ch *child) cpu() (time.Duration, error) { return testkit.ProcCPU(ch.cmd.Process.Pid) }
func (ch *child) own() (int64, bool)          { return 0, false }

// signal stops the child with sig and waits for it to exit.
func (ch *child) signal(sig syscall.Signal) error {
	if err := ch.cmd.Process.Signal(sig); err != nil {
		return err
	}
	select {
	case <-ch.done:
		return nil
	case <-time.After(30 * time.Second):
		ch.cmd.Process.Kill()
		<-ch.done
		return fmt.Errorf("%s did not exit within 30s of %v; its output ends with:\n%s", ch.name, sig, ch.tail())
	}
}

func (ch *child) cleanup() {
	if ch.done != nil {
		select {
		case <-ch.done:
		default:
			ch.cmd.Process.Kill()
			<-ch.done
		}
	}
	if ch.dir != "" {
		os.RemoveAll(ch.dir)
	}
}

// haproxyChecker: HAProxy with one server per listener, plain `check`.
type haproxyChecker struct {
	child
	bin   string
	inter time.Duration
	sig   syscall.Signal
}

func (k *haproxyChecker) start(addrs []netip.AddrPort) error {
	dir, port, err := k.prepare("haproxy")
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString(testkit.HAProxyConfig(dir, 4096, time.Second))
	fmt.Fprintf(&b, "\nlisten bench\n\tbind 127.0.0.1:%d\n", port)
	inter := fmt.Sprintf("%dms", max(k.inter.Milliseconds(), 1))
	for i, a := range addrs {
		fmt.Fprintf(&b, "\tserver s%d %s check inter %s\n", i, a, inter)
	}
	cfg := dir + "/haproxy.cfg"
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return k.run(dir, k.bin, "-f", cfg, "-db")
}

func (k *haproxyChecker) stop() error { return k.signal(k.sig) }

// caddyChecker: Caddy's reverse_proxy with the listeners as static upstreams
// and active HTTP health checks (health_uri /).
type caddyChecker struct {
	child
	bin      string
	interval time.Duration
}

func (k *caddyChecker) start(addrs []netip.AddrPort) error {
	dir, port, err := k.prepare("caddy")
	if err != nil {
		return err
	}
	var ups []map[string]string
	for _, a := range addrs {
		ups = append(ups, map[string]string{"dial": a.String()})
	}
	cfg := map[string]any{
		"admin": map[string]any{"disabled": true},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"bench": map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
			"automatic_https": map[string]any{"disable": true},
			"routes": []any{map[string]any{"handle": []any{map[string]any{
				"handler":   "reverse_proxy",
				"upstreams": ups,
				"health_checks": map[string]any{"active": map[string]any{
					"uri":      "/",
					"interval": k.interval.String(),
					"timeout":  "1s",
				}},
			}}}},
		}}}},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	path := dir + "/caddy.json"
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return err
	}
	return k.run(dir, k.bin, "run", "--config", path)
}

func (k *caddyChecker) stop() error { return k.signal(syscall.SIGTERM) }

// buildCaddy builds ./cmd/caddy (Caddy with this plugin) into dir.
func buildCaddy(dir string) (string, error) {
	bin := dir + "/caddy"
	cmd := exec.Command("go", "build", "-o", bin, "github.com/caddy-shaker/caddy-shaker/cmd/caddy")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/caddy: %v: %s", err, bytes.TrimSpace(out))
	}
	return bin, nil
}

// checkerRow is one line of the comparison, for the table and the plot.
type checkerRow struct {
	name, label string
	m           cmeasure
}

// checkerLabel names a checker and how it was configured.
func checkerLabel(name string, c int, haproxyBin string, inter time.Duration, caddyInterval, shakerInterval time.Duration) string {
	switch name {
	case "shaker":
		return fmt.Sprintf("Caddy %s with caddy-shaker: `dynamic shaker`, interval %v; SIGTERM", caddyVersionOf, shakerInterval)
	case "shaker-raw":
		return fmt.Sprintf("Caddy %s with caddy-shaker: `dynamic shaker`, interval %v, probe_mode raw; SIGTERM", caddyVersionOf, shakerInterval)
	case "engine":
		return fmt.Sprintf("caddy-shaker engine: ProbeAsync, %d in flight; Close()", c)
	case "engine-raw":
		return fmt.Sprintf("caddy-shaker engine, raw mode: ProbeAsync, %d in flight; Close()", c)
	case "engine-every":
		return fmt.Sprintf("caddy-shaker engine: Every, interval %v; Close()", shakerInterval)
	case "engine-raw-every":
		return fmt.Sprintf("caddy-shaker engine, raw mode: Every, interval %v; Close()", shakerInterval)
	case "haproxy", "haproxy-term":
		stop := "SIGUSR1 (soft stop)"
		if name == "haproxy-term" {
			stop = "SIGTERM (hard stop)"
		}
		return fmt.Sprintf("HAProxy %s: `check inter %v`, nbthread 1; %s", toolVersion(haproxyBin, "-v", 2), inter, stop)
	default:
		return fmt.Sprintf("Caddy %s HTTP checks: `health_uri /`, `health_interval %v`; SIGTERM", caddyVersionOf, caddyInterval)
	}
}

// caddyVersionOf is the version of the Caddy the caddy checker runs.
var caddyVersionOf = "v2"

// toolVersion runs bin with flag and returns field n (counting from 0) of
// its first line, or "" if that fails.
func toolVersion(bin, flag string, n int) string {
	out, err := exec.Command(bin, flag).Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(out), "\n")
	f := strings.Fields(line)
	if n < len(f) {
		return f[n]
	}
	return ""
}

// machineFacts says what the figures were measured on.
func machineFacts() string {
	var u unix.Utsname
	kernel := "Linux"
	if unix.Uname(&u) == nil {
		kernel += " " + unix.ByteSliceToString(u.Release[:])
	}
	cpu := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v) + ", "
				break
			}
		}
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			load = ", load average " + f[0] + " at start"
		}
	}
	return fmt.Sprintf("%s, %s%d cores, %s%s", kernel, cpu, runtime.NumCPU(), runtime.Version(), load)
}
