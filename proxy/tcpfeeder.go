package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// TCPFeederOptions configure a TCPFeeder.
type TCPFeederOptions struct {
	// Addr is the server's address (host:port), asked at every connect.
	Addr func() string
	// Output receives the server's output.
	Output Output
	// Budget bounds the bytes fed but not yet written to the server
	// (default 256 MiB); Feed waits above it.
	Budget int64
	// CloseGrace is how long a graceful close waits for the server to end
	// its output before resetting the connection (default 5s).
	CloseGrace time.Duration
	// AbortGrace is how long the data queued before a reset may take to
	// reach the server (default 1s).
	AbortGrace time.Duration
	// OrderConnects opens a connection only once every connection that
	// the client had shut down or closed before it, in log order, has
	// ended on the server (the server closed it, or it was reset), or
	// CloseGrace has passed. A client that ends one connection and then
	// opens another (a one-thread client: sysbench's prepare, then its
	// run) has seen the first one's answers before it sent anything on
	// the second, so the leader's server ran them one after the other. A
	// server that runs behind the log (a backup, above all one that
	// restored a checkpoint and replays) is otherwise given both at once
	// and runs them concurrently: its data diverges. Connects keep their
	// log order. Not for the DMTFeeder, which needs the connection at
	// once (its source port).
	//
	// SetOrderConnects turns the waiting off and on: the leader's own
	// server is not behind its log, and a client that half-closes one
	// connection and waits long for its answer must not hold up every
	// other client there.
	OrderConnects bool
	// BatchCloses leaves the closes of connections the server already
	// ended for EndBatch, which the apply loop calls after a batch of
	// committed entries: a request's close then rides with the next
	// request's connect (lazy ServerClose) without delaying it (the close
	// wakes the server and costs about as much as the connect).
	BatchCloses bool
	Logger      logrus.FieldLogger
}

// TCPFeeder is the Feeder of a server reached over TCP: each client
// connection becomes a real connection to the server.
//
// Feed does what cannot block at once, in log order: it opens a
// connection with a non-blocking connect (the SYNs leave in log order, so
// the server accepts the connections in the log's order) and writes data
// with a non-blocking write when the connection has nothing queued, and
// shuts it down or closes it at once when that cannot wait on the server.
// What would block goes to the connection's own queue and writer
// goroutine, started when there is something to queue, so that a server
// that does not read one connection never holds up another, nor the apply
// loop. Each connection's output is read by its own goroutine.
type TCPFeeder struct {
	o TCPFeederOptions

	mu          sync.Mutex
	space       *sync.Cond // queued fell, or closed
	idle        *sync.Cond // outstanding fell, or closed
	conns       map[uint64]*feedConn
	queued      int64 // bytes queued, not yet written
	outstanding int64 // events queued, not yet done
	lastFed     uint64
	closed      bool
	closing     chan struct{} // closed by Close
	wg          sync.WaitGroup

	// OrderConnects: connections whose client side ended (Shutdown, or a
	// graceful Close) while the server may not have ended them yet, and
	// the gate of the last connection whose connect waits.
	ending   map[uint64]*feedConn
	lastGate chan struct{}
	// toClose are the connections left for EndBatch (BatchCloses).
	toClose  []*serverConn
	ordering atomic.Bool // OrderConnects is in force (SetOrderConnects)

	addrMu    sync.Mutex // connects may be issued by a waiting connection
	addrCache struct {
		s  string
		sa syscall.Sockaddr
		af int
	}
}

type feedOp struct {
	typ   Type
	data  []byte
	abort bool
}

type feedConn struct {
	f  *TCPFeeder
	id uint64
	c  *serverConn // nil when the connect failed
	rc syscall.RawConn

	mu       sync.Mutex
	ops      []feedOp
	writerOn bool      // a writer goroutine runs (until the queue is empty)
	waiting  bool      // its connect waits for the gate (OrderConnects)
	aborted  bool      // we reset it: the reader reports ErrAborted
	broken   bool      // a write failed: drop further data
	expiry   time.Time // a reset is queued: writes must be done by then

	readerDone chan struct{}
	// gate (OrderConnects) is closed once the connect was issued (or
	// given up); after lists what it waits for before, prev the gate of
	// the connection before it.
	gate  chan struct{}
	after []*feedConn
	prev  chan struct{}
}

