package wal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"
)

// ErrCorrupt is wrapped by errors reporting damage that Open does not
// repair: it names the segment file and byte offset.
var ErrCorrupt = errors.New("wal: corrupt")

// ErrClosed is returned by operations on a closed WAL.
var ErrClosed = errors.New("wal: closed")

// DefaultSegmentSize is the segment size used when Options.SegmentSize is 0.
const DefaultSegmentSize = 64 << 20

const (
	segmentSuffix = ".wal"
	lockFileName  = "wal.lock"

	// maxKeptBuffer bounds the batch buffer kept between Saves, so that one
	// huge batch does not pin its memory for the life of the WAL.
	maxKeptBuffer = 8 << 20

	// scanBudget bounds the checksum work spent looking for valid records
	// after damage at the tail (see validRecordAfter).
	scanBudget = 1 << 30
)

// State is what a WAL held when opened.
type State struct {
	// Snapshot is the newest snapshot marker recorded in the WAL (zero
	// value if none).
	Snapshot raftpb.SnapshotMetadata
	// HardState is the newest hard state.
	HardState raftpb.HardState
	// Entries are the entries with Index > Snapshot.Index, in order, with
	// conflicts resolved: a later record for an index replaces that index
	// and drops everything after it, as raft overwrites conflicting suffixes.
	Entries []raftpb.Entry
}

// Options configure a WAL.
type Options struct {
	// SegmentSize: rotate to a new segment file after this many bytes
	// (default 64 MiB).
	SegmentSize int64
	// NoSync skips fsync (tests and benchmarks only).
	NoSync bool
	// Logger receives repair warnings; nil means logrus.StandardLogger().
	Logger logrus.FieldLogger
	// OnSync, if set, observes the latency of each fsync of a segment file
	// (for metrics). Directory syncs are not reported.
	OnSync func(time.Duration)
	// Preallocate gives every new segment its full SegmentSize at once
	// (fallocate), so that an append does not change the file's size, and
	// writes zeros a little ahead of the appends (zeroAhead), so that an
	// append lands on blocks already written and its fdatasync has no
	// metadata to write at all. The unused rest of a segment reads as
	// zeros, which recovery takes for the end of the log. File systems
	// without fallocate get plain appends.
	Preallocate bool
}

// WAL is an open write-ahead log. Its methods are safe for concurrent use,
// though raft's node loop normally drives it from one goroutine.
type WAL struct {
	dir  string
	opts Options
	log  logrus.FieldLogger

	mu     sync.Mutex
	lock   *os.File // holds the directory's flock
	f      *os.File // current (last) segment, positioned at its end
	off    int64    // size of the current segment
	segs   []segment
	buf    []byte // reusable batch buffer: one write per Save
	closed bool
	// err is sticky: after a failed write or fsync the file's contents are
	// unknown (and a retried fsync may falsely succeed), so nothing more is
	// appended.
	err error

	lastIndex uint64 // last index of the log (entries or snapshot marker)
	snapIndex uint64 // index of the newest snapshot marker
	hs        []byte // encoding of the newest hard state, copied into new segments
	hsScratch raftpb.HardState
	// unsynced: the current segment has records written by SaveUnsynced
	// and not yet covered by an fsync.
	unsynced bool
	// allocated is the size the current segment was preallocated to (0:
	// not preallocated); zeroed is how far its blocks have been written,
	// with records or with zeros (see zeroAhead).
	allocated, zeroed int64
}

// zeroChunk is how much zeroAhead writes at a time: the fdatasync that
// first covers a chunk also writes it and records its blocks as written
// (a journal commit on ext4), one slower sync per this much log.
const zeroChunk = 1 << 20

// zeros is the source of zeroAhead's writes.
var zeros [zeroChunk]byte

// segment is what the WAL remembers about one segment file.
type segment struct {
	seq        uint64
	firstIndex uint64   // log's last index + 1 when the segment was started
	markers    []uint64 // snapshot marker indexes recorded in it, in order
}

func (s segment) name() string { return segmentName(s.seq, s.firstIndex) }

func segmentName(seq, firstIndex uint64) string {
	return fmt.Sprintf("%016x-%016x%s", seq, firstIndex, segmentSuffix)
}

