//go:build linux

package main

import (
	"encoding/xml"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestThousands(t *testing.T) {
	for v, want := range map[float64]string{0: "0", 999: "999", 1000: "1,000", 116781.4: "116,781", 1234567: "1,234,567"} {
		if got := thousands(v); got != want {
			t.Errorf("thousands(%v) = %q, want %q", v, got, want)
		}
	}
}

// TestPlotIsWellFormed: the SVG parses as XML and names every checker and
// its figures, escaped.
func TestPlotIsWellFormed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.svg")
	rows := []checkerRow{
		{name: "engine", label: "caddy-shaker engine: x", m: cmeasure{checks: 1000, cpu: 10 * time.Millisecond, wall: time.Second, stops: 3}},
		{name: "haproxy-term", label: "HAProxy <2.6> & co", m: cmeasure{checks: 2000, cpu: 50 * time.Millisecond, wall: time.Second, acceptedAtStop: 1069, stops: 3}},
		{name: "caddy", label: "Caddy", m: cmeasure{checks: 500, accepted: 500, cpu: 100 * time.Millisecond, wall: time.Second, stops: 3}},
	}
	if err := writeCheckerPlot(path, "title & date", "facts", rows); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(strings.NewReader(string(b)))
	var text strings.Builder
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v", err)
		}
		if c, ok := tok.(xml.CharData); ok {
			text.Write(c)
			text.WriteString("\n")
		}
	}
	for _, want := range []string{"title & date", "caddy-shaker engine", "HAProxy, SIGTERM", "HAProxy <2.6> & co", "Caddy HTTP checks", "10.0 µs", "1,069  in 3 stops", "1000.0  (500 accepted)"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("plot text lacks %q:\n%s", want, text.String())
		}
	}
}

// TestExpandVeth: -backends veth's addresses are B's, the ports varying
// fastest, one per listener when -addresses is 0.
func TestExpandVeth(t *testing.T) {
	ls := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1000"), netip.MustParseAddrPort("127.0.0.1:2000")}
	got, err := expandVeth(ls, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"198.19.0.1:1000", "198.19.0.1:2000"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("expandVeth(ls, 0) = %v, want %v", got, want)
	}
	got, err = expandVeth(ls, 600)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 600 || got[5].String() != "198.19.0.3:2000" || got[599].String() != "198.19.1.44:2000" {
		t.Errorf("expandVeth(ls, 600): %d addresses, [5] %v, [599] %v", len(got), got[5], got[599])
	}
	prefix := netip.MustParsePrefix(vethPrefix)
	seen := map[netip.AddrPort]bool{}
	for _, a := range got {
		if !prefix.Contains(a.Addr()) || seen[a] {
			t.Fatalf("%v: outside %v or repeated", a, prefix)
		}
		seen[a] = true
	}
	if _, err := expandVeth(ls, 2*0xffff+1); err == nil {
		t.Error("expandVeth: more addresses than the prefix holds, and no error")
	}
	if _, err := expandVeth(ls, 2*0xffff); err != nil {
		t.Errorf("expandVeth: as many addresses as the prefix holds: %v", err)
	}
}

// TestRPSMask: one CPU's rps_cpus mask, as sysfs parses it.
func TestRPSMask(t *testing.T) {
	for cpu, want := range map[int]string{0: "00000001", 1: "00000002", 31: "80000000", 32: "00000001,00000000", 65: "00000002,00000000,00000000"} {
		if got := rpsMask(cpu); got != want {
			t.Errorf("rpsMask(%d) = %q, want %q", cpu, got, want)
		}
	}
}

// TestCore0Extra: the kernel's work over the window beyond its rate
// alone, the rate taken over both readings alone.
func TestCore0Extra(t *testing.T) {
	t0 := time.Unix(1000, 0)
	c := core0Meter{next: 6}
	// alone: 20 ms in 2 s before, 60 ms in 2 s after (20 ms/s); the
	// window: 30 s with 1,600 ms, of which 600 ms is the rate alone
	c.k = [6]time.Duration{0, 20 * time.Millisecond, 100 * time.Millisecond, 1700 * time.Millisecond, 2000 * time.Millisecond, 2060 * time.Millisecond}
	c.at = [6]time.Time{t0, t0.Add(2 * time.Second), t0.Add(10 * time.Second), t0.Add(40 * time.Second), t0.Add(45 * time.Second), t0.Add(47 * time.Second)}
	got, err := c.extra()
	if err != nil || got != time.Second {
		t.Errorf("extra() = %v, %v; want 1s", got, err)
	}
	c.next = 5
	if _, err := c.extra(); err == nil {
		t.Error("extra() with a mark missing: no error")
	}
}

// TestRatiosCore0: the core-0 ratio is given where both checkers have it,
// and -targets checks it as well as the process's.
func TestRatiosCore0(t *testing.T) {
	ct := map[string]*cmeasure{
		"shaker-raw": {checks: 1000, wall: time.Second, cpu: 3 * time.Millisecond, core0: 5 * time.Millisecond},
		"haproxy":    {checks: 1000, wall: time.Second, cpu: 10 * time.Millisecond, core0: 10 * time.Millisecond},
	}
	rs := checkerRatios(ct)
	if len(rs) != 1 || rs[0].a != "shaker-raw" || rs[0].cpu != 0.3 || rs[0].core0 != 0.5 {
		t.Fatalf("checkerRatios = %+v", rs)
	}
	miss, checked := speedTargets(nil, ct)
	if checked != 1 || len(miss) != 1 || !strings.Contains(miss[0], "core 0 in all, 0.50x") {
		t.Errorf("speedTargets: %d checked, missed %q", checked, miss)
	}
	ct["shaker-raw"].core0 = 0
	if rs := checkerRatios(ct); rs[0].core0 != 0 || strings.Contains(rs[0].line(), "core 0") {
		t.Errorf("without core 0 on one side: %+v, %q", rs[0], rs[0].line())
	}
	// with the spinner running, a core-0 figure missing is a miss, and so is a
	// CPU figure of 0 (under a tick), however low the ratio reads
	coreSpinner = &spinner{}
	defer func() { coreSpinner = nil }()
	if miss, _ := speedTargets(nil, ct); len(miss) != 1 || !strings.Contains(miss[0], "core 0 in all not measured") {
		t.Errorf("core 0 not measured: missed %q", miss)
	}
	ct["shaker-raw"].cpu, ct["shaker-raw"].core0 = 0, 5*time.Millisecond
	if miss, _ := speedTargets(nil, ct); len(miss) != 1 || !strings.Contains(miss[0], "not measured") {
		t.Errorf("CPU 0: missed %q", miss)
	}
}
