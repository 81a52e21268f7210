package shakerl4

import (
	"bufio"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/caddy-shaker/caddy-shaker"
	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/internal/caddytest"
)

// Probe settings of the integration tests.
const (
	tInterval = 50 * time.Millisecond
	tTimeout  = 40 * time.Millisecond
	tPasses   = 2
	tFails    = 3
	// kernelWindow is how long to wait, once nothing probes any more,
	// before counting what a backend accepted: a probe's socket left open
	// with a SYN-ACK in hand becomes a connection when the kernel sends
	// its delayed ACK, at most 200 ms after the SYN-ACK; 100 ms of slack.
	kernelWindow = 300 * time.Millisecond
)

// backend is a TCP server on 127.0.0.1 whose accept loop counts every
// connection: one that carries a line is a client's, through the proxy
// (it answers with its name); one that closes without a byte is what a
// leaked probe, or a full-connect health check, leaves. Sentinel
// connections ('S'), which flush makes, are not counted.
type backend struct {
	t    testing.TB
	name string
	addr string

	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
	wg     sync.WaitGroup // the accept loop and the connections it accepted
	sentCh chan struct{}

	silent bool // reads the line but answers nothing

	accepts atomic.Int64 // every accept() but sentinels'
	served  atomic.Int64 // connections that carried a line
	empty   atomic.Int64 // connections closed without a byte
}

func startBackend(t testing.TB, name string) *backend {
	t.Helper()
	return startBackendSilent(t, name, false)
}

// startBackendSilent starts a backend; a silent one answers nothing.
func startBackendSilent(t testing.TB, name string, silent bool) *backend {
	t.Helper()
	b := &backend{t: t, name: name, addr: "127.0.0.1:0", sentCh: make(chan struct{}, 16), silent: silent}
	b.start()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) start() {
	b.t.Helper()
	ln := caddytest.Relisten(b.t, "tcp4", b.addr, "backend "+b.name)
	b.mu.Lock()
	b.addr, b.ln, b.conns = ln.Addr().String(), ln, map[net.Conn]bool{}
	b.mu.Unlock()
	b.wg.Add(1)
	go b.acceptLoop(ln)
}

func (b *backend) acceptLoop(ln net.Listener) {
	defer b.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		if b.conns == nil { // stopping
			b.mu.Unlock()
			c.Close()
			return
		}
		b.conns[c] = true
		b.mu.Unlock()
		b.wg.Add(1)
		go b.serve(c)
	}
}

func (b *backend) serve(c net.Conn) {
	defer b.wg.Done()
	defer func() {
		b.mu.Lock()
		delete(b.conns, c)
		b.mu.Unlock()
		c.Close()
	}()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	first, err := r.ReadByte()
	if err != nil {
		b.accepts.Add(1)
		b.empty.Add(1)
		return
	}
	if first == 'S' {
		b.sentCh <- struct{}{}
		return
	}
	b.accepts.Add(1)
	if _, err := r.ReadString('\n'); err != nil {
		return
	}
	b.served.Add(1)
	if !b.silent {
		fmt.Fprintf(c, "%s\n", b.name)
	}
}

// stop closes the listener and every connection, and waits for them.
func (b *backend) stop() {
	b.mu.Lock()
	ln, conns := b.ln, b.conns
	b.ln, b.conns = nil, nil
	b.mu.Unlock()
	if ln == nil {
		return
	}
	ln.Close()
	for c := range conns {
		c.Close()
	}
	b.wg.Wait()
}

// flush makes a sentinel connection and waits until the backend has seen
// it: the accept queue is FIFO, so every connection a probe could have
// left in it has been accepted and classified by then (its own
// goroutine reads it first).
func (b *backend) flush() {
	b.t.Helper()
	c, err := net.DialTimeout("tcp4", b.addr, 5*time.Second)
	if err != nil {
		b.t.Fatalf("sentinel dial %s: %v", b.name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{'S'}); err != nil {
		b.t.Fatalf("sentinel write %s: %v", b.name, err)
	}
	select {
	case <-b.sentCh:
	case <-time.After(10 * time.Second):
		b.t.Fatalf("sentinel connection to %s never accepted", b.name)
	}
}

// emptyAccepts waits out the kernel's window (call it once nothing probes
// or checks any more), flushes the accept queues of the backends that
// serve, waits until every connection they accepted has been classified,
// and returns how many closed without a byte, by backend.
func emptyAccepts(t testing.TB, bs ...*backend) map[string]int64 {
	t.Helper()
	time.Sleep(kernelWindow) // a kernel timer: there is no event to await
	out := map[string]int64{}
	for _, b := range bs {
		b.mu.Lock()
		serving := b.ln != nil
		b.mu.Unlock()
		if serving {
			b.flush()
			waitFor(t, 6*time.Second, b.name+"'s connections classified", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.conns) == 0
			})
		}
		out[b.name] = b.empty.Load()
	}
	return out
}

