//go:build linux && !shaker_fallback

package shaker

import (
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// microClock reports whether TCP's microsecond clock (tcpi_rtt, the
// close delays' kernelView.arrival) is CLOCK_MONOTONIC, the engine's:
// since Linux 4.20, where TCP's clock is ktime_get_ns. Before, it was
// local_clock(), which can drift from CLOCK_MONOTONIC and differ between
// CPUs, so the SYN's time plus the RTT could pass the real arrival.
var microClock = sync.OnceValue(func() bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	return kernelAtLeast(unix.ByteSliceToString(u.Release[:]), 4, 20)
})

// kernelAtLeast reports whether a kernel release ("6.18.44-fc", uname -r)
// is major.minor or later; false if it cannot be read.
func kernelAtLeast(release string, major, minor int) bool {
	f := strings.SplitN(release, ".", 3)
	if len(f) < 2 {
		return false
	}
	ma, err := strconv.Atoi(f[0])
	if err != nil {
		return false
	}
	digits := f[1]
	if i := strings.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		digits = digits[:i] // "20-rc1"
	}
	mi, err := strconv.Atoi(digits)
	if err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

// kernelTick is the kernel clock's tick (1000/HZ ms, rounded up to a
// whole ms), the resolution of TCP_INFO's tcpi_last_ack_recv, as
// measured once per process (measureTick); maxTick where it could not be.
var kernelTick = sync.OnceValue(func() int64 { return measureTick(40 * time.Millisecond) })

// measureTick measures the kernel clock's tick, in ns, waiting at most
// limit. HZ cannot be read from user space, but a TCP socket that has
// never been connected has its receive stamp at jiffy 0, so its
// tcpi_last_ack_recv is the jiffies count in ms, which steps by a tick
// (by several if a read misses some, never by fewer). A tick that is not
// a whole number of ms (HZ 300) steps by 3 or 4 ms: the longest of three
// steps is the tick or longer, the upper bound the close delay needs. It
// returns maxTick if the socket cannot be made or read, or no step comes
// in time.
func measureTick(limit time.Duration) int64 {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return maxTick
	}
	defer unix.Close(fd)
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return maxTick
	}
	prev := info.Last_ack_recv
	var step uint32 // the longest step seen, in ms
	steps := 0
	for end := time.Now().Add(limit); steps < 3 && time.Now().Before(end); time.Sleep(200 * time.Microsecond) {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return maxTick
		}
		if v := info.Last_ack_recv; v != prev {
			step = max(step, v-prev) // wraps with the jiffies
			prev = v
			steps++
		}
	}
	if steps == 0 {
		return maxTick
	}
	return min(int64(step)*int64(time.Millisecond), maxTick)
}
