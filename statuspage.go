package caddyshaker

import (
	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
	"github.com/caddy-shaker/caddy-shaker/status"
)

// The status page (http.handlers.shaker_status, the `shaker_status`
// directive) is package status. Importing it registers it, so that
// `xcaddy build --with` this module brings it; it reads the statuses of
// the registry, the admin API's, and the engine's close delays, those of
// GET /shaker/engine.
func init() { status.SetSource(statusSource{reg}) }

// statusSource is what the status page reads: the registry's checkers,
// and the running engine's close delays.
type statusSource struct{ *health.Registry }

// CloseDelays returns the running engine's close delays; none when no
// engine runs or it runs in raw mode, which leaves nothing to close.
func (statusSource) CloseDelays() (status.CloseDelays, bool) {
	e := engines.cur.Load()
	if e == nil || e.Mode() == shaker.ModeRaw {
		return status.CloseDelays{}, false
	}
	st := e.Stats()
	cs := closeDelayStatus(st)
	return status.CloseDelays{
		Count:   cs.Count,
		WorstMs: float64(st.MaxCloseDelay.Microseconds()) / 1000,
		P50Ms:   cs.P50Ms, P99Ms: cs.P99Ms, P999Ms: cs.P999Ms,
	}, true
}

// interface guard
var _ status.CloseDelaySource = statusSource{}
