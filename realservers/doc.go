// Package realservers holds only tests: the plugin's Caddy, Caddy's own
// active health checks and HAProxy's `check` probe real servers that log or
// count every connection (PostgreSQL, MariaDB, OpenSSH, nginx, Redis), and
// the tests count what each checker left behind. See realservers_linux_test.go.
package realservers
