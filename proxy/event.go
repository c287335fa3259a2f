package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// EventVersion is the first byte of every encoded event. A replica refuses
// (and skips, like every other replica) an entry of a version it does not
// know, so the version must change whenever the meaning of an existing
// encoding changes; new event types can be added within a version.
const EventVersion = 1

// Type is the kind of a socket event.
type Type uint8

// The events agreed through the log. Conn ids are chosen by the leader
// that accepted the client (see connID).
const (
	// Connect: a client connected. Term is the leader's term: a Connect
	// counts only inside the epoch of that leader and term.
	Connect Type = 1
	// Data: the client sent bytes; Off is the stream offset of Data[0].
	// An event whose offset is not the next expected one (a proposal was
	// lost) aborts the connection on every replica alike.
	Data Type = 2
	// Shutdown: the client half-closed (FIN) after Off bytes.
	Shutdown Type = 3
	// Close: the client's connection is gone; Abort when it was reset (or
	// the leader gave up on it) rather than closed.
	Close Type = 4
	// ServerClose: the leader's server ended its output on the connection
	// (Abort: with a reset); every replica drops the connection there.
	ServerClose Type = 5
	// Epoch: a new leader (Leader, Term) starts serving at Addr (its
	// client listener). Every connection still open is aborted: a leader
	// only carries the connections it originated.
	Epoch Type = 6
	// Digest: Replica reports digests of its server's output (Reports).
	Digest Type = 7
	// Bubble: a time bubble of the deterministic scheduler (joint_sched,
	// bubble.go): every replica's logical clock advances by Ticks; Time is
	// the leader's wall clock, the servers' time from then on.
	Bubble Type = 8
	// Checkpoint: Replica took checkpoint CkptID (content digest
	// CkptDigest) of its server at log index CkptIndex and serves it at
	// Addr (a URL of its checkpoint store). Every replica may then fetch
	// it and compact its log below CkptIndex.
	Checkpoint Type = 9
)

var typeNames = [...]string{"invalid", "connect", "data", "shutdown", "close", "server_close", "epoch", "digest", "bubble", "checkpoint"}

func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type%d", uint8(t))
}

// DigestReport is one checkpoint of a connection's output digest at a
// replica: after Seq checkpoints the masked output is Len bytes long and
// hashes to Sum. Final marks the checkpoint taken when the server ended
// its output (EOF).
type DigestReport struct {
	Conn  uint64
	Seq   uint64
	Len   uint64
	Final bool
	Sum   [16]byte
}

// Event is one socket-level event, the unit of the log. Fields not used by
// a type are zero.
type Event struct {
	Type    Type
	Conn    uint64
	Off     uint64 // Data, Shutdown
	Term    uint64 // Connect, Epoch
	Leader  uint64 // Epoch
	Addr    string // Epoch
	Abort   bool   // Close, ServerClose
	Data    []byte // Data (aliases the decoded buffer)
	Replica uint64 // Digest
	Reports []DigestReport
	Ticks   uint64 // Bubble
	Time    uint64 // Bubble: the leader's wall clock (ns) when it proposed it
	// Checkpoint (with Replica and Addr).
	CkptIndex  uint64
	CkptID     string
	CkptDigest string
}

func (e Event) String() string {
	switch e.Type {
	case Connect:
		return fmt.Sprintf("connect(%x term %d)", e.Conn, e.Term)
	case Data:
		return fmt.Sprintf("data(%x @%d +%d)", e.Conn, e.Off, len(e.Data))
	case Shutdown:
		return fmt.Sprintf("shutdown(%x @%d)", e.Conn, e.Off)
	case Close, ServerClose:
		return fmt.Sprintf("%s(%x abort=%v)", e.Type, e.Conn, e.Abort)
	case Epoch:
		return fmt.Sprintf("epoch(leader %d term %d at %s)", e.Leader, e.Term, e.Addr)
	case Digest:
		return fmt.Sprintf("digest(replica %d, %d reports)", e.Replica, len(e.Reports))
	case Bubble:
		return fmt.Sprintf("bubble(%d @%d)", e.Ticks, e.Time)
	case Checkpoint:
		return fmt.Sprintf("checkpoint(replica %d, index %d, id %s)", e.Replica, e.CkptIndex, e.CkptID)
	}
	return e.Type.String()
}

const (
	flagAbort = 1
	flagFinal = 1
	// maxAddr bounds an Epoch's address.
	maxAddr = 1024
	// digestReportMin is the smallest encoding of a DigestReport.
	digestReportMin = 3 + 1 + 16
)

// ErrMalformed wraps every decoding error.
var ErrMalformed = errors.New("proxy: malformed event")

