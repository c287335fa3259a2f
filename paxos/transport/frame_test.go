package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

func testMsg(from, to, index uint64, data []byte) raftpb.Message {
	return raftpb.Message{
		Type: raftpb.MsgApp, From: from, To: to, Term: 3, LogTerm: 3, Index: index, Commit: index,
		Entries: []raftpb.Entry{{Term: 3, Index: index + 1, Data: data}},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	msgs := []raftpb.Message{
		testMsg(1, 2, 7, []byte("hello")),
		{Type: raftpb.MsgHeartbeat, From: 1, To: 2, Term: 9, Context: []byte("ctx")},
		{Type: raftpb.MsgSnap, From: 1, To: 2, Snapshot: &raftpb.Snapshot{Data: bytes.Repeat([]byte{7}, 100000),
			Metadata: raftpb.SnapshotMetadata{Index: 50, Term: 3, ConfState: raftpb.ConfState{Voters: []uint64{1, 2, 3}}}}},
	}
	var stream []byte
	for i := range msgs {
		var err error
		if stream, err = AppendFrame(stream, &msgs[i]); err != nil {
			t.Fatal(err)
		}
	}
	r := bytes.NewReader(stream)
	var buf []byte
	for i := range msgs {
		m, b, err := ReadMessage(r, buf)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		buf = b
		if m.String() != msgs[i].String() {
			t.Fatalf("message %d: got %v, want %v", i, m.String(), msgs[i].String())
		}
	}
	if _, _, err := ReadMessage(r, buf); err != io.EOF {
		t.Fatalf("after last frame: got %v, want io.EOF", err)
	}
}

func TestReadFrameErrors(t *testing.T) {
	frame, _ := AppendFrame(nil, &raftpb.Message{Type: raftpb.MsgHeartbeat, From: 1, To: 2})
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.EOF},
		{"short header", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"short payload", frame[:len(frame)-1], io.ErrUnexpectedEOF},
		{"oversize", []byte{0xff, 0xff, 0xff, 0xff, 1, 2, 3}, ErrFrameTooLarge},
		{"just over limit", binary.BigEndian.AppendUint32(nil, MaxFrameSize+1), ErrFrameTooLarge},
	} {
		_, err := ReadFrame(bytes.NewReader(tc.in), nil)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := DecodeMessage([]byte{0xff, 0xff, 0xff}); err == nil {
		t.Error("garbage payload decoded without error")
	}
}

// A length prefix is a claim, not a promise: memory follows the bytes that
// actually arrive.
func TestReadFrameDoesNotTrustLength(t *testing.T) {
	in := binary.BigEndian.AppendUint32(nil, 100<<20)
	in = append(in, make([]byte, 1000)...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := ReadFrame(bytes.NewReader(in), nil)
	runtime.ReadMemStats(&after)
	if err != io.ErrUnexpectedEOF {
		t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
		t.Fatalf("allocated %d bytes for a 1 KB stream claiming 100 MiB", alloc)
	}
}

// nested builds a Message whose Responses nest depth deep.
func nested(depth int) []byte {
	b, _ := (&raftpb.Message{Type: raftpb.MsgApp, From: 1, To: 2}).Marshal()
	for range depth {
		outer := []byte{14<<3 | 2}
		outer = binary.AppendUvarint(outer, uint64(len(b)))
		b = append(outer, b...)
	}
	return b
}

func TestDecodeRefusesDeepNesting(t *testing.T) {
	if _, err := DecodeMessage(nested(maxNesting)); err != nil {
		t.Fatalf("depth %d: %v", maxNesting, err)
	}
	// The generated decoder would recurse once per level; without the
	// check, a few MiB like this exhaust the stack (fatal, not a panic).
	if _, err := DecodeMessage(nested(1000)); !errors.Is(err, errBadWire) {
		t.Fatalf("depth 1000: got %v, want errBadWire", err)
	}
}

func TestHandshakeCheck(t *testing.T) {
	good := handshake{version: ProtocolVersion, clusterID: 5, from: 2, to: 1}
	for _, tc := range []struct {
		h    handshake
		want error
	}{
		{good, nil},
		{handshake{version: ProtocolVersion, clusterID: 5, from: 2}, nil},
		{handshake{version: 9, clusterID: 5, from: 2, to: 1}, ErrBadVersion},
		{handshake{version: ProtocolVersion, clusterID: 6, from: 2, to: 1}, ErrClusterMismatch},
		{handshake{version: ProtocolVersion, clusterID: 5, from: 2, to: 3}, ErrWrongRecipient},
		{handshake{version: ProtocolVersion, clusterID: 5, from: 1, to: 1}, ErrBadSender},
		{handshake{version: ProtocolVersion, clusterID: 5, from: 0, to: 1}, ErrBadSender},
	} {
		b := tc.h.appendTo(nil)
		h, err := readHandshake(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		if err := h.check(5, 1); !errors.Is(err, tc.want) {
			t.Errorf("%+v: got %v, want %v", tc.h, err, tc.want)
		}
	}
	bad := good.appendTo(nil)
	bad[0] = 'X'
	if _, err := readHandshake(bytes.NewReader(bad)); !errors.Is(err, ErrBadMagic) {
		t.Errorf("bad magic: got %v", err)
	}
}

func FuzzReadFrame(f *testing.F) {
	var stream []byte
	m := testMsg(1, 2, 10, []byte("payload"))
	stream, _ = AppendFrame(stream, &m)
	hb := raftpb.Message{Type: raftpb.MsgHeartbeat, From: 1, To: 2, Context: []byte("x")}
	stream, _ = AppendFrame(stream, &hb)
	f.Add(stream)
	f.Add(stream[:len(stream)-3])
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(append(binary.BigEndian.AppendUint32(nil, 100<<20), 1, 2, 3))
	f.Add(append(binary.BigEndian.AppendUint32(nil, 3), 0xff, 0xff, 0xff))
	deep := nested(maxNesting + 2)
	f.Add(append(binary.BigEndian.AppendUint32(nil, uint32(len(deep))), deep...))
	f.Add(handshake{version: ProtocolVersion, clusterID: 1, from: 2, to: 1}.appendTo(nil))
	rnd := make([]byte, 64)
	for i := range rnd {
		rnd[i] = byte(rand.N(256))
	}
	f.Add(rnd)

	f.Fuzz(func(t *testing.T, data []byte) {
		if h, err := readHandshake(bytes.NewReader(data)); err == nil {
			_ = h.check(1, 1)
		}
		r := bytes.NewReader(data)
		var buf []byte
		for {
			payload, err := ReadFrame(r, buf)
			if err != nil {
				if err != io.EOF && err != io.ErrUnexpectedEOF && !errors.Is(err, ErrFrameTooLarge) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if limit := 2*len(data) + 2*readChunk; cap(payload) > limit {
				t.Fatalf("payload cap %d for %d input bytes", cap(payload), len(data))
			}
			m, err := DecodeMessage(payload)
			if err == nil {
				// Whatever decodes must re-encode, stably.
				f1, err := AppendFrame(nil, &m)
				if err != nil {
					t.Fatalf("re-encode: %v", err)
				}
				m2, _, err := ReadMessage(bytes.NewReader(f1), nil)
				if err != nil {
					t.Fatalf("decode re-encoded: %v", err)
				}
				f2, _ := AppendFrame(nil, &m2)
				if !bytes.Equal(f1, f2) {
					t.Fatalf("encoding not stable:\n%x\n%x", f1, f2)
				}
			}
			buf = payload[:0]
		}
	})
}
