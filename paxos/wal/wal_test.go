package wal

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"
)

// model is the State a WAL must yield after the same operations.
type model struct {
	snap raftpb.SnapshotMetadata
	hs   raftpb.HardState
	ents []raftpb.Entry
}

func (m *model) save(hs raftpb.HardState, ents []raftpb.Entry) {
	if len(ents) > 0 {
		first := ents[0].Index
		k := sort.Search(len(m.ents), func(i int) bool { return m.ents[i].Index >= first })
		m.ents = append(slices.Clone(m.ents[:k]), ents...)
	}
	if hs != (raftpb.HardState{}) {
		m.hs = hs
	}
}

func (m *model) saveSnapshot(meta raftpb.SnapshotMetadata) {
	m.snap = meta
	k := sort.Search(len(m.ents), func(i int) bool { return m.ents[i].Index > meta.Index })
	m.ents = slices.Clone(m.ents[k:])
}

func (m *model) lastIndex() uint64 {
	if len(m.ents) > 0 {
		return m.ents[len(m.ents)-1].Index
	}
	return m.snap.Index
}

func (m *model) check(t *testing.T, st State) {
	t.Helper()
	if !reflect.DeepEqual(st.Snapshot, m.snap) {
		t.Fatalf("snapshot = %+v, want %+v", st.Snapshot, m.snap)
	}
	if st.HardState != m.hs {
		t.Fatalf("hard state = %+v, want %+v", st.HardState, m.hs)
	}
	checkEntries(t, st.Entries, m.ents)
}

func checkEntries(t *testing.T, got, want []raftpb.Entry) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d entries %s, want %d %s", len(got), span(got), len(want), span(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Index != w.Index || g.Term != w.Term || g.Type != w.Type || !bytes.Equal(g.Data, w.Data) {
			t.Fatalf("entry %d = %v, want %v", i, g.String(), w.String())
		}
	}
}

func span(ents []raftpb.Entry) string {
	if len(ents) == 0 {
		return "[]"
	}
	return fmt.Sprintf("[%d..%d]", ents[0].Index, ents[len(ents)-1].Index)
}

// mkEnts returns entries lo..hi (inclusive) of the given term.
func mkEnts(term, lo, hi uint64) []raftpb.Entry {
	var ents []raftpb.Entry
	for i := lo; i <= hi; i++ {
		ents = append(ents, raftpb.Entry{Term: term, Index: i, Data: fmt.Appendf(nil, "entry %d of term %d", i, term)})
	}
	return ents
}

func hardState(term, vote, commit uint64) raftpb.HardState {
	return raftpb.HardState{Term: term, Vote: vote, Commit: commit}
}

func testOptions() (Options, *logtest.Hook) {
	logger, hook := logtest.NewNullLogger()
	return Options{NoSync: true, Logger: logger}, hook
}

func mustOpen(t testing.TB, dir string, opts Options) (*WAL, State) {
	t.Helper()
	w, st, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return w, st
}

func mustClose(t testing.TB, w *WAL) {
	t.Helper()
	if err := w.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

// saver applies operations to a WAL and its model together.
type saver struct {
	t *testing.T
	w *WAL
	m *model
}

func (s saver) save(hs raftpb.HardState, ents []raftpb.Entry) {
	s.t.Helper()
	if err := s.w.Save(hs, ents); err != nil {
		s.t.Fatalf("save: %v", err)
	}
	s.m.save(hs, ents)
}

func (s saver) snapshot(meta raftpb.SnapshotMetadata) {
	s.t.Helper()
	if err := s.w.SaveSnapshot(meta); err != nil {
		s.t.Fatalf("save snapshot: %v", err)
	}
	s.m.saveSnapshot(meta)
}

func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	if err != nil {
		t.Fatal(err)
	}
	for i := range names {
		names[i] = filepath.Base(names[i])
	}
	sort.Strings(names)
	return names
}

func lastSegment(t testing.TB, dir string) string {
	t.Helper()
	names := segmentFiles(t, dir)
	if len(names) == 0 {
		t.Fatal("no segments")
	}
	return filepath.Join(dir, names[len(names)-1])
}

// recordEnds returns the offset at which each record of a segment ends.
func recordEnds(t testing.TB, b []byte) []int {
	t.Helper()
	var ends []int
	for off := 0; off < len(b); {
		_, n, err := decodeRecord(b[off:])
		if err != nil {
			t.Fatalf("decode at %d: %v", off, err)
		}
		off += n
		ends = append(ends, off)
	}
	return ends
}

