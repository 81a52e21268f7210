package caddyshaker

import (
	"time"

	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/health"
	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Defaults of the health check settings, as an SRE would expect them
// (the same as HAProxy's `inter 2s rise 2 fall 3`).
const (
	DefaultInterval        = 2 * time.Second
	DefaultTimeout         = time.Second
	DefaultPasses          = 2
	DefaultFails           = 3
	DefaultResolveInterval = time.Minute
	DefaultResolveTimeout  = 5 * time.Second

	// DefaultJitterPercent is the default jitter: every interval varies
	// by up to 5% either way (HAProxy's docs find spread-checks of 2 to
	// 5 work well), which makes the worst-case detection time 5% of an
	// interval longer per failed probe.
	DefaultJitterPercent = 5

	// MinInterval is the shortest interval, fast_interval or
	// down_interval: below it an address would be probed back to back.
	// Jitter never takes an interval below it.
	MinInterval = health.MinInterval
)

// reg is the health state of every probed address, in the health layer.
// It lives at package level, as reverse_proxy's own health state does, so
// that it survives config reloads; the shaker app gives it its engine and
// is its observer.
var reg = health.NewRegistry()

func init() { reg.SetObserver(glueObserver{}) }

// glueObserver turns the health layer's news into metrics, logs and events,
// through the newest shaker app (the herald).
type glueObserver struct{}

// Probed counts a probe's result. It runs on the engine's loop.
func (glueObserver) Probed(res shaker.Result) { observeProbe(res) }

// Changed logs a transition and emits its event.
func (glueObserver) Changed(tr health.Transition) {
	herald := engines.herald.Load()
	if herald == nil {
		return
	}
	addr := tr.Addr.String()
	fields := []zap.Field{zap.String("upstream", tr.Name), zap.String("address", addr)}
	if tr.Rejoin {
		fields = append(fields, zap.Bool("up", tr.Up))
		if !tr.Up {
			fields = append(fields, zap.String("reason", tr.Reason()))
		}
		herald.logger.Info("upstream probed after maintenance", fields...)
	} else if tr.Up {
		fields = append(fields, zap.Duration("rtt", tr.RTT))
		if tr.First {
			// it counted as up already: no change of state, so no
			// info line and no event
			herald.logger.Debug("upstream up (first probe)", fields...)
			return
		}
		fields = append(fields, zap.Int("passes", tr.N))
		herald.logger.Info("upstream up", fields...)
	} else {
		fields = append(fields, zap.String("reason", tr.Reason()))
		if !tr.First {
			fields = append(fields, zap.Int("fails", tr.N))
		}
		herald.logger.Warn("upstream down", fields...)
	}
	if herald.events != nil {
		ev := "unhealthy"
		if tr.Up {
			ev = "healthy"
		}
		herald.events.Emit(herald.ctx, ev, map[string]any{"host": addr, "upstream": tr.Name})
	}
}

// LocalFailing logs when probes start and stop failing on this host.
func (glueObserver) LocalFailing(failing bool, err error) {
	herald := engines.herald.Load()
	if herald == nil {
		return
	}
	if failing {
		herald.logger.Error("probes failing on this host: backends keep their state until probes work again",
			zap.Error(err))
	} else {
		herald.logger.Info("probes working again on this host")
	}
}

// Status is the health of one probed address, as the admin API shows it.
type Status = health.Status
