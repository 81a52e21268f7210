package caddyshaker

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-shaker/caddy-shaker/internal/caddyhome"
)

// TestMain runs the root's tests with Caddy's autosave and storage in a
// temporary directory: tests that run Caddy in-process (the harness, the
// browser test) then write nothing under the home directory.
func TestMain(m *testing.M) { os.Exit(caddyhome.Main(m)) }

// TestCaddyOutOfHome: a config loaded in-process, persisted as Caddy does
// by default, is autosaved in the tests' own directory, and the home
// directory's autosave is left as it was (absent, or unchanged).
func TestCaddyOutOfHome(t *testing.T) {
	home := caddyhome.HomeAutosave
	if home == "" || home == caddy.ConfigAutosavePath {
		t.Fatalf("the autosave goes to %s, the home directory's (%q)", caddy.ConfigAutosavePath, home)
	}
	before, errBefore := os.ReadFile(home)
	statBefore, _ := os.Stat(home)
	// a config of its own, persisted: no admin endpoint, no apps
	if err := caddy.Load([]byte(`{"admin":{"disabled":true}}`), true); err != nil {
		t.Fatalf("caddy.Load: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	if _, err := os.Stat(caddy.ConfigAutosavePath); err != nil {
		t.Errorf("no autosave in the tests' directory: %v", err)
	}
	after, errAfter := os.ReadFile(home)
	statAfter, _ := os.Stat(home)
	switch {
	case os.IsNotExist(errBefore) && !os.IsNotExist(errAfter):
		t.Errorf("the test wrote %s", home)
	case errBefore == nil && (string(after) != string(before) || !statAfter.ModTime().Equal(statBefore.ModTime())):
		t.Errorf("the test rewrote %s", home)
	}
	if dir := filepath.Dir(home); filepath.Dir(caddy.ConfigAutosavePath) == dir {
		t.Errorf("the autosave's directory is the home's, %s", dir)
	}
}
