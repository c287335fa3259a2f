package proxy

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/sirupsen/logrus"

	"lockstep/dmt"
)

// DMTFeeder is the feeder of joint_sched: the server runs under the
// deterministic runtime (dmt, with Options.Joint) and its input is gated
// by the runtime's input channel. The bytes still travel over real TCP
// connections (a TCPFeeder); what the channel adds is which input comes
// next (chanFeeder). The runtime admits one entry at a time, at a fixed
// point of its schedule, and lets the server's accept/recv/poll/epoll see
// only admitted input, so every replica's server sees the same input at
// the same logical time.
//
// The leader keeps the runtime's clock moving when the server waits for
// input and nothing comes (time bubbling, bubble.go).
//
// In a container (LXCServerOptions.Joint) the in-container feeder runs
// the chanFeeder and the replica only the bubbler.
type DMTFeeder struct {
	*chanFeeder

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
		tcp := NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: out, Logger: log})
		return &DMTFeeder{chanFeeder: newChanFeeder(tcp, o.Chan, log), rep: rep, bopts: o.Bubbles}
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

// Feed implements Feeder.
func (f *DMTFeeder) Feed(c Committed) {
	// The apply loop runs after the replica's log started: the bubbler
	// may use it from now on.
	f.once.Do(func() {
		if f.rep != nil {
			f.bubbler = startBubbler(f.rep, f, f.bopts)
		}
	})
	var seen uint32
	if c.Type == Bubble {
		seen = f.ch.StarveCount()
	}
	f.feed(c)
	if c.Type == Bubble && f.bubbler != nil {
		f.bubbler.fed(seen)
	}
}

// withChan and inputsFed make the DMTFeeder the bubbler's source.
func (f *DMTFeeder) withChan(fn func(*dmt.Chan)) bool { fn(f.ch); return true }
func (f *DMTFeeder) inputsFed() uint64                { return f.inputs.Load() }

// Close implements Feeder.
func (f *DMTFeeder) Close() error {
	if f.bubbler != nil {
		f.bubbler.stop()
	}
	return f.chanFeeder.Close()
}

// chanFeeder feeds a TCPFeeder and announces every event in the runtime's
// input channel, in log order, as CONNECT(conn, the feeder's source
// port), DATA(conn, length), CLOSE(conn) or BUBBLE(ticks, the leader's
// time). Channel connection ids are assigned in log order (0, 1, ...), so
// they are the same on every replica; they are part of the feeder's state
// (in a container, of every image).
type chanFeeder struct {
	tcp *TCPFeeder
	ch  *dmt.Chan
	log logrus.FieldLogger

	mu     sync.Mutex
	ids    map[uint64]uint32
	next   uint32
	inputs atomic.Uint64 // non-bubble entries pushed
	closed bool
}

func newChanFeeder(tcp *TCPFeeder, ch *dmt.Chan, log logrus.FieldLogger) *chanFeeder {
	return &chanFeeder{tcp: tcp, ch: ch, log: log, ids: map[uint64]uint32{}}
}

func (f *chanFeeder) push(e dmt.ChanEntry) {
	if e.Kind != dmt.EvBubble {
		f.inputs.Add(1)
	}
	if err := f.ch.Push(e); err != nil && !f.isClosed() {
		f.log.WithError(err).Warn("proxy: dmt input channel")
	}
}

func (f *chanFeeder) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

func (f *chanFeeder) feed(c Committed) {
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
		f.tcp.Feed(c) // its index only
		ticks := min(c.Ticks, 1<<31)
		f.push(dmt.ChanEntry{Seq: c.Index, Kind: dmt.EvBubble, Len: uint32(ticks), LTime: c.Time})
	default:
		f.tcp.Feed(c)
	}
}

func (f *chanFeeder) id(conn uint64, drop bool) (uint32, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.ids[conn]
	if drop {
		delete(f.ids, conn)
	}
	return id, ok
}

// Quiesce implements Feeder.
func (f *chanFeeder) Quiesce(ctx context.Context, index uint64) error {
	return f.tcp.Quiesce(ctx, index)
}

// Backlog reports the bytes fed but not yet written to the server.
func (f *chanFeeder) Backlog() int64 { return f.tcp.Backlog() }

// release lets the server run freely to its end: no more input will come,
// and a signal to stop it must not wait for the log. One last, huge
// bubble does it.
func (f *chanFeeder) release() {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.ch.TryPush(dmt.ChanEntry{Kind: dmt.EvBubble, Len: 1 << 30})
	f.ch.Close()
}

// Close implements Feeder.
func (f *chanFeeder) Close() error {
	f.release()
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
	return fc.c.localPort()
}
