package caddyshaker

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// TestParseShake: the command line of `caddy shake`, parsed; bad usage is
// a usageError that names the bad value.
func TestParseShake(t *testing.T) {
	o, err := parseShake([]string{"--json", "--count", "3", "--timeout", "250ms", "--interval", "2s",
		"--resolve-timeout", "1s", "--mode", "raw", "127.0.0.1:80", "[::1]:8080", "localhost:443"})
	if err != nil {
		t.Fatal(err)
	}
	want := []shakeTarget{{"127.0.0.1:80", "127.0.0.1", 80}, {"[::1]:8080", "::1", 8080}, {"localhost:443", "localhost", 443}}
	if !o.asJSON || o.count != 3 || o.timeout != 250*time.Millisecond || o.interval != 2*time.Second ||
		o.resolveTimeout != time.Second || o.mode != shaker.ModeRaw || o.help || len(o.targets) != len(want) {
		t.Fatalf("parsed %+v", o)
	}
	for i, w := range want {
		if o.targets[i] != w {
			t.Errorf("target %d: %+v, want %+v", i, o.targets[i], w)
		}
	}
	if o, err := parseShake([]string{"127.0.0.1:1"}); err != nil || o.count != 1 || o.timeout != time.Second ||
		o.interval != time.Second || o.resolveTimeout != 5*time.Second || o.mode != shaker.ModeConnect || o.asJSON {
		t.Errorf("defaults: %+v, %v", o, err)
	}
	// --help stops before the rest is checked.
	if o, err := parseShake([]string{"--count", "0", "-h"}); err != nil || !o.help {
		t.Errorf("--help: %+v, %v", o, err)
	}
	for _, c := range []struct {
		args []string
		name string // what the message must name
	}{
		{[]string{"--timeout", "-1s", "127.0.0.1:1"}, "--timeout -1s"},
		{[]string{"--timeout", "soon", "127.0.0.1:1"}, `"soon"`},
		{[]string{"--count", "0", "127.0.0.1:1"}, "--count 0"},
		{[]string{"--count", "many", "127.0.0.1:1"}, `"many"`},
		{[]string{"--interval", "0s", "127.0.0.1:1"}, "--interval 0s"},
		{[]string{"--resolve-timeout", "0s", "127.0.0.1:1"}, "--resolve-timeout 0s"},
		{[]string{"--bogus", "127.0.0.1:1"}, "bogus"},
		{[]string{"--mode", "syn", "127.0.0.1:1"}, `--mode "syn"`},
		{[]string{"--mode", "", "127.0.0.1:1"}, `--mode ""`},
		{[]string{"127.0.0.1:70000"}, "70000"},
		{[]string{}, "no address"},
	} {
		_, err := parseShake(c.args)
		var ue usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), c.name) {
			t.Errorf("%q: %v, want a usage error naming %s", c.args, err, c.name)
		}
	}
}
