package proxy

import (
	"context"
	"net"
	"sync"
	"sync/atomic"

	"github.com/sirupsen/logrus"

	"lockstep/dmt"
)

// DMTFeeder is the feeder of joint_sched: the server runs under the
// deterministic runtime (dmt, with Options.Joint) and its input is gated
// by the runtime's input channel. The bytes still travel over real TCP
// connections (a TCPFeeder); what the channel adds is which input comes
// next: every event fed is also written to the channel, in log order, as
// CONNECT(conn, the feeder's source port), DATA(conn, length),
// CLOSE(conn) or BUBBLE(ticks, the leader's time). The runtime admits one
// entry at a time, at a fixed point of its schedule, and lets the
// server's accept/recv/poll/epoll see only admitted input, so every
// replica's server sees the same input at the same logical time.
//
// Channel connection ids are assigned in log order (0, 1, ...), so they
// are the same on every replica.
//
// The leader keeps the runtime's clock moving when the server waits for
// input and nothing comes (time bubbling, bubble.go).
type DMTFeeder struct {
	tcp *TCPFeeder
	ch  *dmt.Chan
	log logrus.FieldLogger

	mu     sync.Mutex
	ids    map[uint64]uint32
	next   uint32
	inputs atomic.Uint64 // non-bubble entries pushed
	closed bool

	bubbler *bubbler
	rep     *Replica
	bopts   BubbleOptions
	once    sync.Once
}

// DMTFeederOptions configure NewDMTFeeder.
type DMTFeederOptions struct {
	// Chan is the runtime's input channel (dmt.OpenChan of the server's
	// shared-memory file, made with dmt.CreateChan before it started).
	Chan *dmt.Chan
	// Tap, if set, sees the server's output on its way to the replica
	// (tests record transcripts with it).
	Tap func(conn uint64, b []byte)
	// Bubbles tune time bubbling.
	Bubbles BubbleOptions
}

// NewDMTFeeder returns an Options.NewFeeder for joint_sched.
func NewDMTFeeder(o DMTFeederOptions) func(srv Server, out Output, log logrus.FieldLogger) Feeder {
	return func(srv Server, out Output, log logrus.FieldLogger) Feeder {
		rep, _ := out.(*Replica)
		if o.Tap != nil {
			out = tapOutput{Output: out, tap: o.Tap}
		}
		f := &DMTFeeder{
			tcp: NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: out, Logger: log}),
			ch:  o.Chan, log: log, ids: map[uint64]uint32{}, rep: rep, bopts: o.Bubbles,
		}
		return f
	}
}

type tapOutput struct {
	Output
	tap func(conn uint64, b []byte)
}

func (t tapOutput) ServerData(conn uint64, b []byte) {
	t.tap(conn, b)
	t.Output.ServerData(conn, b)
}

func (f *DMTFeeder) push(e dmt.ChanEntry) {
	if e.Kind != dmt.EvBubble {
		f.inputs.Add(1)
	}
	if err := f.ch.Push(e); err != nil && !f.isClosed() {
		f.log.WithError(err).Warn("proxy: dmt input channel")
	}
}

func (f *DMTFeeder) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// Feed implements Feeder.
func (f *DMTFeeder) Feed(c Committed) {
	// The apply loop runs after the replica's log started: the bubbler
	// may use it from now on.
	f.once.Do(func() {
		if f.rep != nil {
			f.bubbler = startBubbler(f.rep, f, f.bopts)
		}
	})
	switch c.Type {
	case Connect:
		f.tcp.Feed(c)
		port := f.tcp.localPort(c.Conn)
		f.mu.Lock()
		id := f.next
		f.next++
		f.ids[c.Conn] = id
		f.mu.Unlock()
		if port == 0 {
			// no connection reached the server: nothing to admit, and
			// its data is dropped like the TCP feeder drops it
			return
		}
		f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvConnect, Conn: id, Len: uint32(port)})
	case Data:
		f.tcp.Feed(c)
		if id, ok := f.id(c.Conn, false); ok && len(c.Data) > 0 {
			f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvData, Conn: id, Len: uint32(len(c.Data))})
		}
	case Shutdown:
		f.tcp.Feed(c)
		if id, ok := f.id(c.Conn, false); ok {
			f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvClose, Conn: id})
		}
	case Close, ServerClose:
		f.tcp.Feed(c)
		if id, ok := f.id(c.Conn, true); ok {
			f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvClose, Conn: id})
		}
	case Bubble:
		ticks := min(c.Ticks, 1<<31)
		f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvBubble, Len: uint32(ticks), LTime: c.Time})
		if f.bubbler != nil {
			f.bubbler.fed()
		}
	}
}

func (f *DMTFeeder) id(conn uint64, drop bool) (uint32, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.ids[conn]
	if drop {
		delete(f.ids, conn)
	}
	return id, ok
}

// Quiesce implements Feeder.
func (f *DMTFeeder) Quiesce(ctx context.Context, index uint64) error {
	return f.tcp.Quiesce(ctx, index)
}

// Backlog reports the bytes fed but not yet written to the server.
func (f *DMTFeeder) Backlog() int64 { return f.tcp.Backlog() }

// Close implements Feeder.
func (f *DMTFeeder) Close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	if f.bubbler != nil {
		f.bubbler.stop()
	}
	// No more input will come: one last, huge bubble lets the server run
	// freely to its end (a signal to stop it must not wait for the log).
	f.ch.TryPush(dmt.ChanEntry{Kind: dmt.EvBubble, Len: 1 << 30})
	f.ch.Close()
	return f.tcp.Close()
}

// localPort is the source port of the feeder's connection for conn, 0 if
// it has none.
func (t *TCPFeeder) localPort(conn uint64) int {
	t.mu.Lock()
	fc := t.conns[conn]
	t.mu.Unlock()
	if fc == nil || fc.c == nil {
		return 0
	}
	if a, ok := fc.c.LocalAddr().(*net.TCPAddr); ok {
		return a.Port
	}
	return 0
}