func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, name := range segmentFiles(t, src) {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, name), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func TestEmptyOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "wal")
	opts, _ := testOptions()
	w, st := mustOpen(t, dir, opts)
	(&model{}).check(t, st)
	if err := w.Save(raftpb.HardState{}, nil); err != nil {
		t.Fatalf("empty save: %v", err)
	}
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	(&model{}).check(t, st)
	if got := segmentFiles(t, dir); len(got) != 1 || got[0] != segmentName(1, 1) {
		t.Fatalf("segments = %v", got)
	}
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	rng := rand.New(rand.NewSource(1))
	m := &model{}
	w, _ := mustOpen(t, dir, opts)
	s := saver{t, w, m}
	var term, next uint64 = 1, 1
	for batch := 0; batch < 200; batch++ {
		n := uint64(rng.Intn(8))
		var ents []raftpb.Entry
		if n > 0 {
			ents = mkEnts(term, next, next+n-1)
			next += n
		}
		var hs raftpb.HardState
		if rng.Intn(3) > 0 {
			hs = hardState(term, 1, next-1)
		}
		s.save(hs, ents)
		if rng.Intn(20) == 0 {
			term++
		}
	}
	mustClose(t, w)

	w, st := mustOpen(t, dir, opts)
	m.check(t, st)
	// Appending after a reopen continues the same log.
	s = saver{t, w, m}
	s.save(hardState(term+1, 2, next), mkEnts(term+1, next, next+9))
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
}

func TestConflictingOverwrite(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(1, 1, 0), mkEnts(1, 1, 10))
	s.save(hardState(2, 2, 3), mkEnts(2, 6, 8))
	mustClose(t, w)

	w, st := mustOpen(t, dir, opts)
	want := append(mkEnts(1, 1, 5), mkEnts(2, 6, 8)...)
	checkEntries(t, st.Entries, want)
	m.check(t, st)

	// The log continues after the overwritten suffix, not after index 10.
	s = saver{t, w, m}
	if err := w.Save(raftpb.HardState{}, mkEnts(2, 10, 10)); err == nil {
		t.Fatal("save leaving a gap after the truncated suffix succeeded")
	}
	s.save(raftpb.HardState{}, mkEnts(2, 9, 12))
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
}

func TestOverwriteAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.SegmentSize = 300
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	for i := uint64(1); i <= 40; i += 4 {
		s.save(hardState(1, 1, i), mkEnts(1, i, i+3))
	}
	// A new leader overwrites entries that live in older segments.
	s.save(hardState(3, 3, 5), mkEnts(3, 8, 15))
	for i := uint64(16); i <= 30; i += 5 {
		s.save(hardState(3, 3, i), mkEnts(3, i, i+4))
	}
	mustClose(t, w)
	w, st := mustOpen(t, dir, opts)
	m.check(t, st)

	// Snapshot at 20 and release: the stale entries 16..40 of term 1 are in
	// segments that go, the live ones survive.
	s = saver{t, w, m}
	s.snapshot(raftpb.SnapshotMetadata{Index: 20, Term: 3})
	s.save(hardState(3, 3, 31), mkEnts(3, 31, 32))
	if err := w.ReleaseTo(20); err != nil {
		t.Fatal(err)
	}
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
}

// expectedRelease computes which segments ReleaseTo(index) may delete,
// independently of the implementation: segments before the one holding the
// newest marker <= index whose successors start at or below marker+1.
func expectedRelease(names []string, holder string, marker uint64) []string {
	var out []string
	for i := 0; i+1 < len(names) && names[i] < holder; i++ {
		_, next, _ := parseSegmentName(names[i+1])
		if next-1 > marker {
			break
		}
		out = append(out, names[i])
	}
	return out
}

func TestRotationAndReleaseTo(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.SegmentSize = 256
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	for i := uint64(1); i <= 300; i += 3 {
		s.save(hardState(1, 1, i-1), mkEnts(1, i, i+2))
	}
	segs := segmentFiles(t, dir)
	if len(segs) < 20 {
		t.Fatalf("only %d segments with SegmentSize 256", len(segs))
	}
	for _, name := range segs {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Size() > 256+200 {
			t.Fatalf("segment %s: %v, size %d", name, err, fi.Size())
		}
	}
	holder150 := segs[len(segs)-1] // the marker goes into the current segment
	s.snapshot(raftpb.SnapshotMetadata{Index: 150, Term: 1, ConfState: raftpb.ConfState{Voters: []uint64{1, 2, 3}}})
	for i := uint64(301); i <= 400; i += 3 {
		s.save(hardState(1, 1, i-1), mkEnts(1, i, i+2))
	}
	mustClose(t, w)

	w, st := mustOpen(t, dir, opts)
	m.check(t, st)

	// Below the marker nothing can go.
	before := segmentFiles(t, dir)
	if err := w.ReleaseTo(149); err != nil {
		t.Fatal(err)
	}
	if got := segmentFiles(t, dir); !slices.Equal(got, before) {
		t.Fatalf("ReleaseTo(149) deleted %v", diff(before, got))
	}

	for _, index := range []uint64{150, 10000} {
		if err := w.ReleaseTo(index); err != nil {
			t.Fatal(err)
		}
		after := segmentFiles(t, dir)
		want := expectedRelease(before, holder150, 150)
		if len(want) == 0 {
			t.Fatal("test setup: nothing to release")
		}
		if got := diff(before, after); !slices.Equal(got, want) {
			t.Fatalf("ReleaseTo(%d) deleted %v, want %v", index, got, want)
		}
	}
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	m.check(t, st)

	// A newer snapshot releases more; the WAL still recovers the same.
	s = saver{t, w, m}
	before = segmentFiles(t, dir)
	holder390 := before[len(before)-1]
	s.snapshot(raftpb.SnapshotMetadata{Index: 390, Term: 1})
	if err := w.ReleaseTo(395); err != nil {
		t.Fatal(err)
	}
	after := segmentFiles(t, dir)
	if got, want := diff(before, after), expectedRelease(before, holder390, 390); !slices.Equal(got, want) || len(got) == 0 {
		t.Fatalf("ReleaseTo(395) deleted %v, want %v", got, want)
	}
	s.save(hardState(2, 2, 401), mkEnts(2, 401, 402))
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
}

