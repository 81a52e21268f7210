//go:build linux

package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHAProxyConfig: the head, with a listen section, is a config HAProxy
// accepts (haproxy -c), with and without maxconn.
func TestHAProxyConfig(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("needs haproxy (Debian package haproxy)")
	}
	for _, maxconn := range []int{0, 4096} {
		dir := t.TempDir()
		head := HAProxyConfig(dir, maxconn, 80*time.Millisecond)
		if !strings.Contains(head, "timeout check 80ms\n") || strings.Contains(head, "maxconn") != (maxconn > 0) {
			t.Errorf("maxconn %d: %q", maxconn, head)
		}
		cfg := filepath.Join(dir, "haproxy.cfg")
		if err := os.WriteFile(cfg, []byte(head+fmt.Sprintf("\nlisten l\n\tbind 127.0.0.1:%d\n\tserver s 127.0.0.1:1 check inter 100ms\n", FreePort(t))), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bin, "-c", "-f", cfg).CombinedOutput(); err != nil {
			t.Errorf("maxconn %d: haproxy -c: %v\n%s\n%s", maxconn, err, out, head)
		}
	}
}
