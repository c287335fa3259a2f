package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// The protocol between a replica and its in-container feeder (feedproc.go)
// over a unix socket: frames of [4-byte big-endian length][1-byte kind]
// [payload]. Replica to feeder:
//
//	'E' index(8) event        an event committed at index, to deliver
//	'Q' token(8) index(8)     quiesce at index; answered by 'q'
//	'D'                       detach: the feeder answers 'd' and closes
//	'O' on(1)                 OrderConnects on (1) or off (0); older
//	                          feeders ignore it, as any unknown kind
//
// Feeder to replica:
//
//	'h' applied(8) addr       hello: the last index it was fed, server addr
//	'o' conn(8) bytes         output of the server
//	'e' conn(8) kind(1) msg   end of output: 0 EOF, 1 aborted, 2 error msg
//	'v' conn(8) n(8)          n more client bytes reached the server
//	'q' token(8) msg          quiesced (msg empty) or failed
//	'd'                       detached; nothing follows
const (
	frameEvent    = 'E'
	frameQuiesce  = 'Q'
	frameDetach   = 'D'
	frameOrder    = 'O'
	frameHello    = 'h'
	frameOutput   = 'o'
	frameEOF      = 'e'
	frameDeliver  = 'v'
	frameQuiesced = 'q'
	frameDetached = 'd'
)

// maxFrame bounds a frame (an event carries at most a Data of ReadSize).
const maxFrame = 64 << 20

func appendFrame(dst []byte, kind byte, parts ...[]byte) []byte {
	n := 1
	for _, p := range parts {
		n += len(p)
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	dst = append(dst, kind)
	for _, p := range parts {
		dst = append(dst, p...)
	}
	return dst
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// readFrame reads one frame into buf (grown as needed).
func readFrame(r *bufio.Reader, buf []byte) (kind byte, payload []byte, _ []byte, err error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, buf, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 1 || n > maxFrame {
		return 0, nil, buf, fmt.Errorf("proxy: feeder frame of %d bytes", n)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, nil, buf, err
	}
	return buf[0], buf[1:], buf, nil
}

var errShortFrame = errors.New("proxy: short feeder frame")

func frameU64(p []byte) (uint64, []byte, error) {
	if len(p) < 8 {
		return 0, nil, errShortFrame
	}
	return binary.BigEndian.Uint64(p), p[8:], nil
}

// frameWriter queues frames for one connection and writes them from its
// own goroutine, so that neither side of the feeder protocol ever blocks
// on the other while holding a lock (the apply loop feeding, the feeder
// relaying output). Frames keep their order.
type frameWriter struct {
	mu     sync.Mutex
	cond   *sync.Cond
	buf    []byte
	err    error
	closed bool
	done   chan struct{}
}

func newFrameWriter(w io.Writer) *frameWriter {
	fw := &frameWriter{done: make(chan struct{})}
	fw.cond = sync.NewCond(&fw.mu)
	go fw.run(w)
	return fw
}

func (fw *frameWriter) run(w io.Writer) {
	defer close(fw.done)
	var out []byte
	for {
		fw.mu.Lock()
		for len(fw.buf) == 0 && !fw.closed {
			fw.cond.Wait()
		}
		if len(fw.buf) == 0 {
			fw.mu.Unlock()
			return
		}
		out, fw.buf = fw.buf, out[:0]
		fw.mu.Unlock()
		if _, err := w.Write(out); err != nil {
			fw.mu.Lock()
			fw.err, fw.closed, fw.buf = err, true, nil
			fw.cond.Broadcast()
			fw.mu.Unlock()
			return
		}
		fw.mu.Lock()
		fw.cond.Broadcast()
		fw.mu.Unlock()
	}
}

// write queues a frame; it fails once the connection failed.
func (fw *frameWriter) write(frame []byte) error { return fw.writeMax(frame, 0) }

// writeMax is write that first waits while more than max bytes are
// queued (max 0: no bound).
func (fw *frameWriter) writeMax(frame []byte, max int) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	for max > 0 && len(fw.buf) > max && !fw.closed {
		fw.cond.Wait()
	}
	if fw.closed {
		if fw.err != nil {
			return fw.err
		}
		return errors.New("proxy: feeder connection closed")
	}
	fw.buf = append(fw.buf, frame...)
	fw.cond.Signal()
	return nil
}

// close stops the writer after what is queued has been written.
func (fw *frameWriter) close() {
	fw.shut()
	<-fw.done
}

// shut is close without waiting.
func (fw *frameWriter) shut() {
	fw.mu.Lock()
	fw.closed = true
	fw.cond.Broadcast()
	fw.mu.Unlock()
}
