//go:build linux

package main

import (
	"encoding/xml"
	"io"
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