func parseSegmentName(name string) (seq, firstIndex uint64, ok bool) {
	base, found := strings.CutSuffix(name, segmentSuffix)
	if !found || len(base) != 33 || base[16] != '-' {
		return 0, 0, false
	}
	seq, err1 := strconv.ParseUint(base[:16], 16, 64)
	firstIndex, err2 := strconv.ParseUint(base[17:], 16, 64)
	return seq, firstIndex, err1 == nil && err2 == nil
}

func corruptf(file string, off int, format string, args ...any) error {
	return fmt.Errorf("%w: %s at offset %d: %s", ErrCorrupt, file, off, fmt.Sprintf(format, args...))
}

// Open opens the WAL in dir, creating dir and a first segment if needed,
// and recovers its State. A torn tail of the last segment is truncated;
// any other damage fails with an error wrapping ErrCorrupt.
func Open(dir string, opts Options) (*WAL, State, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	if opts.Logger == nil {
		opts.Logger = logrus.StandardLogger()
	}
	w := &WAL{dir: dir, opts: opts, log: opts.Logger.WithField("wal", dir)}
	if err := mkdirAll(dir, !opts.NoSync); err != nil {
		return nil, State{}, fmt.Errorf("wal: create %s: %w", dir, err)
	}
	if err := w.lockDir(); err != nil {
		return nil, State{}, err
	}
	st, err := w.recover()
	if err != nil {
		w.closeFiles()
		return nil, State{}, err
	}
	return w, st, nil
}

// lockDir takes an exclusive flock so that two processes (or two opens in
// one process) never append to the same log.
func (w *WAL) lockDir() error {
	path := filepath.Join(w.dir, lockFileName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("wal: open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		return fmt.Errorf("wal: lock %s (already open?): %w", path, err)
	}
	w.lock = f
	return nil
}

func (w *WAL) closeFiles() {
	if w.f != nil {
		_ = w.f.Close()
		w.f = nil
	}
	if w.lock != nil {
		_ = w.lock.Close() // releases the flock
		w.lock = nil
	}
}

// listSegments returns the segments in dir ordered by seq and removes
// leftover temporary files of segments that were never renamed into place.
func (w *WAL) listSegments() ([]segment, error) {
	des, err := os.ReadDir(w.dir)
	if err != nil {
		return nil, fmt.Errorf("wal: read dir: %w", err)
	}
	var segs []segment
	for _, de := range des {
		name := de.Name()
		switch {
		case strings.HasSuffix(name, segmentSuffix+tmpSuffix):
			// A crash during segment creation; it was never part of the log.
			if err := os.Remove(filepath.Join(w.dir, name)); err != nil {
				return nil, fmt.Errorf("wal: remove leftover %s: %w", name, err)
			}
			w.log.WithField("file", name).Info("wal: removed leftover temporary segment")
		case strings.HasSuffix(name, segmentSuffix):
			seq, first, ok := parseSegmentName(name)
			if !ok {
				return nil, fmt.Errorf("wal: unexpected segment file name %q", name)
			}
			segs = append(segs, segment{seq: seq, firstIndex: first})
		}
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].seq < segs[j].seq })
	for i := 1; i < len(segs); i++ {
		if segs[i].seq != segs[i-1].seq+1 {
			return nil, fmt.Errorf("%w: %s: segment(s) missing between %s and %s",
				ErrCorrupt, w.dir, segs[i-1].name(), segs[i].name())
		}
	}
	return segs, nil
}

// replay is the state built while reading records in order. Save maintains
// the same lastIndex/snapIndex rules, so that what recovery rebuilds is
// what Save validated against.
type replay struct {
	ents      []raftpb.Entry // entries > snapIndex, contiguous, ending at lastIndex
	lastIndex uint64
	snapIndex uint64
	snap      raftpb.SnapshotMetadata
	hs        raftpb.HardState
	hsRaw     []byte
}