func diff(before, after []string) []string {
	var out []string
	for _, n := range before {
		if !slices.Contains(after, n) {
			out = append(out, n)
		}
	}
	return out
}

// The log grows ahead of the snapshot: entries above the marker that live
// in segments before the marker's must survive a generous ReleaseTo.
func TestReleaseToKeepsEntriesAboveMarker(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.SegmentSize = 200
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	for i := uint64(1); i <= 60; i += 2 {
		s.save(hardState(1, 1, i), mkEnts(1, i, i+1))
	}
	s.snapshot(raftpb.SnapshotMetadata{Index: 45, Term: 1})
	s.save(hardState(1, 1, 60), mkEnts(1, 61, 70))
	if err := w.ReleaseTo(100); err != nil {
		t.Fatal(err)
	}
	mustClose(t, w)
	w, st := mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
	if st.Entries[0].Index != 46 {
		t.Fatalf("entries start at %d", st.Entries[0].Index)
	}
}

// The vote is saved once and then not again for many segments: releasing
// those segments must not lose it.
func TestReleaseToKeepsHardState(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.SegmentSize = 200
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(7, 3, 0), mkEnts(7, 1, 1))
	for i := uint64(2); i <= 80; i += 2 {
		s.save(raftpb.HardState{}, mkEnts(7, i, i+1))
	}
	s.snapshot(raftpb.SnapshotMetadata{Index: 81, Term: 7})
	if err := w.ReleaseTo(81); err != nil {
		t.Fatal(err)
	}
	// Only copies of the hard state are left.
	if segs := segmentFiles(t, dir); segs[0] == segmentName(1, 1) || len(segs) > 2 {
		t.Fatalf("segments left: %v", segs)
	}
	mustClose(t, w)
	w, st := mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
}

func TestSnapshotMarker(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(1, 1, 20), mkEnts(1, 1, 20))
	meta := raftpb.SnapshotMetadata{Index: 10, Term: 1, ConfState: raftpb.ConfState{Voters: []uint64{1, 2, 3}, Learners: []uint64{4}}}
	s.snapshot(meta)
	s.save(hardState(2, 1, 25), mkEnts(2, 21, 30))
	mustClose(t, w)

	w, st := mustOpen(t, dir, opts)
	m.check(t, st)
	if !reflect.DeepEqual(st.Snapshot, meta) || st.Entries[0].Index != 11 {
		t.Fatalf("snapshot %+v, entries from %d", st.Snapshot, st.Entries[0].Index)
	}

	// Entries at or below the marker are rejected, an older marker too.
	if err := w.Save(raftpb.HardState{}, mkEnts(2, 10, 12)); err == nil {
		t.Fatal("save at the snapshot index succeeded")
	}
	if err := w.SaveSnapshot(raftpb.SnapshotMetadata{Index: 5, Term: 1}); err == nil {
		t.Fatal("older snapshot marker accepted")
	}

	// A snapshot from the leader ahead of the log: the log restarts after it.
	s = saver{t, w, m}
	s.snapshot(raftpb.SnapshotMetadata{Index: 100, Term: 3})
	if err := w.Save(raftpb.HardState{}, mkEnts(3, 31, 31)); err == nil {
		t.Fatal("save below a newer snapshot succeeded")
	}
	s.save(hardState(3, 2, 100), mkEnts(3, 101, 105))
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	m.check(t, st)
	mustClose(t, w)

	// Marker as the last record, nothing after it.
	s = saver{t, nil, m}
	w, _ = mustOpen(t, dir, opts)
	s.w = w
	s.snapshot(raftpb.SnapshotMetadata{Index: 105, Term: 3})
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
	if len(st.Entries) != 0 {
		t.Fatalf("entries after a marker at the last index: %s", span(st.Entries))
	}
}

