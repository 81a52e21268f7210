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
	d := status.CloseDelays{WorstMs: msOf(st.MaxCloseDelay)}
	d.Count, d.P50Ms, d.P99Ms, d.P999Ms = closeDelayQuantiles(st)
	return d, true
}

// interface guard
var _ status.CloseDelaySource = statusSource{}
