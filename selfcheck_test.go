//go:build linux

package caddyshaker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// halfOpenGauge scrapes caddy_shaker_half_open (gauges).
func halfOpenGauge(t *testing.T) float64 {
	t.Helper()
	g := gauges(t, "caddy_shaker_half_open")
	if len(g) != 1 {
		t.Fatalf("caddy_shaker_half_open: %d series, want 1", len(g))
	}
	return g[""]
}

// gauges scrapes the gauge name (gather): its value by label values,
// joined with commas ("" without labels).
func gauges(t *testing.T, name string) map[string]float64 {
	t.Helper()
	for _, mf := range gather(t) {
		if mf.GetName() != name {
			continue
		}
		out := map[string]float64{}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetValue())
			}
			out[strings.Join(labels, ",")] = m.GetGauge().GetValue()
		}
		return out
	}
	t.Fatalf("no %s", name)
	return nil
}

// buildGauge is caddy_shaker_half_open when only the build speaks: 1 where
// probes are half-open by construction.
func buildGauge() float64 {
	if shaker.HalfOpen() {
		return 1
	}
	return 0
}

// startTestEngine starts the process's engine for an app of the test's
// own that logs into an observer, with check as the self-check. It
// returns the app and its logs; the engine is released at cleanup if the
// test has not released it.
func startTestEngine(t *testing.T, check func(*shaker.Engine, context.Context) error) (*App, *observer.ObservedLogs) {
	t.Helper()
	if engines.cur.Load() != nil {
		t.Fatal("an engine is already running")
	}
	orig := selfCheck
	selfCheck = check
	t.Cleanup(func() { selfCheck = orig })
	a := new(App)
	return a, acquireTestApp(t, a)
}

// acquireTestApp gives a (an app of the test's own: its configuration
// fields only) a logger into an observer and acquires the engine for it,
// starting it if none runs. It returns the logs; a is released at cleanup
// if the test has not released it.
func acquireTestApp(t *testing.T, a *App) *observer.ObservedLogs {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	a.logger = zap.New(core)
	if err := engines.acquire(a); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		engines.mu.Lock()
		held := slices.Contains(engines.apps, a)
		engines.mu.Unlock()
		if held {
			engines.release(a)
		}
	})
	return logs
}

// waitCheckDone waits until the self-check is no longer pending.
func waitCheckDone(t *testing.T) string {
	t.Helper()
	var state string
	waitFor(t, 10*time.Second, "the self-check to end", func() bool {
		state, _, _ = selfCheckState()
		return state != checkPending
	})
	return state
}

// errorLines returns the Error-level log lines.
func errorLines(logs *observer.ObservedLogs) []observer.LoggedEntry {
	return logs.FilterLevelExact(zapcore.ErrorLevel).All()
}

