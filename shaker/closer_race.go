//go:build linux && !shaker_fallback && race

package shaker

// withCloser is false under the race detector: its runtime calls back
// into the Go scheduler for the P of the thread (its processor context)
// on every atomic operation, and a closer inside a system call has no P.
// Loops then close answered sockets themselves, as before the closer; the
// closer's tests run without -race (README.md's test command).
const withCloser = false
