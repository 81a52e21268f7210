package xcaddytest

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	// the plugin, so that caddy.Modules() below holds its modules
	_ "github.com/caddy-shaker/caddy-shaker"
)

const (
	rootModule = "github.com/caddy-shaker/caddy-shaker"
	l4Module   = rootModule + "/l4"
	caddyL4    = "github.com/mholt/caddy-l4"
)

// TestXcaddyBuild builds Caddy with xcaddy as README.md tells users to,
//
//	xcaddy build v2.11.9 --with github.com/caddy-shaker/caddy-shaker@VERSION
//
// with every Go module of this repository served, at one pseudo-version made
// for this checkout, by a module proxy on disk in front of GOPROXY. It then
// checks that the binary's list-modules has every module of the plugin,
// from that module at that version, and that the HTTP-only build's module
// graph has no caddy-l4. Once the nested module l4/ exists (l4/go.mod), a
// second build adds --with github.com/caddy-shaker/caddy-shaker/l4 and
// checks its modules too, and that caddy-l4 is there.
//
// The proxy is needed because xcaddy's --with module=../dir asks the
// registry for the module's versions, and this one is not published. The
// shared module and build caches are used as they are.
//
// A clean work tree is served as HEAD, with HEAD's pseudo-version. A dirty
// one (go test from a work tree with changes) is served as it is on disk:
// tracked and untracked files that git does not ignore, at a
// pseudo-version with HEAD's time and a hash of the content in place of
// the commit's, so that each content gets a version of its own in the
// module cache.
func TestXcaddyBuild(t *testing.T) {
	if os.Getenv("SHAKER_XCADDY") != "1" {
		t.Skip("builds Caddy with xcaddy, up to three minutes a build: set SHAKER_XCADDY=1 to run it (.ci/run does, and installs xcaddy)")
	}
	// asked for: from here on a missing tool fails the test
	xcaddy := findXcaddy(t)
	t.Logf("xcaddy: %s, %s", xcaddy, firstLine(run(t, "", nil, xcaddy, "version")))

	root := strings.TrimSpace(run(t, ".", nil, "git", "rev-parse", "--show-toplevel"))
	caddyVersion := strings.TrimSpace(run(t, root, nil, "go", "list", "-m", "-f", "{{.Version}}", "github.com/caddyserver/caddy/v2"))
	mods := repoModules(t, root)
	version, what := pseudoVersion(t, root, mods)
	t.Logf("serving %s as %s", what, version)

	proxy := t.TempDir()
	for _, m := range mods {
		serve(t, proxy, root, m, version)
	}
	goproxy := strings.TrimSpace(run(t, root, nil, "go", "env", "GOPROXY"))
	nosumdb := "github.com/caddy-shaker"
	if v := strings.TrimSpace(run(t, root, nil, "go", "env", "GONOSUMDB")); v != "" {
		nosumdb += "," + v
	}
	env := []string{
		"GOPROXY=file://" + filepath.ToSlash(proxy) + "," + goproxy,
		"GONOSUMDB=" + nosumdb, // not in the checksum database: go.sum takes what the proxy serves
	}
	t.Logf("%s", strings.Join(env, " "))

	repo := map[string]bool{}
	for _, m := range mods {
		repo[m.path] = true
	}
	builds := []struct {
		name   string
		with   []string          // Go modules given to --with
		want   map[string]string // module ID -> the Go module it must come from
		wantL4 bool              // caddy-l4 in the module graph
	}{{
		name: "http",
		with: []string{rootModule},
		want: registeredHere(t),
	}}
	rootWant := builds[0].want
	if _, err := os.Stat(filepath.Join(root, "l4", "go.mod")); err == nil {
		builds = append(builds, struct {
			name   string
			with   []string
			want   map[string]string
			wantL4 bool
		}{
			name:   "l4",
			with:   []string{rootModule, l4Module},
			want:   listedBy(t, filepath.Join(root, "l4"), l4Module, rootWant, repo),
			wantL4: true,
		})
	} else {
		t.Logf("no l4/go.mod: only the HTTP-only build")
	}

	for _, b := range builds {
		t.Run(b.name, func(t *testing.T) {
			if len(b.want) == 0 {
				t.Fatalf("found no module of the plugin to look for")
			}
			bin := xcaddyBuild(t, xcaddy, caddyVersion, version, b.with, env)
			checkListModules(t, bin, version, b.want, repo)
			checkModuleGraph(t, bin, version, b.with, b.wantL4)
		})
	}
}

