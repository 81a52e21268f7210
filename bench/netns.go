//go:build linux

package main

// The bench's network namespaces: its own, with -compare as root (so that
// the kernel's TCP counters count only its checks), and the backends' with
// -backends veth.
//
// Backends on a core of their own (-backends veth). On loopback a prober's
// CPU includes the kernel's work for both ends of every probe: the
// backend's handling of the SYN, its SYN-ACK and the RST happen inside the
// prober's own system calls. That hides what a prober costs the host it
// runs on when the backends are elsewhere, as they are in production. With
// -backends veth the listeners live in a network namespace of their own
// (B) behind a veth pair, and the work of each side is kept on its own
// core:
//
//   - RPS on B's veth end steers the backends' packets to the last core,
//     where the listener process and the bench itself run too;
//   - RPS on the bench's end steers the answers to core 0, so that this
//     side's kernel work (the SYN-ACK, the RST it is answered with) is
//     done on core 0, as the checker's;
//   - each checker's process is started on core 0, alone.
//
// What a checker costs core 0 is read two ways: its process's CPU time
// (/proc/PID/stat), and that plus the kernel's work on core 0 that no
// process of the checker's was charged with. Time is sampled by the 10 ms
// tick, and a core that idles between packets stops its tick, so that
// softirqs run from idle go uncounted. A SCHED_IDLE spinner on core 0, which
// runs whenever nothing else there wants to, keeps it from idling: the
// softirqs that interrupt the spinner land in its sys time (it makes no
// system calls of its own), and those deferred to ksoftirqd in that
// thread's. Their time over the window, beyond their rate alone just
// before the checker started and just after it stopped, is the checker's.
// Other processes that land on core 0 are not counted; their softirqs
// would be. This holds on kernels without CONFIG_IRQ_TIME_ACCOUNTING
// (this machine's, Linux 6.18): with it, softirq time is kept out of every
// task's, and the second figure reads low.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// vethBackends is the namespace B of -backends veth and how the bench's
// side reaches it.
type vethBackends struct {
	ns, self string // B, and the name given to the bench's own namespace
	last     int    // the highest CPU this process may run on: the backends'
}

// The addresses of -backends veth: inside the bench's namespaces only
// (198.18.0.0/15 is the benchmarking range).
const (
	vethAddrA, vethAddrB = "198.18.9.1", "198.18.9.2"
	vethPrefix           = "198.19.0.0/16" // B's own, every address of it
	vethDevA, vethDevB   = "shkbench-a", "shkbench-b"
)