func (w *WAL) recover() (State, error) {
	segs, err := w.listSegments()
	if err != nil {
		return State{}, err
	}
	if len(segs) == 0 {
		if err := w.createFirstSegment(); err != nil {
			return State{}, err
		}
		return State{}, nil
	}
	if segs[0].firstIndex == 0 {
		return State{}, corruptf(filepath.Join(w.dir, segs[0].name()), 0, "first index 0")
	}
	// After ReleaseTo the log before the first segment is gone; its name
	// still tells where the log stood, which is all that later checks need.
	rp := &replay{lastIndex: segs[0].firstIndex - 1}
	var end int64
	for i := range segs {
		if end, err = w.replaySegment(rp, &segs[i], i == len(segs)-1); err != nil {
			return State{}, err
		}
	}
	// Everything after the newest snapshot must be present.
	if rp.lastIndex > rp.snapIndex {
		if len(rp.ents) == 0 || rp.ents[0].Index != rp.snapIndex+1 ||
			rp.ents[len(rp.ents)-1].Index != rp.lastIndex {
			first := uint64(0)
			if len(rp.ents) > 0 {
				first = rp.ents[0].Index
			}
			return State{}, fmt.Errorf("%w: %s: log after snapshot %d should cover %d..%d but starts at %d",
				ErrCorrupt, w.dir, rp.snapIndex, rp.snapIndex+1, rp.lastIndex, first)
		}
	}

	last := segs[len(segs)-1]
	f, err := os.OpenFile(filepath.Join(w.dir, last.name()), os.O_WRONLY, 0)
	if err != nil {
		return State{}, fmt.Errorf("wal: open %s: %w", last.name(), err)
	}
	if _, err := f.Seek(end, 0); err != nil {
		_ = f.Close()
		return State{}, fmt.Errorf("wal: seek %s: %w", last.name(), err)
	}
	// A segment written before preallocation was asked for gets it now.
	w.setCurrent(f, end, w.preallocate(f))
	w.segs = segs
	w.lastIndex, w.snapIndex, w.hs = rp.lastIndex, rp.snapIndex, rp.hsRaw

	st := State{Snapshot: rp.snap, HardState: rp.hs}
	if len(rp.ents) > 0 {
		// Drop the slack of the replay buffer.
		st.Entries = slices.Clone(rp.ents)
	}
	return st, nil
}

// replaySegment applies the records of one segment and returns the offset
// its good records end at. In the last segment, damage that nothing valid
// follows is a torn write and is truncated away.
func (w *WAL) replaySegment(rp *replay, seg *segment, last bool) (int64, error) {
	name := seg.name()
	path := filepath.Join(w.dir, name)
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("wal: read %s: %w", name, err)
	}
	// The header is synced before the segment is renamed into place, so it
	// can never be torn: any damage to it is corruption.
	rec, n, err := decodeRecord(data)
	if err != nil {
		return 0, corruptf(path, 0, "segment header: %v", err)
	}
	if rec.typ != recSegmentHeader {
		return 0, corruptf(path, 0, "first record is %s, not a segment header", rec.typ)
	}
	h, err := decodeSegmentHeader(rec.payload)
	if err != nil {
		return 0, corruptf(path, 0, "%v", err)
	}
	if h.seq != seg.seq || h.firstIndex != seg.firstIndex {
		return 0, corruptf(path, 0, "header says seq %d first index %d", h.seq, h.firstIndex)
	}
	if rp.lastIndex != h.firstIndex-1 {
		// Records are missing at the end of the previous segment.
		return 0, corruptf(path, 0, "segment starts at index %d but the log before it ends at %d",
			h.firstIndex, rp.lastIndex)
	}

	off := n
	for off < len(data) {
		rec, n, err := decodeRecord(data[off:])
		if err != nil && allZero(data[off:]) {
			// Preallocated space never written, or a write of which
			// nothing reached the disk: the end of the log. (In a segment
			// other than the last, entries lost this way show as a gap at
			// the next segment's start.)
			return int64(off), nil
		}
		if err != nil {
			if !last || errors.Is(err, errUnknownType) {
				return 0, corruptf(path, off, "%v", err)
			}
			found, exhausted := validRecordAfter(data, off)
			if found {
				return 0, corruptf(path, off, "%v, followed by valid records", err)
			}
			if exhausted {
				return 0, corruptf(path, off, "%v; could not rule out valid records after it", err)
			}
			if err := w.truncateTail(path, name, off, len(data), err); err != nil {
				return 0, err
			}
			return int64(off), nil
		}
		if err := rp.apply(rec, seg); err != nil {
			return 0, corruptf(path, off, "%v", err)
		}
		off += n
	}
	return int64(off), nil
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func (w *WAL) truncateTail(path, name string, off, size int, cause error) error {
	w.log.WithFields(logrus.Fields{
		"file": name, "offset": off, "dropped_bytes": size - off, "cause": cause.Error(),
	}).Warnf("wal: truncating torn tail of %s at offset %d", path, off)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("wal: repair %s: %w", name, err)
	}
	defer f.Close()
	if err := f.Truncate(int64(off)); err != nil {
		return fmt.Errorf("wal: truncate %s at %d: %w", name, off, err)
	}
	w.preallocate(f)
	if !w.opts.NoSync {
		if err := w.syncFile(f); err != nil {
			return fmt.Errorf("wal: sync %s after truncate: %w", name, err)
		}
	}
	return nil
}

