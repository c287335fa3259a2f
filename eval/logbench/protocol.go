// Package logbench measures lockstep's replicated log against etcd and
// tests it under crashes. It serves the log to network clients through a
// small pipelined protocol so that, like etcd's clients, the benchmark's
// clients pay a network round trip per operation.
package logbench

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Request and response frames: u32 length, then the body.
//
//	request:  op u8 | id u64 | payload
//	response: status u8 | id u64 | payload (index u64 on success, else an error text)
const (
	opPropose = 1
	opDump    = 2 // payload of the response: the applied sequence
	opStatus  = 3 // payload of the response: JSON paxos.Status

	statusOK  = 0
	statusErr = 1

	maxFrame = 64 << 20
)

var errFrame = errors.New("logbench: malformed frame")

type frame struct {
	kind    byte // op in requests, status in responses
	id      uint64
	payload []byte
}

func writeFrame(w *bufio.Writer, f frame) error {
	var hdr [13]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(9+len(f.payload)))
	hdr[4] = f.kind
	binary.BigEndian.PutUint64(hdr[5:], f.id)
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(f.payload)
	return err
}

func readFrame(r *bufio.Reader) (frame, error) {
	var hdr [13]byte
	if _, err := io.ReadFull(r, hdr[:4]); err != nil {
		return frame{}, err
	}
	n := binary.BigEndian.Uint32(hdr[:4])
	if n < 9 || n > maxFrame {
		return frame{}, fmt.Errorf("%w: length %d", errFrame, n)
	}
	if _, err := io.ReadFull(r, hdr[4:]); err != nil {
		return frame{}, err
	}
	p := make([]byte, n-9)
	if _, err := io.ReadFull(r, p); err != nil {
		return frame{}, err
	}
	return frame{kind: hdr[4], id: binary.BigEndian.Uint64(hdr[5:]), payload: p}, nil
}

// Record is one applied entry as a node reports it.
type Record struct {
	Index uint64
	Data  []byte
}

func encodeRecords(recs []Record) []byte {
	var b []byte
	for _, r := range recs {
		b = binary.AppendUvarint(b, r.Index)
		b = binary.AppendUvarint(b, uint64(len(r.Data)))
		b = append(b, r.Data...)
	}
	return b
}

func decodeRecords(b []byte) ([]Record, error) {
	var recs []Record
	for len(b) > 0 {
		idx, k := binary.Uvarint(b)
		if k <= 0 {
			return nil, errFrame
		}
		b = b[k:]
		l, k := binary.Uvarint(b)
		if k <= 0 || l > uint64(len(b)-k) {
			return nil, errFrame
		}
		recs = append(recs, Record{Index: idx, Data: b[k : k+int(l)]})
		b = b[k+int(l):]
	}
	return recs, nil
}