// goModule is one Go module of this repository.
type goModule struct {
	path  string   // module path, from its go.mod
	dir   string   // directory, relative to the repository root, "" for the root
	files []string // its files, relative to the repository root, sorted
}

// repoModules returns the Go modules of the work tree, root first: every
// go.mod that git tracks or would track, each module with the files under
// its directory that are in no nested module (which is what
// golang.org/x/mod/zip puts in a module's zip).
func repoModules(t *testing.T, root string) []goModule {
	t.Helper()
	out := run(t, root, nil, "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
	seen := map[string]bool{}
	var files []string
	for _, f := range strings.Split(out, "\x00") {
		if f == "" || seen[f] {
			continue
		}
		seen[f] = true
		fi, err := os.Lstat(filepath.Join(root, filepath.FromSlash(f)))
		if errors.Is(err, os.ErrNotExist) {
			continue // deleted in the work tree
		} else if err != nil {
			t.Fatal(err)
		}
		if !fi.Mode().IsRegular() {
			continue // x/mod/zip leaves out symbolic links and the like too
		}
		files = append(files, f)
	}
	sort.Strings(files)

	var mods []goModule
	for _, f := range files {
		if path.Base(f) != "go.mod" {
			continue
		}
		data, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(f)))
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(`(?m)^module\s+"?([^"\s]+)"?`).FindSubmatch(data)
		if m == nil {
			t.Fatalf("%s: no module line", f)
		}
		dir := path.Dir(f)
		if dir == "." {
			dir = ""
		}
		mods = append(mods, goModule{path: string(m[1]), dir: dir})
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].dir < mods[j].dir }) // the root, "", first
	if len(mods) == 0 || mods[0].dir != "" || mods[0].path != rootModule {
		t.Fatalf("the repository's root is not module %s", rootModule)
	}
	// each file to the deepest module directory it is in
	for _, f := range files {
		best := 0
		for i, m := range mods {
			if m.dir != "" && strings.HasPrefix(f, m.dir+"/") && len(m.dir) > len(mods[best].dir) {
				best = i
			}
		}
		mods[best].files = append(mods[best].files, f)
	}
	for _, m := range mods {
		t.Logf("module %s: %d files from %s/", m.path, len(m.files), m.dir)
	}
	return mods
}

// pseudoVersion returns the version to serve every module at, and what it
// stands for.
func pseudoVersion(t *testing.T, root string, mods []goModule) (version, what string) {
	t.Helper()
	head := strings.Fields(run(t, root, nil, "git", "show", "-s", "--format=%H %ct", "HEAD"))
	if len(head) != 2 {
		t.Fatalf("git show HEAD: %q", head)
	}
	sec, err := strconv.ParseInt(head[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	stamp := time.Unix(sec, 0).UTC().Format("20060102150405")
	status := run(t, root, nil, "git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=all")
	if strings.TrimSpace(status) == "" {
		return "v0.0.0-" + stamp + "-" + head[0][:12], "HEAD " + head[0][:12] + " (clean work tree)"
	}
	h := sha256.New()
	for _, m := range mods {
		for _, f := range m.files {
			data, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(f)))
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(h, "%s\x00%d\x00", f, len(data))
			h.Write(data)
		}
	}
	sum := hex.EncodeToString(h.Sum(nil))[:12]
	n := len(strings.Split(strings.TrimSpace(status), "\n"))
	return "v0.0.0-" + stamp + "-" + sum,
		fmt.Sprintf("the work tree as it is on disk (%d changed or new paths on HEAD %s; content hash %s, not a commit)", n, head[0][:12], sum)
}

