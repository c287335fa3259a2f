package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"go.etcd.io/raft/v3/raftpb"
)

// Wire format.
//
// A stream is one TCP connection opened by the sender. It starts with a
// fixed-size handshake and is followed by frames until either side closes it:
//
//	handshake: magic "LKST" | version u16 | flags u16 (0) | cluster id u64 | from u64 | to u64
//	frame:     length u32 | length bytes of a protobuf-encoded raftpb.Message
//
// All integers are big-endian. Streams are one-way: the receiver never writes
// on them, so a sender that reads anything (or EOF) knows the stream is dead.
const (
	// MaxFrameSize caps one frame's payload, so that a corrupt or hostile
	// length prefix cannot make a reader allocate without bound. Messages
	// larger than this (huge snapshots) are refused by the sender.
	MaxFrameSize = 128 << 20

	// ProtocolVersion is the version sent in, and required of, handshakes.
	ProtocolVersion uint16 = 1

	frameHeaderSize = 4
	handshakeSize   = 32

	// readChunk is the most ReadFrame allocates ahead of bytes that have
	// actually arrived.
	readChunk = 64 << 10
)

var handshakeMagic = [4]byte{'L', 'K', 'S', 'T'}

// Errors returned by the frame and handshake decoders.
var (
	ErrFrameTooLarge   = errors.New("transport: frame too large")
	ErrBadMagic        = errors.New("transport: bad handshake magic")
	ErrBadVersion      = errors.New("transport: unsupported protocol version")
	ErrClusterMismatch = errors.New("transport: cluster id mismatch")
	ErrWrongRecipient  = errors.New("transport: stream meant for another node")
	ErrBadSender       = errors.New("transport: bad sender id")
)

// handshake opens every stream.
type handshake struct {
	version   uint16
	clusterID uint64
	from, to  uint64
}

func (h handshake) appendTo(b []byte) []byte {
	b = append(b, handshakeMagic[:]...)
	b = binary.BigEndian.AppendUint16(b, h.version)
	b = binary.BigEndian.AppendUint16(b, 0) // flags, reserved
	b = binary.BigEndian.AppendUint64(b, h.clusterID)
	b = binary.BigEndian.AppendUint64(b, h.from)
	return binary.BigEndian.AppendUint64(b, h.to)
}

// readHandshake reads and parses a handshake; it checks only the magic, so
// that the caller can report the version and ids it got.
func readHandshake(r io.Reader) (handshake, error) {
	var b [handshakeSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return handshake{}, fmt.Errorf("read handshake: %w", err)
	}
	if [4]byte(b[0:4]) != handshakeMagic {
		return handshake{}, fmt.Errorf("%w %q", ErrBadMagic, b[0:4])
	}
	return handshake{
		version:   binary.BigEndian.Uint16(b[4:6]),
		clusterID: binary.BigEndian.Uint64(b[8:16]),
		from:      binary.BigEndian.Uint64(b[16:24]),
		to:        binary.BigEndian.Uint64(b[24:32]),
	}, nil
}

// check validates a handshake received by node self of cluster clusterID.
// A zero h.to is accepted (sender does not know our id).
func (h handshake) check(clusterID, self uint64) error {
	switch {
	case h.version != ProtocolVersion:
		return fmt.Errorf("%w: got %d, want %d", ErrBadVersion, h.version, ProtocolVersion)
	case h.clusterID != clusterID:
		return fmt.Errorf("%w: got %x, want %x", ErrClusterMismatch, h.clusterID, clusterID)
	case h.to != 0 && h.to != self:
		return fmt.Errorf("%w: addressed to %x, we are %x", ErrWrongRecipient, h.to, self)
	case h.from == 0 || h.from == self:
		return fmt.Errorf("%w: %x", ErrBadSender, h.from)
	}
	return nil
}

// AppendFrame appends m, framed, to dst. It fails without appending if m
// encodes to more than MaxFrameSize bytes.
func AppendFrame(dst []byte, m *raftpb.Message) ([]byte, error) {
	size := m.Size()
	if size > MaxFrameSize {
		return dst, fmt.Errorf("%w: %v to %x encodes to %d bytes, limit %d", ErrFrameTooLarge, m.Type, m.To, size, MaxFrameSize)
	}
	dst = slices.Grow(dst, frameHeaderSize+size)
	dst = binary.BigEndian.AppendUint32(dst, uint32(size))
	start := len(dst)
	dst = dst[:start+size]
	if _, err := m.MarshalToSizedBuffer(dst[start:]); err != nil {
		return dst[:start-frameHeaderSize], fmt.Errorf("marshal %v to %x: %w", m.Type, m.To, err)
	}
	return dst, nil
}

