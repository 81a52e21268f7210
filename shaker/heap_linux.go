//go:build linux && !shaker_fallback

package shaker

// Two binary min-heaps per loop, each element knowing its place so that it
// leaves in O(log n): the deadline heap of slot indices (probes in flight,
// by deadline) and the timer heap of schedules (periodic probes, by due
// time).

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

func (l *loop) timerLess(i, j int) bool { return l.timers[i].due < l.timers[j].due }

func (l *loop) timerSwap(i, j int) {
	l.timers[i], l.timers[j] = l.timers[j], l.timers[i]
	l.timers[i].idx = int32(i)
	l.timers[j].idx = int32(j)
}

func (l *loop) timerPush(s *Schedule) {
	l.timers = append(l.timers, s)
	i := len(l.timers) - 1
	s.idx = int32(i)
	siftUp(i, l.timerLess, l.timerSwap)
}

func (l *loop) timerRemove(i int) {
	last := len(l.timers) - 1
	if i != last {
		l.timerSwap(i, last)
	}
	l.timers[last].idx = -1
	l.timers[last] = nil
	l.timers = l.timers[:last]
	if i != last && !siftDown(i, last, l.timerLess, l.timerSwap) {
		siftUp(i, l.timerLess, l.timerSwap)
	}
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
