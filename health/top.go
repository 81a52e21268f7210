package health

import (
	"cmp"
	"slices"
)

// Top picks the first rows of a list out of rows seen one at a time: it
// keeps the least keep rows by cmp in a heap, so that a page near the
// start of a million rows costs a look at each and about as many
// comparisons, and memory for the rows kept, not a sort of them all.
// cmp must be a total order (break ties) for pages to agree.
type Top[T any] struct {
	keep int
	cmp  func(a, b T) int
	h    []T // a heap with the greatest row first once len(h) == keep
}

// NewTop returns a Top that keeps the least keep rows (keep 0: none, only
// seen), with room for hint of them at first.
func NewTop[T any](keep, hint int, cmp func(a, b T) int) *Top[T] {
	return &Top[T]{keep: keep, cmp: cmp, h: make([]T, 0, max(0, min(keep, hint, 1<<16)))}
}

// Add offers a row: kept when it is among the least keep seen so far.
func (t *Top[T]) Add(x T) {
	switch {
	case len(t.h) < t.keep:
		t.h = append(t.h, x)
		if len(t.h) == t.keep {
			for i := len(t.h)/2 - 1; i >= 0; i-- {
				t.siftDown(i)
			}
		}
	case t.keep > 0 && t.cmp(x, t.h[0]) < 0:
		t.h[0] = x // the greatest row kept gives way
		t.siftDown(0)
	}
}

// Sorted returns the rows kept, least first. The Top is spent.
func (t *Top[T]) Sorted() []T {
	slices.SortFunc(t.h, t.cmp)
	return t.h
}

func (t *Top[T]) siftDown(i int) {
	h := t.h
	for {
		c := 2*i + 1
		if c >= len(h) {
			return
		}
		if c+1 < len(h) && t.cmp(h[c+1], h[c]) > 0 {
			c++
		}
		if t.cmp(h[c], h[i]) <= 0 {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// CompareSettings orders settings: any order, but always the same, to
// break the ties of lists between checkers of one address and interval.
func CompareSettings(x, y Settings) int {
	return cmp.Or(cmp.Compare(x.Interval, y.Interval), cmp.Compare(x.Timeout, y.Timeout), cmp.Compare(x.Passes, y.Passes),
		cmp.Compare(x.Fails, y.Fails), cmp.Compare(x.FastInterval, y.FastInterval), cmp.Compare(x.DownInterval, y.DownInterval),
		cmp.Compare(x.JitterPercent, y.JitterPercent), cmp.Compare(x.Jitter, y.Jitter))
}
