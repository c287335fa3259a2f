package wal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	logtest "github.com/sirupsen/logrus/hooks/test"
	"go.etcd.io/raft/v3/raftpb"
)

func seedRecords(tb testing.TB) [][]byte {
	tb.Helper()
	must := func(b []byte, err error) []byte {
		if err != nil {
			tb.Fatal(err)
		}
		return b
	}
	ent := raftpb.Entry{Term: 3, Index: 7, Type: raftpb.EntryConfChange, Data: []byte("data")}
	hs := raftpb.HardState{Term: 3, Vote: 2, Commit: 6}
	meta := raftpb.SnapshotMetadata{Index: 5, Term: 2, ConfState: raftpb.ConfState{Voters: []uint64{1, 2, 3}}}
	entRec := must(appendMessage(nil, recEntry, &ent))
	hugeLen := bytes.Clone(entRec)
	binary.LittleEndian.PutUint32(hugeLen, 0xffffffff)
	pastEnd := bytes.Clone(entRec)
	binary.LittleEndian.PutUint32(pastEnd, maxRecordSize)
	badCRC := bytes.Clone(entRec)
	badCRC[len(badCRC)-1] ^= 1
	return [][]byte{
		entRec,
		must(appendMessage(nil, recHardState, &hs)),
		must(appendMessage(nil, recSnapshot, &meta)),
		segmentHeader{seq: 1, firstIndex: 1}.appendTo(nil),
		appendRecord(nil, recEntry, nil),
		appendRecord(nil, recordType(9), []byte("unknown")),
		entRec[:5],
		entRec[:len(entRec)-1],
		hugeLen,
		pastEnd,
		badCRC,
		make([]byte, 32),
		{},
	}
}

func TestDecodeRecord(t *testing.T) {
	seeds := seedRecords(t)
	wantErr := []error{nil, nil, nil, nil, nil, errUnknownType, errTruncated, errTruncated,
		errTooLarge, errTruncated, errChecksum, errChecksum, errTruncated}
	for i, b := range seeds {
		rec, n, err := decodeRecord(b)
		if !errors.Is(err, wantErr[i]) {
			t.Fatalf("seed %d: err %v, want %v", i, err, wantErr[i])
		}
		if err == nil && !bytes.Equal(appendRecord(nil, rec.typ, rec.payload), b[:n]) {
			t.Fatalf("seed %d: re-encoding differs", i)
		}
	}
	// Decoding never allocates, whatever the length field claims.
	for i, b := range seeds {
		if allocs := testing.AllocsPerRun(10, func() { _, _, _ = decodeRecord(b) }); allocs != 0 {
			t.Fatalf("seed %d: %v allocations", i, allocs)
		}
	}
}

// FuzzDecodeRecord: the decoder must not panic, must not trust a length
// field beyond the input or maxRecordSize, and whatever it accepts must
// re-encode to the same bytes and decode to a payload that round-trips.
func FuzzDecodeRecord(f *testing.F) {
	for _, b := range seedRecords(f) {
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, b []byte, fixCRC bool) {
		if fixCRC {
			// Let mutations get past the checksum to the payload decoders.
			fixChecksums(b)
		}
		rec, n, err := decodeRecord(b)
		if err != nil {
			if n != 0 {
				t.Fatalf("error %v with n=%d", err, n)
			}
			return
		}
		if n < recordHeaderSize || n > len(b) || len(rec.payload) != n-recordHeaderSize || len(rec.payload) > maxRecordSize {
			t.Fatalf("n=%d payload=%d for %d input bytes", n, len(rec.payload), len(b))
		}
		if enc := appendRecord(nil, rec.typ, rec.payload); !bytes.Equal(enc, b[:n]) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", enc, b[:n])
		}
		m, err := decodePayload(rec)
		if err != nil {
			return
		}
		// A decoded payload encodes to something that decodes to the same.
		var re []byte
		switch m := m.(type) {
		case *segmentHeader:
			re = m.appendTo(nil)
		case *raftpb.Entry:
			re, err = appendMessage(nil, recEntry, m)
		case *raftpb.HardState:
			re, err = appendMessage(nil, recHardState, m)
		case *raftpb.SnapshotMetadata:
			re, err = appendMessage(nil, recSnapshot, m)
		default:
			t.Fatalf("unexpected payload %T", m)
		}
		if err != nil {
			t.Fatalf("re-encode %T: %v", m, err)
		}
		rec2, _, err := decodeRecord(re)
		if err != nil || rec2.typ != rec.typ {
			t.Fatalf("re-encoded record: %v, type %v", err, rec2.typ)
		}
		m2, err := decodePayload(rec2)
		if err != nil {
			t.Fatalf("re-encoded payload: %v", err)
		}
		if !reflect.DeepEqual(normalize(m), normalize(m2)) {
			t.Fatalf("payload round trip:\n got %+v\nwant %+v", m2, m)
		}
	})
}