// serve writes module m at version into the file proxy at dir: list,
// .info, .mod and .zip under dir/MODULE/@v/, as GOPROXY's protocol has
// them. A version of m that a nested module's go.mod requires (l4/go.mod
// requiring the root at some older or placeholder version, replaced by ../
// in development) is not served: with a go 1.17+ go.mod the pruned module
// graph never reads an unselected version's go.mod, and the one served
// here is selected, being newer.
func serve(t *testing.T, dir, root string, m goModule, version string) {
	t.Helper()
	gomod, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(path.Join(m.dir, "go.mod"))))
	if err != nil {
		t.Fatal(err)
	}
	at := filepath.Join(dir, filepath.FromSlash(escapePath(m.path)), "@v")
	if err := os.MkdirAll(at, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(at, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stamp, err := time.Parse("20060102150405", strings.Split(version, "-")[1])
	if err != nil {
		t.Fatal(err)
	}
	info, err := json.Marshal(struct {
		Version string
		Time    time.Time
	}{version, stamp})
	if err != nil {
		t.Fatal(err)
	}
	write("list", []byte(version+"\n"))
	write(version+".info", info)
	write(version+".mod", gomod)
	write(version+".zip", moduleZip(t, root, m, version, stamp))
}

// moduleZip returns m's files as a module zip (golang.org/x/mod/zip):
// every file under MODULE@VERSION/, its path relative to the module's
// directory.
func moduleZip(t *testing.T, root string, m goModule, version string, stamp time.Time) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	prefix := m.path + "@" + version + "/"
	var size int64
	for _, f := range m.files {
		data, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(f)))
		if err != nil {
			t.Fatal(err)
		}
		size += int64(len(data))
		name := f
		if m.dir != "" {
			name = strings.TrimPrefix(f, m.dir+"/")
		}
		w, err := zw.CreateHeader(&zip.FileHeader{Name: prefix + name, Method: zip.Deflate, Modified: stamp})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if size > 500<<20 { // x/mod/zip's MaxZipFile
		t.Fatalf("module %s: %d bytes of files, more than a module zip may hold", m.path, size)
	}
	return buf.Bytes()
}

// escapePath is the module path as the proxy protocol spells it: each
// upper-case letter as "!" and its lower case.
func escapePath(p string) string {
	var b strings.Builder
	for _, r := range p {
		if 'A' <= r && r <= 'Z' {
			b.WriteByte('!')
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// registeredHere returns the modules that this repository's root module
// registers, as this test binary (which imports the plugin) has them: each
// module ID whose Go type is in a package of the root module.
func registeredHere(t *testing.T) map[string]string {
	t.Helper()
	want := map[string]string{}
	for _, id := range caddy.Modules() {
		info, err := caddy.GetModule(id)
		if err != nil {
			t.Fatal(err)
		}
		typ := reflect.TypeOf(info.New())
		for typ.Kind() == reflect.Pointer {
			typ = typ.Elem()
		}
		if pkg := typ.PkgPath(); pkg == rootModule || strings.HasPrefix(pkg, rootModule+"/") {
			want[id] = rootModule
		}
	}
	t.Logf("the plugin's modules, from this test binary: %s", strings.Join(sortedKeys(want), ", "))
	return want
}

// listedBy returns the modules that dir/cmd/caddy (nested module mod's own
// Caddy) lists from this repository's modules: `go run ./cmd/caddy
// list-modules` in dir, which builds it from the work tree. Caddy names
// the Go module of each by the longest module path among the binary's
// dependencies that prefixes its package, and mod, the main module there,
// is not among them: mod's own modules come out as the root's. So each
// module that the root does not register (rootWant) is taken to be mod's.
func listedBy(t *testing.T, dir, mod string, rootWant map[string]string, repo map[string]bool) map[string]string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "cmd", "caddy")); err != nil {
		t.Fatalf("%s has a go.mod but no cmd/caddy to list its modules with: %v", dir, err)
	}
	start := time.Now()
	out := run(t, dir, nil, nice("go", "run", "./cmd/caddy", "list-modules", "--json", "--skip-standard")...)
	want := map[string]string{}
	for _, e := range parseList(t, out) {
		if !repo[e.PackageURL] {
			continue
		}
		if m, ok := rootWant[e.ModuleName]; ok {
			want[e.ModuleName] = m
		} else {
			want[e.ModuleName] = mod
		}
	}
	t.Logf("the plugin's modules, from go run ./cmd/caddy in %s (%s): %s",
		dir, time.Since(start).Round(time.Second), strings.Join(sortedKeys(want), ", "))
	return want
}

// xcaddyBuild runs xcaddy build in a directory of its own and returns the
// binary's path. TMPDIR is that directory too, so xcaddy's build
// environment goes there.
func xcaddyBuild(t *testing.T, xcaddy, caddyVersion, version string, with, env []string) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "caddy")
	args := []string{xcaddy, "build", caddyVersion, "--output", bin}
	for _, w := range with {
		args = append(args, "--with", w+"@"+version)
	}
	t.Logf("%s", strings.Join(args, " "))
	start := time.Now()
	out, err := command(t, dir, append(env, "TMPDIR="+dir), nice(args...)...).CombinedOutput()
	took := time.Since(start).Round(time.Second)
	if err != nil {
		t.Fatalf("xcaddy build failed after %s: %v\n%s", took, err, tail(string(out), 60))
	}
	t.Logf("xcaddy build took %s", took)
	return bin
}