// ReadFrame reads one frame from r and returns its payload. The payload is
// stored in buf if it fits (buf may be nil), else in a new slice.
//
// It returns io.EOF only if r ends cleanly before a frame,
// io.ErrUnexpectedEOF if it ends inside one, and an error wrapping
// ErrFrameTooLarge for a length over MaxFrameSize. Memory is allocated as
// payload bytes arrive, never more than about twice what r actually yielded
// (plus 64 KiB), whatever the length prefix claims.
func ReadFrame(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [frameHeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err // io.EOF or io.ErrUnexpectedEOF, unwrapped on purpose
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if n > MaxFrameSize {
		return nil, fmt.Errorf("%w: length prefix %d, limit %d", ErrFrameTooLarge, n, MaxFrameSize)
	}
	if n <= cap(buf) {
		buf = buf[:n]
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, noEOF(err)
		}
		return buf, nil
	}
	// Grow with the data rather than trusting the prefix: a peer claiming
	// 100 MiB and sending 10 bytes costs us 64 KiB, not 100 MiB.
	buf = buf[:0]
	for len(buf) < n {
		chunk := min(n-len(buf), max(len(buf), readChunk))
		buf = slices.Grow(buf, chunk)
		k, err := io.ReadFull(r, buf[len(buf):len(buf)+chunk])
		buf = buf[:len(buf)+k]
		if err != nil {
			return nil, noEOF(err)
		}
	}
	return buf, nil
}

// ReadMessage reads one frame from r and decodes it. buf is used as in
// ReadFrame and returned for reuse; the message does not alias it.
func ReadMessage(r io.Reader, buf []byte) (raftpb.Message, []byte, error) {
	payload, err := ReadFrame(r, buf)
	if err != nil {
		return raftpb.Message{}, buf, err
	}
	m, err := DecodeMessage(payload)
	return m, payload[:0], err
}

// DecodeMessage decodes one frame payload. The generated Unmarshal copies
// bytes fields, so payload may be reused afterwards.
func DecodeMessage(payload []byte) (raftpb.Message, error) {
	var m raftpb.Message
	// Message.Responses nests Messages, and the generated decoder recurses
	// without a limit: a few MiB of nested length prefixes would exhaust the
	// goroutine stack, which is fatal, not a recoverable panic.
	if err := checkNesting(payload, 0); err != nil {
		return m, fmt.Errorf("decode message frame of %d bytes: %w", len(payload), err)
	}
	if err := m.Unmarshal(payload); err != nil {
		return raftpb.Message{}, fmt.Errorf("decode message frame of %d bytes: %w", len(payload), err)
	}
	return m, nil
}

// maxNesting bounds Message.Responses nesting on the wire. Responses are
// only used between raft and local storage, so peers send depth 0.
const maxNesting = 4

var errBadWire = errors.New("malformed protobuf")

// checkNesting walks the protobuf wire format of a raftpb.Message without
// decoding it and fails if Responses (field 14) nest deeper than
// maxNesting. Other malformations are left to Unmarshal, except where they
// stop the walk.
func checkNesting(b []byte, depth int) error {
	const responsesField = 14
	if depth > maxNesting {
		return fmt.Errorf("%w: responses nested deeper than %d", errBadWire, maxNesting)
	}
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return fmt.Errorf("%w: bad tag", errBadWire)
		}
		b = b[n:]
		switch tag & 7 {
		case 0: // varint
			if _, n = binary.Uvarint(b); n <= 0 {
				return fmt.Errorf("%w: bad varint", errBadWire)
			}
			b = b[n:]
		case 1: // fixed64
			if len(b) < 8 {
				return fmt.Errorf("%w: short fixed64", errBadWire)
			}
			b = b[8:]
		case 5: // fixed32
			if len(b) < 4 {
				return fmt.Errorf("%w: short fixed32", errBadWire)
			}
			b = b[4:]
		case 2: // length-delimited
			l, n := binary.Uvarint(b)
			if n <= 0 || l > uint64(len(b)-n) {
				return fmt.Errorf("%w: bad length", errBadWire)
			}
			field := b[n : n+int(l)]
			b = b[n+int(l):]
			if tag>>3 == responsesField {
				if err := checkNesting(field, depth+1); err != nil {
					return err
				}
			}
		default: // groups (3, 4) and invalid types: raftpb has none
			return fmt.Errorf("%w: wire type %d", errBadWire, tag&7)
		}
	}
	return nil
}

// noEOF turns an EOF inside a frame into io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