// fixChecksums rewrites the checksum of each record in b whose length fits,
// walking records in order.
func fixChecksums(b []byte) {
	for len(b) >= recordHeaderSize {
		n := binary.LittleEndian.Uint32(b)
		if n > maxRecordSize || uint64(len(b)) < recordHeaderSize+uint64(n) {
			return
		}
		end := recordHeaderSize + int(n)
		binary.LittleEndian.PutUint32(b[4:8], crc32.Checksum(b[8:end], crcTable))
		b = b[end:]
	}
}

// normalize maps empty and nil byte slices together (Unmarshal yields
// non-nil empty Data).
func normalize(m any) any {
	if e, ok := m.(*raftpb.Entry); ok && len(e.Data) == 0 {
		c := *e
		c.Data = nil
		return &c
	}
	return m
}

// FuzzOpen feeds arbitrary bytes as the only segment: Open must not panic,
// and when it accepts the bytes the WAL must keep working across reopens.
func FuzzOpen(f *testing.F) {
	src := f.TempDir()
	logger, _ := logtest.NewNullLogger()
	opts := Options{NoSync: true, Logger: logger}
	w, _, err := Open(src, opts)
	if err != nil {
		f.Fatal(err)
	}
	for i := uint64(1); i <= 9; i += 3 {
		if err := w.Save(hardState(1, 1, i), mkEnts(1, i, i+2)); err != nil {
			f.Fatal(err)
		}
	}
	if err := w.SaveSnapshot(raftpb.SnapshotMetadata{Index: 4, Term: 1}); err != nil {
		f.Fatal(err)
	}
	if err := w.Save(hardState(2, 1, 9), mkEnts(2, 8, 10)); err != nil {
		f.Fatal(err)
	}
	if err := w.Close(); err != nil {
		f.Fatal(err)
	}
	seg, err := os.ReadFile(filepath.Join(src, segmentName(1, 1)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seg, false)
	f.Add(seg, true)
	f.Add(seg[:len(seg)-3], false)
	f.Add(append(bytes.Clone(seg), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), false)

	f.Fuzz(func(t *testing.T, b []byte, fixCRC bool) {
		if fixCRC {
			fixChecksums(b)
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segmentName(1, 1)), b, 0o640); err != nil {
			t.Fatal(err)
		}
		w, st, err := Open(dir, opts)
		if err != nil {
			return
		}
		defer w.Close()
		if w.lastIndex == ^uint64(0) {
			return // no room for another entry
		}
		next := raftpb.Entry{Term: 1, Index: w.lastIndex + 1, Data: []byte("x")}
		hs := raftpb.HardState{Term: 5, Vote: 5, Commit: 5}
		if hs == st.HardState {
			hs.Vote = 6
		}
		if err := w.Save(hs, []raftpb.Entry{next}); err != nil {
			t.Fatalf("save after open: %v", err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		w2, st2, err := Open(dir, opts)
		if err != nil {
			t.Fatalf("reopen: %v", err)
		}
		defer w2.Close()
		want := model{snap: st.Snapshot, hs: hs, ents: st.Entries}
		want.save(raftpb.HardState{}, []raftpb.Entry{next})
		if !reflect.DeepEqual(st2.Snapshot, want.snap) || st2.HardState != want.hs || len(st2.Entries) != len(want.ents) {
			t.Fatalf("reopen: got %+v %+v %s, want %+v %+v %s",
				st2.Snapshot, st2.HardState, span(st2.Entries), want.snap, want.hs, span(want.ents))
		}
	})
}
