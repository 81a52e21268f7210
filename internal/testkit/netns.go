//go:build linux

package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Netns creates a network namespace with loopback up, deleted at the end of
// the test, and returns its name. With nft, the test needs nftables there:
// ruleset, if any, is loaded, else nft is checked to work. It skips the
// test, saying what is missing, when this machine cannot.
func Netns(t testing.TB, nft bool, ruleset string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace (CI runs as root)")
	}
	tools := []string{"ip"}
	if nft {
		tools = append(tools, "nft")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian packages iproute2 and nftables; .ci/run installs them)", tool)
		}
	}
	ns := fmt.Sprintf("shaker-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
	if !nft {
		return ns
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "list", "ruleset")
	if ruleset != "" {
		cmd = exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(ruleset)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("nftables does not work here: %v: %s", err, out)
	}
	return ns
}
