// Package testkit is the one set of helpers that the tests of every package,
// and the bench command, share: counting listeners (listeners.go), runs of
// the test binary as a child process (self.go), file descriptor, CPU and
// process counters (proc.go), the kernel's TCP counters (kernel.go) and
// network namespaces (netns.go).
//
// The helpers are Linux-only; on other systems the package is empty.
package testkit