// setupVeth creates B and the veth pair from the bench's namespace (which
// must be its own: -in-netns), and steers each side's packets to its core.
func setupVeth() (*vethBackends, error) {
	var allowed unix.CPUSet
	if err := unix.SchedGetaffinity(0, &allowed); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	last := -1
	for c := 0; c < len(allowed)*64; c++ { // CPUSet holds 1024 CPUs
		if allowed.IsSet(c) {
			last = c
		}
	}
	if !allowed.IsSet(0) || last < 1 {
		return nil, fmt.Errorf("-backends veth needs CPU 0 and one more that this process may run on (it may run on %d CPUs, 0 among them: %v)", allowed.Count(), allowed.IsSet(0))
	}
	v := &vethBackends{last: last}
	pid := os.Getpid()
	names := vethNamespaces(pid)
	v.ns, v.self = names[0], names[1]
	run := func(args ...string) error {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := run("ip", "netns", "add", v.ns); err != nil {
		return nil, err
	}
	// named, so that ip netns exec can reach its sysfs
	if err := run("ip", "netns", "attach", v.self, strconv.Itoa(pid)); err != nil {
		v.close()
		return nil, err
	}
	steps := [][]string{
		{"ip", "-n", v.ns, "link", "set", "lo", "up"},
		{"ip", "netns", "exec", v.ns, "sh", "-c", "echo " + rpsMask(last) + " > /sys/class/net/" + vethDevB + "/queues/rx-0/rps_cpus"},
		{"ip", "netns", "exec", v.self, "sh", "-c", "echo " + rpsMask(0) + " > /sys/class/net/" + vethDevA + "/queues/rx-0/rps_cpus"},
	}
	err := testkit.JoinVeth(testkit.VethEnd{NS: v.self, Dev: vethDevA, MAC: "02:5b:00:00:01:0a", Addrs: []string{vethAddrA + "/30"}},
		testkit.VethEnd{NS: v.ns, Dev: vethDevB, MAC: "02:5b:00:00:01:0b", Addrs: []string{vethAddrB + "/30"}}, vethPrefix)
	for _, st := range steps {
		if err == nil {
			err = run(st...)
		}
	}
	if err != nil {
		v.close()
		return nil, err
	}
	return v, nil
}

// vethNamespaces are the names setupVeth gives B and the bench's own
// namespace, in the bench process pid.
func vethNamespaces(pid int) []string {
	return []string{fmt.Sprintf("shaker-bench-b-%d", pid), fmt.Sprintf("shaker-bench-a-%d", pid)}
}

// childCheckers are the checkers that run as child processes, which
// -backends veth can put on a core of their own.
var childCheckers = []string{"haproxy", "haproxy-term", "caddy", "shaker", "shaker-raw"}

// close deletes B (and with it the veth pair) and the bench's name for its
// own namespace (the namespace lives on with the process).
func (v *vethBackends) close() {
	for _, ns := range []string{v.ns, v.self} {
		exec.Command("ip", "netns", "del", ns).Run()
	}
}

// lastCPU is the core of the backends and the bench.
func (v *vethBackends) lastCPU() int { return v.last }

// rpsMask is the rps_cpus mask of the one CPU cpu, as sysfs reads it:
// comma-separated groups of 32 bits, the highest first.
func rpsMask(cpu int) string {
	groups := make([]string, cpu/32+1)
	for i := range groups {
		g := len(groups) - 1 - i // groups[0] holds the highest CPUs
		v := uint32(0)
		if g == cpu/32 {
			v = 1 << (cpu % 32)
		}
		groups[i] = fmt.Sprintf("%08x", v)
	}
	return strings.Join(groups, ",")
}

// startVethBackends sets -backends veth up from the bench's own
// namespace: B and the veth pair, this process on the last core, the
// checkers on core 0 beside the spinner. stop undoes what can be undone
// (inNewNetns's parent deletes the namespaces whatever the exit).
func startVethBackends() (v *vethBackends, stop func(), err error) {
	if v, err = setupVeth(); err != nil {
		return nil, nil, err
	}
	if err := pinProcess(v.lastCPU()); err != nil {
		v.close()
		return nil, nil, err
	}
	checkerCPU = 0
	if coreSpinner, err = startSpinner(0); err != nil {
		v.close()
		return nil, nil, fmt.Errorf("spinner: %w", err)
	}
	return v, func() { coreSpinner.stop(); v.close() }, nil
}

// printCore0 prints, for -backends veth, each checker's two figures on
// core 0.
func printCore0(names []string, ctotals map[string]*cmeasure) {
	fmt.Println("\nOn core 0, where each checker ran alone (-backends veth): its process's CPU beside all it cost core 0, the kernel's work there included (softirqs: its SYN-ACKs, RSTs and wake-ups, read from the sys time of a SCHED_IDLE spinner that keeps core 0 from idling, and ksoftirqd's, beyond their rate alone):")
	fmt.Println()
	fmt.Println("| checker | CPU per check, its process | CPU per check, core 0 in all | core 0 used |")
	fmt.Println("|---|---:|---:|---:|")
	for _, name := range names {
		t := ctotals[name]
		fmt.Printf("| %s | %.2f us | %.2f us | %.2f cores |\n", name, t.cpuPerCheck(), t.core0PerCheck(), t.core0.Seconds()/t.wall.Seconds())
	}
}

// expandVeth is expandAddrs on B's prefix: address i is port i mod
// len(ports) on the (i / len(ports) + 1)th address of it.
func expandVeth(ls []netip.AddrPort, n int) ([]netip.AddrPort, error) {
	if n == 0 {
		n = len(ls)
	}
	if (n-1)/len(ls)+1 > 0xffff {
		return nil, fmt.Errorf("%d addresses over %d listeners need more than the %d addresses of %s", n, len(ls), 0xffff, vethPrefix)
	}
	base := netip.MustParsePrefix(vethPrefix).Addr().As4()
	out := make([]netip.AddrPort, n)
	for i := range out {
		k := i/len(ls) + 1
		ip := netip.AddrFrom4([4]byte{base[0], base[1], byte(k >> 8), byte(k)})
		out[i] = netip.AddrPortFrom(ip, ls[i%len(ls)].Port())
	}
	return out, nil
}

// pinProcess keeps every thread of this process, and so every thread and
// child it makes from now on, on cpu.
func pinProcess(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	for range 2 { // a thread made during the first pass is caught by the second
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
				return fmt.Errorf("sched_setaffinity %d: %w", tid, err)
			}
		}
	}
	return nil
}

// startOn starts cmd on cpu alone: a child inherits the CPUs of the thread
// that forks it.
func startOn(cpu int, cmd *exec.Cmd) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var was, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &was); err != nil {
		return err
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return err
	}
	err := cmd.Start()
	if err2 := unix.SchedSetaffinity(0, &was); err == nil {
		err = err2
	}
	return err
}

// checkerCPU is the core a checker's process is started on (-backends
// veth), or -1: wherever the scheduler puts it.
var checkerCPU = -1

// spinner is the SCHED_IDLE child that keeps core 0 busy (serveSpin),
// and ksoftirqd of core 0, if this process can see it.
type spinner struct {
	cmd       *exec.Cmd
	in        io.WriteCloser
	ksoftirqd int // its pid, or 0
}

// spinBase is how long the kernel's work on core 0 is read alone before a
// checker starts and after it stops.
const spinBase = 2 * time.Second

