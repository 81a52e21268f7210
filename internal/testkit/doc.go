// Package testkit is the one set of helpers that the tests of every package,
// and the bench command, share: counting listeners (listeners.go) and accept
// counts taken past the kernel's delayed-ACK window (window.go), runs of the
// test binary as a child process (self.go), file descriptor, CPU and process
// counters (proc.go), the kernel's TCP counters (kernel.go), free ports
// (ports.go), network namespaces (netns.go) and the head of an HAProxy
// config for comparisons (haproxy.go).
//
// Functions that take a testing.TB are for tests: they skip the test, saying
// what is missing, where the machine cannot do what they need, and fail it
// on an error. Where the bench command (not a test) needs one, there is a
// counterpart that returns an error instead (Listen and ListenMany,
// LoopbackPort, ProcCPU, KernelCounters), and the TB function is a thin
// wrapper of it.
//
// The helpers are Linux-only; on other systems the package is empty.
package testkit