// TestSelfCheckFailed: a failing self-check sets the gauge to 0, the
// admin API's self_check to "failed" with the error and half_open to
// false, gives advice, and logs one error that says what it means for the
// backends. A new engine checks again, and a passing check says "ok".
func TestSelfCheckFailed(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		msg  []string // in the error line
	}{
		{"accepted", fmt.Errorf("shaker: self-check: the listener on 127.0.0.1:1 accepted a probe's connection: %w", shaker.ErrNotHalfOpen),
			[]string{"NOT half-open", "accept()s a real connection per probe", "log and count", "delayed ACK", "gVisor", "non-Linux"}},
		{"could not probe", fmt.Errorf("shaker: self-check: probe of its own listener 127.0.0.1:1 failed: %w", shaker.ErrTimeout),
			[]string{"could not probe its own listener", "accept()s a real connection per probe", "gVisor", "non-Linux"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, logs := startTestEngine(t, func(*shaker.Engine, context.Context) error { return tc.err })
			if got := waitCheckDone(t); got != checkFailed {
				t.Fatalf("self-check state %q, want %q", got, checkFailed)
			}
			if g := halfOpenGauge(t); g != 0 {
				t.Errorf("caddy_shaker_half_open %v after a failed self-check, want 0", g)
			}
			es := engineStatus()
			if es.SelfCheck != checkFailed || es.SelfCheckError != tc.err.Error() || es.HalfOpen || !es.Running {
				t.Errorf("engine status %+v: want running, self_check failed with %q, half_open false", es, tc.err)
			}
			if !strings.Contains(es.Advice, "self-check failed") {
				t.Errorf("advice %q does not say what to do about the failed self-check", es.Advice)
			}
			// release waits for the check's goroutine: its logging is over.
			if err := engines.release(a); err != nil {
				t.Fatal(err)
			}
			lines := errorLines(logs)
			if len(lines) != 1 {
				t.Fatalf("%d error lines, want 1: %v", len(lines), lines)
			}
			for _, s := range tc.msg {
				if !strings.Contains(lines[0].Message, s) {
					t.Errorf("error line %q does not say %q", lines[0].Message, s)
				}
			}
			if got := lines[0].ContextMap()["error"]; got != tc.err.Error() {
				t.Errorf("error field %v, want %q", got, tc.err)
			}
			if es := engineStatus(); es.SelfCheck != checkNotRun || es.Running {
				t.Errorf("after release: %+v, want self_check %q", es, checkNotRun)
			}

			// A new engine runs the check again; this time it passes.
			calls := 0
			a, logs = startTestEngine(t, func(*shaker.Engine, context.Context) error { calls++; return nil })
			if got := waitCheckDone(t); got != checkOK {
				t.Fatalf("self-check state %q, want %q", got, checkOK)
			}
			// 1, unless the build has no half-open probes (shaker_fallback)
			if g := halfOpenGauge(t); g != buildGauge() {
				t.Errorf("caddy_shaker_half_open %v after a passed self-check, want %v", g, buildGauge())
			}
			if es := engineStatus(); es.SelfCheck != checkOK || es.SelfCheckError != "" || es.HalfOpen != shaker.HalfOpen() || es.Advice != "" {
				t.Errorf("engine status %+v: want self_check ok, half_open %v, no advice", es, shaker.HalfOpen())
			}
			if err := engines.release(a); err != nil {
				t.Fatal(err)
			}
			if calls != 1 {
				t.Errorf("the new engine ran the self-check %d times, want 1", calls)
			}
			if n := len(errorLines(logs)); n != 0 {
				t.Errorf("%d error lines after a passed self-check", n)
			}
			if n := logs.FilterMessageSnippet("self-check passed").Len(); n != 1 {
				t.Errorf("%d 'self-check passed' lines, want 1", n)
			}
		})
	}
}