// NewTCPFeeder starts a feeder.
func NewTCPFeeder(o TCPFeederOptions) *TCPFeeder {
	if o.Budget <= 0 {
		o.Budget = 256 << 20
	}
	if o.CloseGrace <= 0 {
		o.CloseGrace = 5 * time.Second
	}
	if o.AbortGrace <= 0 {
		o.AbortGrace = abortGrace
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	f := &TCPFeeder{o: o, conns: map[uint64]*feedConn{}, ending: map[uint64]*feedConn{}, closing: make(chan struct{})}
	f.space = sync.NewCond(&f.mu)
	f.idle = sync.NewCond(&f.mu)
	f.ordering.Store(o.OrderConnects)
	return f
}

// SetOrderConnects turns OrderConnects' waiting on or off for the
// connections fed from now on (a feeder made without it never waits).
func (f *TCPFeeder) SetOrderConnects(on bool) { f.ordering.Store(on && f.o.OrderConnects) }

// Feed implements Feeder.
func (f *TCPFeeder) Feed(ev Committed) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	if ev.Index > f.lastFed {
		f.lastFed = ev.Index
	}
	switch ev.Type {
	case Connect:
		if _, ok := f.conns[ev.Conn]; ok {
			f.mu.Unlock()
			return // the state machine never does this
		}
		fc := &feedConn{f: f, id: ev.Conn, readerDone: make(chan struct{})}
		f.conns[ev.Conn] = fc
		f.wg.Add(1) // the reader
		if f.o.OrderConnects {
			// Pruned at every connect, waited on only while ordering.
			after := f.endingLocked()
			if f.ordering.Load() {
				fc.after = after
			}
			if f.lastGate != nil && !isClosed(f.lastGate) {
				fc.prev = f.lastGate
			}
			if len(fc.after) > 0 || fc.prev != nil {
				// The writer connects once the gate opens; until then
				// the connection's events wait in its queue.
				fc.waiting, fc.writerOn = true, true
				fc.gate = make(chan struct{})
				f.lastGate = fc.gate
				f.outstanding++ // the connect, for Quiesce
				f.wg.Add(1)
				f.mu.Unlock()
				go fc.writer(true)
				return
			}
		}
		f.mu.Unlock()
		fc.open()
		return
	case Data:
		fc := f.conns[ev.Conn]
		if fc == nil || len(ev.Data) == 0 {
			f.mu.Unlock()
			return
		}
		f.mu.Unlock()
		n, ok := fc.tryWrite(ev.Data)
		if n > 0 {
			f.o.Output.Delivered(fc.id, n)
		}
		if ok {
			return
		}
		rest := ev.Data[n:]
		f.mu.Lock()
		for f.queued > f.o.Budget && !f.closed {
			f.space.Wait()
		}
		if !f.closed {
			f.queued += int64(len(rest))
			f.outstanding++
			// The apply loop's buffers are not ours to keep.
			fc.push(feedOp{typ: Data, data: append([]byte(nil), rest...)})
		}
	case Shutdown:
		if fc := f.conns[ev.Conn]; fc != nil {
			if f.o.OrderConnects {
				f.ending[ev.Conn] = fc
			}
			if fc.endNow(feedOp{typ: Shutdown}, false) {
				break
			}
			f.outstanding++
			fc.push(feedOp{typ: Shutdown})
		}
	case Close, ServerClose:
		if fc := f.conns[ev.Conn]; fc != nil {
			delete(f.conns, ev.Conn)
			if f.o.OrderConnects && !ev.Abort {
				f.ending[ev.Conn] = fc
			}
			if fc.endNow(feedOp{typ: Close, abort: ev.Abort}, f.o.BatchCloses) {
				break
			}
			f.outstanding++
			if ev.Abort {
				// The data queued before the reset still goes first, but a
				// server that does not read may hold it up only so long.
				fc.expire(time.Now().Add(f.o.AbortGrace))
			}
			fc.push(feedOp{typ: Close, abort: ev.Abort})
		}
	}
	f.mu.Unlock()
}

