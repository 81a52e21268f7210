//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// listeners is the child process that holds the listeners.
type listeners struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	addrs []netip.AddrPort
	net   string // its network namespace's /proc/net, for the kernel's counters
}

// startListeners starts the child in the network namespace ns ("": this
// process's).
func startListeners(n int, any bool, ns string) (*listeners, error) {
	cmd, err := testkit.Command(context.Background(), ns, "-serve", "-listeners", strconv.Itoa(n), "-serve-any="+strconv.FormatBool(any))
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
	// ip netns exec runs the command in its own place: the pid is the child's
	ls := &listeners{cmd: cmd, in: in, out: bufio.NewReader(out), net: fmt.Sprintf("/proc/%d/net", cmd.Process.Pid)}
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

// kernelCounters reads the kernel's TcpExt EmbryonicRsts and Tcp
// PassiveOpens where the listeners are (testkit.KernelCounters).
func (ls *listeners) kernelCounters() (resets, opens int64, err error) {
	return testkit.KernelCountersAt(ls.net)
}

// stop closes the child's stdin, on which it exits, and waits for it.
func (ls *listeners) stop() { stopByStdin(ls.in, ls.cmd) }

// stopByStdin closes in, the stdin of a child that exits when it closes
// (the listeners, the spinner), and waits for cmd; a child that does not
// exit within 5 s is killed.
func stopByStdin(in io.Closer, cmd *exec.Cmd) {
	in.Close()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
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