// waitFor is caddytest.WaitFor: it polls cond every 2 ms until it holds
// or within has passed.
var waitFor = caddytest.WaitFor

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// through makes one connection through the proxy at addr: it sends a line
// and returns the names of the backends that answered ("" and an error
// when none did).
func through(addr string) (string, error) {
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		return "", err
	}
	var names []string
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		names = append(names, sc.Text())
	}
	if len(names) == 0 {
		if err := sc.Err(); err != nil {
			return "", err
		}
		return "", errors.New("no answer")
	}
	return strings.Join(names, "+"), nil
}

// eventCount is how many events name for host have been recorded (by
// caddytest's recorder, which the harness's config subscribes).
var eventCount = caddytest.EventCount

// waitEvent waits until there are more than before events name for host.
var waitEvent = caddytest.WaitEvent

// harness is Caddy running in this process: a layer4 server with a proxy
// handler in front of backends, admin on a free localhost port, logs at
// WARN and above in a JSON file.
type harness struct {
	t       testing.TB
	admin   string
	proxy   string
	logFile string
	level   string // of the logs written to logFile; default WARN
}

func newHarness(t testing.TB) *harness {
	t.Helper()
	h := &harness{
		t:       t,
		admin:   fmt.Sprintf("localhost:%d", freePort(t)),
		proxy:   fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		logFile: filepath.Join(t.TempDir(), "caddy.log"),
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	return h
}

// config is the whole Caddy config with this proxy handler (its JSON
// object, "handler" included).
func (h *harness) config(proxy map[string]any) []byte {
	cfg := map[string]any{
		"admin": map[string]any{"listen": h.admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":   cmp.Or(h.level, "WARN"),
			"writer":  map[string]any{"output": "file", "filename": h.logFile},
			"encoder": map[string]any{"format": "json"},
		}}},
		"apps": map[string]any{
			"events": caddytest.Subscribe("healthy", "unhealthy"),
			"layer4": map[string]any{"servers": map[string]any{"proxy": map[string]any{
				"listen": []string{h.proxy},
				"routes": []any{map[string]any{"handle": []any{proxy}}},
			}}},
		},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		h.t.Fatal(err)
	}
	return b
}

// load loads the config, reloading it if it is the same as the one
// running (caddy.Load forced).
func (h *harness) load(proxy map[string]any) {
	h.t.Helper()
	caddytest.Load(h.t, h.config(proxy))
}

// shakerProxy is a proxy handler's JSON with the shaker policy (inner and
// more of its fields in extra) over upstreams, each a list of dials.
func shakerProxy(extra map[string]any, upstreams ...[]string) map[string]any {
	sel := map[string]any{
		"policy":   "shaker",
		"interval": tInterval.String(),
		"timeout":  tTimeout.String(),
		"passes":   tPasses,
		"fails":    tFails,
	}
	for k, v := range extra {
		sel[k] = v
	}
	return map[string]any{
		"handler":        "proxy",
		"upstreams":      upstreamsJSON(upstreams...),
		"load_balancing": map[string]any{"selection": sel},
	}
}

func upstreamsJSON(upstreams ...[]string) []any {
	ups := make([]any, len(upstreams))
	for i, d := range upstreams {
		ups[i] = map[string]any{"dial": d}
	}
	return ups
}

// statuses are the admin API's statuses of the probed addresses
// (caddytest.Statuses, retried across a reload).
func (h *harness) statuses() map[string]health.Status {
	h.t.Helper()
	return caddytest.Statuses(h.t, h.admin)
}

// waitProbes waits until every address has at least n probe results.
func (h *harness) waitProbes(n uint64, within time.Duration, addrs ...string) {
	h.t.Helper()
	waitFor(h.t, within, fmt.Sprintf("%d probes of %v", n, addrs), func() bool {
		st := h.statuses()
		for _, a := range addrs {
			if st[a].Probes < n {
				return false
			}
		}
		return true
	})
}

// logs are the lines logged so far (WARN and above), as JSON objects.
func (h *harness) logs() []map[string]any {
	h.t.Helper()
	b, err := os.ReadFile(h.logFile)
	if err != nil && !os.IsNotExist(err) {
		h.t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range strings.Split(string(b), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// logged returns the first line whose message contains msg, or nil.
func (h *harness) logged(msg string) map[string]any {
	for _, l := range h.logs() {
		if s, _ := l["msg"].(string); strings.Contains(s, msg) {
			return l
		}
	}
	return nil
}

// spread makes n connections through the proxy, one at a time, and
// returns how many each backend (or set of backends) answered; "" counts
// the failures.
func spread(h *harness, n int) map[string]int {
	h.t.Helper()
	got := map[string]int{}
	for range n {
		name, _ := through(h.proxy)
		got[name]++
	}
	return got
}
