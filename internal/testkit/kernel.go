//go:build linux

package testkit

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// ProcNetField reads one counter from a /proc/net/{snmp,netstat} file: a
// line of names then a line of values, both starting with prefix
// ("TcpExt:", say). The counters are those of the caller's network
// namespace.
func ProcNetField(path, prefix, name string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var names []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != prefix {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := range names {
			if names[i] == name && i < len(f) {
				return strconv.ParseInt(f[i], 10, 64)
			}
		}
		break
	}
	return 0, fmt.Errorf("%s: no %s %s", path, prefix, name)
}

// KernelCounters reads TcpExt EmbryonicRsts (half-made connections reset
// by the prober: one a half-open probe) and Tcp PassiveOpens (connections
// a listener completed) of this process's network namespace.
func KernelCounters() (resets, opens int64, err error) { return KernelCountersAt("/proc/net") }

// KernelCountersAt is KernelCounters of the network namespace whose
// /proc/net is dir: /proc/PID/net for the namespace of process PID.
func KernelCountersAt(dir string) (resets, opens int64, err error) {
	resets, err = ProcNetField(dir+"/netstat", "TcpExt:", "EmbryonicRsts")
	if err != nil {
		return 0, 0, err
	}
	opens, err = ProcNetField(dir+"/snmp", "Tcp:", "PassiveOpens")
	return resets, opens, err
}

// TCPExt reads the TcpExt counter name of this process's network
// namespace. It fails the test if it cannot.
func TCPExt(tb testing.TB, name string) int64 {
	tb.Helper()
	v, err := ProcNetField("/proc/net/netstat", "TcpExt:", name)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}