// validRecordAfter reports whether any valid record starts after the
// damaged record at off, which would make the damage corruption rather than
// a torn write. It first tries where the damaged record says it ends (a
// flipped payload bit), then every later byte (a flipped length bit).
// exhausted means the checksum budget ran out before the scan finished.
func validRecordAfter(data []byte, off int) (found, exhausted bool) {
	if b := data[off:]; plausibleStart(b) {
		if next := recordHeaderSize + int(binary.LittleEndian.Uint32(b)); next < len(b) {
			if _, _, err := decodeRecord(b[next:]); err == nil {
				return true, false
			}
		}
	}
	budget := scanBudget
	for p := off + 1; p+recordHeaderSize <= len(data); p++ {
		b := data[p:]
		if !plausibleStart(b) {
			continue
		}
		// Charge what the checksum will cover: the claimed record length.
		if budget -= recordHeaderSize + int(binary.LittleEndian.Uint32(b)); budget < 0 {
			return false, true
		}
		if _, _, err := decodeRecord(b); err == nil {
			return true, false
		}
	}
	return false, false
}

// apply adds one record to the replay, enforcing the rules Save enforces.
func (rp *replay) apply(rec record, seg *segment) error {
	m, err := decodePayload(rec)
	if err != nil {
		return err
	}
	switch m := m.(type) {
	case *segmentHeader:
		return errors.New("segment header in the middle of a segment")
	case *raftpb.Entry:
		i := m.Index
		switch {
		case i <= rp.snapIndex:
			return fmt.Errorf("entry %d at or below snapshot %d", i, rp.snapIndex)
		case i > rp.lastIndex+1:
			return fmt.Errorf("entry %d leaves a gap after index %d", i, rp.lastIndex)
		}
		if len(rp.ents) > 0 && i >= rp.ents[0].Index {
			// Overwrite: raft replaces a conflicting suffix.
			rp.ents = rp.ents[:i-rp.ents[0].Index]
		} else {
			// Overwrites everything we know, or the first entry after the
			// released prefix of the log.
			rp.ents = rp.ents[:0]
		}
		rp.ents = append(rp.ents, *m)
		rp.lastIndex = i
	case *raftpb.HardState:
		rp.hs = *m
		rp.hsRaw = append(rp.hsRaw[:0], rec.payload...)
	case *raftpb.SnapshotMetadata:
		s := m.Index
		if s < rp.snapIndex {
			return fmt.Errorf("snapshot marker %d older than marker %d", s, rp.snapIndex)
		}
		rp.snap, rp.snapIndex = *m, s
		k := sort.Search(len(rp.ents), func(j int) bool { return rp.ents[j].Index > s })
		rp.ents = rp.ents[k:]
		if s > rp.lastIndex {
			rp.lastIndex = s
		}
		seg.markers = append(seg.markers, s)
	}
	return nil
}

func (w *WAL) createFirstSegment() error {
	f, off, alloc, err := w.createSegment(segment{seq: 1, firstIndex: 1})
	if err != nil {
		if f != nil {
			_ = f.Close()
		}
		return err
	}
	w.setCurrent(f, off, alloc)
	w.segs = []segment{{seq: 1, firstIndex: 1}}
	return nil
}

