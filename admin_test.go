//go:build linux

package caddyshaker

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestAdminEngine: GET /shaker/engine shows the running engine and its
// schedule; other methods are refused.
func TestAdminEngine(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	h := newHarness(t, 2)
	h.waitProbes(nil, 2, 5*time.Second)
	resp, err := http.Get("http://" + h.admin + "/shaker/engine")
	if err != nil {
		t.Fatal(err)
	}
	var es EngineStatus
	err = json.NewDecoder(resp.Body).Decode(&es)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /shaker/engine: %d, %v", resp.StatusCode, err)
	}
	if !es.Running || !es.HalfOpen || es.Loops < 1 || es.Scheduled != 2 || es.MaxSockets < 1 || es.Advice != "" {
		t.Fatalf("engine status %+v: want running, half-open, 2 scheduled, no advice", es)
	}
	resp, err = http.Post("http://"+h.admin+"/shaker/engine", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /shaker/engine: %d, want 405", resp.StatusCode)
	}
}
