//go:build linux

package main

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// measure is what one prober did.
type measure struct {
	probes, failed, accepted int64
	mallocs                  uint64 // heap allocations of this process while it probed
	wall, cpu                time.Duration
	maxCloseDelay            time.Duration
}

func (m *measure) add(o measure) {
	m.probes += o.probes
	m.failed += o.failed
	m.accepted += o.accepted
	m.mallocs += o.mallocs
	m.wall += o.wall
	m.cpu += o.cpu
	m.maxCloseDelay = max(m.maxCloseDelay, o.maxCloseDelay)
}

// allocsPerProbe is the process's heap allocations per probe while the
// prober ran: the prober's setup (an engine, its chains, goroutines) and
// the runtime's own are in it too, spread over the probes.
func (m *measure) allocsPerProbe() float64 {
	return float64(m.mallocs) / float64(max(m.probes, 1))
}

// mallocs is the process's heap allocations so far.
func mallocs() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.Mallocs
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
	malloc0 := mallocs()
	cpu0, wall0 := testkit.CPUTime(), time.Now()
	probes, failed, worst, err := p(ls.addrs, c, stop)
	m := measure{probes: probes, failed: failed, maxCloseDelay: worst,
		wall: time.Since(wall0), cpu: testkit.CPUTime() - cpu0, mallocs: mallocs() - malloc0}
	if err != nil {
		return m, err
	}
	// A socket left open past the kernel's 200 ms delayed-ACK timer becomes
	// a connection: the count waits that window out (see settled).
	after, err := ls.settled()
	m.accepted = after - before
	return m, err
}

// engineAsync is engine-async with these options: engine-async (the
// zero Options), engine-1loop, engine-raw-async.
func engineAsync(opts shaker.Options) prober {
	return func(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
		return engineChains(opts, addrs, c, stop)
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

// engineProbe is engine-probe with these options: engine-probe,
// engine-raw-probe.
func engineProbe(opts shaker.Options) prober {
	return func(addrs []netip.AddrPort, c int, stop <-chan struct{}) (int64, int64, time.Duration, error) {
		e, err := shaker.New(opts)
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