// createSegment writes a new segment holding its header and the newest hard
// state; alloc is the size it was preallocated to. On error, a non-nil file
// means the segment was renamed into place (only the directory sync failed)
// and must be treated as part of the log.
func (w *WAL) createSegment(s segment) (f *os.File, off, alloc int64, err error) {
	buf := segmentHeader{seq: s.seq, firstIndex: s.firstIndex}.appendTo(nil)
	if len(w.hs) > 0 {
		buf = appendRecord(buf, recHardState, w.hs)
	}
	prepare := func(f *os.File) { alloc = w.preallocate(f) }
	f, renamed, err := writeFileSync(filepath.Join(w.dir, s.name()), buf, !w.opts.NoSync, true, prepare, w.syncFileFull)
	if err != nil {
		err = fmt.Errorf("wal: create segment %s: %w", s.name(), err)
		if renamed {
			return f, int64(len(buf)), alloc, err
		}
		return nil, 0, 0, err
	}
	return f, int64(len(buf)), alloc, nil
}

// setCurrent makes f, of size off and preallocated to alloc, the segment
// appended to.
func (w *WAL) setCurrent(f *os.File, off, alloc int64) {
	w.f, w.off = f, off
	w.allocated, w.zeroed = alloc, off
}

// preallocate extends f to SegmentSize with fallocate when
// Options.Preallocate asks for it, and returns the size it got (0 if
// none). It is an optimisation: a file system without fallocate, or too
// full for a whole segment, gets appends, and a disk that is really full
// fails the next write instead.
func (w *WAL) preallocate(f *os.File) int64 {
	if !w.opts.Preallocate {
		return 0
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, w.opts.SegmentSize); err != nil {
		w.log.WithError(err).WithField("file", filepath.Base(f.Name())).Debug("wal: segment not preallocated")
		return 0
	}
	return w.opts.SegmentSize
}

// zeroAhead writes zeros after the end of the log, a chunk at a time,
// before the appends get there. Fallocate leaves blocks "unwritten": the
// fdatasync of an append into them must also record them as written, a
// journal commit on ext4 (on this project's machines 180-240 instead of
// 125-180 µs per sync, with three WALs syncing at once). Zeros written
// ahead (not synced: the next append's sync takes them along) move that
// commit to one sync per zeroChunk. A failed write is left to that sync
// to report.
func (w *WAL) zeroAhead() {
	if w.off <= w.zeroed-zeroChunk/2 || w.zeroed >= w.allocated {
		w.zeroed = max(w.zeroed, w.off)
		return
	}
	from := max(w.zeroed, w.off)
	n := min(zeroChunk, w.allocated-from)
	if n <= 0 {
		w.zeroed = from
		return
	}
	if _, err := w.f.WriteAt(zeros[:n], from); err != nil {
		w.log.WithError(err).WithField("file", w.segs[len(w.segs)-1].name()).Debug("wal: zeroing ahead failed")
	}
	w.zeroed = from + n
}

func (w *WAL) syncFile(f *os.File) error {
	return w.timeSync(func() error { return fdatasync(f) })
}

// syncFileFull is used for new files, whose metadata must be durable too.
func (w *WAL) syncFileFull(f *os.File) error {
	return w.timeSync(f.Sync)
}

func (w *WAL) timeSync(sync func() error) error {
	if w.opts.OnSync == nil {
		return sync()
	}
	start := time.Now()
	err := sync()
	w.opts.OnSync(time.Since(start))
	return err
}

func (w *WAL) usable() error {
	if w.closed {
		return ErrClosed
	}
	return w.err
}

// Save appends records for ents and, unless it is empty or unchanged since
// the last one saved, hs, then makes all of them durable with a single write
// and a single fsync (group commit: the caller batches). It is a no-op when
// there is nothing to write. Entries must be contiguous, above the newest
// snapshot marker, and start at most one past the log's last index; a first
// index at or below the last index overwrites the log from there on.
func (w *WAL) Save(hs raftpb.HardState, ents []raftpb.Entry) error {
	return w.save(hs, ents, true)
}

