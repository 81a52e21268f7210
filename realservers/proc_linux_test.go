//go:build linux

package realservers

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// proc is a process the test started: a server or a checker. Its output
// goes to a file; it is stopped by its pid at the end of the test.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // from Wait, once done is closed
}

// startProc starts bin with args, its stdout and stderr appended to
// logPath, in dir, as cred (nil: as the test), and stops it with stopSig at
// the end of the test.
func startProc(t *testing.T, name, logPath, dir string, cred *syscall.Credential, stopSig syscall.Signal, bin string, args ...string) *proc {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	p := &proc{name: name, log: logPath, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir, "LANG=C", "LC_ALL=C")
	// Pdeathsig: if the test binary dies, so does the process.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: cred}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		if _, err := p.stop(stopSig, 20*time.Second); err != nil {
			t.Logf("stopping %s: %v", name, err)
		}
	})
	return p
}

// exited reports whether the process has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig and waits up to wait for the process to exit (then kills
// it), and returns the time it took to exit.
func (p *proc) stop(sig syscall.Signal, wait time.Duration) (time.Duration, error) {
	if p.exited() {
		return 0, nil
	}
	t0 := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		return 0, err
	}
	select {
	case <-p.done:
		return time.Since(t0), nil
	case <-time.After(wait):
		p.cmd.Process.Kill()
		<-p.done
		return time.Since(t0), fmt.Errorf("%s did not exit within %v of %v; killed", p.name, wait, sig)
	}
}

// output is the process's output so far.
func (p *proc) output() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// tail is the end of the process's output, for error messages.
func (p *proc) tail() string {
	s := p.output()
	if len(s) > 3000 {
		s = s[len(s)-3000:]
	}
	return s
}

// waitFor polls cond every 20 ms until it holds, and fails the test if it
// does not within d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitLog waits until p's output contains s, and fails the test with the
// output if p exits or d passes first.
func waitLog(t *testing.T, p *proc, s string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(p.output(), s) {
		if p.exited() {
			t.Fatalf("%s exited (%v) before logging %q; its output:\n%s", p.name, p.err, s, p.tail())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not log %q within %v; its output:\n%s", p.name, s, d, p.tail())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run runs a command to completion and fails the test with its output if
// it fails.
func run(t *testing.T, cred *syscall.Credential, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "LANG=C", "LC_ALL=C")
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Dir = "/"
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// account is a user that servers refusing root run as: name if it exists,
// else nobody.
func account(t *testing.T, name string) (*syscall.Credential, string) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		if u, err = user.Lookup("nobody"); err != nil {
			t.Fatalf("no user %s nor nobody: %v", name, err)
		}
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, u.Username
}

// ownedDir makes dir/name owned by cred (root's if nil), and makes dir and
// its parent (the test's temporary directories) traversable by it.
func ownedDir(t *testing.T, dir, name string, cred *syscall.Credential) string {
	t.Helper()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(dir, name)
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// countLines counts the lines of s, and those that contain sub.
func countLines(s, sub string) (all, matching int64) {
	for line := range strings.Lines(s) {
		all++
		if sub != "" && strings.Contains(line, sub) {
			matching++
		}
	}
	return all, matching
}

// version runs bin with args and returns the first line of its output
// that contains want, trimmed; "" if none.
func version(bin string, want string, args ...string) string {
	out, _ := exec.Command(bin, args...).CombinedOutput()
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, want) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}