// serverConn is a connection to the local server: the socket as a
// pollable *os.File (reads and writes park in the runtime's netpoller, as a
// net.Conn's do) with the two TCP calls the feeder needs. Not a
// net.TCPConn because net.FileConn, the only way to make one from a socket
// connected by hand, dups it, registers both with the netpoller and asks
// the kernel eight more things: 12 more syscalls and a spurious netpoller
// wake-up per connection, on every replica, for every client connection.
type serverConn struct{ *os.File }

// CloseWrite shuts down the writing side (the client half-closed).
func (c *serverConn) CloseWrite() error {
	return c.control(func(fd int) error { return syscall.Shutdown(fd, syscall.SHUT_WR) })
}

// finish ends a connection whose server ended its output: our FIN, then
// the close.
func (c *serverConn) finish() {
	_ = c.CloseWrite()
	_ = c.Close()
}

// SetLinger(0) makes Close reset the connection.
func (c *serverConn) SetLinger(sec int) error {
	return c.control(func(fd int) error {
		return syscall.SetsockoptLinger(fd, syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: int32(sec)})
	})
}

// localPort is the connection's source port, 0 if unknown.
func (c *serverConn) localPort() int {
	port := 0
	_ = c.control(func(fd int) error {
		switch sa, err := syscall.Getsockname(fd); a := sa.(type) {
		case *syscall.SockaddrInet4:
			port = a.Port
		case *syscall.SockaddrInet6:
			port = a.Port
		default:
			return err
		}
		return nil
	})
	return port
}