// AppendEvent appends e's encoding to dst.
func AppendEvent(dst []byte, e Event) []byte {
	dst = append(dst, EventVersion, byte(e.Type))
	switch e.Type {
	case Connect:
		dst = binary.AppendUvarint(dst, e.Conn)
		dst = binary.AppendUvarint(dst, e.Term)
	case Data:
		dst = binary.AppendUvarint(dst, e.Conn)
		dst = binary.AppendUvarint(dst, e.Off)
		dst = append(dst, e.Data...)
	case Shutdown:
		dst = binary.AppendUvarint(dst, e.Conn)
		dst = binary.AppendUvarint(dst, e.Off)
	case Close, ServerClose:
		dst = binary.AppendUvarint(dst, e.Conn)
		var f byte
		if e.Abort {
			f |= flagAbort
		}
		dst = append(dst, f)
	case Epoch:
		dst = binary.AppendUvarint(dst, e.Leader)
		dst = binary.AppendUvarint(dst, e.Term)
		dst = binary.AppendUvarint(dst, uint64(len(e.Addr)))
		dst = append(dst, e.Addr...)
	case Digest:
		dst = binary.AppendUvarint(dst, e.Replica)
		dst = binary.AppendUvarint(dst, uint64(len(e.Reports)))
		for _, r := range e.Reports {
			dst = binary.AppendUvarint(dst, r.Conn)
			dst = binary.AppendUvarint(dst, r.Seq)
			dst = binary.AppendUvarint(dst, r.Len)
			var f byte
			if r.Final {
				f |= flagFinal
			}
			dst = append(dst, f)
			dst = append(dst, r.Sum[:]...)
		}
	case Bubble:
		dst = binary.AppendUvarint(dst, e.Ticks)
		dst = binary.AppendUvarint(dst, e.Time)
	case Checkpoint:
		dst = binary.AppendUvarint(dst, e.Replica)
		dst = binary.AppendUvarint(dst, e.CkptIndex)
		for _, str := range []string{e.CkptID, e.CkptDigest, e.Addr} {
			dst = binary.AppendUvarint(dst, uint64(len(str)))
			dst = append(dst, str...)
		}
	}
	return dst
}

// EncodeEvent is AppendEvent to a new buffer.
func EncodeEvent(e Event) []byte {
	return AppendEvent(make([]byte, 0, 24+len(e.Data)+len(e.Addr)+len(e.Reports)*40), e)
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, what)
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *decoder) byte(what string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, what)
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) bytes(n uint64, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, what)
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) flags(what string, known byte) bool {
	f := d.byte(what)
	if d.err == nil && f&^known != 0 {
		d.err = fmt.Errorf("%w: unknown %s flags %#x", ErrMalformed, what, f)
	}
	return f&1 != 0
}

// DecodeEvent decodes one event. Data aliases b. It never panics, whatever
// b holds, and rejects trailing bytes (but for Data, whose payload is the
// rest).
func DecodeEvent(b []byte) (Event, error) {
	var e Event
	if len(b) < 2 {
		return e, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	if b[0] != EventVersion {
		return e, fmt.Errorf("%w: version %d, want %d", ErrMalformed, b[0], EventVersion)
	}
	e.Type = Type(b[1])
	d := &decoder{b: b[2:]}
	switch e.Type {
	case Connect:
		e.Conn = d.uvarint("conn")
		e.Term = d.uvarint("term")
	case Data:
		e.Conn = d.uvarint("conn")
		e.Off = d.uvarint("offset")
		if d.err == nil {
			e.Data = d.b
			d.b = nil
		}
	case Shutdown:
		e.Conn = d.uvarint("conn")
		e.Off = d.uvarint("offset")
	case Close, ServerClose:
		e.Conn = d.uvarint("conn")
		e.Abort = d.flags("close", flagAbort)
	case Epoch:
		e.Leader = d.uvarint("leader")
		e.Term = d.uvarint("term")
		n := d.uvarint("address length")
		if d.err == nil && n > maxAddr {
			d.err = fmt.Errorf("%w: address of %d bytes", ErrMalformed, n)
		}
		e.Addr = string(d.bytes(n, "address"))
	case Digest:
		e.Replica = d.uvarint("replica")
		n := d.uvarint("report count")
		if d.err == nil && n > uint64(len(d.b)/digestReportMin) {
			d.err = fmt.Errorf("%w: %d reports in %d bytes", ErrMalformed, n, len(d.b))
		}
		if d.err == nil && n > 0 {
			e.Reports = make([]DigestReport, 0, n)
		}
		for i := uint64(0); i < n && d.err == nil; i++ {
			var r DigestReport
			r.Conn = d.uvarint("report conn")
			r.Seq = d.uvarint("report seq")
			r.Len = d.uvarint("report length")
			r.Final = d.flags("report", flagFinal)
			copy(r.Sum[:], d.bytes(16, "report sum"))
			e.Reports = append(e.Reports, r)
		}
	case Bubble:
		e.Ticks = d.uvarint("ticks")
		e.Time = d.uvarint("time")
	case Checkpoint:
		e.Replica = d.uvarint("replica")
		e.CkptIndex = d.uvarint("checkpoint index")
		str := func(what string) string {
			n := d.uvarint(what + " length")
			if d.err == nil && n > maxAddr {
				d.err = fmt.Errorf("%w: %s of %d bytes", ErrMalformed, what, n)
			}
			return string(d.bytes(n, what))
		}
		e.CkptID = str("checkpoint id")
		e.CkptDigest = str("checkpoint digest")
		e.Addr = str("checkpoint address")
	default:
		return Event{}, fmt.Errorf("%w: unknown type %d", ErrMalformed, b[1])
	}
	if d.err != nil {
		return Event{}, d.err
	}
	if len(d.b) != 0 {
		return Event{}, fmt.Errorf("%w: %d trailing bytes after %s", ErrMalformed, len(d.b), e.Type)
	}
	return e, nil
}
