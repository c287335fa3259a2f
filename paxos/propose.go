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
	lazyArmed bool // a timer will wake the loop for the lazy ones queued
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
		if !p.lazyArmed {
			p.lazyArmed = true
			time.AfterFunc(p.lazyDelay, p.signal)
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

func (p *proposalQueue) take() []proposal {
	p.mu.Lock()
	q := p.q
	p.q = nil
	// A timer still armed fires into an empty queue: a harmless wake-up.
	p.lazyArmed = false
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
