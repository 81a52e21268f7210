//go:build linux && !shaker_fallback && !race

package shaker

// withCloser: connect-mode loops have a closer (closer_linux.go), except
// under the race detector (closer_race.go).
const withCloser = true
