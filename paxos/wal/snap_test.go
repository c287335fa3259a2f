package wal

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"testing"

	logtest "github.com/sirupsen/logrus/hooks/test"
	"go.etcd.io/raft/v3/raftpb"
)

func testSnapshotter(t *testing.T, dir string) (*Snapshotter, *logtest.Hook) {
	t.Helper()
	s, err := NewSnapshotter(dir)
	if err != nil {
		t.Fatal(err)
	}
	logger, hook := logtest.NewNullLogger()
	s.Logger = logger
	return s, hook
}

func mkSnap(term, index uint64) raftpb.Snapshot {
	return raftpb.Snapshot{
		Data: []byte("checkpoint-" + string(rune('a'+index%26))),
		Metadata: raftpb.SnapshotMetadata{
			Term: term, Index: index,
			ConfState: raftpb.ConfState{Voters: []uint64{1, 2, 3}},
		},
	}
}

func snapFiles(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+snapSuffix))
	if err != nil {
		t.Fatal(err)
	}
	for i := range names {
		names[i] = filepath.Base(names[i])
	}
	sort.Strings(names)
	return names
}

func TestSnapshotterSaveLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, _ := testSnapshotter(t, dir)
	if _, err := s.Load(); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("load from empty dir: %v", err)
	}
	if err := s.Save(raftpb.Snapshot{}); err == nil {
		t.Fatal("empty snapshot saved")
	}
	for i := uint64(1); i <= 3; i++ {
		if err := s.Save(mkSnap(i, i*10)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if want := mkSnap(3, 30); !reflect.DeepEqual(got, want) {
		t.Fatalf("load = %+v, want %+v", got, want)
	}
	// A fresh Snapshotter over the same directory sees the same.
	s2, _ := testSnapshotter(t, dir)
	if got2, err := s2.Load(); err != nil || !reflect.DeepEqual(got2, got) {
		t.Fatalf("reload = %+v, %v", got2, err)
	}
}

func TestSnapshotterCorruptNewestFallsBack(t *testing.T) {
	dir := t.TempDir()
	s, hook := testSnapshotter(t, dir)
	for i := uint64(1); i <= 3; i++ {
		if err := s.Save(mkSnap(1, i*10)); err != nil {
			t.Fatal(err)
		}
	}
	newest := filepath.Join(dir, snapName(1, 30))
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-2] ^= 0x04
	if err := os.WriteFile(newest, b, 0o640); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if got.Metadata.Index != 20 {
		t.Fatalf("loaded index %d, want fallback to 20", got.Metadata.Index)
	}
	if e := hook.LastEntry(); e == nil || e.Data["file"] != filepath.Base(newest) {
		t.Fatalf("no warning naming the damaged file: %+v", e)
	}

	// Truncated and misnamed files are skipped too; with none left, ErrNoSnapshot.
	if err := os.WriteFile(filepath.Join(dir, snapName(1, 20)), b[:5], 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, snapName(1, 10)), filepath.Join(dir, snapName(1, 11))); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("load with only damaged files: %v", err)
	}
}

func TestSnapshotterKeepsNewest(t *testing.T) {
	dir := t.TempDir()
	s, _ := testSnapshotter(t, dir)
	s.Keep = 3
	s.NoSync = true
	if err := os.WriteFile(filepath.Join(dir, snapName(1, 1)+tmpSuffix), []byte("partial"), 0o640); err != nil {
		t.Fatal(err)
	}
	s, _ = testSnapshotter(t, dir) // removes the leftover temporary file
	s.Keep = 3
	for i := uint64(1); i <= 8; i++ {
		if err := s.Save(mkSnap(1+i/4, i)); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{snapName(2, 6), snapName(2, 7), snapName(3, 8)}
	if got := snapFiles(t, dir); !reflect.DeepEqual(got, want) {
		t.Fatalf("files = %v, want %v", got, want)
	}
	if _, err := os.Stat(filepath.Join(dir, snapName(1, 1)+tmpSuffix)); !os.IsNotExist(err) {
		t.Fatalf("leftover temporary file: %v", err)
	}
}
