//go:build linux

package realservers

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-shaker/caddy-shaker/internal/testkit"
)

// The servers: throwaway instances in the test's temporary directory, each
// set to log or count every connection it accepts. Each one says what it
// counts (its metrics) and reads those counts with the test's own
// connections taken out.

// What the test's control connection (one plain connect, or one request
// for nginx) must do to a metric.
const (
	ctlOne        = 1  // move it by exactly one
	ctlAtLeastOne = -1 // move it by one or more
	ctlNone       = 0  // leave it
)

// metric is one thing a server counts.
type metric struct {
	key   string
	label string // for the table
	// control is what the test's own control connection does to it.
	control int64
	// connects: every full connection moves it, so Caddy's HTTP checks,
	// which connect, must.
	connects bool
	// bare: a bare connection (connect, close, nothing sent) moves it, so
	// caddy-l4's active checks, which are that, must.
	bare bool
}

// server is a running instance of a real server.
type server interface {
	name() string
	label() string  // name and version, for the table
	target() string // host:port the checkers probe
	metrics() []metric
	// read returns the metrics now, cumulative, without the test's own
	// connections (those read makes to ask a server for its counters).
	read(t *testing.T) map[string]int64
	// touch makes the test's control connection.
	touch(t *testing.T)
}

// hostCache is a server that blocks client hosts after too many failed
// connects (MariaDB's max_connect_errors).
type hostCache interface {
	flushHosts(t *testing.T)
	// blocked says whether the checkers' host is blocked now.
	blocked(t *testing.T) bool
}

// serverSpec is a server the suite knows how to run.
type serverSpec struct {
	name  string
	find  func() (string, error) // its binary, or what is missing
	start func(t *testing.T, env *testEnv, bin string) server
}

var serverSpecs = []serverSpec{
	{"postgres", findPostgres, startPostgres},
	{"mariadb", findMariaDB, startMariaDB},
	{"sshd", findSSHD, startSSHD},
	{"nginx", func() (string, error) { return findBin("nginx") }, startNginx},
	{"redis", func() (string, error) { return findBin("redis-server") }, startRedis},
}

// debianPackage names the package that brings a server, for skip messages.
var debianPackage = map[string]string{
	"postgres": "postgresql",
	"mariadb":  "mariadb-server",
	"sshd":     "openssh-server",
	"nginx":    "nginx",
	"redis":    "redis-server",
	"haproxy":  "haproxy",
}

// findBin looks for the first of names on PATH, then in /usr/sbin and
// /usr/bin (root's PATH may lack /usr/sbin).
func findBin(names ...string) (string, error) {
	for _, n := range names {
		if p, err := exec.LookPath(n); err == nil {
			return p, nil
		}
		for _, d := range []string{"/usr/sbin", "/usr/bin", "/usr/local/sbin"} {
			if st, err := os.Stat(filepath.Join(d, n)); err == nil && st.Mode()&0o111 != 0 {
				return filepath.Join(d, n), nil
			}
		}
	}
	return "", fmt.Errorf("no %s", strings.Join(names, " or "))
}

// ---- PostgreSQL ----

type postgres struct {
	p         *proc
	addr, ver string
	base      int64 // log lines once it was ready
}

// findPostgres finds Debian's /usr/lib/postgresql/N/bin/postgres (newest
// N), or postgres on PATH.
func findPostgres() (string, error) {
	ms, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	slices.SortFunc(ms, func(a, b string) int {
		va, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(filepath.Dir(a))), 64)
		vb, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(filepath.Dir(b))), 64)
		return int(va*100) - int(vb*100)
	})
	if len(ms) > 0 {
		return ms[len(ms)-1], nil
	}
	return findBin("postgres")
}

func startPostgres(t *testing.T, env *testEnv, bin string) server {
	bin, data, cred := initPostgres(t, env, bin, "pgdata")
	port := testkit.FreePort(t)
	s := &postgres{addr: fmt.Sprintf("127.0.0.1:%d", port), ver: version(bin, "postgres", "--version")}
	s.p = runPostgres(t, bin, data, cred, port, filepath.Join(env.dir, "postgres.log"))
	s.base, _ = countLines(s.p.output(), "")
	return s
}

