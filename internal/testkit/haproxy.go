//go:build linux

package testkit

import (
	"fmt"
	"time"
)

// HAProxyConfig is the head of the HAProxy config that the tests and the
// bench run HAProxy with as a checker to compare: one thread, its stats
// socket at dir/stats.sock, TCP mode, HAProxy's timeouts for a connection
// and a check timeout of check; with maxconn above 0, that many
// connections at most (HAProxy's default otherwise). The caller appends
// its listen sections.
func HAProxyConfig(dir string, maxconn int, check time.Duration) string {
	limit := ""
	if maxconn > 0 {
		limit = fmt.Sprintf("\tmaxconn %d\n", maxconn)
	}
	return fmt.Sprintf(`global
	nbthread 1
%s	stats socket %s/stats.sock mode 600 level admin

defaults
	mode tcp
	timeout connect 1s
	timeout client 10s
	timeout server 10s
	timeout check %dms
`, limit, dir, check.Milliseconds())
}
