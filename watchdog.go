package caddyshaker

import (
	"time"

	"go.uber.org/zap"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// A probe's socket closed long after its SYN-ACK is a warning sign: at
// about 200 ms the kernel completes the handshake itself and the backend
// accepts a connection. The engine keeps the worst delay it has seen; the
// app checks it every watchEvery and warns when it passes closeDelayWarn,
// and again each time it grows.
//
// Probes that start late are the other sign of an engine that cannot keep
// up: the app warns once when probes start later than a quarter of their
// interval (an episode), and says when they are on time again.
var (
	closeDelayWarn = 50 * time.Millisecond
	watchEvery     = 5 * time.Second
)

// watchEngine logs, until stop is closed: a warning each time the engine's
// worst SYN-ACK-to-close delay passes warn and the worst already
// reported; a warning when probes start running late, and a line when
// they are on time again.
func watchEngine(stats func() shaker.Stats, logger func() *zap.Logger, stop <-chan struct{}, every, warn time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	reported := warn
	prev := stats()
	late := false
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		st := stats()
		l := logger()
		if worst := st.MaxCloseDelay; worst > reported {
			reported = worst
			if l != nil {
				l.Warn("probes closed late: at 200 ms after a SYN-ACK the kernel completes the handshake and the backend accepts a connection; the machine may be overloaded",
					zap.Duration("worst_synack_to_close", worst))
			}
		}
		newLate := st.Late - prev.Late
		switch {
		case newLate > 0 && !late:
			late = true
			if l != nil {
				l.Warn("probes starting late: addresses are probed less often than configured and failures are seen later; "+
					"give Caddy more CPU, raise loops (one per core), raise max_sockets if it is reached, or probe less often",
					zap.Uint64("late_probes", newLate),
					zap.Duration("lag", st.Lag),
					zap.Int("overdue", st.Overdue),
					zap.Int("loops", st.Loops),
					zap.Int("sockets", st.Sockets),
					zap.Int("max_sockets", st.MaxSockets))
			}
		case newLate == 0 && late:
			late = false
			if l != nil {
				l.Info("probes on time again")
			}
		}
		prev = st
	}
}
