package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"go.etcd.io/raft/v3/raftpb"
)

// ErrNoSnapshot is returned by Snapshotter.Load when no snapshot file
// passes its checksum.
var ErrNoSnapshot = errors.New("wal: no snapshot")

const (
	snapSuffix = ".snap"
	// snapHeaderSize: magic(4) crc32c(4) of the marshalled raftpb.Snapshot.
	snapHeaderSize = 8
	snapMagic      = 0x4c53534e // "LSSN"

	// DefaultKeepSnapshots is how many snapshot files Save leaves behind.
	// More than one, so Load can fall back when the newest is damaged.
	DefaultKeepSnapshots = 5
)

// Snapshotter stores raft snapshots as files named
// "<term>-<index>.snap" (16 hex digits each). Raft snapshots here are small
// (their data is an application checkpoint id), so each is one checksummed
// file written atomically.
type Snapshotter struct {
	dir string
	// Logger receives warnings about damaged files; set before use.
	Logger logrus.FieldLogger
	// Keep is how many snapshots Save keeps (0: DefaultKeepSnapshots);
	// set before use.
	Keep int
	// NoSync skips fsync (tests only); set before use.
	NoSync bool

	mu sync.Mutex
}

// NewSnapshotter returns a Snapshotter for dir, creating dir if missing and
// removing temporary files left by a crash during Save.
func NewSnapshotter(dir string) (*Snapshotter, error) {
	if err := mkdirAll(dir, true); err != nil {
		return nil, fmt.Errorf("wal: create snapshot dir %s: %w", dir, err)
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("wal: read snapshot dir: %w", err)
	}
	for _, de := range des {
		if strings.HasSuffix(de.Name(), snapSuffix+tmpSuffix) {
			if err := os.Remove(filepath.Join(dir, de.Name())); err != nil {
				return nil, fmt.Errorf("wal: remove leftover %s: %w", de.Name(), err)
			}
		}
	}
	return &Snapshotter{dir: dir}, nil
}

func (s *Snapshotter) logger() logrus.FieldLogger {
	if s.Logger != nil {
		return s.Logger
	}
	return logrus.StandardLogger()
}

func snapName(term, index uint64) string {
	return fmt.Sprintf("%016x-%016x%s", term, index, snapSuffix)
}

func parseSnapName(name string) (term, index uint64, ok bool) {
	base, found := strings.CutSuffix(name, snapSuffix)
	if !found || len(base) != 33 || base[16] != '-' {
		return 0, 0, false
	}
	term, err1 := strconv.ParseUint(base[:16], 16, 64)
	index, err2 := strconv.ParseUint(base[17:], 16, 64)
	return term, index, err1 == nil && err2 == nil
}

// Save writes snap durably: to a temporary file that is fsynced, renamed
// into place, and the directory fsynced. Then it removes all but the newest
// Keep snapshots.
func (s *Snapshotter) Save(snap raftpb.Snapshot) error {
	if snap.Metadata.Index == 0 {
		return errors.New("wal: save snapshot: empty snapshot (index 0)")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	size := snap.Size()
	buf := make([]byte, snapHeaderSize+size)
	if _, err := snap.MarshalToSizedBuffer(buf[snapHeaderSize:]); err != nil {
		return fmt.Errorf("wal: marshal snapshot: %w", err)
	}
	binary.LittleEndian.PutUint32(buf[0:4], snapMagic)
	binary.LittleEndian.PutUint32(buf[4:8], crc32.Checksum(buf[snapHeaderSize:], crcTable))
	name := snapName(snap.Metadata.Term, snap.Metadata.Index)
	if _, _, err := writeFileSync(filepath.Join(s.dir, name), buf, !s.NoSync, false, nil,
		func(f *os.File) error { return f.Sync() }); err != nil {
		return fmt.Errorf("wal: save snapshot %s: %w", name, err)
	}
	s.prune()
	return nil
}

// prune removes snapshots beyond the newest Keep. Failure only leaves extra
// files behind, so it is logged, not returned.
func (s *Snapshotter) prune() {
	keep := s.Keep
	if keep <= 0 {
		keep = DefaultKeepSnapshots
	}
	names, err := s.list()
	if err != nil {
		s.logger().WithError(err).Warn("wal: listing snapshots to prune")
		return
	}
	removed := false
	for _, name := range names[min(keep, len(names)):] {
		if err := os.Remove(filepath.Join(s.dir, name)); err != nil {
			s.logger().WithError(err).WithField("file", name).Warn("wal: removing old snapshot")
			continue
		}
		removed = true
	}
	if removed && !s.NoSync {
		if err := syncDir(s.dir); err != nil {
			s.logger().WithError(err).Warn("wal: sync snapshot dir after prune")
		}
	}
}

// list returns snapshot file names, newest (highest index, then term) first.
func (s *Snapshotter) list() ([]string, error) {
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	type snapFile struct {
		name        string
		term, index uint64
	}
	var files []snapFile
	for _, de := range des {
		if term, index, ok := parseSnapName(de.Name()); ok {
			files = append(files, snapFile{de.Name(), term, index})
		}
	}
	sort.Slice(files, func(i, j int) bool {
		if files[i].index != files[j].index {
			return files[i].index > files[j].index
		}
		return files[i].term > files[j].term
	})
	names := make([]string, len(files))
	for i, f := range files {
		names[i] = f.name
	}
	return names, nil
}

// Load returns the newest snapshot that passes its checksum. Damaged files
// are skipped with a warning (and left for the operator); ErrNoSnapshot
// means none is usable.
func (s *Snapshotter) Load() (raftpb.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	names, err := s.list()
	if err != nil {
		return raftpb.Snapshot{}, fmt.Errorf("wal: list snapshots: %w", err)
	}
	for _, name := range names {
		snap, err := s.read(name)
		if err != nil {
			s.logger().WithError(err).WithField("file", name).Warn("wal: skipping damaged snapshot")
			continue
		}
		return snap, nil
	}
	return raftpb.Snapshot{}, ErrNoSnapshot
}

func (s *Snapshotter) read(name string) (raftpb.Snapshot, error) {
	var snap raftpb.Snapshot
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if err != nil {
		return snap, err
	}
	if len(b) < snapHeaderSize {
		return snap, fmt.Errorf("%s: %d bytes, shorter than header", name, len(b))
	}
	if m := binary.LittleEndian.Uint32(b[0:4]); m != snapMagic {
		return snap, fmt.Errorf("%s: bad magic %#x", name, m)
	}
	if crc32.Checksum(b[snapHeaderSize:], crcTable) != binary.LittleEndian.Uint32(b[4:8]) {
		return snap, fmt.Errorf("%s: checksum mismatch", name)
	}
	if err := snap.Unmarshal(b[snapHeaderSize:]); err != nil {
		return raftpb.Snapshot{}, fmt.Errorf("%s: decode: %w", name, err)
	}
	if term, index, _ := parseSnapName(name); term != snap.Metadata.Term || index != snap.Metadata.Index {
		return raftpb.Snapshot{}, fmt.Errorf("%s: holds snapshot term %d index %d", name, snap.Metadata.Term, snap.Metadata.Index)
	}
	return snap, nil
}
