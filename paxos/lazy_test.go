package paxos

import (
	"context"
	"testing"
	"time"
)

// A lazy proposal waits for an eager one and commits just before it, in
// its round; alone, it goes after LazyDelay.
func TestLazyProposalRidesWithTheNextOne(t *testing.T) {
	c := newTestClusterWith(t, 3, func(cfg *Config) { cfg.LazyDelay = time.Hour })
	l := c.leader()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := l.Propose(ctx, []byte("first")); err != nil {
		t.Fatal(err)
	}
	lazy := l.ProposeAsyncLazy(ctx, []byte("lazy"))
	select {
	case r := <-lazy:
		t.Fatalf("a lazy proposal committed on its own (%+v) within an hour's delay", r)
	case <-time.After(300 * time.Millisecond):
	}
	eager, err := l.Propose(ctx, []byte("eager"))
	if err != nil {
		t.Fatal(err)
	}
	r := <-lazy
	if r.Err != nil || r.Index != eager-1 {
		t.Fatalf("lazy proposal: %+v, want index %d, just before the eager one", r, eager-1)
	}
	seq := c.waitSame(eager)
	if n := len(seq); n < 2 || seq[n-2] != "lazy" || seq[n-1] != "eager" {
		t.Fatalf("log ends %q, want lazy then eager", seq)
	}
}

func TestLazyProposalAloneCommitsAfterItsDelay(t *testing.T) {
	c := newTestClusterWith(t, 3, func(cfg *Config) { cfg.LazyDelay = 50 * time.Millisecond })
	l := c.leader()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := <-l.ProposeAsyncLazy(ctx, []byte("alone"))
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	if seq := c.waitSame(r.Index); seq[len(seq)-1] != "alone" {
		t.Fatalf("log ends %q", seq)
	}
}

// A lazy proposal waits its own LazyDelay, not what is left of the delay
// of an earlier lazy one that an eager proposal already took along.
func TestLazyProposalWaitsItsOwnDelay(t *testing.T) {
	const delay = 400 * time.Millisecond
	c := newTestClusterWith(t, 3, func(cfg *Config) { cfg.LazyDelay = delay })
	l := c.leader()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first := l.ProposeAsyncLazy(ctx, []byte("first lazy"))
	if _, err := l.Propose(ctx, []byte("eager")); err != nil {
		t.Fatal(err)
	}
	if r := <-first; r.Err != nil {
		t.Fatal(r.Err)
	}
	time.Sleep(delay / 2)
	start := time.Now()
	r := <-l.ProposeAsyncLazy(ctx, []byte("second lazy"))
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	if waited := time.Since(start); waited < delay {
		t.Fatalf("the second lazy proposal committed after %v, before its own delay of %v", waited, delay)
	}
}