func TestSaveValidation(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	syncs := 0
	opts.OnSync = func(time.Duration) { syncs++ }
	opts.NoSync = false
	w, _ := mustOpen(t, dir, opts)
	defer mustClose(t, w)
	if err := w.Save(raftpb.HardState{}, mkEnts(1, 2, 3)); err == nil {
		t.Fatal("first entry 2 on an empty log accepted")
	}
	ents := mkEnts(1, 1, 3)
	ents[2].Index = 4
	if err := w.Save(raftpb.HardState{}, ents); err == nil {
		t.Fatal("non-contiguous entries accepted")
	}
	if err := w.Save(raftpb.HardState{}, []raftpb.Entry{{Term: 1}}); err == nil {
		t.Fatal("entry with index 0 accepted")
	}
	big := raftpb.Entry{Term: 1, Index: 1, Data: make([]byte, maxRecordSize)}
	if err := w.Save(raftpb.HardState{}, []raftpb.Entry{big}); err == nil {
		t.Fatal("oversized entry accepted")
	}
	syncs = 0
	if err := w.Save(raftpb.HardState{}, nil); err != nil || syncs != 0 {
		t.Fatalf("empty save: err %v, %d syncs", err, syncs)
	}
	if err := w.SaveSnapshot(raftpb.SnapshotMetadata{}); err != nil || syncs != 0 {
		t.Fatalf("empty snapshot marker: err %v, %d syncs", err, syncs)
	}
	// Group commit: one fsync however many entries.
	if err := w.Save(hardState(1, 1, 0), mkEnts(1, 1, 500)); err != nil || syncs != 1 {
		t.Fatalf("batch save: err %v, %d syncs", err, syncs)
	}
	// An unchanged hard state is nothing to write.
	if err := w.Save(hardState(1, 1, 0), nil); err != nil || syncs != 1 {
		t.Fatalf("unchanged hard state: err %v, %d syncs", err, syncs)
	}
	if err := w.Save(hardState(1, 1, 2), nil); err != nil || syncs != 2 {
		t.Fatalf("changed hard state: err %v, %d syncs", err, syncs)
	}
}

func TestOpenLocked(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	if _, _, err := Open(dir, opts); err == nil {
		t.Fatal("second open of a locked WAL succeeded")
	}
	mustClose(t, w)
	if err := w.Save(hardState(1, 1, 0), nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("save after close: %v", err)
	}
	w, _ = mustOpen(t, dir, opts)
	mustClose(t, w)
}

func TestLeftoverTempSegmentRemoved(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	saver{t, w, m}.save(hardState(1, 1, 1), mkEnts(1, 1, 3))
	mustClose(t, w)
	tmp := filepath.Join(dir, segmentName(2, 4)+tmpSuffix)
	if err := os.WriteFile(tmp, []byte("half a header"), 0o640); err != nil {
		t.Fatal(err)
	}
	w, st := mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temporary segment still there: %v", err)
	}
}

// A crash can cut the last write anywhere: every cut must open to the last
// complete record, keep working, and survive another reopen.
// walModes are the two ways segments grow: appends, and writes into space
// preallocated up front (what the raft node uses).
var walModes = []struct {
	name        string
	preallocate bool
}{{"append", false}, {"preallocated", true}}

// dataEnd is where a segment's records end: its size, or where the zeros of
// its preallocated rest begin.
func dataEnd(t testing.TB, b []byte) int {
	t.Helper()
	off := 0
	for off < len(b) {
		_, n, err := decodeRecord(b[off:])
		if err != nil {
			if !allZero(b[off:]) {
				t.Fatalf("decode at %d: %v", off, err)
			}
			break
		}
		off += n
	}
	return off
}

