//go:build !unix

package caddyshaker

// processCPU is 0 without getrusage: the benchmarks' cpu-ns/op then reads
// 0, and their other figures stand.
func processCPU() int64 { return 0 }
