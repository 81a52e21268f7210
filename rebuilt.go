package caddyshaker

import (
	"sync"
	"sync/atomic"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// Rebuilt holds a value built from the probes' state (a policy's list of
// upstreams in service), rebuilt when the state's version has moved or the
// value's own expiry (health.Now; 0 for none) has passed, never per call
// otherwise. While one caller rebuilds it, the others get the value before.
type Rebuilt[T any] struct {
	mu  sync.Mutex // one build at a time
	cur atomic.Pointer[built[T]]
}

type built[T any] struct {
	v       *T
	version uint64
	expires int64
}

// Get returns the value, built by build (which returns it and its expiry)
// if there is none yet, version() has moved since, or it has expired.
func (r *Rebuilt[T]) Get(version func() uint64, build func() (*T, int64)) *T {
	c := r.cur.Load()
	if c != nil && c.version == version() && (c.expires == 0 || health.Now() < c.expires) {
		return c.v
	}
	if !r.mu.TryLock() {
		if c != nil {
			return c.v
		}
		r.mu.Lock()
	}
	defer r.mu.Unlock()
	if now := r.cur.Load(); now != c && now != nil {
		return now.v // built while this one waited
	}
	v0 := version() // before the states are read: a change during the build rebuilds again
	v, exp := build()
	r.cur.Store(&built[T]{v: v, version: v0, expires: exp})
	return v
}

// For is Get with the version of states (0 while states is nil: nothing
// probed).
func (r *Rebuilt[T]) For(states MemberStates, build func() (*T, int64)) *T {
	return r.Get(func() uint64 {
		if states == nil {
			return 0
		}
		return states.Version()
	}, build)
}

// Peek returns the value last built, or nil: for tests.
func (r *Rebuilt[T]) Peek() *T {
	if c := r.cur.Load(); c != nil {
		return c.v
	}
	return nil
}
