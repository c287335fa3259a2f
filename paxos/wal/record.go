package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"

	"go.etcd.io/raft/v3/raftpb"
)

type recordType uint8

const (
	recSegmentHeader recordType = 1 // first record of every segment
	recEntry         recordType = 2 // raftpb.Entry
	recHardState     recordType = 3 // raftpb.HardState
	recSnapshot      recordType = 4 // raftpb.SnapshotMetadata marker
)

func (t recordType) valid() bool { return t >= recSegmentHeader && t <= recSnapshot }

func (t recordType) String() string {
	switch t {
	case recSegmentHeader:
		return "segment-header"
	case recEntry:
		return "entry"
	case recHardState:
		return "hardstate"
	case recSnapshot:
		return "snapshot"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

const (
	recordHeaderSize = 9 // length(4) crc(4) type(1)

	// maxRecordSize caps a record's payload so that a damaged length field
	// can never make the decoder (or anything sizing a buffer from it) ask
	// for gigabytes.
	maxRecordSize = 64 << 20

	segmentMagic       uint32 = 0x4c535741 // "LSWA"
	segmentVersion     uint32 = 1
	segmentHeaderBytes        = 24 // magic(4) version(4) seq(8) firstIndex(8)
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Decoding errors. errTruncated, errTooLarge and errChecksum are what a torn
// write looks like; errUnknownType has a valid checksum, so something wrote
// it on purpose and it is never repaired away.
var (
	errTruncated   = errors.New("truncated record")
	errTooLarge    = errors.New("record length exceeds limit")
	errChecksum    = errors.New("record checksum mismatch")
	errUnknownType = errors.New("unknown record type")
)

// record is one decoded record; payload aliases the decoder's input.
type record struct {
	typ     recordType
	payload []byte
}

// decodeRecord decodes the record at the start of b and returns it with the
// number of bytes it occupies. It never allocates: the length field is
// checked against maxRecordSize and len(b) before anything is sliced.
func decodeRecord(b []byte) (record, int, error) {
	if len(b) < recordHeaderSize {
		return record{}, 0, errTruncated
	}
	n := binary.LittleEndian.Uint32(b[0:4])
	if n > maxRecordSize {
		return record{}, 0, errTooLarge
	}
	end := recordHeaderSize + int(n)
	if len(b) < end {
		return record{}, 0, errTruncated
	}
	// Type and payload are contiguous, so one checksum call covers both.
	if crc32.Checksum(b[8:end], crcTable) != binary.LittleEndian.Uint32(b[4:8]) {
		return record{}, 0, errChecksum
	}
	t := recordType(b[8])
	if !t.valid() {
		return record{}, 0, errUnknownType
	}
	return record{typ: t, payload: b[recordHeaderSize:end]}, end, nil
}

// appendRecord appends a complete record to dst.
func appendRecord(dst []byte, t recordType, payload []byte) []byte {
	start := len(dst)
	dst = beginRecord(dst, t)
	dst = append(dst, payload...)
	// Only the caller's payload length can fail finishRecord; callers of
	// appendRecord pass payloads that fit (headers, fuzz re-encoding).
	_ = finishRecord(dst, start)
	return dst
}

// beginRecord reserves a record header and writes the type, so that the
// payload can be marshalled straight into dst without a copy.
func beginRecord(dst []byte, t recordType) []byte {
	var hdr [recordHeaderSize]byte
	hdr[8] = byte(t)
	return append(dst, hdr[:]...)
}

// finishRecord fills in length and checksum of the record started at start.
func finishRecord(dst []byte, start int) error {
	n := len(dst) - start - recordHeaderSize
	if n > maxRecordSize {
		return fmt.Errorf("record of %d bytes exceeds limit of %d", n, maxRecordSize)
	}
	rec := dst[start:]
	binary.LittleEndian.PutUint32(rec[0:4], uint32(n))
	binary.LittleEndian.PutUint32(rec[4:8], crc32.Checksum(rec[8:], crcTable))
	return nil
}

// marshaler is what gogo-generated raftpb messages implement.
type marshaler interface {
	Size() int
	MarshalToSizedBuffer([]byte) (int, error)
}

// appendMessage appends a record holding m's wire encoding, marshalled in
// place so that a batch costs no allocation once dst has grown.
func appendMessage(dst []byte, t recordType, m marshaler) ([]byte, error) {
	size := m.Size()
	if size > maxRecordSize {
		return dst, fmt.Errorf("%s of %d bytes exceeds record limit of %d", t, size, maxRecordSize)
	}
	start := len(dst)
	dst = beginRecord(dst, t)
	dst = slices.Grow(dst, size)[:len(dst)+size]
	n, err := m.MarshalToSizedBuffer(dst[len(dst)-size:])
	if err != nil {
		return dst[:start], fmt.Errorf("marshal %s: %w", t, err)
	}
	if n != size {
		return dst[:start], fmt.Errorf("marshal %s: wrote %d bytes, Size said %d", t, n, size)
	}
	if err := finishRecord(dst, start); err != nil {
		return dst[:start], fmt.Errorf("%s: %w", t, err)
	}
	return dst, nil
}

// segmentHeader is the payload of the first record of a segment.
type segmentHeader struct {
	seq        uint64
	firstIndex uint64
}

func (h segmentHeader) appendTo(dst []byte) []byte {
	var p [segmentHeaderBytes]byte
	binary.LittleEndian.PutUint32(p[0:4], segmentMagic)
	binary.LittleEndian.PutUint32(p[4:8], segmentVersion)
	binary.LittleEndian.PutUint64(p[8:16], h.seq)
	binary.LittleEndian.PutUint64(p[16:24], h.firstIndex)
	return appendRecord(dst, recSegmentHeader, p[:])
}

func decodeSegmentHeader(p []byte) (segmentHeader, error) {
	if len(p) != segmentHeaderBytes {
		return segmentHeader{}, fmt.Errorf("segment header of %d bytes, want %d", len(p), segmentHeaderBytes)
	}
	if m := binary.LittleEndian.Uint32(p[0:4]); m != segmentMagic {
		return segmentHeader{}, fmt.Errorf("bad segment magic %#x", m)
	}
	if v := binary.LittleEndian.Uint32(p[4:8]); v != segmentVersion {
		return segmentHeader{}, fmt.Errorf("unsupported segment version %d", v)
	}
	return segmentHeader{
		seq:        binary.LittleEndian.Uint64(p[8:16]),
		firstIndex: binary.LittleEndian.Uint64(p[16:24]),
	}, nil
}

// decodePayload turns a record's payload into its message: a *segmentHeader
// or a *raftpb.Entry, *raftpb.HardState or *raftpb.SnapshotMetadata.
func decodePayload(r record) (any, error) {
	var m interface{ Unmarshal([]byte) error }
	switch r.typ {
	case recSegmentHeader:
		h, err := decodeSegmentHeader(r.payload)
		if err != nil {
			return nil, err
		}
		return &h, nil
	case recEntry:
		m = new(raftpb.Entry)
	case recHardState:
		m = new(raftpb.HardState)
	case recSnapshot:
		m = new(raftpb.SnapshotMetadata)
	default:
		return nil, errUnknownType
	}
	// Unmarshal copies bytes fields, so the result does not pin the segment
	// buffer.
	if err := m.Unmarshal(r.payload); err != nil {
		return nil, fmt.Errorf("decode %s: %w", r.typ, err)
	}
	return m, nil
}

// plausibleStart is a cheap filter used when scanning damaged bytes for
// records that follow the damage: it accepts every record this package
// writes (raftpb always encodes its non-nullable fields, lowest field
// number first) and
// rejects most random positions before their checksum is computed.
func plausibleStart(b []byte) bool {
	if len(b) < recordHeaderSize {
		return false
	}
	n := binary.LittleEndian.Uint32(b[0:4])
	if n > maxRecordSize || uint64(len(b)) < recordHeaderSize+uint64(n) {
		return false
	}
	p := b[recordHeaderSize : recordHeaderSize+int(n)]
	switch recordType(b[8]) {
	case recSegmentHeader:
		return n == segmentHeaderBytes && binary.LittleEndian.Uint32(p) == segmentMagic
	case recEntry:
		return n == 0 || p[0] == 0x08 || p[0] == 0x10 || p[0] == 0x18 || p[0] == 0x22
	case recHardState:
		return n == 0 || p[0] == 0x08 || p[0] == 0x10 || p[0] == 0x18
	case recSnapshot:
		return n == 0 || p[0] == 0x0a || p[0] == 0x10 || p[0] == 0x18
	}
	return false
}
