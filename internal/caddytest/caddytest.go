// Package caddytest is what the in-process Caddy harnesses of the root
// package's tests and of the l4 module's tests share: loading a config
// (Load), the admin API read over HTTP and retried across a reload
// (AdminDo, Statuses), an events handler module that records what the
// tests subscribe it to (events.go), a bounded wait (WaitFor) and a
// listener started again on a port just freed (Relisten). Module tests
// reach it from the l4 module too: Go's internal rule goes by import path,
// and the l4 module's go.mod replaces the root module with this tree.
//
// It imports Caddy, so it is for the tests of the Caddy glue only: the
// shaker engine's and the health layer's tests use internal/testkit, which
// does not. Unlike testkit it builds on every system, as the l4 tests do.
package caddytest

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// Load runs cfg in this process's Caddy, reloading it even if it is the
// config running (caddy.Load forced); an error fails the test.
func Load(tb testing.TB, cfg []byte) {
	tb.Helper()
	if err := caddy.Load(cfg, true); err != nil {
		tb.Fatalf("caddy.Load: %v", err)
	}
}

// WaitFor polls cond every 2 ms until it holds, and returns how long that
// took; if within passes first, it fails the test, naming what.
func WaitFor(tb testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	tb.Helper()
	start := time.Now()
	for {
		if cond() {
			return time.Since(start)
		}
		if time.Since(start) > within {
			tb.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// AdminDo sends method to path on Caddy's admin endpoint at admin
// (host:port) and returns the status code and body. It retries a request
// that could not be sent, boundedly (50 times, 10 ms apart): right after a
// reload, Caddy stops the old admin server in the background, and a
// request may meet it closing. It fails the test if none could be sent.
func AdminDo(tb testing.TB, admin, method, path string) (int, string) {
	tb.Helper()
	req, err := http.NewRequest(method, "http://"+admin+path, nil)
	if err != nil {
		tb.Fatal(err)
	}
	var resp *http.Response
	for range 50 {
		if resp, err = http.DefaultClient.Do(req); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// Statuses reads GET /shaker/upstreams on the admin endpoint at admin
// (AdminDo), by address. Anything but a 200 with a list fails the test.
func Statuses(tb testing.TB, admin string) map[string]health.Status {
	tb.Helper()
	code, body := AdminDo(tb, admin, http.MethodGet, "/shaker/upstreams")
	if code != http.StatusOK {
		tb.Fatalf("admin: GET /shaker/upstreams: %d %s", code, body)
	}
	var list []health.Status
	if err := json.Unmarshal([]byte(body), &list); err != nil {
		tb.Fatal(err)
	}
	return ByAddress(list)
}

// ByAddress indexes statuses by address: the one way the tests turn the
// admin API's list, or the registry's, into a map.
func ByAddress(list []health.Status) map[string]health.Status {
	m := make(map[string]health.Status, len(list))
	for _, s := range list {
		m[s.Address] = s
	}
	return m
}

// Relisten listens on network and address, which a listener stopped a
// moment ago may still hold: it retries, boundedly (100 times, 10 ms
// apart), and fails the test, naming what listens, if the address stays
// taken.
func Relisten(tb testing.TB, network, address, what string) net.Listener {
	tb.Helper()
	var ln net.Listener
	var err error
	for range 100 {
		if ln, err = net.Listen(network, address); err == nil {
			return ln
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("%s: %v", what, err)
	return nil
}

// MustRead is the content of the file name; an error fails the test.
func MustRead(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}
