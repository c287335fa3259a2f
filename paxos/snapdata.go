package paxos

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/sirupsen/logrus"
)

// A raft snapshot's data is the membership's addresses (raft's ConfState
// has only ids) followed by the application's bytes.
const snapshotDataVersion = 1

func encodeSnapshotData(members map[uint64]string, app []byte) []byte {
	ids := make([]uint64, 0, len(members))
	for id := range members {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	b := []byte{snapshotDataVersion}
	b = binary.AppendUvarint(b, uint64(len(ids)))
	for _, id := range ids {
		b = binary.AppendUvarint(b, id)
		b = binary.AppendUvarint(b, uint64(len(members[id])))
		b = append(b, members[id]...)
	}
	return append(b, app...)
}

var errSnapshotData = errors.New("malformed snapshot data")

func decodeSnapshotData(b []byte) (map[uint64]string, []byte, error) {
	if len(b) == 0 || b[0] != snapshotDataVersion {
		return nil, nil, fmt.Errorf("%w: unknown version", errSnapshotData)
	}
	b = b[1:]
	count, k := binary.Uvarint(b)
	if k <= 0 || count > uint64(len(b)) {
		return nil, nil, fmt.Errorf("%w: member count", errSnapshotData)
	}
	b = b[k:]
	members := make(map[uint64]string, count)
	for i := uint64(0); i < count; i++ {
		id, k := binary.Uvarint(b)
		if k <= 0 {
			return nil, nil, fmt.Errorf("%w: member id", errSnapshotData)
		}
		b = b[k:]
		l, k := binary.Uvarint(b)
		if k <= 0 || l > uint64(len(b)-k) {
			return nil, nil, fmt.Errorf("%w: member address", errSnapshotData)
		}
		members[id] = string(b[k : k+int(l)])
		b = b[k+int(l):]
	}
	return members, b, nil
}

// raftLogger adapts logrus to raft.Logger.
type raftLogger struct{ logrus.FieldLogger }

func (l raftLogger) Warning(v ...any)                 { l.FieldLogger.Warn(v...) }
func (l raftLogger) Warningf(format string, v ...any) { l.FieldLogger.Warnf(format, v...) }
