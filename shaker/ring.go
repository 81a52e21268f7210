package shaker

import (
	"net/netip"
	"time"
)

// request is a probe asked for and not started yet.
type request struct {
	addr    netip.AddrPort
	timeout time.Duration // from the SYN
	// deadline, in engine time (ns since Engine.base), bounds the probe
	// whatever its timeout; 0 means none. Probe sets it from its context.
	deadline int64
	done     func(Result)
	sched    *Schedule // a periodic probe's schedule, instead of done
	scope    uint32    // IPv6 zone index, looked up by submit
	err      error     // a failure found by submit, delivered by the loop
}

// ring is a FIFO queue of requests that reuses its storage.
type ring struct {
	buf  []request
	head int
	n    int
}

func (q *ring) push(r request) {
	if q.n == len(q.buf) {
		size := 2 * len(q.buf)
		if size == 0 {
			size = 64
		}
		buf := make([]request, size)
		k := copy(buf, q.buf[q.head:])
		copy(buf[k:], q.buf[:q.head])
		q.buf, q.head = buf, 0
	}
	q.buf[(q.head+q.n)%len(q.buf)] = r
	q.n++
}

// popN moves up to max requests to the end of dst and returns it.
func (q *ring) popN(dst []request, max int) []request {
	for ; max > 0 && q.n > 0; max-- {
		dst = append(dst, q.buf[q.head])
		q.buf[q.head] = request{}
		q.head = (q.head + 1) % len(q.buf)
		q.n--
	}
	return dst
}
