//go:build linux

package testkit

import (
	"os"
	"path/filepath"
	"testing"
)

func TestProcNetField(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "netstat")
	data := "TcpExt: SyncookiesSent EmbryonicRsts PruneCalled\nTcpExt: 0 1234 7\nIpExt: InNoRoutes\nIpExt: 5\n"
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := ProcNetField(path, "TcpExt:", "EmbryonicRsts"); err != nil || got != 1234 {
		t.Errorf("EmbryonicRsts = %d, %v; want 1234", got, err)
	}
	if _, err := ProcNetField(path, "TcpExt:", "NoSuchCounter"); err == nil {
		t.Error("a missing counter gave no error")
	}
	// This machine's own counters parse.
	if _, _, err := KernelCounters(); err != nil {
		t.Error(err)
	}
}
