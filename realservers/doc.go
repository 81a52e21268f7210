// Package realservers holds only tests: the plugin's Caddy (its `dynamic
// shaker` and, with caddy-l4's `proxy`, its `lb_policy shaker`), Caddy's
// and caddy-l4's own active health checks and HAProxy's `check` probe real
// servers that log or count every connection (PostgreSQL, MariaDB, OpenSSH,
// nginx, Redis), and the tests count what each checker left behind; real
// clients query through the layer-4 proxies, and failover through
// caddy-l4's proxy is measured with two PostgreSQL servers. See
// realservers_linux_test.go.
package realservers
