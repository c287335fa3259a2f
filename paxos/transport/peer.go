package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// peer owns the outbound stream to one peer: a bounded queue filled by Send
// and one writer goroutine (run) that dials, drains and redials.
type peer struct {
	t       *TCP
	id      uint64
	log     logrus.FieldLogger
	queue   chan raftpb.Message
	metrics peerMetrics

	ctx    context.Context // cancelled by stop
	cancel context.CancelFunc
	kick   chan struct{} // address changed: skip the backoff sleep

	// connected gates Send: while false, messages are dropped at once
	// rather than queued behind a dead stream.
	connected atomic.Bool

	mu   sync.Mutex
	addr string
	conn net.Conn // current stream, so that stop and setAddr can break it

	dropLog, dialLog rateLimit
}

func newPeer(t *TCP, id uint64, addr string) *peer {
	ctx, cancel := context.WithCancel(t.ctx)
	return &peer{
		t:       t,
		id:      id,
		log:     t.log.WithField("peer", fmt.Sprintf("%x", id)),
		queue:   make(chan raftpb.Message, t.opts.QueueSize),
		metrics: t.metrics.forPeer(id),
		ctx:     ctx,
		cancel:  cancel,
		kick:    make(chan struct{}, 1),
		addr:    addr,
	}
}

// start launches the writer; t.mu must be held.
func (p *peer) start() { p.t.goLocked(p.run) }

// stop makes the writer exit: it cancels dials and sleeps, and closes the
// stream to unblock a write stuck on a peer that does not read.
func (p *peer) stop() {
	p.cancel()
	p.mu.Lock()
	if p.conn != nil {
		p.conn.Close()
	}
	p.mu.Unlock()
}