// tear leaves only the first cut bytes of a segment's records, as a crash
// in the middle of a write does: the rest is gone from an appended file,
// and zeros (never-written space) in a preallocated one.
func tear(t testing.TB, path string, cut int, preallocated bool) {
	t.Helper()
	if !preallocated {
		if err := os.Truncate(path, int64(cut)); err != nil {
			t.Fatal(err)
		}
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	clear(b[cut:])
	if err := os.WriteFile(path, b, 0o640); err != nil {
		t.Fatal(err)
	}
}

func TestTornTailEveryOffset(t *testing.T) {
	for _, mode := range walModes {
		t.Run(mode.name, func(t *testing.T) { tornTailEveryOffset(t, mode.preallocate) })
	}
}

func tornTailEveryOffset(t *testing.T, preallocate bool) {
	src := t.TempDir()
	opts, _ := testOptions()
	opts.Preallocate = preallocate
	opts.SegmentSize = 64 << 10
	w, _ := mustOpen(t, src, opts)
	m := &model{}
	s := saver{t, w, m}
	for i := uint64(1); i <= 20; i += 4 {
		s.save(hardState(1, 1, i), mkEnts(1, i, i+3))
	}
	synced := *m
	seg := lastSegment(t, src)
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	if preallocate != (len(b) == int(opts.SegmentSize)) {
		t.Fatalf("segment of %d bytes (preallocate %v, segment size %d)", len(b), preallocate, opts.SegmentSize)
	}
	size0 := dataEnd(t, b)
	lastEnts, lastHS := mkEnts(2, 21, 22), hardState(2, 2, 20)
	s.save(lastHS, lastEnts)
	mustClose(t, w)
	full, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	end := dataEnd(t, full)
	ends := recordEnds(t, full[:end])
	name := filepath.Base(seg)

	for cut := size0; cut < end; cut++ {
		dir := copyDir(t, src)
		tear(t, filepath.Join(dir, name), cut, preallocate)
		// The last batch is entry 21, entry 22, hard state: expect the
		// records that were complete at the cut.
		want := synced
		complete := 0
		for _, e := range ends {
			if e > size0 && e <= cut {
				complete++
			}
		}
		switch {
		case complete == 3:
			want.save(lastHS, lastEnts)
		case complete > 0:
			want.save(raftpb.HardState{}, lastEnts[:complete])
		}
		logger, hook := logtest.NewNullLogger()
		o := opts
		o.Logger = logger
		w, st, err := Open(dir, o)
		if err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		want.check(t, st)
		if !slices.Contains(ends, cut) {
			// Truncated at the end of the last complete record.
			goodEnd := ends[len(ends)-4+complete]
			var e *logrus.Entry
			for _, x := range hook.AllEntries() {
				if x.Level == logrus.WarnLevel {
					e = x
				}
			}
			if e == nil || e.Data["file"] != name || e.Data["offset"] != goodEnd ||
				!strings.Contains(e.Message, name) {
				t.Fatalf("cut at %d: warning %+v", cut, e)
			}
		} else if len(hook.AllEntries()) != 0 {
			t.Fatalf("cut at record boundary %d: unexpected log %v", cut, hook.LastEntry().Message)
		}
		s := saver{t, w, &want}
		s.save(hardState(3, 3, 21), mkEnts(3, want.lastIndex()+1, want.lastIndex()+2))
		mustClose(t, w)
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || preallocate && fi.Size() != opts.SegmentSize {
			t.Fatalf("cut at %d: after repair and an append the segment is %v bytes (%v)", cut, fi.Size(), err)
		}
		w, st = mustOpen(t, dir, opts)
		want.check(t, st)
		mustClose(t, w)
	}
}

// Simulated crashes between write and fsync: the unsynced part is lost, cut,
// zeroed or replaced by garbage; Open yields the synced prefix.
func TestCrashBeforeSync(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	garbage := func(n int) []byte {
		b := make([]byte, n)
		rng.Read(b)
		return b
	}
	cases := []struct {
		name string
		// damage returns the bytes that replace the unsynced part.
		damage func(unsynced []byte) []byte
	}{
		{"lost", func([]byte) []byte { return nil }},
		{"half-written", func(u []byte) []byte { return u[:len(u)/2] }},
		{"header-only", func(u []byte) []byte { return u[:recordHeaderSize] }},
		{"zeros", func(u []byte) []byte { return make([]byte, len(u)) }},
		{"zero-page", func([]byte) []byte { return make([]byte, 4096) }},
		{"garbage-small", func([]byte) []byte { return garbage(7) }},
		{"garbage", func(u []byte) []byte { return garbage(len(u)) }},
		{"garbage-large", func([]byte) []byte { return garbage(1 << 16) }},
		{"bad-checksum", func(u []byte) []byte {
			// Only the first record made it, and not intact.
			_, n, _ := decodeRecord(u)
			b := slices.Clone(u[:n])
			b[n-1] ^= 0xff
			return b
		}},
	}
	for _, mode := range walModes {
		for _, tc := range cases {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) { crashBeforeSync(t, mode.preallocate, tc.damage) })
		}
	}
}

func crashBeforeSync(t *testing.T, preallocate bool, damage func([]byte) []byte) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.SegmentSize = 1 << 20
	opts.Preallocate = preallocate
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	for i := uint64(1); i <= 30; i += 5 {
		s.save(hardState(1, 1, i), mkEnts(1, i, i+4))
	}
	synced := *m
	seg := lastSegment(t, dir)
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	syncedEnd := dataEnd(t, b)
	// The unsynced write: one big entry record followed by more.
	big := mkEnts(1, 31, 31)
	big[0].Data = bytes.Repeat([]byte("x"), 1000)
	if err := w.Save(hardState(1, 1, 31), append(big, mkEnts(1, 32, 33)...)); err != nil {
		t.Fatal(err)
	}
	mustClose(t, w)
	if b, err = os.ReadFile(seg); err != nil {
		t.Fatal(err)
	}
	size := len(b)
	unsynced := b[syncedEnd:dataEnd(t, b)]
	b = append(b[:syncedEnd:syncedEnd], damage(unsynced)...)
	if preallocate && len(b) < size {
		// The rest of a preallocated segment: never written.
		b = append(b, make([]byte, size-len(b))...)
	}
	if err := os.WriteFile(seg, b, 0o640); err != nil {
		t.Fatal(err)
	}
	w, st := mustOpen(t, dir, opts)
	synced.check(t, st)
	s = saver{t, w, &synced}
	s.save(hardState(2, 2, 30), mkEnts(2, 31, 32))
	mustClose(t, w)
	w, st = mustOpen(t, dir, opts)
	defer mustClose(t, w)
	synced.check(t, st)
}

