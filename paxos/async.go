package paxos

import (
	"context"
	"encoding/binary"
)

// ProposeResult is the outcome of ProposeAsync: the entry's index once it
// is committed, or why it is not (ErrStopped, ErrNoLeader, ErrBusy,
// ErrUnknownOutcome or the context's error).
type ProposeResult struct {
	Index uint64
	Err   error
}

// ProposeAsync queues data for the log and returns at once; the channel
// receives exactly one result. Proposals queued by calls that happen one
// after the other (from one goroutine, or serialized by the caller) enter
// the log in that order, as far as they enter it: a proposal that fails
// may leave a gap between the ones before and after it, which the
// application must be able to recognize. Cancelling ctx only stops the
// wait; the proposal may still be committed.
func (n *Node) ProposeAsync(ctx context.Context, data []byte) <-chan ProposeResult {
	return n.proposeAsync(ctx, false, data)[0]
}

// ProposeAsyncLazy is ProposeAsync for an entry that is in no hurry: it
// waits up to Config.LazyDelay for another proposal to share its round
// (its fsync and its messages) instead of taking one of its own. Its order
// relative to other proposals is still the order of the calls.
func (n *Node) ProposeAsyncLazy(ctx context.Context, data []byte) <-chan ProposeResult {
	return n.proposeAsync(ctx, true, data)[0]
}

// ProposeAsyncBatch is ProposeAsync for several entries at once: they are
// queued together, in order, so that the node takes them in one step and
// they normally commit in one round (one fsync) rather than one after the
// other.
func (n *Node) ProposeAsyncBatch(ctx context.Context, data ...[]byte) []<-chan ProposeResult {
	return n.proposeAsync(ctx, false, data...)
}

func (n *Node) proposeAsync(ctx context.Context, lazy bool, data ...[]byte) []<-chan ProposeResult {
	outs := make([]<-chan ProposeResult, len(data))
	ws := make([]*waiter, len(data))
	props := make([]proposal, len(data))
	for i, d := range data {
		ws[i] = n.waiters.add()
		buf := make([]byte, 8+len(d))
		binary.BigEndian.PutUint64(buf, ws[i].id)
		copy(buf[8:], d)
		props[i] = proposal{id: ws[i].id, data: buf}
	}
	queued := n.props.pushAll(lazy, props...)
	for i, w := range ws {
		out := make(chan ProposeResult, 1)
		outs[i] = out
		if !queued {
			n.waiters.remove(w.id)
			out <- ProposeResult{Err: ErrStopped}
			continue
		}
		go n.await(ctx, w, out)
	}
	return outs
}

func (n *Node) await(ctx context.Context, w *waiter, out chan<- ProposeResult) {
	select {
	case r := <-w.ch:
		if r.err != nil {
			n.m.failed.Inc()
		}
		out <- ProposeResult{Index: r.index, Err: r.err}
	case <-ctx.Done():
		n.waiters.remove(w.id)
		n.m.failed.Inc()
		out <- ProposeResult{Err: ctx.Err()}
	case <-n.done:
		out <- ProposeResult{Err: ErrStopped}
	}
}
