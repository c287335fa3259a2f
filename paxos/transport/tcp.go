package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// Defaults for zero TCPOptions fields.
const (
	DefaultQueueSize        = 4096
	DefaultDialTimeout      = time.Second
	DefaultMaxBackoff       = time.Second
	DefaultWriteTimeout     = 5 * time.Second
	DefaultHandshakeTimeout = 5 * time.Second

	initialBackoff = 20 * time.Millisecond
	ioBufferSize   = 64 << 10
	// maxBatchBytes bounds how much one writer batch encodes before
	// flushing, so that snapshot reports and stop checks are not starved.
	maxBatchBytes = 1 << 20
	// keepBufBytes: scratch buffers grown beyond this (by a snapshot) are
	// released after use instead of being kept for the stream's lifetime.
	keepBufBytes = 1 << 20
	// logEvery rate-limits repetitive warnings (drops, failed dials).
	logEvery = 5 * time.Second
)

// TCPOptions configures NewTCP. Zero fields take the defaults above.
type TCPOptions struct {
	ID        uint64            // this node's raft id; required
	ClusterID uint64            // streams from another cluster are refused
	Listen    string            // host:port to listen on (":0" picks a port)
	Peers     map[uint64]string // initial peers id->addr; an entry for ID is ignored
	QueueSize int               // per-peer bounded queue of messages
	Logger    logrus.FieldLogger
	// DialTimeout bounds one connection attempt, handshake included.
	DialTimeout time.Duration
	// MaxBackoff caps the reconnect backoff, which starts at 20ms, doubles
	// per failure and is jittered.
	MaxBackoff time.Duration
	// WriteTimeout is how long a write to a peer may make no progress
	// before the stream is dropped and redialled (a peer that stopped
	// reading).
	WriteTimeout time.Duration
	// HandshakeTimeout is how long an inbound connection may take to send
	// its handshake.
	HandshakeTimeout time.Duration
	// Registerer, if not nil, gets the transport's metrics. Metric names
	// have no per-transport label: use one registry per transport, or
	// prometheus.WrapRegistererWith to add one.
	Registerer prometheus.Registerer
}

// TCP is a Transport over one long-lived TCP stream per direction and peer.
type TCP struct {
	id, clusterID uint64
	opts          TCPOptions
	log           logrus.FieldLogger
	ln            net.Listener
	metrics       *metrics
	reports       *reporter

	// ctx is cancelled by Close; it bounds dials, Process calls and sleeps.
	ctx    context.Context
	cancel context.CancelFunc
	// wg counts every goroutine the transport starts. Add happens only
	// under mu while !closed, so Close's Wait cannot race with it.
	wg sync.WaitGroup

	mu        sync.RWMutex
	raft      Raft // set by Start
	started   bool
	closed    bool
	peers     map[uint64]*peer
	inbound   map[net.Conn]struct{} // accepted connections, for Close
	inboundBy map[uint64]net.Conn   // current stream per sender

	closeOnce sync.Once
	closeErr  error
}

var _ Transport = (*TCP)(nil)

// NewTCP validates opts and starts listening; peers are dialled and inbound
// streams served once Start is called.
func NewTCP(opts TCPOptions) (*TCP, error) {
	if opts.ID == 0 {
		return nil, errors.New("transport: TCPOptions.ID must not be 0")
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = DefaultQueueSize
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if opts.Logger == nil {
		opts.Logger = logrus.StandardLogger()
	}
	log := opts.Logger.WithFields(logrus.Fields{"component": "transport", "node": fmt.Sprintf("%x", opts.ID)})

	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("transport: listen on %q: %w", opts.Listen, err)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		ln.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &TCP{
		id:        opts.ID,
		clusterID: opts.ClusterID,
		opts:      opts,
		log:       log,
		ln:        ln,
		metrics:   m,
		reports:   newReporter(),
		ctx:       ctx,
		cancel:    cancel,
		peers:     map[uint64]*peer{},
		inbound:   map[net.Conn]struct{}{},
		inboundBy: map[uint64]net.Conn{},
	}
	for id, addr := range opts.Peers {
		t.AddPeer(id, addr)
	}
	return t, nil
}

// Addr is the address the transport listens on (the chosen port if Listen
// was ":0").
func (t *TCP) Addr() string { return t.ln.Addr().String() }

// Start begins dialling peers and accepting their streams, delivering to r.
func (t *TCP) Start(r Raft) error {
	if r == nil {
		return errors.New("transport: Start with nil Raft")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.closed:
		return errors.New("transport: Start after Close")
	case t.started:
		return errors.New("transport: already started")
	}
	t.raft, t.started = r, true
	t.wg.Add(2)
	go t.reports.run(t.ctx, &t.wg, r)
	go t.acceptLoop()
	for _, p := range t.peers {
		p.start()
	}
	t.log.WithField("addr", t.Addr()).Info("transport started")
	return nil
}

// Send hands msgs to their recipients' streams and returns at once: a
// stream with nothing queued is written directly, with a non-blocking
// write (no goroutine to wake on the commit path); otherwise, or for what
// the socket does not take, the peer's writer goroutine sends it.
// Messages to unknown or disconnected peers, or that do not fit a peer's
// queue, are dropped and the peer reported unreachable (MsgSnap: snapshot
// failure).
// Reports reach Raft from another goroutine, never from within Send.
//
// Messages are queued by value, but their Entries, Snapshot and Context are
// shared until written: as with raft's Ready.Messages, the caller must not
// modify those. Messages sent before Start or after Close are dropped
// silently.
func (t *TCP) Send(msgs []raftpb.Message) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if !t.started || t.closed {
		return
	}
	for i := range msgs {
		m := &msgs[i]
		if p := t.peers[m.To]; p != nil {
			p.enqueue(m)
			continue
		}
		if m.To == t.id {
			t.log.WithField("type", m.Type).Debug("dropping message addressed to self")
			continue
		}
		t.metrics.dropped.WithLabelValues(peerLabel(m.To), dropUnknownPeer).Inc()
		t.reports.dropped(m.To, m.Type == raftpb.MsgSnap)
	}
}

