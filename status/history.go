package status

import (
	"context"
	"math/bits"
	"sync"
	"time"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// The RTT history of the status page: while at least one shaker_status
// handler is provisioned, a process-wide sampler reads the last RTT of
// every checker every rttSampleEvery (Checker.LastRTT: a short lock, no
// Status built, no allocation once the address has its history) and keeps
// the last rttHistoryLen RTTs of each, 2 bytes each, for at most
// rttHistoryMax addresses. Addresses no longer probed are dropped at the
// next sample. It lives here, not in the health state, so that the
// probing path pays nothing for it.
const (
	// rttHistoryLen samples of rttSampleEvery: 5 minutes.
	rttHistoryLen = 60
	// DefaultRTTSampleEvery is the period of the RTT history's samples.
	DefaultRTTSampleEvery = 5 * time.Second
	// rttHistoryMax is how many addresses (checkers) the history keeps:
	// 100,000 at 128 bytes each, 13 MB. Past it, an address first seen
	// when the history is full has none (its sparkline is empty) until
	// others go.
	rttHistoryMax = 100_000
)

// sampler is the process's one RTT history.
var sampler = &rttSampler{every: DefaultRTTSampleEvery}

// rttSampler samples RTTs while it has references.
type rttSampler struct {
	mu     sync.Mutex
	every  time.Duration // period; tests shorten it
	refs   int
	stop   context.CancelFunc
	done   chan struct{}
	rings  map[histKey]*rttRing
	gen    uint32
	source func(*rttSampler) // takes one sample (recordCheckers)
}

// histKey is whose history a ring is: a checker's (one per address and
// settings, as the registry keeps them), or, for the tests' lists of
// statuses, a historyKey.
type histKey struct {
	c *health.Checker
	s string
}

// rttRing is one address's last RTTs (packed, see packRTT; 0 = no
// sample), oldest at next once full. 128 bytes.
type rttRing struct {
	buf  [rttHistoryLen]uint16
	n    uint8 // samples held
	next uint8 // where the next one goes
	gen  uint32
}

// acquire takes a reference; the first starts sampling: source takes one
// sample (as sampleSource does).
func (s *rttSampler) acquire(source func(*rttSampler)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refs++
	if s.refs > 1 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop, s.done, s.source = cancel, make(chan struct{}), source
	s.rings = make(map[histKey]*rttRing)
	go s.run(ctx, s.every, s.done)
}

// release drops a reference; the last stops sampling, waits for the
// sampling goroutine to end and frees the history.
func (s *rttSampler) release() {
	s.mu.Lock()
	s.refs--
	if s.refs > 0 {
		s.mu.Unlock()
		return
	}
	stop, done := s.stop, s.done
	s.stop, s.done, s.source, s.rings = nil, nil, nil, nil
	s.mu.Unlock()
	stop()
	<-done
}

func (s *rttSampler) run(ctx context.Context, every time.Duration, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.mu.Lock()
		source := s.source
		s.mu.Unlock()
		if source != nil {
			source(s)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sampleSource is the sampler's source: every checker of the Source.
func sampleSource(s *rttSampler) { s.recordCheckers(currentCheckers()) }

// recordCheckers adds one sample of every checker to the history and
// drops the checkers that are gone.
func (s *rttSampler) recordCheckers(cs []*health.Checker) {
	s.sample(len(cs), func(i int) (histKey, uint16) {
		var x uint16
		if rtt, ok := cs[i].LastRTT(); ok {
			x = packRTT(rtt.Microseconds())
		}
		return histKey{c: cs[i]}, x
	})
}

// record is recordCheckers for a list of statuses (the tests').
func (s *rttSampler) record(list []health.Status) {
	s.sample(len(list), func(i int) (histKey, uint16) {
		st := &list[i]
		var x uint16
		if st.Healthy && st.CheckedAt != nil && st.LastError == "" {
			x = packRTT(st.LastRTTMicros)
		}
		return histKey{s: string(historyKey(nil, st))}, x
	})
}

// sample adds one sample of each of n addresses, at(i) being the key of
// the i-th and its packed RTT, and drops the addresses not sampled.
func (s *rttSampler) sample(n int, at func(i int) (histKey, uint16)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rings == nil {
		return // released meanwhile
	}
	s.gen++
	for i := range n {
		k, x := at(i)
		r := s.rings[k]
		if r == nil {
			if len(s.rings) >= rttHistoryMax {
				continue
			}
			r = new(rttRing)
			s.rings[k] = r
		}
		r.gen = s.gen
		r.buf[r.next] = x
		r.next = uint8((int(r.next) + 1) % rttHistoryLen)
		if int(r.n) < rttHistoryLen {
			r.n++
		}
	}
	for k, r := range s.rings {
		if r.gen != s.gen {
			delete(s.rings, k)
		}
	}
}

// history returns the samples of the address with this historyKey (the
// tests' statuses), oldest first; nil when there are none.
func (s *rttSampler) history(key []byte) rttHistory {
	return s.historyOf(histKey{s: string(key)})
}

// historyOf returns the samples of k, oldest first; nil when there are
// none.
func (s *rttSampler) historyOf(k histKey) rttHistory {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.rings[k]
	if r == nil || r.n == 0 {
		return nil
	}
	out := make(rttHistory, r.n)
	start := (int(r.next) - int(r.n) + rttHistoryLen) % rttHistoryLen
	for i := range out {
		out[i] = r.buf[(start+i)%rttHistoryLen]
	}
	return out
}

// period returns the sampling period.
func (s *rttSampler) period() time.Duration {
	if s == nil {
		return DefaultRTTSampleEvery
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.every
}

// historyKey appends the key of the history of a status of the tests'
// lists: the address and its probe settings, as the registry keeps one
// checker per pair.
func historyKey(b []byte, s *health.Status) []byte {
	b = append(b, s.Address...)
	for _, x := range []string{s.Interval, s.Timeout, s.FastInterval, s.DownInterval, s.Jitter} {
		b = append(b, ' ')
		b = append(b, x...)
	}
	return b
}

// packRTT packs microseconds into 16 bits, a small float: below 2048 µs
// exact, above with 11 significant bits (an error under 0.1%), up to
// about 50 days. 0 is kept for "no sample", so 0 µs packs as 1.
func packRTT(us int64) uint16 {
	if us < 1 {
		return 1
	}
	if us < 2048 {
		return uint16(us)
	}
	shift := bits.Len64(uint64(us)) - 11 // us>>shift in [1024, 2048)
	if shift > 31 {
		return 0xffff
	}
	return uint16(shift)<<11 | uint16(us>>shift)
}

// unpackRTT is packRTT's inverse (rounded down).
func unpackRTT(x uint16) int64 {
	return int64(x&0x7ff) << (x >> 11)
}