// checkListModules checks that the binary lists every module in want, from
// the Go module that want names at version, and no module of this
// repository that want does not have.
func checkListModules(t *testing.T, bin, version string, want map[string]string, repo map[string]bool) {
	t.Helper()
	got := map[string]listed{}
	for _, e := range parseList(t, run(t, "", nil, bin, "list-modules", "--json", "--skip-standard")) {
		got[e.ModuleName] = e
	}
	for _, id := range sortedKeys(want) {
		e, ok := got[id]
		switch {
		case !ok:
			t.Errorf("list-modules has no %s", id)
		case e.PackageURL != want[id] || e.Version != version:
			t.Errorf("list-modules has %s from %s %s, want %s %s", id, e.PackageURL, e.Version, want[id], version)
		}
	}
	for id, e := range got {
		if _, ok := want[id]; !ok && repo[e.PackageURL] {
			t.Errorf("list-modules has %s from %s, which this build should not have", id, e.PackageURL)
		}
	}
	t.Logf("list-modules has the %d modules of the plugin", len(want))
}

// checkModuleGraph checks the Go modules built into the binary (go version
// -m): each module given to --with at version and not replaced, and
// caddy-l4 there or not as wantL4 says.
func checkModuleGraph(t *testing.T, bin, version string, with []string, wantL4 bool) {
	t.Helper()
	out := run(t, "", nil, "go", "version", "-m", bin)
	deps := map[string]string{}
	var last string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[0] == "dep":
			last = f[1]
			deps[last] = f[2]
		case len(f) >= 2 && f[0] == "=>":
			t.Errorf("go version -m: %s is replaced by %s", last, strings.Join(f[1:], " "))
		}
	}
	for _, m := range with {
		if deps[m] != version {
			t.Errorf("go version -m: %s at %q, want %s", m, deps[m], version)
		}
	}
	var l4 []string
	for p, v := range deps {
		if p == caddyL4 || strings.HasPrefix(p, caddyL4+"/") {
			l4 = append(l4, p+" "+v)
		}
	}
	switch {
	case wantL4 && len(l4) == 0:
		t.Errorf("go version -m: no %s in the module graph", caddyL4)
	case !wantL4 && len(l4) > 0:
		t.Errorf("go version -m: the HTTP-only build has %s", strings.Join(l4, ", "))
	case wantL4:
		t.Logf("module graph: %d modules, with %s", len(deps), strings.Join(l4, ", "))
	default:
		t.Logf("module graph: %d modules, no %s", len(deps), caddyL4)
	}
}

// listed is one entry of caddy list-modules --json.
type listed struct {
	ModuleName string `json:"module_name"`
	ModuleType string `json:"module_type"`
	Version    string `json:"version"`
	PackageURL string `json:"package_url"` // the Go module's path
}

func parseList(t *testing.T, out string) []listed {
	t.Helper()
	var l []listed
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("list-modules --json: %v\n%s", err, tail(out, 20))
	}
	return l
}

// findXcaddy returns xcaddy's path: $XCADDY, or xcaddy on PATH, or in
// go install's directory. Missing, it fails the test.
func findXcaddy(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("XCADDY"); p != "" {
		return p
	}
	if p, err := exec.LookPath("xcaddy"); err == nil {
		return p
	}
	bin := strings.TrimSpace(run(t, "", nil, "go", "env", "GOBIN"))
	if bin == "" {
		bin = filepath.Join(strings.TrimSpace(run(t, "", nil, "go", "env", "GOPATH")), "bin")
	}
	p := filepath.Join(bin, "xcaddy")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("SHAKER_XCADDY=1 but no xcaddy on PATH or in %s: go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5", bin)
	}
	return p
}

// nice runs args at the lowest CPU priority where nice exists: the builds
// share a small machine.
func nice(args ...string) []string {
	if _, err := exec.LookPath("nice"); err == nil {
		return append([]string{"nice", "-n", "19"}, args...)
	}
	return args
}

// command is args[0] with the rest as arguments, in dir, with env added to
// this process's environment, stopped a minute before the test's deadline.
func command(t *testing.T, dir string, env []string, args ...string) *exec.Cmd {
	t.Helper()
	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-time.Minute))
		t.Cleanup(cancel)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// run runs a command and returns its standard output; it fails the test if
// the command fails.
func run(t *testing.T, dir string, env []string, args ...string) string {
	t.Helper()
	cmd := command(t, dir, env, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, tail(stderr.String(), 40))
	}
	return string(out)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"..."}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
