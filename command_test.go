//go:build linux

package caddyshaker

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

func TestShakeCommandRegistered(t *testing.T) {
	if _, ok := caddycmd.Commands()["shake"]; !ok {
		t.Fatal("caddy shake is not registered")
	}
}

func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func TestShakeCommand(t *testing.T) {
	l4 := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	l6 := testkit.NewListener(t, "tcp6", "[::1]:0")
	up4, up6 := l4.Addr.String(), l6.Addr.String()
	down := closedPort(t)

	var out bytes.Buffer
	code, err := runShake(context.Background(), []string{"--json", "--count", "2", "--interval", "10ms", up4, up6}, &out)
	if code != 0 || err != nil {
		t.Fatalf("all up: exit %d, %v\n%s", code, err, out.String())
	}
	var lines []shakeResult
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var r shakeResult
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		lines = append(lines, r)
	}
	if len(lines) != 4 {
		t.Fatalf("%d lines, want 2 rounds x 2 addresses:\n%s", len(lines), out.String())
	}
	for i, r := range lines {
		want := []string{up4, up6}[i%2]
		if r.Address != want || r.Result != "up" || r.RTTus < 0 || r.Error != "" {
			t.Fatalf("line %d: %+v, want %s up", i, r, want)
		}
	}

	out.Reset()
	code, err = runShake(context.Background(), []string{up4, down}, &out)
	if code != 1 || err == nil {
		t.Fatalf("one down: exit %d, %v, want 1", code, err)
	}
	text := out.String()
	if !strings.Contains(text, up4) || !strings.Contains(text, down+" ") || !strings.Contains(text, "refused") {
		t.Fatalf("text output:\n%s", text)
	}

	// localhost resolves to loopback addresses; each is probed.
	_, port, _ := net.SplitHostPort(up4)
	out.Reset()
	runShake(context.Background(), []string{"--json", "localhost:" + port}, &out)
	if !strings.Contains(out.String(), `"address":"127.0.0.1:`+port+`"`) || !strings.Contains(out.String(), `"target":"localhost:`+port+`"`) {
		t.Fatalf("localhost not resolved to 127.0.0.1:\n%s", out.String())
	}

	if n := (testkit.Listeners{l4, l6}).ProbeAccepts(t); n != 0 {
		t.Fatalf("listeners accepted %d connections from caddy shake", n)
	}
}

// TestShakeCommandRaw: --mode raw gives the same results, and the
// listeners accept nothing.
func TestShakeCommandRaw(t *testing.T) {
	if e, err := shaker.New(shaker.Options{Mode: shaker.ModeRaw, Loops: 1}); err != nil {
		t.Skipf("raw mode unavailable here (needs CAP_NET_RAW; CI runs as root): %v", err)
	} else {
		e.Close()
	}
	l4 := testkit.NewListener(t, "tcp4", "127.0.0.1:0")
	l6 := testkit.NewListener(t, "tcp6", "[::1]:0")
	down := closedPort(t)
	var out bytes.Buffer
	code, err := runShake(context.Background(), []string{"--json", "--mode", "raw", l4.Addr.String(), l6.Addr.String(), down}, &out)
	if code != 1 || err == nil {
		t.Fatalf("one down: exit %d, %v, want 1\n%s", code, err, out.String())
	}
	want := map[string]string{l4.Addr.String(): "up", l6.Addr.String(): "up", down: "refused"}
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var r shakeResult
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		if want[r.Address] != r.Result {
			t.Errorf("%s: %s, want %s (%+v)", r.Address, r.Result, want[r.Address], r)
		}
		delete(want, r.Address)
	}
	if len(want) != 0 {
		t.Errorf("not printed: %v\n%s", want, out.String())
	}
	if n := (testkit.Listeners{l4, l6}).ProbeAccepts(t); n != 0 {
		t.Fatalf("listeners accepted %d connections from caddy shake --mode raw", n)
	}
}

func TestShakeCommandUsage(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"--timeout", "0s", "127.0.0.1:1"},
		{"--timeout", "-1s", "127.0.0.1:1"},
		{"--count", "0", "127.0.0.1:1"},
		{"--interval", "0s", "127.0.0.1:1"},
		{"--bogus", "127.0.0.1:1"},
		{"127.0.0.1"},
		{"127.0.0.1:0"},
		{"127.0.0.1:70000"},
		{":80"},
	} {
		var out bytes.Buffer
		code, err := runShake(context.Background(), args, &out)
		if code != 2 || err == nil {
			t.Errorf("%q: exit %d, %v, want 2 with an error", args, code, err)
		}
	}
	// The message names the bad value.
	_, err := runShake(context.Background(), []string{"--count", "0", "127.0.0.1:1"}, new(bytes.Buffer))
	if !strings.Contains(err.Error(), "--count 0") {
		t.Errorf("error %q does not name the value", err)
	}
}
