package shaker

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