func startSpinner(cpu int) (*spinner, error) {
	cmd, err := testkit.Command(context.Background(), "", "-spin")
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	s := &spinner{cmd: cmd, ksoftirqd: findProcess(fmt.Sprintf("ksoftirqd/%d", cpu))}
	if s.in, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := startOn(cpu, cmd); err != nil {
		return nil, err
	}
	// it says "ready" once its spinning thread is SCHED_IDLE
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("said %q", line)
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(10 * time.Second):
		err = fmt.Errorf("not ready in 10 s")
	}
	if err != nil {
		s.stop()
		return nil, fmt.Errorf("the spinner: %w", err)
	}
	return s, nil
}

// findProcess is the pid of the process whose comm is name, or 0.
func findProcess(name string) int {
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + d.Name() + "/comm"); err == nil && strings.TrimSpace(string(b)) == name {
			return pid
		}
	}
	return 0
}

// kernel is the kernel's work on core 0 that no checker's process was
// charged with, so far: the softirqs that interrupted the spinner (its sys
// time: the spinner itself makes no system calls) and ksoftirqd's.
func (s *spinner) kernel() (time.Duration, error) {
	_, sys, err := testkit.ProcTimes(s.cmd.Process.Pid)
	if err != nil {
		return 0, fmt.Errorf("the spinner on core 0: %w", err)
	}
	if s.ksoftirqd != 0 {
		k, err := testkit.ProcCPU(s.ksoftirqd)
		if err != nil {
			return 0, err
		}
		sys += k
	}
	return sys, nil
}

// core0Meter is one round's reading of the kernel's work on core 0 that
// the checker's process was not charged with (spinner.kernel): alone
// before the start and after the stop, spinBase each, and over the
// window; the window's, less the rate alone, is the checker's. The first
// error of any mark is kept.
type core0Meter struct {
	s    *spinner
	k    [6]time.Duration // kernel() at the marks
	at   [6]time.Time
	err  error
	next int
}

// The marks, in order: alone before the start (two), the window (two),
// alone after the stop (two).
func (c *core0Meter) mark() {
	if c.s == nil || c.next >= len(c.k) {
		return
	}
	k, err := c.s.kernel()
	if c.err == nil {
		c.err = err
	}
	c.k[c.next], c.at[c.next] = k, time.Now()
	c.next++
}

// alone marks the two ends of a reading alone, spinBase apart.
func (c *core0Meter) alone() {
	if c.s == nil {
		return
	}
	c.mark()
	time.Sleep(spinBase)
	c.mark()
}

// extra is the kernel's work on core 0 over the window beyond its rate
// alone.
func (c *core0Meter) extra() (time.Duration, error) {
	if c.err != nil {
		return 0, fmt.Errorf("core 0's kernel time: %w", c.err)
	}
	if c.next != len(c.k) {
		return 0, fmt.Errorf("core 0's kernel time: %d of its %d readings taken", c.next, len(c.k))
	}
	alone := float64(c.k[1]-c.k[0]+c.k[5]-c.k[4]) / float64(c.at[1].Sub(c.at[0])+c.at[5].Sub(c.at[4]))
	return c.k[3] - c.k[2] - time.Duration(alone*float64(c.at[3].Sub(c.at[2]))), nil
}

// stop closes the spinner's stdin, on which it exits, and waits for it;
// a spinner that does not exit within 5 s is killed.
func (s *spinner) stop() { stopByStdin(s.in, s.cmd) }

// serveSpin is the spinner: SCHED_IDLE, it runs an empty loop whenever
// nothing else on its core wants to run, until its stdin closes. It keeps
// its core from idling: the kernel's work there (a checker's SYN-ACKs,
// RSTs and wake-ups) then always lands in a process's time, which ticks
// sample, where on an idle core it would go unsampled.
func serveSpin() {
	// SCHED_IDLE is a thread's: the loop must spin on the thread that
	// asked for it, not on whichever thread the runtime moves it to
	runtime.LockOSThread()
	if err := unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0); err != nil {
		fmt.Fprintln(os.Stderr, "bench -spin: SCHED_IDLE:", err)
		os.Exit(1)
	}
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	fmt.Println("ready")
	for {
	}
}

// inNewNetns re-runs this command with args in a network namespace of its
// own (CLONE_NEWNET: needs root) and returns its exit status; ok is false
// when the namespace cannot be created here. With veth, it deletes the
// namespaces the child names (setupVeth) once it has exited, however it
// exited; SIGINT, SIGTERM and SIGHUP are passed on to the child, so that
// this process lives to do so.
func inNewNetns(args []string, veth bool) (status int, ok bool, err error) {
	cmd, err := testkit.Command(context.Background(), "", args...)
	if err != nil {
		return 0, false, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	// An interrupt goes to the child, which ends its run; this process
	// waits for it, then cleans up.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, false, err
	}
	go func() {
		for sig := range sigs {
			cmd.Process.Signal(sig)
		}
	}()
	err = cmd.Wait()
	if veth {
		for _, ns := range vethNamespaces(cmd.Process.Pid) {
			exec.Command("ip", "netns", "del", ns).Run() // gone already if the child ended well
		}
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), true, nil
	}
	return 0, true, err
}

// loopbackUp brings up lo, which is down in a new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("SIOCGIFFLAGS lo: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("SIOCSIFFLAGS lo: %w", err)
	}
	return nil
}