func (p *peer) setAddr(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if addr == p.addr {
		return
	}
	p.log.WithFields(logrus.Fields{"old": p.addr, "new": addr}).Info("peer address changed; redialling")
	p.addr = addr
	if p.conn != nil {
		p.conn.Close()
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// enqueue queues m without blocking, or drops it.
func (p *peer) enqueue(m *raftpb.Message) {
	reason := dropDisconnected
	if p.connected.Load() {
		select {
		case p.queue <- *m:
			return
		default:
			reason = dropQueueFull
		}
	}
	p.drop(m, reason)
}

// drop accounts for a message that will not be sent and reports it to raft.
func (p *peer) drop(m *raftpb.Message, reason string) {
	p.metrics.dropped[reason].Inc()
	p.t.reports.dropped(p.id, m.Type == raftpb.MsgSnap)
	if reason == dropClosed {
		return
	}
	if n, ok := p.dropLog.allow(); ok {
		p.log.WithFields(logrus.Fields{"reason": reason, "type": m.Type, "suppressed": n}).
			Warn("dropping messages to peer")
	}
}

// drainQueue drops whatever is queued; called whenever the stream is down
// so that nothing sits in the queue unreported.
func (p *peer) drainQueue(reason string) {
	for {
		select {
		case m := <-p.queue:
			p.drop(&m, reason)
		default:
			return
		}
	}
}

// run is the writer goroutine: dial, stream until error, back off, repeat.
func (p *peer) run() {
	backoff := initialBackoff
	for {
		conn, err := p.dial()
		if err == nil {
			began := time.Now()
			err = p.stream(conn)
			p.disconnected()
			conn.Close()
			// A stream that lived a while resets the backoff; one that dies
			// at once (peer refusing our handshake) keeps growing it.
			if time.Since(began) > p.t.opts.MaxBackoff {
				backoff = initialBackoff
			}
		}
		if p.ctx.Err() != nil {
			p.drainQueue(dropClosed)
			return
		}
		p.drainQueue(dropDisconnected)
		if n, ok := p.dialLog.allow(); ok {
			p.log.WithError(err).WithField("suppressed", n).Warn("no stream to peer; retrying with backoff")
		} else {
			p.log.WithError(err).Debug("no stream to peer")
		}
		// Jitter in [backoff/2, backoff) so that peers restarting together
		// do not redial in lockstep.
		d := backoff/2 + rand.N(backoff/2+1)
		if !sleepCtx(p.ctx, d, p.kick) {
			p.drainQueue(dropClosed)
			return
		}
		backoff = min(2*backoff, p.t.opts.MaxBackoff)
	}
}

// dial connects and sends the handshake.
func (p *peer) dial() (net.Conn, error) {
	p.mu.Lock()
	addr := p.addr
	p.mu.Unlock()
	d := net.Dialer{Timeout: p.t.opts.DialTimeout}
	conn, err := d.DialContext(p.ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial peer %x at %s: %w", p.id, addr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true) // Go's default, but latency matters here: be explicit
	}
	hs := handshake{version: ProtocolVersion, clusterID: p.t.clusterID, from: p.t.id, to: p.id}.appendTo(nil)
	_ = conn.SetWriteDeadline(time.Now().Add(p.t.opts.DialTimeout))
	if _, err := conn.Write(hs); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send handshake to peer %x at %s: %w", p.id, addr, err)
	}
	// Publish conn so that stop and setAddr can break it, unless one of
	// them ran during the dial (they found no conn to close).
	p.mu.Lock()
	switch {
	case p.ctx.Err() != nil:
		err = p.ctx.Err()
	case p.addr != addr:
		err = fmt.Errorf("peer %x moved from %s to %s while dialling", p.id, addr, p.addr)
	default:
		p.conn = conn
	}
	p.mu.Unlock()
	if err != nil {
		conn.Close()
		return nil, err
	}
	p.connected.Store(true)
	p.metrics.connected.Set(1)
	p.log.Debug("stream to peer up")
	return conn, nil
}

// disconnected marks the stream down; run drains the queue next.
func (p *peer) disconnected() {
	p.connected.Store(false)
	p.metrics.connected.Set(0)
	p.mu.Lock()
	p.conn = nil
	p.mu.Unlock()
}

// stream writes queued messages to conn until the stream breaks (error) or
// the peer is stopped (nil).
func (p *peer) stream(conn net.Conn) error {
	// The peer never writes on our stream, so a read that returns means it
	// closed it (or broke protocol): notice now, not at the next write.
	broken := make(chan error, 1)
	p.t.mu.RLock()
	ok := p.t.goLocked(func() {
		var b [1]byte
		_, err := conn.Read(b[:])
		if err == nil {
			err = errors.New("peer wrote on our stream")
		}
		broken <- err
	})
	p.t.mu.RUnlock()
	if !ok {
		return errors.New("transport closing")
	}

	bw := bufio.NewWriterSize(deadlineWriter{conn, p.t.opts.WriteTimeout}, ioBufferSize)
	var (
		buf   []byte
		snaps []uint64 // MsgSnap recipients in the batch, reported after flush
	)
	for {
		var m raftpb.Message
		select {
		case <-p.ctx.Done():
			return nil
		case err := <-broken:
			return fmt.Errorf("stream to peer %x closed: %w", p.id, err)
		case m = <-p.queue:
		}
		// Coalesce everything already queued into one flush: when busy,
		// many messages per syscall.
		n, bytes := 0, 0
		snaps = snaps[:0]
		for more := true; more; {
			frame, err := AppendFrame(buf[:0], &m)
			switch {
			case err != nil:
				reason := dropEncodeError
				if errors.Is(err, ErrFrameTooLarge) {
					reason = dropTooLarge
				}
				p.log.WithError(err).Error("cannot send message; dropping it")
				p.drop(&m, reason)
			default:
				buf = frame
				if _, err := bw.Write(frame); err != nil {
					return p.failBatch(fmt.Errorf("write to peer %x: %w", p.id, err), n+1, snaps, &m)
				}
				n++
				bytes += len(frame)
				if m.Type == raftpb.MsgSnap {
					snaps = append(snaps, m.To)
				}
			}
			more = false
			if bytes < maxBatchBytes {
				select {
				case m = <-p.queue:
					more = true
				default:
				}
			}
		}
		if err := bw.Flush(); err != nil {
			return p.failBatch(fmt.Errorf("flush to peer %x: %w", p.id, err), n, snaps, nil)
		}
		p.metrics.sent.Add(float64(n))
		p.metrics.bytesSent.Add(float64(bytes))
		for _, to := range snaps {
			p.t.reports.snapshot(to, raft.SnapshotFinish)
		}
		if cap(buf) > keepBufBytes {
			buf = nil
		}
	}
}

// failBatch accounts for a batch lost with the stream: n messages, among
// them the snapshots in snaps and, if not nil, cur (not yet in snaps).
func (p *peer) failBatch(err error, n int, snaps []uint64, cur *raftpb.Message) error {
	p.metrics.dropped[dropWriteError].Add(float64(n))
	if cur != nil && cur.Type == raftpb.MsgSnap {
		snaps = append(snaps, cur.To)
	}
	for _, to := range snaps {
		p.t.reports.snapshot(to, raft.SnapshotFailure)
	}
	p.t.reports.dropped(p.id, false)
	return err
}

// deadlineWriter bounds each write by a deadline, refreshed per chunk so
// that a large frame on a slow but live link is not cut off, while a peer
// that stopped reading is.
type deadlineWriter struct {
	c       net.Conn
	timeout time.Duration
}

func (w deadlineWriter) Write(b []byte) (int, error) {
	const chunk = 1 << 20
	written := 0
	for len(b) > 0 {
		k := min(len(b), chunk)
		if err := w.c.SetWriteDeadline(time.Now().Add(w.timeout)); err != nil {
			return written, err
		}
		n, err := w.c.Write(b[:k])
		written += n
		if err != nil {
			return written, err
		}
		b = b[n:]
	}
	return written, nil
}