// TestSelfCheckPending: while the check runs, the gauge and half_open
// say what the build says, and self_check is "pending"; Provision (here
// acquire) does not wait for it.
func TestSelfCheckPending(t *testing.T) {
	entered, proceed := make(chan struct{}), make(chan struct{})
	a, _ := startTestEngine(t, func(_ *shaker.Engine, ctx context.Context) error {
		close(entered)
		select {
		case <-proceed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	<-entered
	if g, want := halfOpenGauge(t), buildGauge(); g != want {
		t.Errorf("caddy_shaker_half_open %v while pending, want %v (shaker.HalfOpen)", g, want)
	}
	if es := engineStatus(); es.SelfCheck != checkPending || es.HalfOpen != shaker.HalfOpen() {
		t.Errorf("engine status %+v: want self_check pending, half_open %v", es, shaker.HalfOpen())
	}
	close(proceed)
	if got := waitCheckDone(t); got != checkOK {
		t.Fatalf("self-check state %q, want ok", got)
	}
	if err := engines.release(a); err != nil {
		t.Fatal(err)
	}
}

// TestSelfCheckEngineClosed: an engine closed while its self-check
// probes gives no verdict ("not run"), not a failure, and no error line;
// releasing an engine in the middle of its check neither hangs nor logs
// an error.
func TestSelfCheckEngineClosed(t *testing.T) {
	t.Run("closed under the check", func(t *testing.T) {
		entered, proceed := make(chan struct{}), make(chan struct{})
		a, logs := startTestEngine(t, func(e *shaker.Engine, ctx context.Context) error {
			close(entered)
			<-proceed
			return e.SelfCheck(ctx) // its probes meet a closed engine
		})
		<-entered
		engines.cur.Load().Close()
		close(proceed)
		if got := waitCheckDone(t); got != checkNotRun {
			t.Errorf("self-check of a closed engine: %q, want %q", got, checkNotRun)
		}
		if es := engineStatus(); es.HalfOpen != shaker.HalfOpen() || es.SelfCheckError != "" {
			t.Errorf("engine status %+v: a closed engine's check must not refute half_open", es)
		}
		releaseWithin(t, a)
		if lines := errorLines(logs); len(lines) != 0 {
			t.Errorf("error lines for a closed engine's check: %v", lines)
		}
	})
	t.Run("released during the check", func(t *testing.T) {
		for round := range 5 {
			entered := make(chan struct{})
			var returned atomic.Bool // the check returned, its context cancelled
			a, logs := startTestEngine(t, func(e *shaker.Engine, ctx context.Context) error {
				close(entered)
				err := e.SelfCheck(ctx)
				<-ctx.Done()
				returned.Store(errors.Is(ctx.Err(), context.Canceled)) // by release, not its timeout
				return err
			})
			<-entered
			releaseWithin(t, a)
			if !returned.Load() {
				t.Errorf("round %d: release returned before the self-check ended, or did not cancel it", round)
			}
			if state, _, _ := selfCheckState(); state != checkNotRun {
				t.Errorf("round %d: self-check %q after release, want %q", round, state, checkNotRun)
			}
			if lines := errorLines(logs); len(lines) != 0 {
				t.Errorf("round %d: error lines for a released engine's check: %v", round, lines)
			}
		}
	})
}

// releaseWithin releases a's engine, failing the test if that hangs.
func releaseWithin(t *testing.T, a *App) {
	t.Helper()
	released := make(chan error, 1)
	go func() { released <- engines.release(a) }()
	var err error
	waitFor(t, 10*time.Second, "release (a hang)", func() bool {
		select {
		case err = <-released:
			return true
		default:
			return false
		}
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSelfCheckNotInProbesTotal: the self-check's probes count in the
// engine's own figures but, by design, not in caddy_shaker_probes_total,
// which counts the probes of upstreams; its help says so.
func TestSelfCheckNotInProbesTotal(t *testing.T) {
	initMetrics()
	probesTotal := func() float64 {
		var sum float64
		for o := shaker.Up; o <= shaker.Failed; o++ {
			var m dto.Metric
			if err := shakerMetrics.byOutcome[o].Write(&m); err != nil {
				t.Fatal(err)
			}
			sum += m.GetCounter().GetValue()
		}
		return sum
	}
	before := probesTotal()
	startTestEngine(t, (*shaker.Engine).SelfCheck)
	if state := waitCheckDone(t); state != checkOK {
		t.Skipf("self-check %s here: %s", state, func() string { _, e, _ := selfCheckState(); return e }())
	}
	st := engines.cur.Load().Stats()
	if st.Up < 3 || st.CloseDelay.Count() < 3 {
		t.Errorf("engine stats after the self-check: %d up, %d close delays; want its 3 probes", st.Up, st.CloseDelay.Count())
	}
	if after := probesTotal(); after != before {
		t.Errorf("caddy_shaker_probes_total went from %v to %v with only the self-check's probes", before, after)
	}
	if desc := shakerMetrics.byOutcome[shaker.Up].Desc().String(); !strings.Contains(desc, "self-check") || !strings.Contains(desc, "not counted") {
		t.Errorf("caddy_shaker_probes_total's help does not say the self-check is not counted: %s", desc)
	}
}