// SaveUnsynced is Save without the fsync, for a raft Ready that needs none
// (MustSync false: only the commit index moved). The records become
// durable with the next Save; until then a crash may lose them, which
// raft tolerates. A segment is never rotated with an unsynced tail.
func (w *WAL) SaveUnsynced(hs raftpb.HardState, ents []raftpb.Entry) error {
	return w.save(hs, ents, false)
}

func (w *WAL) save(hs raftpb.HardState, ents []raftpb.Entry, sync bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	if len(ents) > 0 {
		first := ents[0].Index
		if first == 0 || first <= w.snapIndex || first > w.lastIndex+1 {
			return fmt.Errorf("wal: save: first entry index %d not in [%d, %d] (snapshot %d, last index %d)",
				first, w.snapIndex+1, w.lastIndex+1, w.snapIndex, w.lastIndex)
		}
		for k := range ents {
			if ents[k].Index != first+uint64(k) {
				return fmt.Errorf("wal: save: entry %d has index %d, want %d (entries must be contiguous)",
					k, ents[k].Index, first+uint64(k))
			}
		}
	}

	buf := w.buf[:0]
	var err error
	for k := range ents {
		if buf, err = appendMessage(buf, recEntry, &ents[k]); err != nil {
			w.keepBuf(buf)
			return fmt.Errorf("wal: save: entry %d: %w", ents[k].Index, err)
		}
	}
	hsStart := -1
	if !raft.IsEmptyHardState(hs) {
		start := len(buf)
		// Marshal from a field: &hs would move every Save's hs to the heap.
		w.hsScratch = hs
		if buf, err = appendMessage(buf, recHardState, &w.hsScratch); err != nil {
			w.keepBuf(buf)
			return fmt.Errorf("wal: save: %w", err)
		}
		if bytes.Equal(buf[start+recordHeaderSize:], w.hs) {
			buf = buf[:start] // unchanged: not worth a record (or an fsync)
		} else {
			hsStart = start
		}
	}
	if len(buf) == 0 {
		return nil
	}
	if err := w.writeSync(buf, sync); err != nil {
		w.keepBuf(buf)
		return err
	}
	if len(ents) > 0 {
		w.lastIndex = ents[len(ents)-1].Index
	}
	if hsStart >= 0 {
		w.hs = append(w.hs[:0], buf[hsStart+recordHeaderSize:]...)
	}
	w.keepBuf(buf)
	return w.maybeRotate()
}

func (w *WAL) keepBuf(buf []byte) {
	if cap(buf) > maxKeptBuffer {
		w.buf = nil
		return
	}
	w.buf = buf[:0]
}

// writeSync appends buf to the current segment with one write and one
// fsync. Any failure poisons the WAL (see WAL.err).
func (w *WAL) writeSync(buf []byte, sync bool) error {
	n, err := w.f.Write(buf)
	w.off += int64(n)
	if err != nil {
		w.err = fmt.Errorf("wal: write %s at offset %d: %w", w.segs[len(w.segs)-1].name(), w.off, err)
		return w.err
	}
	w.zeroAhead()
	if !sync {
		w.unsynced = true
		return nil
	}
	w.unsynced = false
	if w.opts.NoSync {
		return nil
	}
	if err := w.syncFile(w.f); err != nil {
		w.err = fmt.Errorf("wal: fsync %s: %w", w.segs[len(w.segs)-1].name(), err)
		return w.err
	}
	return nil
}

// SaveSnapshot appends a snapshot marker record and fsyncs it. Entries up
// to meta's index are then no longer part of State; if the marker is ahead
// of the log (a snapshot received from the leader), the log continues at
// its index + 1. A marker with index 0 (no snapshot) is a no-op; one older
// than the newest marker is an error.
func (w *WAL) SaveSnapshot(meta raftpb.SnapshotMetadata) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	s := meta.Index
	if s == 0 {
		return nil
	}
	if s < w.snapIndex {
		return fmt.Errorf("wal: snapshot marker %d older than recorded marker %d", s, w.snapIndex)
	}
	buf, err := appendMessage(w.buf[:0], recSnapshot, &meta)
	if err != nil {
		w.keepBuf(buf)
		return fmt.Errorf("wal: save snapshot: %w", err)
	}
	if err := w.writeSync(buf, true); err != nil {
		w.keepBuf(buf)
		return err
	}
	w.keepBuf(buf)
	w.snapIndex = s
	if s > w.lastIndex {
		w.lastIndex = s
	}
	cur := &w.segs[len(w.segs)-1]
	cur.markers = append(cur.markers, s)
	return w.maybeRotate()
}

