//go:build linux

package main

// What the comparison concludes: the ratios to quote, and what -check and
// -targets hold the probers and checkers of this project to.

import (
	"fmt"
	"math"
	"strings"
)

// ratio is one "a vs b, CPU per check" line of the comparison.
type ratio struct {
	a, b        string
	cpu, checks float64 // a's over b's
	core0       float64 // a's over b's, what they took from core 0 (-backends veth); 0 if not measured
}

func (r ratio) line() string {
	if r.core0 > 0 {
		return fmt.Sprintf("%s vs %s, CPU per check: %.2fx of its process, %.2fx of core 0 in all (checks/s %.2fx)", r.a, r.b, r.cpu, r.core0, r.checks)
	}
	return fmt.Sprintf("%s vs %s, CPU per check: %.2fx (checks/s %.2fx)", r.a, r.b, r.cpu, r.checks)
}

// checkerRatios compares, among the checkers that ran, raw mode with
// connect mode and each of ours with HAProxy (its soft-stop run; the
// hard-stop one if that alone ran): the checkers ran in turn in the same
// rounds, so their ratios are the figures to quote.
func checkerRatios(ctotals map[string]*cmeasure) []ratio {
	haproxy := "haproxy"
	if ctotals[haproxy] == nil {
		haproxy = "haproxy-term"
	}
	pairs := [][2]string{
		{"engine-raw", "engine"},
		{"engine-raw-every", "engine-every"},
		{"shaker-raw", "shaker"},
		{"engine", haproxy},
		{"engine-raw", haproxy},
		{"engine-every", haproxy},
		{"engine-raw-every", haproxy},
		{"shaker", haproxy},
		{"shaker-raw", haproxy},
	}
	var out []ratio
	for _, p := range pairs {
		a, b := ctotals[p[0]], ctotals[p[1]]
		if a == nil || b == nil || a.checks == 0 || b.checks == 0 {
			continue
		}
		r := ratio{a: p[0], b: p[1], cpu: a.cpuPerCheck() / b.cpuPerCheck(), checks: a.rate() / b.rate()}
		if a.core0 > 0 && b.core0 > 0 {
			r.core0 = a.core0PerCheck() / b.core0PerCheck()
		}
		out = append(out, r)
	}
	return out
}

// rawTarget is the most CPU per check raw mode's scheduled path may cost,
// as a fraction of HAProxy's in the same run (issue 17: at 10,000
// addresses at 1 s).
const rawTarget = 0.4

// speedTargets checks -targets over what ran: it returns the targets
// missed and how many were checked.
func speedTargets(totals map[string]*measure, ctotals map[string]*cmeasure) (miss []string, checked int) {
	if e, b := totals["engine-async"], totals["dialer-halfopen"]; e != nil && b != nil {
		checked++
		if r := e.cpuPerProbe() / b.cpuPerProbe(); r > 0.5 {
			miss = append(miss, fmt.Sprintf("engine-async CPU per probe %.2fx dialer-halfopen, target <= 0.5x", r))
		}
		if e.rate() < 100000 {
			miss = append(miss, fmt.Sprintf("engine-async %.0f probes/s, target >= 100000", e.rate()))
		}
	}
	for _, r := range checkerRatios(ctotals) {
		if (r.a == "engine-raw-every" || r.a == "shaker-raw") && strings.HasPrefix(r.b, "haproxy") {
			checked++
			if !(r.cpu > 0) || math.IsInf(r.cpu, 0) { // under a tick on one side: no figure
				miss = append(miss, fmt.Sprintf("%s vs %s: CPU per check not measured (%v)", r.a, r.b, r.cpu))
				continue
			}
			if coreSpinner != nil && !(r.core0 > 0) {
				miss = append(miss, fmt.Sprintf("%s vs %s: CPU per check on core 0 in all not measured (at or below 0 on one side)", r.a, r.b))
			}
			if r.cpu > rawTarget {
				miss = append(miss, fmt.Sprintf("%s CPU per check %.2fx %s, target <= %.1fx", r.a, r.cpu, r.b, rawTarget))
			}
			if r.core0 > rawTarget {
				miss = append(miss, fmt.Sprintf("%s CPU per check, core 0 in all, %.2fx %s, target <= %.1fx", r.a, r.core0, r.b, rawTarget))
			}
		}
	}
	return miss, checked
}

// checkOurs returns, for -check, what each prober and checker of ours that
// ran let through: no connection may be accepted from any of them, while it
// ran or at its stop. checked is how many of ours ran.
func checkOurs(order []string, totals map[string]*measure, checkerNames []string, ctotals map[string]*cmeasure) (miss []string, checked int) {
	for _, m := range order {
		if t := totals[m]; ours(m) && t != nil {
			checked++
			if t.accepted != 0 {
				miss = append(miss, fmt.Sprintf("backends accepted %d connections from prober %s", t.accepted, m))
			}
		}
	}
	for _, name := range checkerNames {
		if c := ctotals[name]; ours(name) && c != nil {
			checked++
			if c.accepted+c.acceptedAtStop != 0 {
				miss = append(miss, fmt.Sprintf("backends accepted %d connections from checker %s (%d at stop)", c.accepted+c.acceptedAtStop, name, c.acceptedAtStop))
			}
		}
	}
	return miss, checked
}
