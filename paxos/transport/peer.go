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
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// peer owns the outbound stream to one peer: a bounded queue filled by Send
// and one writer goroutine (run) that dials, drains and redials. While the
// writer is idle, Send writes to the stream itself (writeDirect).
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

	// The stream is written either by Send's caller directly (a
	// non-blocking write, when the writer has nothing to do: no goroutine
	// to wake on the commit path) or by the writer goroutine; wmu and busy
	// keep the two apart and the frames in order.
	wmu     sync.Mutex
	wrc     syscall.RawConn // the stream while it is up, else nil
	busy    bool            // the writer has messages queued or in hand
	rest    []byte          // the tail of a frame a direct write left over
	scratch []byte
	restc   chan struct{} // rest is set: the writer writes it first

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
		restc:   make(chan struct{}, 1),
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

// enqueue writes m at once if the stream is idle, else queues it without
// blocking, or drops it.
func (p *peer) enqueue(m *raftpb.Message) {
	reason := dropDisconnected
	if p.connected.Load() {
		p.wmu.Lock()
		if p.writeDirect(m) {
			p.wmu.Unlock()
			return
		}
		select {
		case p.queue <- *m:
			p.busy = true
			p.wmu.Unlock()
			return
		default:
			reason = dropQueueFull
		}
		p.wmu.Unlock()
	}
	p.drop(m, reason)
}

// writeDirect writes m to the stream with a non-blocking write when the
// writer goroutine has nothing queued or in hand; what the socket does not
// take is left to the writer. It reports whether m was taken care of;
// p.wmu is held.
func (p *peer) writeDirect(m *raftpb.Message) bool {
	if p.wrc == nil || p.busy || m.Type == raftpb.MsgSnap {
		return false
	}
	frame, err := AppendFrame(p.scratch[:0], m)
	if err != nil {
		return false // the writer reports it
	}
	n := 0
	var werr error
	// Control, not Write: no wait for the socket (the writer does that)
	// and no write deadline, which the writer sets per write.
	cerr := p.wrc.Control(func(fd uintptr) {
		for n < len(frame) {
			k, err := syscall.Write(int(fd), frame[n:])
			if err == syscall.EINTR {
				continue
			}
			if k > 0 {
				n += k
			}
			if err != nil || k <= 0 {
				werr = err
				return
			}
		}
	})
	if cap(frame) <= keepBufBytes {
		p.scratch = frame[:0]
	}
	if cerr != nil || (werr != nil && werr != syscall.EAGAIN) {
		if n == 0 {
			return false // queued; the writer finds the stream broken
		}
		// Half a frame is on the stream: only a new stream can follow.
		p.mu.Lock()
		if p.conn != nil {
			p.conn.Close()
		}
		p.mu.Unlock()
		p.metrics.dropped[dropWriteError].Inc()
		p.t.reports.dropped(p.id, false)
		return true
	}
	p.metrics.sent.Inc()
	p.metrics.bytesSent.Add(float64(len(frame)))
	if n < len(frame) {
		p.rest = append(p.rest, frame[n:]...)
		p.busy = true
		select {
		case p.restc <- struct{}{}:
		default:
		}
	}
	return true
}

// startDirect lets Send write to conn directly; stopDirect ends that when
// the stream goes down (what a direct write left over is lost with it).
func (p *peer) startDirect(conn net.Conn) {
	var rc syscall.RawConn
	if sc, ok := conn.(syscall.Conn); ok {
		rc, _ = sc.SyscallConn()
	}
	p.wmu.Lock()
	// Messages queued while the stream came up go first, by the writer.
	p.wrc, p.busy, p.rest = rc, len(p.queue) > 0, nil
	p.wmu.Unlock()
}

func (p *peer) stopDirect() {
	p.wmu.Lock()
	p.wrc, p.busy, p.rest = nil, false, nil
	p.wmu.Unlock()
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
	p.startDirect(conn)
	defer p.stopDirect()
	var (
		buf   []byte
		snaps []uint64 // MsgSnap recipients in the batch, reported after flush
	)
	for {
		var m raftpb.Message
		have := false
		select {
		case <-p.ctx.Done():
			return nil
		case err := <-broken:
			return fmt.Errorf("stream to peer %x closed: %w", p.id, err)
		case m = <-p.queue:
			have = true
		case <-p.restc:
		}
		// A frame that a direct write began goes on first.
		p.wmu.Lock()
		rest := p.rest
		p.rest = nil
		p.wmu.Unlock()
		if len(rest) > 0 {
			if _, err := bw.Write(rest); err != nil {
				return p.failBatch(fmt.Errorf("write to peer %x: %w", p.id, err), 1, nil, nil)
			}
		}
		// Coalesce everything already queued into one flush: when busy,
		// many messages per syscall.
		n, bytes := 0, 0
		snaps = snaps[:0]
		for more := have; more; {
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
		// Idle again: Send may write directly, unless more came meanwhile.
		p.wmu.Lock()
		if len(p.queue) == 0 && p.rest == nil {
			p.busy = false
		}
		p.wmu.Unlock()
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