// maybeRotate starts a new segment once the current one reached
// SegmentSize. It runs after a successful fsync, so the old segment is
// complete and durable before the new one exists: only the last segment can
// ever have a torn tail.
func (w *WAL) maybeRotate() error {
	if w.off < w.opts.SegmentSize || w.unsynced {
		return nil
	}
	cur := w.segs[len(w.segs)-1]
	next := segment{seq: cur.seq + 1, firstIndex: w.lastIndex + 1}
	f, off, alloc, err := w.createSegment(next)
	if err != nil && f == nil {
		// Nothing changed on disk; keep appending to the current segment
		// and try again after the next write.
		w.log.WithError(err).Warn("wal: segment rotation failed, will retry")
		return nil
	}
	// From here the new segment is part of the log: appending to the old
	// one would put newer records before the new segment's hard state copy.
	if w.opts.Preallocate {
		// Give back what the old segment did not use. Unsynced: if a crash
		// loses it, recovery reads the zeros as the segment's end.
		if terr := w.f.Truncate(w.off); terr != nil {
			w.log.WithError(terr).WithField("file", cur.name()).Warn("wal: trimming a full segment failed")
		}
	}
	if cerr := w.f.Close(); cerr != nil {
		w.log.WithError(cerr).WithField("file", cur.name()).Warn("wal: close of synced segment failed")
	}
	w.setCurrent(f, off, alloc)
	w.segs = append(w.segs, next)
	if err != nil {
		w.err = err // the directory entry may not be durable
		return err
	}
	return nil
}

// ReleaseTo deletes whole segment files that are no longer needed after a
// snapshot at index: those that come before the segment holding the newest
// snapshot marker with Index <= index and whose live entries all have
// index <= that marker's index. Entries above the marker, the marker itself
// and the newest hard state (copied into every new segment) are never
// deleted, so a reopened WAL yields the same State.
func (w *WAL) ReleaseTo(index uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	var marker uint64
	holder := -1
	for j, s := range w.segs {
		for _, m := range s.markers {
			if m <= index && m >= marker {
				marker, holder = m, j
			}
		}
	}
	// Segment j's live entries end below segs[j+1].firstIndex: entries it
	// holds above that were overwritten before segment j+1 was started.
	n := 0
	for j := 0; j < holder && w.segs[j+1].firstIndex-1 <= marker; j++ {
		n = j + 1
	}
	if n == 0 {
		return nil
	}
	// Oldest first, so that a crash in the middle leaves a suffix of the
	// log, which recovery accepts.
	removed := 0
	var err error
	for _, s := range w.segs[:n] {
		if err = os.Remove(filepath.Join(w.dir, s.name())); err != nil {
			err = fmt.Errorf("wal: release %s: %w", s.name(), err)
			break
		}
		removed++
	}
	w.segs = append(w.segs[:0], w.segs[removed:]...)
	if removed > 0 && !w.opts.NoSync {
		if serr := syncDir(w.dir); serr != nil && err == nil {
			err = fmt.Errorf("wal: release: %w", serr)
		}
	}
	return err
}

// Close closes the WAL, syncing what SaveUnsynced left; everything Save
// saved is already durable.
func (w *WAL) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	var err error
	if w.f != nil && w.unsynced && w.err == nil && !w.opts.NoSync {
		if serr := w.syncFile(w.f); serr != nil {
			err = fmt.Errorf("wal: close: fsync: %w", serr)
		}
	}
	if w.f != nil {
		if cerr := w.f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("wal: close: %w", cerr)
		}
		w.f = nil
	}
	w.closeFiles()
	return err
}
