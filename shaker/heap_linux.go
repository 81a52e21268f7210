//go:build linux && !shaker_fallback

package shaker

// The deadline heap: a binary min-heap of slot indices ordered by deadline,
// each slot knowing its place (heapIdx) so that a completed probe leaves it
// in O(log n).

func (e *Engine) heapLess(i, j int) bool {
	return e.slots[e.heap[i]].deadline < e.slots[e.heap[j]].deadline
}

func (e *Engine) heapSwap(i, j int) {
	e.heap[i], e.heap[j] = e.heap[j], e.heap[i]
	e.slots[e.heap[i]].heapIdx = i
	e.slots[e.heap[j]].heapIdx = j
}

func (e *Engine) heapPush(idx int32) {
	e.heap = append(e.heap, idx)
	i := len(e.heap) - 1
	e.slots[idx].heapIdx = i
	e.heapUp(i)
}

func (e *Engine) heapRemove(i int) {
	last := len(e.heap) - 1
	if i != last {
		e.heapSwap(i, last)
	}
	e.heap = e.heap[:last]
	if i != last {
		if !e.heapDown(i) {
			e.heapUp(i)
		}
	}
}

func (e *Engine) heapUp(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !e.heapLess(i, p) {
			return
		}
		e.heapSwap(i, p)
		i = p
	}
}

// heapDown reports whether the element moved.
func (e *Engine) heapDown(i int) bool {
	i0 := i
	n := len(e.heap)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		c := l
		if r := l + 1; r < n && e.heapLess(r, l) {
			c = r
		}
		if !e.heapLess(c, i) {
			break
		}
		e.heapSwap(i, c)
		i = c
	}
	return i > i0
}
