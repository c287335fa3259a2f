package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"lockstep/dmt"
)

// BubbleOptions tune time bubbling (joint_sched).
type BubbleOptions struct {
	// Busy is the size in turns of a bubble while client connections are
	// open (default 1000, as Crane); it doubles with every bubble that
	// follows another without input in between, up to Idle.
	Busy uint64
	// Idle is the size with no connection open (default 10000).
	Idle uint64
	// NsPerTurn is the runtime's (dmt.Options.NsPerTurn, default 1000).
	// With no connection open, bubbles are paced so that the logical
	// clock runs no faster than real time (Idle turns at most every
	// Idle*NsPerTurn): an idle server does not fill the log.
	NsPerTurn uint64
}

// BubblesProposed is how many bubbles this process has proposed as a
// leader (the replicas' metrics count them too:
// lockstep_proxy_events_proposed_total{type="bubble"}).
func BubblesProposed() uint64 {
	return bubbleCount.Load()
}

var bubbleCount atomic.Uint64

// bubbler is the leader's half of time bubbling. The runtime in the
// server reports, through the channel, each time it must admit input and
// finds none (every thread waits for input, or the quantum is used up);
// the bubbler then proposes a bubble if this replica leads, none of its
// bubbles is in flight, and every committed entry has been fed (more
// input is on its way otherwise). Driven by the runtime's futex, not by
// polling; backups never propose.
type bubbler struct {
	r    *Replica
	src  bubbleSource
	o    BubbleOptions
	done chan struct{}
	wg   sync.WaitGroup

	// inflight: a bubble was proposed and has not been fed yet. Once fed,
	// the next one waits until the runtime starved again after it
	// (afterStarve, the channel's starve count before the feed, plus
	// one; 0: no condition): in a container the feed reaches the channel
	// a little later, through the in-container feeder.
	inflight    atomic.Bool
	afterStarve atomic.Uint64
	mu          sync.Mutex
	streak      int       // bubbles in a row without input
	inputs      uint64    // src.inputsFed() at the last bubble
	last        time.Time // when the last bubble was proposed
}

// bubbleSource is what the bubbler watches: the runtime's input channel
// (withChan calls fn with it, false if there is none now, between two
// containers) and how many inputs (not bubbles) have been fed to it.
type bubbleSource interface {
	withChan(fn func(*dmt.Chan)) bool
	inputsFed() uint64
}

func startBubbler(r *Replica, src bubbleSource, o BubbleOptions) *bubbler {
	if o.Busy == 0 {
		o.Busy = 1000
	}
	if o.Idle == 0 {
		o.Idle = 10000
	}
	if o.NsPerTurn == 0 {
		o.NsPerTurn = 1000
	}
	b := &bubbler{r: r, src: src, o: o, done: make(chan struct{})}
	b.wg.Add(1)
	go b.loop()
	return b
}

func (b *bubbler) stop() {
	close(b.done)
	b.wg.Wait() // the loop looks at done at least every 200ms
}

// fed: a bubble was fed, when the channel's starve count was seen; the
// next may be proposed when the runtime starves again.
func (b *bubbler) fed(seen uint32) {
	b.afterStarve.Store(uint64(seen) + 1)
	b.inflight.Store(false)
}

func (b *bubbler) loop() {
	defer b.wg.Done()
	var last *dmt.Chan
	for {
		select {
		case <-b.done:
			return
		default:
		}
		var seen uint32
		want := false
		have := b.src.withChan(func(ch *dmt.Chan) {
			if ch != last {
				// a new container (a restored image): its own count
				last = ch
				b.afterStarve.Store(0)
			}
			seen = ch.StarveCount()
			after := b.afterStarve.Load()
			starving, _ := ch.Starving()
			want = starving && (after == 0 || uint64(seen) != after-1) && !b.inflight.Load()
		})
		if !have {
			select {
			case <-b.done:
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		if want && b.leading() && b.inflight.CompareAndSwap(false, true) {
			if !b.pace() {
				return
			}
			b.propose()
		}
		// Woken by the runtime when it starves; the timeout only catches a
		// change of leader while it already starved.
		b.src.withChan(func(ch *dmt.Chan) { ch.WaitStarve(seen, 200*time.Millisecond) })
	}
}

// pace waits, with no connection open, until the last bubble's logical
// time has passed in real time. False: stopping.
func (b *bubbler) pace() bool {
	r := b.r
	r.smu.Lock()
	open := len(r.conns)
	r.smu.Unlock()
	if open > 0 {
		return true
	}
	b.mu.Lock()
	wait := time.Until(b.last.Add(time.Duration(b.o.Idle * b.o.NsPerTurn)))
	b.mu.Unlock()
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-b.done:
		b.inflight.Store(false)
		return false
	case <-t.C:
		return true
	}
}

func (b *bubbler) leading() bool {
	r := b.r
	r.lmu.Lock()
	serving := r.serving && r.tenure != 0
	r.lmu.Unlock()
	if !serving {
		return false
	}
	// Entries committed and not yet fed are input on its way.
	return r.node.Status().Commit <= r.Applied()
}

func (b *bubbler) propose() {
	r := b.r
	r.smu.Lock()
	open := len(r.conns)
	r.smu.Unlock()
	b.mu.Lock()
	in := b.src.inputsFed()
	if in != b.inputs {
		b.streak = 0
	}
	b.inputs = in
	size := b.o.Idle
	if open > 0 {
		size = b.o.Busy << min(b.streak, 16)
		size = min(size, b.o.Idle)
	}
	b.streak++
	b.last = time.Now()
	b.mu.Unlock()

	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	res := r.node.ProposeAsync(ctx, EncodeEvent(Event{Type: Bubble, Ticks: size, Time: uint64(time.Now().UnixNano())}))
	bubbleCount.Add(1)
	r.m.proposed.WithLabelValues(Bubble.String()).Inc()
	go func() {
		defer cancel()
		if x := <-res; x.Err != nil {
			r.m.proposeFailed.WithLabelValues(Bubble.String()).Inc()
			b.inflight.Store(false)
		}
	}()
}
