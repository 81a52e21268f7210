//go:build !race

package shaker

const raceEnabled = false
