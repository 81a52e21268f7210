package caddyhome

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

const exitHelperEnv = "CADDYHOME_EXIT_HELPER"

// TestChildEndingInExitLeavesNothing: a child of the test binary that ends
// in os.Exit, as caddycmd.Main does, has its directory inside this
// process's, which Main removes at the end.
func TestChildEndingInExitLeavesNothing(t *testing.T) {
	home := os.Getenv(HomeEnv)
	if home == "" || filepath.Dir(caddy.DefaultStorage.Path) != home {
		t.Fatalf("%s=%q, storage in %q: Main did not set them", HomeEnv, home, caddy.DefaultStorage.Path)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^TestExitHelper$")
	cmd.Env = append(os.Environ(), exitHelperEnv+"=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	dir := strings.TrimSpace(string(out))
	if filepath.Dir(dir) != home {
		t.Fatalf("the child's directory %q is not inside %q", dir, home)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("the child's directory: %v", err)
	}
}

// TestExitHelper is the child of TestChildEndingInExitLeavesNothing.
func TestExitHelper(t *testing.T) {
	if os.Getenv(exitHelperEnv) == "" {
		t.Skip("only runs as a child")
	}
	os.Stdout.WriteString(filepath.Dir(caddy.DefaultStorage.Path) + "\n")
	os.Exit(0)
}
