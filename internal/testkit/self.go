//go:build linux

package testkit

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Some tests need a process of their own: a network namespace with
// nftables rules, a lowered RLIMIT_NOFILE, a backend to kill, another user.
// The test binary runs itself again, running only one test function (the
// child's body, which skips unless an environment variable says it is the
// child); the child prints its measures as "RESULT ..." lines.

// Command returns a command that runs this executable again with args,
// inside network namespace ns (through ip netns exec) unless ns is "".
func Command(ctx context.Context, ns string, args ...string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args = append([]string{self}, args...)
	if ns != "" {
		args = append([]string{"ip", "netns", "exec", ns}, args...)
	}
	return exec.CommandContext(ctx, args[0], args[1:]...), nil
}

// TestArgs are the flags that make a test binary run test (a test
// function's name) alone, once, verbosely.
func TestArgs(test string) []string {
	return []string{"-test.run=^" + test + "$", "-test.count=1", "-test.v"}
}

// TestCommand is Command for the test binary: it runs the test function
// test alone (TestArgs), with env added to this process's environment.
func TestCommand(ctx context.Context, ns, test string, env ...string) (*exec.Cmd, error) {
	cmd, err := Command(ctx, ns, TestArgs(test)...)
	if err != nil {
		return nil, err
	}
	cmd.Env = append(os.Environ(), env...)
	return cmd, nil
}

// WithoutCapCommand is TestCommand for a child that runs without the
// capability name, as setpriv spells it (net_raw, sys_nice): setpriv
// takes it out of the child's inheritable and bounding sets. It skips
// unless the test runs as root and has setpriv (Debian package
// util-linux).
func WithoutCapCommand(tb testing.TB, ctx context.Context, name, test string, env ...string) *exec.Cmd {
	tb.Helper()
	capName := "CAP_" + strings.ToUpper(name)
	if os.Geteuid() != 0 {
		tb.Skipf("needs root, to drop %s from a child (CI runs as root)", capName)
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		tb.Skipf("needs setpriv (Debian package util-linux) to run a child without %s", capName)
	}
	cmd, err := TestCommand(ctx, "", test, env...)
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Path = setpriv
	cmd.Args = append([]string{"setpriv", "--inh-caps", "-" + name, "--bounding-set", "-" + name, "--"}, cmd.Args...)
	return cmd
}

// RunTest runs the test function test in a child process (TestCommand),
// bounded to 60 s, and returns its output, stdout and stderr together. It
// fails the test, with the output, if the child fails.
func RunTest(tb testing.TB, ns, test string, env ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd, err := TestCommand(ctx, ns, test, env...)
	if err != nil {
		tb.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		tb.Fatalf("child %s %v: %v\n%s", test, env, err, out.String())
	}
	return out.String()
}

// Results returns the RESULT lines of a child's output, each split into
// fields, "RESULT" left out.
func Results(out string) [][]string {
	var results [][]string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 && f[0] == "RESULT" {
			results = append(results, f[1:])
		}
	}
	return results
}

// ResultsByName returns the RESULT lines of a child's output by their
// first field (the last line wins), with the fields after it.
func ResultsByName(out string) map[string][]string {
	res := map[string][]string{}
	for _, r := range Results(out) {
		if len(r) > 0 {
			res[r[0]] = r[1:]
		}
	}
	return res
}

// Child is the body of a child's test function: it runs the helper of
// helpers that the environment variable env names. Without env (a run of
// the test binary that is no child) it skips, saying parent, the tests it
// is the child of; a name it does not know fails.
func Child(t *testing.T, env, parent string, helpers map[string]func(t *testing.T)) {
	t.Helper()
	name := os.Getenv(env)
	if name == "" {
		t.Skip("only runs as a child of " + parent)
	}
	run, ok := helpers[name]
	if !ok {
		t.Fatalf("%s=%q: no such helper", env, name)
	}
	run(t)
}
