// Package realservers holds only tests: the plugin's Caddy (its `dynamic
// shaker` and, with caddy-l4's `proxy`, its `lb_policy shaker`), each in
// connect mode and in raw mode (the shaker app's `probe_mode raw`),
// Caddy's and caddy-l4's own active health checks and HAProxy's `check`
// probe real servers that log or count every connection (PostgreSQL,
// MariaDB, OpenSSH, nginx, Redis), and the tests count what each checker
// left behind; real clients query through the layer-4 proxies, and
// failover through caddy-l4's proxy is measured with two PostgreSQL
// servers. See realservers_linux_test.go.
//
// The figures are in docs/testing.md ("On real servers"), from
//
//	REALSERVERS_PHASE=20s go test -count=1 -v -timeout 30m -run '^TestRealServers$' ./realservers   # as root
//
// on 2026-12-02: the plugin, in both modes, moved no count on any server
// in any phase (steady, 39 reloads, SIGTERM), where Caddy's and caddy-l4's
// checks showed on every server, about 200 times a phase.
package realservers