// initPostgres makes a cluster in env.dir/name, owned by the postgres
// user: postgres's real path, the cluster's directory and the user.
func initPostgres(t *testing.T, env *testEnv, bin, name string) (string, string, *syscall.Credential) {
	t.Helper()
	// The real path: initdb lives beside postgres (PATH may hold links).
	if r, err := filepath.EvalSymlinks(bin); err == nil {
		bin = r
	}
	initdb := filepath.Join(filepath.Dir(bin), "initdb")
	cred, _ := account(t, "postgres") // postgres refuses to run as root
	data := ownedDir(t, env.dir, name, cred)
	run(t, cred, initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
	return bin, data, cred
}

// runPostgres starts postgres on the cluster data at 127.0.0.1:port,
// logging to logPath, and returns once it accepts connections. SIGINT (a
// fast shutdown) stops it.
func runPostgres(t *testing.T, bin, data string, cred *syscall.Credential, port int, logPath string) *proc {
	t.Helper()
	p := startProc(t, "postgres", logPath, data, cred, syscall.SIGINT, bin,
		"-D", data,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "port="+strconv.Itoa(port),
		"-c", "unix_socket_directories=",
		"-c", "log_connections=on", // every accepted connection: "connection received"
		"-c", "log_checkpoints=off",
		"-c", "logging_collector=off",
		"-c", "log_line_prefix=%m [%p] ",
		"-c", "shared_buffers=16MB",
		"-c", "max_connections=20",
		"-c", "fsync=off")
	waitLog(t, p, "database system is ready to accept connections", 60*time.Second)
	return p
}

func (s *postgres) name() string   { return "postgres" }
func (s *postgres) target() string { return s.addr }
func (s *postgres) label() string {
	if f := strings.Fields(s.ver); len(f) >= 3 {
		return "PostgreSQL " + f[2]
	}
	return "PostgreSQL"
}

func (s *postgres) metrics() []metric {
	return []metric{
		{"received", "log lines `connection received` (`log_connections = on`)", ctlOne, true, true},
		{"lines", "log lines, any", ctlOne, true, true},
	}
}

// read counts the log's lines, leaving out the sessions of the test's own
// clients (psql through a proxy, which log in): their backend logs
// "connection received" and then "connection authorized". No checker logs
// in.
func (s *postgres) read(t *testing.T) map[string]int64 {
	var all, rec int64
	for _, l := range withoutClients(s.p.output()) {
		all++
		if strings.Contains(l, "connection received") {
			rec++
		}
	}
	return map[string]int64{"received": rec, "lines": all - s.base}
}

// withoutClients returns the lines of a PostgreSQL log (log_line_prefix
// "%m [%p] ") without those of sessions that logged in. A session is a
// backend's lines from its "connection received" on (a pid may come back
// for a later session).
func withoutClients(log string) []string {
	var lines []string
	session := map[string]int{} // pid -> index of its current session
	var sessions []bool         // by index: logged in
	var of []int                // by line: its session's index, or -1
	for l := range strings.Lines(log) {
		pid := ""
		if _, rest, ok := strings.Cut(l, " ["); ok {
			pid, _, _ = strings.Cut(rest, "] ")
		}
		if strings.Contains(l, "connection received") {
			session[pid] = len(sessions)
			sessions = append(sessions, false)
		}
		i, ok := session[pid]
		if !ok {
			i = -1
		} else if strings.Contains(l, "connection authorized") {
			sessions[i] = true
		}
		lines = append(lines, l)
		of = append(of, i)
	}
	out := lines[:0]
	for n, l := range lines {
		if of[n] < 0 || !sessions[of[n]] {
			out = append(out, l)
		}
	}
	return out
}

// query runs `SELECT 1` with psql through addr, a proxy in front of the
// server: one session of the test's own, which read leaves out.
func (s *postgres) query(t *testing.T, addr string) error {
	t.Helper()
	out, err := psql(t, addr, "SELECT 1")
	if err == nil && out != "1" {
		err = fmt.Errorf("psql: SELECT 1 answered %q", out)
	}
	return err
}

func (s *postgres) queryLabel() string { return "`psql -c 'SELECT 1'`" }

// psql runs one query with psql at addr (host:port) as the postgres user,
// on one connection (no SSL, no GSS attempt), within 10 s, and returns its
// unaligned output.
func psql(t *testing.T, addr, sql string) (string, error) {
	t.Helper()
	cmd, cancel := clientCmd(t, "psql", addr, func(host, port string) []string {
		return []string{"-X", "-w", "-q", "-A", "-t", "-h", host, "-p", port, "-U", "postgres", "-d", "postgres", "-c", sql}
	})
	defer cancel()
	cmd.Env = append(os.Environ(), "LANG=C", "LC_ALL=C", "PGSSLMODE=disable", "PGGSSENCMODE=disable",
		"PGCONNECT_TIMEOUT=5", "PGAPPNAME=realservers")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("psql %s: %v: %s", addr, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

func (s *postgres) touch(t *testing.T) { plainConnect(t, s.addr) }

// plainConnect opens a TCP connection to addr and closes it without
// sending anything.
func plainConnect(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// ---- MariaDB ----

// findMariaDB finds mariadbd, and the client and installer it needs.
func findMariaDB() (string, error) {
	bin, err := findBin("mariadbd", "mysqld")
	_, err1 := findBin("mariadb", "mysql")
	_, err2 := findBin("mariadb-install-db", "mysql_install_db")
	return bin, errors.Join(err, err1, err2)
}

// MariaDB exempts loopback clients from its host cache, so it runs in a
// network namespace of its own at mariadbAddr, reached over a veth pair
// from the test's namespace, where the checkers have checkersAddr.
const (
	mariadbAddr  = "198.18.0.1"
	checkersAddr = "198.18.0.2"
	// maxConnectErrors: MariaDB blocks a host after this many failed
	// connects in a row (its default is 100).
	maxConnectErrors = 10
)

type mariadb struct {
	p              *proc
	addr, ver      string
	client, socket string
	own            int64 // connections the test made to read counters
	base           int64 // error-log lines once it was ready
}

func startMariaDB(t *testing.T, env *testEnv, bin string) server {
	if env.dbns == "" {
		t.Fatal("no namespace for MariaDB")
	}
	client, err1 := findBin("mariadb", "mysql")
	install, err2 := findBin("mariadb-install-db", "mysql_install_db")
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	data := ownedDir(t, env.dir, "mariadb", nil)
	run(t, nil, install, "--no-defaults", "--datadir="+data, "--user=root",
		"--auth-root-authentication-method=normal", "--skip-test-db")
	// MariaDB's host cache holds a client host only once its address
	// resolves, so the namespace gets a hosts file naming both ends: ip
	// netns exec gives mariadbd a mount namespace of its own, where that
	// file is bind-mounted over /etc/hosts. No name is looked up in DNS.
	hosts := filepath.Join(env.dir, "hosts")
	if err := os.WriteFile(hosts, []byte("127.0.0.1 localhost\n"+mariadbAddr+" db.realservers.test\n"+
		checkersAddr+" proxy.realservers.test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	port := testkit.FreePort(t)
	s := &mariadb{
		addr:   net.JoinHostPort(mariadbAddr, strconv.Itoa(port)),
		ver:    version(bin, "Ver", "--version"),
		client: client,
		socket: filepath.Join(data, "mariadb.sock"),
	}
	errlog := filepath.Join(env.dir, "mariadb.err")
	s.p = startProc(t, "mariadbd", errlog, data, nil, syscall.SIGTERM, "ip",
		"netns", "exec", env.dbns, "sh", "-c", `mount --bind "$0" /etc/hosts && exec "$@"`, hosts,
		bin, "--no-defaults",
		"--datadir="+data,
		"--socket="+s.socket,
		"--pid-file="+filepath.Join(data, "mariadb.pid"),
		"--tmpdir="+data,
		"--port="+strconv.Itoa(port),
		"--bind-address="+mariadbAddr,
		"--user=root",
		"--skip-grant-tables", // any client may connect: the checks reach the handshake
		"--max-connect-errors="+strconv.Itoa(maxConnectErrors),
		"--log-warnings=4", // logs each aborted connection
		"--innodb-buffer-pool-size=32M",
		"--performance-schema=off")
	waitLog(t, s.p, "ready for connections", 60*time.Second)
	s.base, _ = countLines(s.p.output(), "")
	return s
}

func (s *mariadb) name() string   { return "mariadb" }
func (s *mariadb) target() string { return s.addr }
func (s *mariadb) label() string {
	if f := strings.Fields(s.ver); len(f) >= 3 {
		v, _, _ := strings.Cut(f[2], "-")
		return "MariaDB " + v
	}
	return "MariaDB"
}

func (s *mariadb) metrics() []metric {
	return []metric{
		{"connections", "`Connections`", ctlOne, true, true},
		{"aborted", "`Aborted_connects`", ctlOne, true, true},
		{"errlog", "error-log lines (`log_warnings = 4`)", ctlAtLeastOne, true, true},
	}
}

// query runs SQL through the Unix socket: one connection of the test's own.
func (s *mariadb) query(t *testing.T, sql string) string {
	t.Helper()
	s.own++
	return run(t, nil, s.client, "--no-defaults", "-S", s.socket, "-u", "root", "-N", "-B", "-e", sql)
}

func (s *mariadb) read(t *testing.T) map[string]int64 {
	out := s.query(t, "SHOW GLOBAL STATUS WHERE Variable_name IN ('Connections', 'Aborted_connects')")
	m := map[string]int64{}
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("SHOW GLOBAL STATUS: %q", line)
		}
		switch f[0] {
		case "Connections":
			m["connections"] = n - s.own // Connections counts the one asking
		case "Aborted_connects":
			m["aborted"] = n
		}
	}
	if len(m) != 2 {
		t.Fatalf("SHOW GLOBAL STATUS: %q", out)
	}
	all, _ := countLines(s.p.output(), "")
	m["errlog"] = all - s.base
	return m
}

func (s *mariadb) touch(t *testing.T) { plainConnect(t, s.addr) }

func (s *mariadb) flushHosts(t *testing.T) { s.query(t, "FLUSH HOSTS") }

// blocked connects from the checkers' address and reads MariaDB's first
// packet: its greeting, or error 1129 (ER_HOST_IS_BLOCKED).
func (s *mariadb) blocked(t *testing.T) bool {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if a := c.LocalAddr().(*net.TCPAddr).IP.String(); a != checkersAddr {
		t.Fatalf("connected to MariaDB from %s, not the checkers' %s", a, checkersAddr)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("MariaDB's first packet: %v", err)
	}
	body := make([]byte, int(hdr[0])|int(hdr[1])<<8|int(hdr[2])<<16)
	if _, err := io.ReadFull(c, body); err != nil {
		t.Fatalf("MariaDB's first packet: %v", err)
	}
	if len(body) >= 3 && body[0] == 0xff {
		if code := binary.LittleEndian.Uint16(body[1:3]); code == 1129 {
			return true
		}
		t.Fatalf("MariaDB answered with an error: %q", body[3:])
	}
	return false
}

// ---- OpenSSH ----

// findSSHD finds sshd and ssh-keygen (Debian's openssh-client).
func findSSHD() (string, error) {
	bin, err := findBin("sshd")
	_, err1 := findBin("ssh-keygen")
	return bin, errors.Join(err, err1)
}

type sshd struct {
	p         *proc
	addr, ver string
	base      int64
}

func startSSHD(t *testing.T, env *testEnv, bin string) server {
	keygen, err := findBin("ssh-keygen")
	if err != nil {
		t.Fatal(err)
	}
	// As a plain user sshd needs no privilege-separation directory
	// (/run/sshd) and can still accept and log connections.
	cred, _ := account(t, "nobody")
	dir := ownedDir(t, env.dir, "sshd", cred)
	key := filepath.Join(dir, "host_ed25519")
	run(t, cred, keygen, "-q", "-t", "ed25519", "-N", "", "-f", key)
	port := testkit.FreePort(t)
	s := &sshd{addr: fmt.Sprintf("127.0.0.1:%d", port), ver: version(bin, "OpenSSH", "-V")}
	cfg := filepath.Join(dir, "sshd_config")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `Port %d
ListenAddress 127.0.0.1
HostKey %s
PidFile %s/sshd.pid
LogLevel VERBOSE
UsePAM no
StrictModes no
`, port, key, dir), 0o644); err != nil {
		t.Fatal(err)
	}
	s.p = startProc(t, "sshd", filepath.Join(env.dir, "sshd.log"), dir, cred, syscall.SIGTERM, bin, "-D", "-e", "-f", cfg)
	waitLog(t, s.p, fmt.Sprintf("Server listening on 127.0.0.1 port %d", port), 30*time.Second)
	s.base, _ = countLines(s.p.output(), "")
	return s
}

func (s *sshd) name() string   { return "sshd" }
func (s *sshd) target() string { return s.addr }
func (s *sshd) label() string {
	v, _, _ := strings.Cut(s.ver, ",")
	if v, ok := strings.CutPrefix(v, "OpenSSH_"); ok {
		return "OpenSSH " + v
	}
	return "OpenSSH"
}

func (s *sshd) metrics() []metric {
	return []metric{
		{"from", "log lines `Connection from` (`LogLevel VERBOSE`)", ctlOne, true, true},
		{"lines", "log lines, any", ctlAtLeastOne, true, true},
	}
}

func (s *sshd) read(t *testing.T) map[string]int64 {
	// "Connection from A port P on B port Q": one per accepted connection.
	// Later lines may quote it ("banner exchange: Connection from ...").
	var all, from int64
	for line := range strings.Lines(s.p.output()) {
		all++
		if strings.HasPrefix(line, "Connection from ") {
			from++
		}
	}
	return map[string]int64{"from": from, "lines": all - s.base}
}

func (s *sshd) touch(t *testing.T) { plainConnect(t, s.addr) }

// ---- nginx ----

type nginx struct {
	p                 *proc
	addr, status, ver string
	access            string
	own               int64
	hc                *http.Client
}

func startNginx(t *testing.T, env *testEnv, bin string) server {
	dir := ownedDir(t, env.dir, "nginx", nil)
	port, sport := testkit.FreePort(t), testkit.FreePort(t)
	s := &nginx{
		addr:   fmt.Sprintf("127.0.0.1:%d", port),
		status: fmt.Sprintf("http://127.0.0.1:%d/status", sport),
		ver:    version(bin, "nginx", "-v"),
		access: filepath.Join(dir, "access.log"),
		hc:     &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
	}
	cfg := filepath.Join(dir, "nginx.conf")
	// One process (master_process off): its pid is the server. The second
	// server answers stub_status and logs nothing.
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log notice;
events { worker_connections 256; }
http {
	access_log %[2]s;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[3]s;
		location / { return 200 "ok\n"; }
	}
	server {
		listen 127.0.0.1:%[4]d;
		access_log off;
		location = /status { stub_status; }
	}
}
`, dir, s.access, s.addr, sport), 0o644); err != nil {
		t.Fatal(err)
	}
	s.p = startProc(t, "nginx", filepath.Join(env.dir, "nginx.out"), dir, nil, syscall.SIGQUIT, bin,
		"-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", cfg)
	waitFor(t, 30*time.Second, "nginx answers stub_status", func() bool {
		if s.p.exited() {
			b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Fatalf("nginx exited: %v\n%s%s", s.p.err, s.p.tail(), b)
		}
		r, err := s.hc.Get(s.status)
		if err != nil {
			return false
		}
		r.Body.Close()
		s.own++ // a connection accepted for that request
		return true
	})
	return s
}

func (s *nginx) name() string   { return "nginx" }
func (s *nginx) target() string { return s.addr }
func (s *nginx) label() string {
	if _, v, ok := strings.Cut(s.ver, "nginx/"); ok {
		return "nginx " + strings.Fields(v)[0]
	}
	return "nginx"
}

func (s *nginx) metrics() []metric {
	return []metric{
		{"accepts", "connections accepted (`stub_status`)", ctlOne, true, true},
		{"access", "access-log lines", ctlOne, true, false},
	}
}

func (s *nginx) read(t *testing.T) map[string]int64 {
	t.Helper()
	r, err := s.hc.Get(s.status)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	s.own++
	// "Active connections: 1 \nserver accepts handled requests\n 5 5 5 \n..."
	lines := strings.Split(string(b), "\n")
	var accepts int64 = -1
	for i, l := range lines {
		if strings.HasPrefix(l, "server accepts") && i+1 < len(lines) {
			if f := strings.Fields(lines[i+1]); len(f) > 0 {
				accepts, err = strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	if accepts < 0 || err != nil {
		t.Fatalf("stub_status: %q", b)
	}
	access, _ := os.ReadFile(s.access)
	n, _ := countLines(string(access), "")
	return map[string]int64{"accepts": accepts - s.own, "access": n}
}

// touch sends one request: a connection and an access-log line.
func (s *nginx) touch(t *testing.T) {
	t.Helper()
	r, err := s.hc.Get("http://" + s.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, r.Body)
	r.Body.Close()
}

// ---- Redis ----

type redis struct {
	p         *proc
	addr, ver string
	own       int64
}

func startRedis(t *testing.T, env *testEnv, bin string) server {
	dir := ownedDir(t, env.dir, "redis", nil)
	port := testkit.FreePort(t)
	s := &redis{addr: fmt.Sprintf("127.0.0.1:%d", port), ver: version(bin, "v=", "--version")}
	s.p = startProc(t, "redis-server", filepath.Join(env.dir, "redis.log"), dir, nil, syscall.SIGTERM, bin,
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no")
	waitLog(t, s.p, "Ready to accept connections", 30*time.Second)
	return s
}

func (s *redis) name() string   { return "redis" }
func (s *redis) target() string { return s.addr }
func (s *redis) label() string {
	for _, f := range strings.Fields(s.ver) {
		if v, ok := strings.CutPrefix(f, "v="); ok {
			return "Redis " + v
		}
	}
	return "Redis"
}

func (s *redis) metrics() []metric {
	return []metric{{"conns", "`total_connections_received`", ctlOne, true, true}}
}

// read asks INFO stats on a connection of its own.
func (s *redis) read(t *testing.T) map[string]int64 {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s.own++
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "INFO stats\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	hdr, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(hdr, "$") {
		t.Fatalf("INFO: %q %v", hdr, err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(hdr[1:]))
	if err != nil {
		t.Fatalf("INFO: %q", hdr)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "total_connections_received:"); ok {
			total, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("INFO: %q", line)
			}
			return map[string]int64{"conns": total - s.own}
		}
	}
	t.Fatalf("INFO stats without total_connections_received: %q", body)
	return nil
}

func (s *redis) touch(t *testing.T) { plainConnect(t, s.addr) }

// query runs PING with redis-cli through addr, a proxy in front of the
// server: one connection of the test's own, which read leaves out.
func (s *redis) query(t *testing.T, addr string) error {
	t.Helper()
	cmd, cancel := clientCmd(t, "redis-cli", addr, func(host, port string) []string {
		return []string{"-h", host, "-p", port, "PING"}
	})
	defer cancel()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("redis-cli %s PING: %v: %s", addr, err, strings.TrimSpace(string(out)))
	}
	if got := strings.TrimSpace(string(out)); got != "PONG" {
		return fmt.Errorf("redis-cli %s PING: %q", addr, got)
	}
	s.own++
	return nil
}

func (s *redis) queryLabel() string { return "`redis-cli PING`" }