// AddPeer makes a peer known, or changes its address (the stream is then
// redialled at once). Adding ourselves or id 0 is ignored.
func (t *TCP) AddPeer(id uint64, addr string) {
	if id == 0 || id == t.id {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	if p := t.peers[id]; p != nil {
		p.setAddr(addr)
		return
	}
	p := newPeer(t, id, addr)
	t.peers[id] = p
	if t.started {
		p.start()
	}
}

// RemovePeer forgets a peer and closes our stream to it; its queued messages
// are dropped. It does not wait for the stream's goroutine (Close does), so
// it is safe to call from the goroutine that serves Raft. Inbound streams
// from the peer are left alone: the peer stops sending once it is removed.
func (t *TCP) RemovePeer(id uint64) {
	t.mu.Lock()
	p := t.peers[id]
	delete(t.peers, id)
	t.mu.Unlock()
	if p != nil {
		p.stop()
		t.metrics.forget(id)
	}
}

// PeerConnected reports whether the outbound stream to peer id is up, i.e.
// whether Send would queue rather than drop messages to it.
func (t *TCP) PeerConnected(id uint64) bool {
	t.mu.RLock()
	p := t.peers[id]
	t.mu.RUnlock()
	return p != nil && p.connected.Load()
}

// Close stops the listener and every stream and waits for all goroutines.
// It is idempotent; calls after the first return the first's result.
func (t *TCP) Close() error {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		t.closed = true
		peers := t.peers
		t.peers = map[uint64]*peer{}
		for c := range t.inbound {
			c.Close()
		}
		t.mu.Unlock()

		t.cancel()
		if err := t.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			t.closeErr = fmt.Errorf("transport: close listener: %w", err)
		}
		for _, p := range peers {
			p.stop()
		}
		t.wg.Wait()
		t.log.Info("transport closed")
	})
	return t.closeErr
}

// goLocked starts f as a tracked goroutine unless the transport is closed.
// t.mu must be held.
func (t *TCP) goLocked(f func()) bool {
	if t.closed {
		return false
	}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		f()
	}()
	return true
}

func (t *TCP) acceptLoop() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if t.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Typically EMFILE: back off instead of spinning.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.WithError(err).Warnf("accept failed; retrying in %v", delay)
			if !sleepCtx(t.ctx, delay, nil) {
				return
			}
			continue
		}
		delay = 0
		t.mu.Lock()
		ok := t.goLocked(func() { t.serve(c) })
		if ok {
			t.inbound[c] = struct{}{}
		}
		t.mu.Unlock()
		if !ok {
			c.Close()
			return
		}
	}
}

