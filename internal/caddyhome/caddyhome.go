// Package caddyhome keeps the Caddy that tests run in-process out of the
// home directory. caddy.Load autosaves every config it runs (unless the
// config sets admin.config.persist false) to caddy.ConfigAutosavePath,
// and Caddy keeps its data (instance.uuid, certificates, locks) in
// caddy.DefaultStorage: both under the user's home, computed when the
// caddy package starts, so that setting HOME or XDG_CONFIG_HOME in a test
// is too late for them. Main points both at a temporary directory for the
// whole test binary.
package caddyhome

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// HomeAutosave is where caddy.Load would have autosaved configs, in the
// home directory, before Main moved it; "" before Main runs.
var HomeAutosave string

// HomeEnv names the directory that a test binary shares with the
// processes it starts (children re-executing the binary inherit its
// environment): Main sets it, and a Main that finds it set makes its
// directory inside and leaves the removal to the first, which outlives
// it. A child ending in os.Exit (caddycmd.Main does) or killed by its
// test leaves nothing behind.
const HomeEnv = "CADDYSHAKER_TEST_HOME"

// Main runs m with Caddy's autosave and default storage in a temporary
// directory, removed at the end, and returns m's exit code: a TestMain
// calls os.Exit(caddyhome.Main(m)).
func Main(m *testing.M) int {
	parent := os.Getenv(HomeEnv)
	dir, err := os.MkdirTemp(parent, "caddy-test-home-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "caddyhome: a directory for Caddy's autosave and storage: %v\n", err)
		return 1
	}
	if parent == "" {
		os.Setenv(HomeEnv, dir)
		defer func() {
			caddy.Stop() // a config left running would write to its storage while it goes
			os.RemoveAll(dir)
		}()
	}
	HomeAutosave = caddy.ConfigAutosavePath
	caddy.ConfigAutosavePath = filepath.Join(dir, "config", "autosave.json")
	caddy.DefaultStorage.Path = filepath.Join(dir, "data")
	return m.Run()
}
