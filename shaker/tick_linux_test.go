//go:build linux && !shaker_fallback

package shaker

import (
	"bufio"
	"compress/gzip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// configHZ is CONFIG_HZ from /proc/config.gz, or 0 where the kernel does
// not publish its config.
func configHZ(t *testing.T) int {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return 0
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("/proc/config.gz: %v", err)
	}
	sc := bufio.NewScanner(z)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ="); ok {
			hz, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("/proc/config.gz: %q: %v", sc.Text(), err)
			}
			return hz
		}
	}
	return 0
}

// TestMeasureTick: the measured tick is never shorter than the kernel's
// (1000/HZ ms rounded up, HZ from the kernel's config), which the close
// delays of answers taken inside connect() need for an upper bound; and
// it is the kernel's in most of five measures (a read that misses ticks
// makes it longer, which is safe).
func TestMeasureTick(t *testing.T) {
	hz := configHZ(t)
	if hz == 0 {
		t.Skip("no CONFIG_HZ in /proc/config.gz: the kernel's tick is unknown here")
	}
	want := int64((1000+hz-1)/hz) * int64(time.Millisecond)
	exact := 0
	for range 5 {
		got := measureTick(100 * time.Millisecond)
		if got < want {
			t.Fatalf("measureTick = %v, shorter than the kernel's tick %v (HZ %d)", time.Duration(got), time.Duration(want), hz)
		}
		if got == want {
			exact++
		}
		t.Logf("HZ %d: measured %v", hz, time.Duration(got))
	}
	if exact < 3 {
		t.Errorf("measureTick was the kernel's tick %v in %d of 5 measures, want 3 at least", time.Duration(want), exact)
	}
	if got := kernelTick(); got < want {
		t.Errorf("kernelTick = %v, shorter than %v", time.Duration(got), time.Duration(want))
	}
}