// A torn write inside a large entry of random bytes: the scan for valid
// records after the damage must stay cheap and find nothing.
func TestTornLargeEntry(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(1, 1, 2), mkEnts(1, 1, 3))
	big := mkEnts(1, 4, 4)
	big[0].Data = make([]byte, 4<<20)
	rand.New(rand.NewSource(3)).Read(big[0].Data)
	if err := w.Save(hardState(1, 1, 3), big); err != nil {
		t.Fatal(err)
	}
	mustClose(t, w)
	seg := lastSegment(t, dir)
	fi, err := os.Stat(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(seg, fi.Size()-100); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	w, st := mustOpen(t, dir, opts)
	defer mustClose(t, w)
	m.check(t, st)
	t.Logf("open with a torn 4 MiB record took %v", time.Since(start))
}

// Damage followed by valid records is not a torn write and is not repaired.
func TestCorruptionIsReported(t *testing.T) {
	build := func(t *testing.T, segSize int64) string {
		dir := t.TempDir()
		opts, _ := testOptions()
		opts.SegmentSize = segSize
		w, _ := mustOpen(t, dir, opts)
		for i := uint64(1); i <= 60; i += 3 {
			if err := w.Save(hardState(1, 1, i), mkEnts(1, i, i+2)); err != nil {
				t.Fatal(err)
			}
		}
		mustClose(t, w)
		return dir
	}
	modify := func(t *testing.T, path string, f func(b []byte, ends []int) []byte) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b = f(b, recordEnds(t, b))
		if err := os.WriteFile(path, b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	expectCorrupt := func(t *testing.T, dir, file string, off int) {
		t.Helper()
		opts, _ := testOptions()
		_, _, err := Open(dir, opts)
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("open: %v, want ErrCorrupt", err)
		}
		if !strings.Contains(err.Error(), file) {
			t.Fatalf("error %q does not name %s", err, file)
		}
		if off >= 0 && !strings.Contains(err.Error(), fmt.Sprintf("offset %d:", off)) {
			t.Fatalf("error %q does not name offset %d", err, off)
		}
		t.Log(err)
	}

	single := []struct {
		name string
		// flip damages b and returns the offset of the damaged record.
		flip func(b []byte, ends []int) int
	}{
		{"payload-bit", func(b []byte, ends []int) int { b[ends[10]+recordHeaderSize+3] ^= 0x10; return ends[10] }},
		{"checksum-bit", func(b []byte, ends []int) int { b[ends[10]+5] ^= 0x01; return ends[10] }},
		{"type-byte", func(b []byte, ends []int) int { b[ends[10]+8] = 0x7f; return ends[10] }},
		{"length-low-bit", func(b []byte, ends []int) int { b[ends[10]] ^= 0x01; return ends[10] }},
		{"length-high-bit", func(b []byte, ends []int) int { b[ends[10]+3] ^= 0x80; return ends[10] }},
		{"length-past-eof", func(b []byte, ends []int) int { b[ends[10]+2] ^= 0x08; return ends[10] }},
		{"zeroed-record", func(b []byte, ends []int) int { clear(b[ends[10]:ends[11]]); return ends[10] }},
		{"header", func(b []byte, ends []int) int { b[12] ^= 0x01; return 0 }},
	}
	for _, tc := range single {
		t.Run("last-segment/"+tc.name, func(t *testing.T) {
			dir := build(t, 1<<20)
			seg := lastSegment(t, dir)
			off := -1
			modify(t, seg, func(b []byte, ends []int) []byte { off = tc.flip(b, ends); return b })
			expectCorrupt(t, dir, filepath.Base(seg), off)
		})
	}

	t.Run("non-last-segment/final-record", func(t *testing.T) {
		dir := build(t, 300)
		segs := segmentFiles(t, dir)
		path := filepath.Join(dir, segs[1])
		off := -1
		modify(t, path, func(b []byte, ends []int) []byte {
			b[len(b)-1] ^= 0x01
			off = ends[len(ends)-2]
			return b
		})
		expectCorrupt(t, dir, segs[1], off)
	})
	t.Run("non-last-segment/torn", func(t *testing.T) {
		dir := build(t, 300)
		segs := segmentFiles(t, dir)
		path := filepath.Join(dir, segs[1])
		off := -1
		modify(t, path, func(b []byte, ends []int) []byte {
			off = ends[len(ends)-2]
			return b[:off+3]
		})
		expectCorrupt(t, dir, segs[1], off)
	})
	t.Run("non-last-segment/lost-records", func(t *testing.T) {
		// Cut at a record boundary before the last batch's entries: every
		// record decodes, but the next segment starts past the log's end.
		dir := build(t, 300)
		segs := segmentFiles(t, dir)
		modify(t, filepath.Join(dir, segs[1]), func(b []byte, ends []int) []byte { return b[:ends[1]] })
		expectCorrupt(t, dir, segs[2], 0)
	})
	t.Run("missing-segment", func(t *testing.T) {
		dir := build(t, 300)
		segs := segmentFiles(t, dir)
		if err := os.Remove(filepath.Join(dir, segs[2])); err != nil {
			t.Fatal(err)
		}
		expectCorrupt(t, dir, segs[1], -1)
	})
	t.Run("renamed-segment", func(t *testing.T) {
		dir := build(t, 300)
		segs := segmentFiles(t, dir)
		seq, first, _ := parseSegmentName(segs[2])
		bad := segmentName(seq, first+1)
		if err := os.Rename(filepath.Join(dir, segs[2]), filepath.Join(dir, bad)); err != nil {
			t.Fatal(err)
		}
		expectCorrupt(t, dir, bad, 0)
	})
}

