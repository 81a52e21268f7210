//go:build linux && !shaker_fallback

package shaker

// Two binary min-heaps per loop, each element knowing its place so that it
// leaves in O(log n): the deadline heap of slot indices (probes in flight,
// by deadline) and the timer heap of schedules (periodic probes, by due
// time, timerEntry).

func (l *loop) heapLess(i, j int) bool {
	return l.slots[l.heap[i]].deadline < l.slots[l.heap[j]].deadline
}

func (l *loop) heapSwap(i, j int) {
	l.heap[i], l.heap[j] = l.heap[j], l.heap[i]
	l.slots[l.heap[i]].heapIdx = i
	l.slots[l.heap[j]].heapIdx = j
}

func (l *loop) heapPush(idx int32) {
	l.heap = append(l.heap, idx)
	i := len(l.heap) - 1
	l.slots[idx].heapIdx = i
	siftUp(i, l.heapLess, l.heapSwap)
}

func (l *loop) heapRemove(i int) {
	last := len(l.heap) - 1
	if i != last {
		l.heapSwap(i, last)
	}
	l.heap = l.heap[:last]
	if i != last {
		l.heapFix(i)
	}
}

// heapFix restores the deadline heap after the deadline at i changed.
func (l *loop) heapFix(i int) {
	if !siftDown(i, len(l.heap), l.heapLess, l.heapSwap) {
		siftUp(i, l.heapLess, l.heapSwap)
	}
}

// timerEntry is one schedule in the timer heap, with its due time beside
// it (a copy of s.due while it is in the heap): the heap's comparisons
// read the heap's own array, not a Schedule each (a cache miss each, at
// thousands of schedules), and its sifts are written out, not calls
// through a func value: the timer heap was the scheduled path's largest
// cost of the engine's own.
type timerEntry struct {
	due int64
	s   *Schedule
}

func (l *loop) timerPush(s *Schedule) {
	l.timers = append(l.timers, timerEntry{due: s.due, s: s})
	i := len(l.timers) - 1
	s.idx = int32(i)
	l.timerUp(i)
}

func (l *loop) timerRemove(i int) {
	t := l.timers
	last := len(t) - 1
	t[i].s.idx = -1
	if i != last {
		l.timerPut(i, t[last])
	}
	t[last] = timerEntry{}
	l.timers = t[:last]
	if i != last && !l.timerDown(i) {
		l.timerUp(i)
	}
}

// timerUp moves entry i up the timer heap to its place.
func (l *loop) timerUp(i int) {
	t := l.timers
	e := t[i]
	for i > 0 {
		p := (i - 1) / 2
		if t[p].due <= e.due {
			break
		}
		l.timerPut(i, t[p])
		i = p
	}
	l.timerPut(i, e)
}

// timerPut puts e at place i of the timer heap.
func (l *loop) timerPut(i int, e timerEntry) {
	l.timers[i] = e
	e.s.idx = int32(i)
}

// timerDown moves entry i down the timer heap to its place and reports
// whether it moved.
func (l *loop) timerDown(i int) bool {
	t := l.timers
	n := len(t)
	i0, e := i, t[i]
	for {
		c := 2*i + 1
		if c >= n {
			break
		}
		if r := c + 1; r < n && t[r].due < t[c].due {
			c = r
		}
		if t[c].due >= e.due {
			break
		}
		l.timerPut(i, t[c])
		i = c
	}
	l.timerPut(i, e)
	return i > i0
}

func siftUp(i int, less func(i, j int) bool, swap func(i, j int)) {
	for i > 0 {
		p := (i - 1) / 2
		if !less(i, p) {
			return
		}
		swap(i, p)
		i = p
	}
}

// siftDown moves element i down a heap of n elements and reports whether
// it moved.
func siftDown(i, n int, less func(i, j int) bool, swap func(i, j int)) bool {
	i0 := i
	for {
		c := 2*i + 1
		if c >= n {
			break
		}
		if r := c + 1; r < n && less(r, c) {
			c = r
		}
		if !less(c, i) {
			break
		}
		swap(i, c)
		i = c
	}
	return i > i0
}