func (c *serverConn) control(fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// connect starts a non-blocking connect to the server; the connection
// completes in the background (at once on loopback).
func (f *TCPFeeder) connect() (*serverConn, error) {
	f.addrMu.Lock()
	defer f.addrMu.Unlock()
	addr := f.o.Addr()
	if f.addrCache.s != addr {
		ta, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			return nil, err
		}
		if ip4 := ta.IP.To4(); ip4 != nil {
			sa := &syscall.SockaddrInet4{Port: ta.Port}
			copy(sa.Addr[:], ip4)
			f.addrCache.sa, f.addrCache.af = sa, syscall.AF_INET
		} else {
			sa := &syscall.SockaddrInet6{Port: ta.Port}
			copy(sa.Addr[:], ta.IP.To16())
			f.addrCache.sa, f.addrCache.af = sa, syscall.AF_INET6
		}
		f.addrCache.s = addr
	}
	fd, err := syscall.Socket(f.addrCache.af, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	_ = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	if err := syscall.Connect(fd, f.addrCache.sa); err != nil && err != syscall.EINPROGRESS && err != syscall.EINTR {
		syscall.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	// A non-blocking descriptor makes a pollable *os.File.
	return &serverConn{os.NewFile(uintptr(fd), "feeder")}, nil
}

// endingLocked returns the connections whose client side ended and whose
// server has not ended them yet, and forgets those it has (f.mu held).
func (f *TCPFeeder) endingLocked() []*feedConn {
	var out []*feedConn
	for id, fc := range f.ending {
		if isClosed(fc.readerDone) {
			delete(f.ending, id)
			continue
		}
		out = append(out, fc)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// open connects to the server and starts the reader (or reports the
// failure as the connection's end).
func (fc *feedConn) open() {
	f := fc.f
	fc.mu.Lock()
	aborted := fc.aborted
	fc.mu.Unlock()
	var c *serverConn
	err := ErrAborted
	if !aborted {
		c, err = f.connect()
	}
	if err != nil {
		if err != ErrAborted {
			f.o.Logger.WithError(err).WithField("conn", fmt.Sprintf("%x", fc.id)).Warn("proxy: cannot connect to the server")
			err = fmt.Errorf("proxy: connecting to the server: %w", err)
		}
		go func() {
			defer f.wg.Done()
			f.o.Output.ServerEOF(fc.id, err)
			close(fc.readerDone)
		}()
		return
	}
	rc, _ := c.SyscallConn()
	fc.mu.Lock()
	fc.c, fc.rc = c, rc
	if !fc.expiry.IsZero() {
		_ = c.SetWriteDeadline(fc.expiry)
	}
	fc.mu.Unlock()
	go fc.reader()
}

// awaitGate waits (OrderConnects) until the connections ended before this
// one have ended on the server, or CloseGrace has passed, and the
// connection before it has connected; then it connects.
func (fc *feedConn) awaitGate() {
	f := fc.f
	t := time.NewTimer(f.o.CloseGrace)
	defer t.Stop()
	timedOut := false
	for _, o := range fc.after {
		if timedOut {
			break
		}
		select {
		case <-o.readerDone:
		case <-t.C:
			timedOut = true
			f.o.Logger.WithField("conn", fmt.Sprintf("%x", fc.id)).Warnf(
				"proxy: connection %x did not end on the server within %v: connecting the next one anyway", o.id, f.o.CloseGrace)
		case <-f.closing:
			fc.reset()
		}
	}
	fc.after = nil
	if fc.prev != nil {
		select {
		case <-fc.prev:
		case <-f.closing:
			fc.reset()
		}
	}
	fc.open()
	fc.mu.Lock()
	fc.waiting = false
	fc.mu.Unlock()
	close(fc.gate)
	f.done(0)
}

// tryWrite writes what it can of b at once if nothing is queued before
// it; ok tells that nothing is left to queue (all written, or dropped on a
// broken connection).
func (fc *feedConn) tryWrite(b []byte) (n int, ok bool) {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	if fc.waiting {
		return 0, false
	}
	if fc.c == nil || fc.broken || fc.aborted {
		return 0, true
	}
	if fc.writerOn || !fc.expiry.IsZero() {
		return 0, false
	}
	var werr error
	cerr := fc.rc.Control(func(fd uintptr) {
		for n < len(b) {
			k, err := syscall.Write(int(fd), b[n:])
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
	switch {
	case cerr != nil:
		return n, false
	case werr == nil || werr == syscall.EAGAIN:
		return n, n == len(b)
	default:
		fc.broken = true
		return n, true
	}
}

// done accounts for one finished event of n bytes.
func (f *TCPFeeder) done(n int) {
	f.mu.Lock()
	f.outstanding--
	if n > 0 {
		f.queued -= int64(n)
		f.space.Broadcast()
	}
	if f.outstanding == 0 {
		f.idle.Broadcast()
	}
	f.mu.Unlock()
}

// EndBatch closes the connections Feed left for it (BatchCloses).
func (f *TCPFeeder) EndBatch() {
	f.mu.Lock()
	cs := f.toClose
	f.toClose = nil
	f.mu.Unlock()
	for _, c := range cs {
		c.finish()
	}
}

// Quiesce implements Feeder.
func (f *TCPFeeder) Quiesce(ctx context.Context, index uint64) error {
	f.EndBatch()
	stop := context.AfterFunc(ctx, func() {
		f.mu.Lock()
		f.idle.Broadcast()
		f.mu.Unlock()
	})
	defer stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lastFed > index {
		return fmt.Errorf("proxy: feeder already fed index %d, beyond %d", f.lastFed, index)
	}
	for f.outstanding > 0 {
		if f.closed {
			return errors.New("proxy: feeder closed")
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		f.idle.Wait()
	}
	return nil
}

// Backlog reports the bytes fed but not yet written to the server.
func (f *TCPFeeder) Backlog() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queued
}

// Close implements Feeder.
func (f *TCPFeeder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	close(f.closing)
	conns := f.conns
	f.conns = map[uint64]*feedConn{}
	f.outstanding += int64(len(conns)) // the closes below
	f.space.Broadcast()
	f.idle.Broadcast()
	f.mu.Unlock()
	for _, fc := range conns {
		fc.reset()
		fc.push(feedOp{typ: Close, abort: true})
	}
	f.EndBatch()
	f.wg.Wait()
	return nil
}

// abortGrace is how long the data queued before a reset may take to reach
// the server.
const abortGrace = time.Second

// push queues op for the writer, starting one if none runs.
func (fc *feedConn) push(op feedOp) {
	fc.mu.Lock()
	fc.ops = append(fc.ops, op)
	start := !fc.writerOn
	fc.writerOn = true
	fc.mu.Unlock()
	if start {
		fc.f.wg.Add(1)
		go fc.writer(false)
	}
}

// endNow does a Shutdown or Close op at once, as the writer would, when
// nothing is queued before it and it cannot wait on the server: a reset,
// a shutdown, or a close after the server ended its output (a short
// connection's usual end, which then needs no writer goroutine at all).
// It reports whether it did; with later, such a close is left for
// EndBatch (f.mu is held).
func (fc *feedConn) endNow(op feedOp, later bool) bool {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	if fc.waiting || fc.writerOn { // writerOn is set whenever ops are queued
		return false
	}
	c := fc.c
	dead := c == nil || fc.aborted || fc.broken
	switch {
	case op.typ == Shutdown:
		if !dead {
			_ = c.CloseWrite()
		}
	case c == nil:
	case op.abort || dead:
		fc.resetLocked()
	case isClosed(fc.readerDone):
		if later {
			fc.f.toClose = append(fc.f.toClose, c)
		} else {
			c.finish()
		}
	default:
		return false // the server may still answer: the writer waits
	}
	return true
}

func (fc *feedConn) expire(t time.Time) {
	fc.mu.Lock()
	fc.expiry = t
	if fc.c != nil {
		_ = fc.c.SetWriteDeadline(t)
	}
	fc.mu.Unlock()
}

// reset marks the connection aborted and resets it.
func (fc *feedConn) reset() {
	fc.mu.Lock()
	fc.resetLocked()
	fc.mu.Unlock()
}

func (fc *feedConn) resetLocked() {
	fc.aborted = true
	if fc.c != nil {
		_ = fc.c.SetLinger(0)
		_ = fc.c.Close()
	}
}

// writer does the queued ops in order, after connecting first when the
// connect waits for its gate (gated), and exits when the queue is empty.
func (fc *feedConn) writer(gated bool) {
	defer fc.f.wg.Done()
	if gated {
		fc.awaitGate()
	}
	fc.mu.Lock()
	c := fc.c
	fc.mu.Unlock()
	for {
		fc.mu.Lock()
		if len(fc.ops) == 0 {
			// Nothing left: the next push starts another writer.
			fc.writerOn = false
			fc.mu.Unlock()
			return
		}
		op := fc.ops[0]
		fc.ops[0] = feedOp{}
		fc.ops = fc.ops[1:]
		dead := c == nil || fc.aborted || fc.broken
		fc.mu.Unlock()

		switch op.typ {
		case Data:
			if !dead {
				if _, err := c.Write(op.data); err != nil {
					fc.mu.Lock()
					fc.broken = true
					fc.mu.Unlock()
				} else {
					fc.f.o.Output.Delivered(fc.id, len(op.data))
				}
			}
			fc.f.done(len(op.data))
		case Shutdown:
			if !dead {
				_ = c.CloseWrite()
			}
			fc.f.done(0)
		case Close:
			if c != nil {
				if op.abort || dead {
					fc.reset()
				} else {
					_ = c.CloseWrite()
					t := time.NewTimer(fc.f.o.CloseGrace)
					select {
					case <-fc.readerDone:
					case <-t.C:
						fc.reset()
					}
					t.Stop()
					_ = c.Close()
				}
			}
			// Drop whatever else was queued (only a feeder Close does that).
			fc.mu.Lock()
			rest := fc.ops
			fc.ops = nil
			fc.mu.Unlock()
			for _, o := range rest {
				fc.f.done(len(o.data))
			}
			fc.f.done(0)
			return
		}
	}
}

// outputBufs are the readers' buffers: a connection is often short.
var outputBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

func (fc *feedConn) reader() {
	defer fc.f.wg.Done()
	defer close(fc.readerDone)
	bp := outputBufs.Get().(*[]byte)
	defer outputBufs.Put(bp)
	buf := *bp
	for {
		n, err := fc.c.Read(buf)
		if n > 0 {
			fc.f.o.Output.ServerData(fc.id, buf[:n])
		}
		if err != nil {
			fc.mu.Lock()
			aborted := fc.aborted
			fc.mu.Unlock()
			switch {
			case aborted:
				err = ErrAborted
			case errors.Is(err, io.EOF):
				err = nil
			}
			fc.f.o.Output.ServerEOF(fc.id, err)
			return
		}
	}
}
