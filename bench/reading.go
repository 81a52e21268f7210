//go:build linux

package main

// Reading while measuring: during the shaker checker's windows, the bench
// reads its Caddy as operators do, a Prometheus scrape of the admin
// endpoint's /metrics every -read-metrics (15 s, Prometheus's default) and
// the status page every -read-status (5 s, its refresh), the first of
// each as the window opens. It reports each read's latency and size, and
// the CPU the reads cost Caddy: its CPU during the reads less what its
// rate outside them (the probes) would have used in that time.

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

var (
	readMetricsEvery = flag.Duration("read-metrics", 15*time.Second, "with -compare: GET the shaker checker's /metrics this often during its windows (0: never)")
	readStatusEvery  = flag.Duration("read-status", 5*time.Second, "with -compare: GET the shaker checker's status page this often during its windows (0: never, and the page is not configured)")
)

// readStats are the reads of one kind over every window.
type readStats struct {
	n, errs    int
	bytes      int64
	wall       time.Duration // sum of the reads' latencies
	worst      time.Duration
	cpu        time.Duration // Caddy's CPU from each read's start to its end
	firstError string
}

func (s *readStats) add(o readStats) {
	s.n += o.n
	s.errs += o.errs
	s.bytes += o.bytes
	s.wall += o.wall
	s.worst = max(s.worst, o.worst)
	s.cpu += o.cpu
	if s.firstError == "" {
		s.firstError = o.firstError
	}
}

// windowReads are the reads of one window: started with startReads,
// ended with end.
type windowReads struct {
	totals   *readTotal // the checker's, which end adds to
	pid      int
	stop     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	kinds    map[string]*readStats
	t0       time.Time
	cpu0     time.Duration
	wall     time.Duration
	totalCPU time.Duration
}

// readTotal is one checker's reads over its windows, by kind, and the CPU
// and wall time of those windows, for the report.
type readTotal struct {
	kinds    map[string]*readStats
	wall     time.Duration
	totalCPU time.Duration
	rss      int64 // the most, at the windows' ends
}

// readTotals are the reads of each checker (shaker, shaker-raw), by name.
var readTotals = map[string]*readTotal{}

// readTotalOf is the readTotal of checker name.
func readTotalOf(name string) *readTotal {
	t := readTotals[name]
	if t == nil {
		t = &readTotal{kinds: map[string]*readStats{}}
		readTotals[name] = t
	}
	return t
}

// startReads starts reading pid's Caddy: url for each kind, that often;
// end adds the window's reads to totals.
func startReads(totals *readTotal, pid int, urls map[string]string, every map[string]time.Duration) *windowReads {
	w := &windowReads{totals: totals, pid: pid, stop: make(chan struct{}), kinds: map[string]*readStats{}, t0: time.Now()}
	w.cpu0, _ = testkit.ProcCPU(pid)
	for kind, url := range urls {
		d := every[kind]
		if d <= 0 {
			continue
		}
		w.kinds[kind] = &readStats{}
		w.wg.Go(func() {
			t := time.NewTicker(d)
			defer t.Stop()
			for {
				w.read(kind, url)
				select {
				case <-w.stop:
					return
				case <-t.C:
				}
			}
		})
	}
	return w
}

var readClient = http.Client{Timeout: 5 * time.Minute}

func (w *windowReads) read(kind, url string) {
	c0, _ := testkit.ProcCPU(w.pid)
	t0 := time.Now()
	var n int64
	resp, err := readClient.Get(url)
	if err == nil {
		n, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s", resp.Status)
		}
	}
	took := time.Since(t0)
	c1, _ := testkit.ProcCPU(w.pid)
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.kinds[kind]
	s.n++
	s.bytes += n
	s.wall += took
	s.worst = max(s.worst, took)
	s.cpu += c1 - c0
	if err != nil {
		s.errs++
		if s.firstError == "" {
			s.firstError = fmt.Sprintf("GET %s: %v", url, err)
		}
	}
}

// end stops the reads, waits for those under way, and adds the window's
// figures to its totals.
func (w *windowReads) end() {
	close(w.stop)
	w.wg.Wait()
	c1, _ := testkit.ProcCPU(w.pid)
	t := w.totals
	t.wall += time.Since(w.t0)
	t.totalCPU += c1 - w.cpu0
	for kind, s := range w.kinds {
		if t.kinds[kind] == nil {
			t.kinds[kind] = &readStats{}
		}
		t.kinds[kind].add(*s)
	}
	if rss, err := procRSS(w.pid); err == nil {
		t.rss = max(t.rss, rss)
	}
}

// procRSS is pid's resident set (VmRSS), in bytes.
func procRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// printReads reports the reads of checker name, if any were made, with
// the Caddy process's RSS per address beside its live heap.
func printReads(name string, addresses int, heap int64) {
	readTotals := readTotalOf(name)
	if readTotals.rss > 0 {
		fmt.Printf("%s: RSS of the Caddy process at the windows' ends %.1f MB, %.0f bytes per address (live heap %.0f bytes per address)\n",
			name, float64(readTotals.rss)/1e6, float64(readTotals.rss)/float64(addresses), float64(heap)/float64(max(addresses, 1)))
	}
	var readWall, readCPU time.Duration
	for _, s := range readTotals.kinds {
		readWall += s.wall
		readCPU += s.cpu
	}
	if len(readTotals.kinds) == 0 {
		return
	}
	// Caddy's CPU rate outside the reads: what the probes cost
	rate := 0.0
	if out := readTotals.wall - readWall; out > 0 {
		rate = max(0, float64(readTotals.totalCPU-readCPU)/float64(out))
	}
	fmt.Printf("\nRead while measuring (the %s checker's windows), Caddy's CPU outside the reads %.2f cores:\n\n", name, rate)
	fmt.Println("| read | every | reads | bytes each | latency mean / worst | Caddy CPU per read, above its rate outside reads | errors |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|")
	for _, kind := range []string{"metrics", "status"} {
		s := readTotals.kinds[kind]
		if s == nil || s.n == 0 {
			continue
		}
		every := *readMetricsEvery
		if kind == "status" {
			every = *readStatusEvery
		}
		extra := time.Duration(max(0, float64(s.cpu)-rate*float64(s.wall)) / float64(s.n))
		fmt.Printf("| %s | %v | %d | %s | %v / %v | %v | %d |\n", readLabel(kind), every, s.n,
			thousands(float64(s.bytes)/float64(s.n)), roundDuration(s.wall/time.Duration(s.n)), roundDuration(s.worst), roundDuration(extra), s.errs)
		if s.firstError != "" {
			fmt.Printf("| | first error: %s | | | | | |\n", s.firstError)
		}
	}
	fmt.Println("\nCPU is /proc/PID/stat's (10 ms ticks); reads of the two kinds may overlap, and then each counts the other's CPU too.")
}

func readLabel(kind string) string {
	if kind == "metrics" {
		return "GET /metrics (admin endpoint)"
	}
	return "status page (shaker_status, HTML)"
}
