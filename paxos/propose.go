package paxos

import (
	"sync"
	"time"
)

type proposal struct {
	id   uint64
	data []byte // 8-byte id, then the application's bytes
}

// proposalQueue collects proposals from many goroutines so that the loop
// takes them all at once: the batching that lets one Ready, one fsync and
// one network write serve many clients.
//
// A lazy proposal does not wake the loop: it rides with the next eager one,
// or goes on its own after lazyDelay. An entry nobody waits for (a server's
// close, say) then costs no round and no fsync of its own.
type proposalQueue struct {
	mu        sync.Mutex
	q         []proposal
	closed    bool
	wake      chan struct{}
	lazyDelay time.Duration
	// lazyDue is when the oldest lazy proposal queued must go (zero: none
	// is queued); lazyTimer wakes the loop then. A timer armed for lazy
	// proposals that an eager one has since taken along must not flush
	// the next lazy one early: at one request at a time, that cost a
	// third of the requests a round and an fsync of their own.
	lazyDue   time.Time
	lazyTimer *time.Timer
}

func (p *proposalQueue) push(pr proposal) bool { return p.pushAll(false, pr) }

// pushAll queues prs together, in order.
func (p *proposalQueue) pushAll(lazy bool, prs ...proposal) bool {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false
	}
	p.q = append(p.q, prs...)
	if lazy && p.lazyDelay > 0 {
		if p.lazyDue.IsZero() {
			p.lazyDue = time.Now().Add(p.lazyDelay)
			if p.lazyTimer == nil {
				p.lazyTimer = time.AfterFunc(p.lazyDelay, p.lazyFired)
			} else {
				p.lazyTimer.Reset(p.lazyDelay)
			}
		}
		p.mu.Unlock()
		return true
	}
	p.mu.Unlock()
	p.signal()
	return true
}

func (p *proposalQueue) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// lazyFired wakes the loop if the oldest lazy proposal is due; a timer
// that fires for proposals already taken (or races a Reset) does nothing.
func (p *proposalQueue) lazyFired() {
	p.mu.Lock()
	due := false
	if !p.lazyDue.IsZero() {
		if wait := time.Until(p.lazyDue); wait > 0 {
			p.lazyTimer.Reset(wait) // a Reset raced this run
		} else {
			due = true
		}
	}
	p.mu.Unlock()
	if due {
		p.signal()
	}
}

func (p *proposalQueue) take() []proposal {
	p.mu.Lock()
	q := p.q
	p.q = nil
	p.lazyDue = time.Time{}
	p.mu.Unlock()
	return q
}

func (p *proposalQueue) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
}

type result struct {
	index uint64
	err   error
}

type waiter struct {
	id uint64
	ch chan result
}

// waiters match committed entries to the proposals waiting for them by a
// 64-bit id carried in the entry: node id in the top 16 bits, then a random
// start per incarnation plus a counter, so that an entry proposed before a
// restart never completes a waiter after it.
type waiters struct {
	mu     sync.Mutex
	m      map[uint64]*waiter
	prefix uint64
	next   uint64
}

func (w *waiters) add() *waiter {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.next++
	id := w.prefix&^(1<<48-1) | (w.prefix+w.next)&(1<<48-1)
	wt := &waiter{id: id, ch: make(chan result, 1)}
	w.m[id] = wt
	return wt
}

func (w *waiters) remove(id uint64) {
	w.mu.Lock()
	delete(w.m, id)
	w.mu.Unlock()
}

// done completes the waiter for id, if this node has one.
func (w *waiters) done(id, index uint64) bool {
	w.mu.Lock()
	wt, ok := w.m[id]
	delete(w.m, id)
	w.mu.Unlock()
	if ok {
		wt.ch <- result{index: index}
	}
	return ok
}

func (w *waiters) fail(id uint64, err error) {
	w.mu.Lock()
	wt, ok := w.m[id]
	delete(w.m, id)
	w.mu.Unlock()
	if ok {
		wt.ch <- result{err: err}
	}
}

func (w *waiters) failAll(err error) {
	w.mu.Lock()
	m := w.m
	w.m = map[uint64]*waiter{}
	w.mu.Unlock()
	for _, wt := range m {
		wt.ch <- result{err: err}
	}
}
