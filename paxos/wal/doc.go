// Package wal is the durable on-disk log under the raft node: the node keeps
// its log in a raft.MemoryStorage and uses this package to make HardState,
// entries and snapshot markers survive crashes (the role etcd's wal and snap
// packages play for etcd).
//
// It is written here rather than imported from etcd's server/storage/wal
// because that package lives in the heavy etcd server module, and because we
// want our own small, fuzzable record decoder and an explicit repair policy.
//
// # Layout
//
// A WAL directory holds segment files named "<seq>-<firstIndex>.wal" (both
// 16 hex digits): seq numbers are consecutive and firstIndex is the index the
// log was about to reach when the segment was started, so ReleaseTo can tell
// from names alone which segments only hold old entries. Every record is
//
//	length  uint32 LE  payload length (at most 64 MiB)
//	crc     uint32 LE  CRC32C (Castagnoli) of type and payload
//	type    uint8      1 segment header, 2 entry, 3 hard state, 4 snapshot marker
//	payload [length]byte
//
// A segment starts with a header record (magic, version, seq, firstIndex),
// followed by a copy of the newest hard state, so that releasing older
// segments can never lose the vote. New segments are written as a temporary
// file, synced, renamed into place, and the directory is synced before the
// first append. With Options.Preallocate (the raft node's choice) a new
// segment is given its whole size up front with fallocate, so that appends
// leave the file's size alone and each fsync has only data to write; the
// part not yet written reads as zeros, and a segment is trimmed to its
// records when the next one starts.
//
// # Recovery
//
// Each Save is one write and one fsync, so a crash can only damage the tail
// of the last segment. Zeros after the last record are space never written
// (preallocated, or a write of which nothing reached the disk): the end of
// the log, without a word. Other damage there (short header, short payload,
// checksum mismatch, garbage followed by zeros or nothing) is truncated at
// the last good record, with a warning. Damage that is followed by any valid record, or damage in a
// segment other than the last, cannot be a torn write: Open refuses with an
// error wrapping ErrCorrupt that names the file and offset, and the replica
// should be rebuilt from its peers rather than silently forget acknowledged
// entries. (A torn write whose pages reached the disk out of order can also
// end up here; refusing is the safe side of that ambiguity. So can a damaged
// tail so large and so record-like that the bounded search for valid records
// after it gives up.)
//
// # Order of writes
//
// When a raft Ready carries a snapshot, save it with Snapshotter.Save and
// WAL.SaveSnapshot before calling WAL.Save with the Ready's entries: Save
// rejects entries that would leave a gap in the log.
package wal