// serve reads one inbound stream. It runs on its own goroutine, so a slow
// Process stalls only this sender's stream (whose order it must keep
// anyway), never other peers'.
func (t *TCP) serve(c net.Conn) {
	log := t.log.WithField("remote", c.RemoteAddr().String())
	defer func() {
		c.Close()
		t.mu.Lock()
		delete(t.inbound, c)
		t.mu.Unlock()
	}()

	_ = c.SetReadDeadline(time.Now().Add(t.opts.HandshakeTimeout))
	h, err := readHandshake(c)
	if err == nil {
		err = h.check(t.clusterID, t.id)
	}
	if err != nil {
		t.metrics.rejected.WithLabelValues(rejectReason(err)).Inc()
		log.WithError(err).Error("refusing inbound stream: bad handshake")
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	from := h.from
	log = log.WithField("peer", fmt.Sprintf("%x", from))

	// One stream per sender: a new one means the sender redialled, so the
	// old one is dead even if TCP has not noticed yet.
	t.mu.Lock()
	if old := t.inboundBy[from]; old != nil {
		old.Close()
	}
	t.inboundBy[from] = c
	r := t.raft
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		if t.inboundBy[from] == c {
			delete(t.inboundBy, from)
		}
		t.mu.Unlock()
	}()
	log.Debug("inbound stream up")

	label := peerLabel(from)
	received := t.metrics.received.WithLabelValues(label)
	bytesReceived := t.metrics.bytesReceived.WithLabelValues(label)
	var processErrs rateLimit
	br := bufio.NewReaderSize(c, ioBufferSize)
	var buf []byte
	for {
		payload, err := ReadFrame(br, buf)
		if err != nil {
			switch {
			case t.ctx.Err() != nil || errors.Is(err, net.ErrClosed):
			case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
				log.WithError(err).Info("inbound stream closed by peer")
			default:
				if errors.Is(err, ErrFrameTooLarge) {
					t.metrics.badFrames.WithLabelValues(label).Inc()
				}
				log.WithError(err).Error("closing inbound stream: cannot read frame")
			}
			return
		}
		m, err := DecodeMessage(payload)
		if err == nil && (m.From != from || m.To != t.id) {
			err = fmt.Errorf("%v message from %x to %x on the stream from %x to %x", m.Type, m.From, m.To, from, t.id)
		}
		if err != nil {
			t.metrics.badFrames.WithLabelValues(label).Inc()
			log.WithError(err).Error("closing inbound stream: bad frame")
			return
		}
		if cap(payload) <= keepBufBytes {
			buf = payload[:0]
		} else {
			buf = nil
		}
		received.Inc()
		bytesReceived.Add(float64(frameHeaderSize + len(payload)))
		if err := r.Process(t.ctx, m); err != nil && t.ctx.Err() == nil {
			if n, ok := processErrs.allow(); ok {
				log.WithError(err).WithField("suppressed", n).Warn("raft did not process message")
			}
		}
	}
}

func rejectReason(err error) string {
	switch {
	case errors.Is(err, ErrClusterMismatch):
		return rejectCluster
	case errors.Is(err, ErrBadVersion):
		return rejectVersion
	case errors.Is(err, ErrWrongRecipient):
		return rejectRecipient
	case errors.Is(err, ErrBadSender):
		return rejectSender
	}
	return rejectHandshake
}

// reporter delivers unreachable and snapshot reports to Raft from its own
// goroutine, so that neither Send's caller (often the goroutine that drives
// raft) nor a stream writer ever blocks on, or re-enters, Raft. Close waits
// for it, so Raft's report methods must not block indefinitely while the
// transport is being closed.
type reporter struct {
	mu          sync.Mutex
	unreachable map[uint64]struct{}
	snaps       []snapReport
	wake        chan struct{}
}

type snapReport struct {
	to     uint64
	status raft.SnapshotStatus
}

func newReporter() *reporter {
	return &reporter{unreachable: map[uint64]struct{}{}, wake: make(chan struct{}, 1)}
}

// dropped records that a message to id was dropped.
func (rp *reporter) dropped(id uint64, snap bool) {
	rp.mu.Lock()
	rp.unreachable[id] = struct{}{} // coalesced: raft only needs to hear it once
	if snap {
		rp.snaps = append(rp.snaps, snapReport{id, raft.SnapshotFailure})
	}
	rp.mu.Unlock()
	rp.poke()
}

func (rp *reporter) snapshot(id uint64, status raft.SnapshotStatus) {
	rp.mu.Lock()
	rp.snaps = append(rp.snaps, snapReport{id, status})
	rp.mu.Unlock()
	rp.poke()
}

func (rp *reporter) poke() {
	select {
	case rp.wake <- struct{}{}:
	default:
	}
}

func (rp *reporter) run(ctx context.Context, wg *sync.WaitGroup, r Raft) {
	defer wg.Done()
	unreachable := map[uint64]struct{}{}
	var snaps []snapReport
	for {
		select {
		case <-ctx.Done():
			return
		case <-rp.wake:
		}
		rp.mu.Lock()
		unreachable, rp.unreachable = rp.unreachable, unreachable
		snaps, rp.snaps = rp.snaps, snaps[:0]
		rp.mu.Unlock()
		// Stop between calls once closing: Close waits for this goroutine,
		// and a closing node may no longer take reports.
		for id := range unreachable {
			if ctx.Err() != nil {
				return
			}
			r.ReportUnreachable(id)
		}
		clear(unreachable)
		for _, s := range snaps {
			if ctx.Err() != nil {
				return
			}
			r.ReportSnapshot(s.to, s.status)
		}
	}
}

// rateLimit lets one event through per logEvery and counts the rest.
type rateLimit struct {
	last       atomic.Int64 // unix nanos of the last allowed event
	suppressed atomic.Int64
}

// allow reports whether to log now, and how many events were suppressed
// since the last time it said yes.
func (l *rateLimit) allow() (int64, bool) {
	now := time.Now().UnixNano()
	last := l.last.Load()
	if now-last < int64(logEvery) || !l.last.CompareAndSwap(last, now) {
		l.suppressed.Add(1)
		return 0, false
	}
	return l.suppressed.Swap(0), true
}

// sleepCtx sleeps d, returning early (true) if wake fires or false if ctx
// is done.
func sleepCtx(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
		return true
	case <-tm.C:
		return true
	}
}