func TestWriteFailureIsSticky(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	w, _ := mustOpen(t, dir, opts)
	defer w.Close()
	if err := w.Save(hardState(1, 1, 0), mkEnts(1, 1, 2)); err != nil {
		t.Fatal(err)
	}
	_ = w.f.Close() // make the next write fail
	if err := w.Save(hardState(1, 1, 1), mkEnts(1, 3, 3)); err == nil {
		t.Fatal("write to a closed file succeeded")
	}
	if err := w.Save(hardState(1, 1, 2), nil); err == nil {
		t.Fatal("save after a failed write succeeded")
	}
}

func TestPlausibleStartAcceptsWrittenRecords(t *testing.T) {
	var b []byte
	var err error
	for _, e := range []raftpb.Entry{{Index: 1}, {Index: 2, Term: 1}, {Index: 3, Type: raftpb.EntryConfChange, Data: []byte{1}}} {
		if b, err = appendMessage(b, recEntry, &e); err != nil {
			t.Fatal(err)
		}
	}
	for _, hs := range []raftpb.HardState{{Commit: 1}, {Vote: 1}, {Term: 1}} {
		if b, err = appendMessage(b, recHardState, &hs); err != nil {
			t.Fatal(err)
		}
	}
	for _, meta := range []raftpb.SnapshotMetadata{{Index: 1}, {Index: 2, ConfState: raftpb.ConfState{Voters: []uint64{1}}}} {
		if b, err = appendMessage(b, recSnapshot, &meta); err != nil {
			t.Fatal(err)
		}
	}
	b = segmentHeader{seq: 1, firstIndex: 1}.appendTo(b)
	for off, i := 0, 0; off < len(b); i++ {
		if !plausibleStart(b[off:]) {
			t.Fatalf("record %d at %d not plausible", i, off)
		}
		_, n, err := decodeRecord(b[off:])
		if err != nil {
			t.Fatal(err)
		}
		off += n
	}
}

