//go:build linux

package main

import (
	"fmt"
	"html"
	"math"
	"os"
	"strings"
	"time"
)

// writeCheckerPlot writes an SVG of rows to path: three panels of
// horizontal bars, one bar per row: CPU per check, connections accepted per
// 1,000 checks while running, and connections accepted at stop.
func writeCheckerPlot(path, title, facts string, rows []checkerRow) error {
	const (
		width    = 1040
		left     = 250 // room for the row names
		right    = 300 // room for the value labels
		barH     = 26
		gap      = 10
		panelTop = 46 // panel title and axis note above the bars
		panelGap = 30
	)
	panels := []struct {
		title string
		value func(m cmeasure) float64
		label func(m cmeasure) string
	}{
		{
			"CPU per check, microseconds (user+sys time of the checker's process / checks)",
			func(m cmeasure) float64 { return m.cpuPerCheck() },
			func(m cmeasure) string {
				return fmt.Sprintf("%.1f µs  (%s checks/s)", m.cpuPerCheck(), thousands(m.rate()))
			},
		},
		{
			"Connections the backends accepted per 1,000 checks, while running",
			func(m cmeasure) float64 { return 1000 * float64(m.accepted) / float64(max(m.checks, 1)) },
			func(m cmeasure) string {
				return fmt.Sprintf("%.1f  (%s accepted)", 1000*float64(m.accepted)/float64(max(m.checks, 1)), thousands(float64(m.accepted)))
			},
		},
		{
			"Connections the backends accepted when the checker was stopped mid-run (stop + 300 ms)",
			func(m cmeasure) float64 { return float64(m.acceptedAtStop) },
			func(m cmeasure) string {
				if m.stops == 0 {
					return "not stopped"
				}
				return fmt.Sprintf("%s  in %d stops (stop took up to %v)", thousands(float64(m.acceptedAtStop)), m.stops, roundDuration(m.worstStop))
			},
		},
	}
	panelH := panelTop + len(rows)*(barH+gap)
	top := 78
	footer := 26 + 16*len(rows)
	height := top + len(panels)*(panelH+panelGap) + footer

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="30" font-size="20" font-weight="bold">%s</text>`+"\n", esc(title))
	fmt.Fprintf(&b, `<text x="20" y="54" font-size="13" fill="#444">%s</text>`+"\n", esc(facts))

	colors := map[string]string{"engine": "#2e7d32", "engine-raw": "#1b5e20", "engine-every": "#66bb6a", "engine-raw-every": "#388e3c",
		"shaker": "#43a047", "shaker-raw": "#2e7d32", "haproxy": "#1565c0", "haproxy-term": "#64b5f6", "caddy": "#ef6c00"}
	y := top
	for _, p := range panels {
		fmt.Fprintf(&b, `<text x="20" y="%d" font-size="15" font-weight="bold">%s</text>`+"\n", y+20, esc(p.title))
		maxV := 0.0
		for _, r := range rows {
			maxV = math.Max(maxV, p.value(r.m))
		}
		if maxV == 0 {
			maxV = 1
		}
		span := float64(width - left - right)
		base := y + panelTop - 10
		// Axis line at zero.
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#888"/>`+"\n", left, base-4, left, base+len(rows)*(barH+gap)-gap+4)
		for i, r := range rows {
			by := base + i*(barH+gap)
			v := p.value(r.m)
			w := span * v / maxV
			if v > 0 && w < 2 {
				w = 2
			}
			color := colors[r.name]
			if color == "" {
				color = "#757575"
			}
			fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="14" text-anchor="end">%s</text>`+"\n", left-10, by+barH/2+5, esc(shortName(r)))
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, by, w, barH, color)
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="13">%s</text>`+"\n", float64(left)+w+8, by+barH/2+5, esc(p.label(r.m)))
		}
		y += panelH + panelGap
	}
	fmt.Fprintf(&b, `<text x="20" y="%d" font-size="12" fill="#444">Checkers, all against the same loopback listeners that count accept():</text>`+"\n", y)
	for i, r := range rows {
		fmt.Fprintf(&b, `<text x="30" y="%d" font-size="12" fill="#444">%s: %s</text>`+"\n", y+16*(i+1), esc(shortName(r)), esc(strings.ReplaceAll(strings.TrimPrefix(r.label, shortName(r)+": "), "`", "")))
	}
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// shortName is a row's name in the plot.
func shortName(r checkerRow) string {
	switch r.name {
	case "engine":
		return "caddy-shaker engine"
	case "engine-raw":
		return "caddy-shaker engine, raw"
	case "engine-every":
		return "engine, scheduled"
	case "engine-raw-every":
		return "engine, raw, scheduled"
	case "haproxy":
		return "HAProxy, SIGUSR1"
	case "haproxy-term":
		return "HAProxy, SIGTERM"
	case "caddy":
		return "Caddy HTTP checks"
	}
	return r.name
}

// thousands formats v rounded, with thin separators: 116,781.
func thousands(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func esc(s string) string { return html.EscapeString(s) }

// roundDuration rounds d for a label: to the millisecond, or to the
// microsecond below one.
func roundDuration(d time.Duration) time.Duration {
	if d < time.Millisecond {
		return d.Round(time.Microsecond)
	}
	return d.Round(time.Millisecond)
}
