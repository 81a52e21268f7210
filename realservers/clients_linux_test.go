//go:build linux

package realservers

import (
	"context"
	"net"
	"os/exec"
	"testing"
	"time"
)

// Real clients through the layer-4 proxies: while a checker that is also a
// TCP proxy in front of each server (caddy-l4's proxy, with the plugin's
// policy or with its own checks; HAProxy's `mode tcp` listen sections)
// checks them, a client connects through it and runs a real query
// (psql's SELECT 1, redis-cli's PING). Each query must work. The servers
// leave the clients' connections out of what they count (PostgreSQL: the
// sessions that logged in; Redis: one connection per query), so what is
// counted is still what the checkers left; the table shows the queries
// apart.

// queryable is a server a real client can query through a proxy.
type queryable interface {
	// query runs one query through addr, a proxy in front of the server:
	// a connection of the test's own, which read leaves out.
	query(t *testing.T, addr string) error
	queryLabel() string // the client and its query, for the table
}

// proxier is a checker that is a layer-4 proxy in front of each server.
type proxier interface {
	// proxyAddr is its address in front of the server named, or "".
	proxyAddr(server string) string
}

// clients: the client program each queryable server needs, and the Debian
// package that brings it.
var clients = map[string][2]string{
	"postgres": {"psql", "postgresql-client"},
	"redis":    {"redis-cli", "redis-tools"},
}

// clientQueries is how many queries a client runs through each proxy in
// the steady phase, spread over it; in the reload phase it runs one after
// each reload.
const clientQueries = 5

// queryClient returns s as a queryable server if it is one and its client
// is installed.
func queryClient(s server) (queryable, bool) {
	q, ok := s.(queryable)
	if !ok {
		return nil, false
	}
	if _, err := findBin(clients[s.name()][0]); err != nil {
		return nil, false
	}
	return q, true
}

// queryThrough runs one query through c's proxy in front of every
// queryable server, and counts those that worked in n, by server. It
// reports whether c is a proxy for any of them.
func queryThrough(t *testing.T, c checker, servers []server, n map[string]int64) bool {
	t.Helper()
	p, ok := c.(proxier)
	if !ok {
		return false
	}
	proxied := false
	for _, s := range servers {
		q, ok := queryClient(s)
		addr := p.proxyAddr(s.name())
		if !ok || addr == "" {
			continue
		}
		proxied = true
		if err := q.query(t, addr); err != nil {
			t.Errorf("%s: a client of %s through its proxy at %s: %v", c.name(), s.name(), addr, err)
			continue
		}
		n[s.name()]++
	}
	return proxied
}

// clientCmd is the command of the client program tool (findBin) to run
// against addr (host:port), with the arguments args makes of its host and
// port, bounded to 10 s: call cancel once it has run.
func clientCmd(t *testing.T, tool, addr string, args func(host, port string) []string) (cmd *exec.Cmd, cancel context.CancelFunc) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := findBin(tool)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	return exec.CommandContext(ctx, bin, args(host, port)...), cancel
}