func BenchmarkSave(b *testing.B) {
	for _, bc := range []struct {
		name        string
		sync, alloc bool
		batch       int
	}{
		{"fsync", true, false, 64},
		{"nosync", false, false, 64},
		// One small entry per sync, as on the latency path.
		{"fsync-1", true, false, 1},
		{"fsync-1-preallocated", true, true, 1},
	} {
		b.Run(bc.name, func(b *testing.B) {
			w, _, err := Open(b.TempDir(), Options{NoSync: !bc.sync, Preallocate: bc.alloc, Logger: logrus.New()})
			if err != nil {
				b.Fatal(err)
			}
			defer w.Close()
			data := bytes.Repeat([]byte("d"), 256)
			ents := make([]raftpb.Entry, bc.batch)
			b.SetBytes(int64(bc.batch) * int64(len(data)))
			b.ReportAllocs()
			index := uint64(1)
			for b.Loop() {
				for i := range ents {
					ents[i] = raftpb.Entry{Term: 1, Index: index, Data: data}
					index++
				}
				if err := w.Save(raftpb.HardState{Term: 1, Vote: 1, Commit: index - 1}, ents); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestSaveUnsynced: records written without fsync are read back (they are
// in the file), are covered by the next Save's fsync, and never leave a
// segment rotated with an unsynced tail.
func TestSaveUnsynced(t *testing.T) {
	dir := t.TempDir()
	var syncs int
	w, _, err := Open(dir, Options{SegmentSize: 512, OnSync: func(time.Duration) { syncs++ }})
	if err != nil {
		t.Fatal(err)
	}
	base := syncs
	ents := []raftpb.Entry{{Index: 1, Term: 1, Data: make([]byte, 600)}}
	if err := w.Save(raftpb.HardState{Term: 1, Commit: 0}, ents); err != nil {
		t.Fatal(err)
	}
	segsAfterSave := len(w.segs)
	afterSave := syncs
	if afterSave <= base {
		t.Fatal("Save did not fsync")
	}
	if err := w.SaveUnsynced(raftpb.HardState{Term: 1, Commit: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if syncs != afterSave {
		t.Fatalf("SaveUnsynced fsynced (%d -> %d)", afterSave, syncs)
	}
	if len(w.segs) != segsAfterSave {
		t.Fatal("rotated a segment with an unsynced tail")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, st, err := Open(dir, Options{SegmentSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if st.HardState.Commit != 1 || len(st.Entries) != 1 {
		t.Fatalf("reopened: %+v, %d entries", st.HardState, len(st.Entries))
	}
}

// TestPreallocatedSegments: new segments get their full size, a full one is
// trimmed to its records when the next starts, a WAL written by appends is
// preallocated when reopened, and none of it logs a repair.
func TestPreallocatedSegments(t *testing.T) {
	dir := t.TempDir()
	opts, hook := testOptions()
	opts.SegmentSize = 4 << 10
	w, _ := mustOpen(t, dir, opts) // appends first
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(1, 1, 1), mkEnts(1, 1, 5))
	mustClose(t, w)
	size := func(name string) int64 {
		t.Helper()
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	first := segmentFiles(t, dir)[0]
	if got := size(first); got >= opts.SegmentSize {
		t.Fatalf("appended segment is %d bytes", got)
	}

	opts.Preallocate = true
	w, st := mustOpen(t, dir, opts)
	m.check(t, st)
	if got := size(first); got != opts.SegmentSize {
		t.Fatalf("reopened with preallocation: %d bytes, want %d", got, opts.SegmentSize)
	}
	s = saver{t, w, m}
	for i := uint64(6); i < 400; i += 10 {
		s.save(hardState(1, 1, i), mkEnts(1, i, i+9))
	}
	mustClose(t, w)
	names := segmentFiles(t, dir)
	if len(names) < 3 {
		t.Fatalf("want several segments, got %v", names)
	}
	for i, name := range names {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		end := dataEnd(t, b)
		if last := i == len(names)-1; last && len(b) != int(opts.SegmentSize) || !last && len(b) != end {
			t.Errorf("segment %s: %d bytes, records end at %d (last %v)", name, len(b), end, last)
		}
	}
	w, st = mustOpen(t, dir, opts)
	m.check(t, st)
	mustClose(t, w)
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			t.Errorf("logged %s: %s", e.Level, e.Message)
		}
	}
}

// TestZeroAhead checks that a preallocated segment's blocks are written
// (with zeros) ahead of the appends, which is what spares an append's
// fdatasync the journal commit. It needs a file system that reports
// fallocated, never written blocks as a hole (ext4, xfs).
func TestZeroAhead(t *testing.T) {
	dir := t.TempDir()
	opts, _ := testOptions()
	opts.NoSync = false
	opts.Preallocate = true
	opts.SegmentSize = 4 * zeroChunk
	w, _ := mustOpen(t, dir, opts)
	f, err := os.Open(filepath.Join(dir, segmentFiles(t, dir)[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// written is where the written blocks from the start of the file end.
	written := func() int64 {
		t.Helper()
		off, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE: %v", err)
		}
		return off
	}
	if got := written(); got >= zeroChunk {
		t.Skipf("the file system reports preallocated blocks as data (first hole at %d)", got)
	}
	m := &model{}
	s := saver{t, w, m}
	s.save(hardState(1, 1, 1), mkEnts(1, 1, 1))
	if got := written(); got < zeroChunk {
		t.Fatalf("after the first append the written blocks end at %d, want at least %d", got, zeroChunk)
	}
	// Appends of 64 KiB entries: the zeros stay at least half a chunk ahead.
	payload := make([]byte, 64<<10)
	for i := uint64(2); i < 40; i++ {
		e := raftpb.Entry{Term: 1, Index: i, Data: payload}
		s.save(hardState(1, 1, i), []raftpb.Entry{e})
		if end, got := w.off, written(); got < min(end+zeroChunk/2, opts.SegmentSize) {
			t.Fatalf("entry %d: log ends at %d, written blocks at %d", i, end, got)
		}
	}
	if got := written(); got > opts.SegmentSize {
		t.Fatalf("blocks written up to %d, past the segment's %d", got, opts.SegmentSize)
	}
	mustClose(t, w)
	w, st := mustOpen(t, dir, opts)
	m.check(t, st)
	mustClose(t, w)
}
