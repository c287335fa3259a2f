package proxy

import (
	"bytes"
	"crypto/sha256"
	"hash"
	"regexp"
	"regexp/syntax"
)

// Output digests.
//
// A replica's server output on a connection is cut into records: a line
// (up to and including '\n'), or MaxRecord bytes of a longer line, cut
// where the raw stream reaches that length. Every mask rule is applied to
// each record on its own, so a pattern matches within one line and never
// across the cut of a read: masking does not depend on how the output
// happened to be chunked by the network. (A pattern can be cut only inside
// a line longer than MaxRecord; keep patterns to headers and short lines.)
//
// The masked records feed a running SHA-256. A checkpoint is taken after
// the record that brings the masked bytes since the last checkpoint to
// CheckpointBytes or the records to CheckpointRecords, and a final one when
// the server ends its output (after the last, possibly partial, record).
// Checkpoint k of identical masked streams is identical on every replica,
// whatever the timing; a replica whose stream was cut short (the
// connection was reset) has a prefix of the checkpoints.

// Digest tuning; every replica of a cluster must use the same values.
const (
	MaxRecord         = 64 << 10
	CheckpointBytes   = 64 << 10
	CheckpointRecords = 256
)

// MaskRule replaces every match of Re in a record by Replace (with $1
// expansion, as regexp.ReplaceAll).
type MaskRule struct {
	Re      *regexp.Regexp
	Replace []byte
	// need is a literal every match contains (nil: unknown). Most output
	// lines lack it, and bytes.Contains is far cheaper than the regexp
	// engine, which dominated the leader's CPU per request without it.
	need []byte
	// needSet: need was computed by NewMaskRule.
	needSet bool
}

// NewMaskRule replaces every match of re by replace.
func NewMaskRule(re *regexp.Regexp, replace []byte) MaskRule {
	return MaskRule{Re: re, Replace: replace, need: requiredLiteral(re), needSet: true}
}

// requiredLiteral returns the longest literal of the pattern's top-level
// concatenation (e.g. "Date: " for `(?m)^Date: [^\r\n]*`), which every
// match must contain; nil when there is none or case is folded.
func requiredLiteral(re *regexp.Regexp) []byte {
	t, err := syntax.Parse(re.String(), syntax.Perl)
	if err != nil {
		return nil
	}
	t = t.Simplify()
	subs := []*syntax.Regexp{t}
	if t.Op == syntax.OpConcat {
		subs = t.Sub
	}
	var best []rune
	for _, sub := range subs {
		if sub.Op == syntax.OpLiteral && sub.Flags&syntax.FoldCase == 0 && len(sub.Rune) > len(best) {
			best = sub.Rune
		}
	}
	if len(best) == 0 {
		return nil
	}
	return []byte(string(best))
}

// ByteRange masks Len bytes from Off, counted from the start of a
// connection's output; they are blanked before records are cut.
type ByteRange struct{ Off, Len uint64 }

// rangeFill replaces masked bytes. It is not '\n', so that a masked range
// never changes where records are cut.
const rangeFill = '-'

type digester struct {
	conn    uint64
	masks   []MaskRule
	ranges  []ByteRange
	raw     uint64 // output bytes seen, before masking
	h       hash.Hash
	pending []byte
	n       uint64 // masked bytes so far
	seq     uint64
	since   uint64 // masked bytes since the last checkpoint
	records int    // records since the last checkpoint
	emit    func(DigestReport)
}

func newDigester(conn uint64, masks []MaskRule, ranges []ByteRange, emit func(DigestReport)) *digester {
	return &digester{conn: conn, masks: masks, ranges: ranges, h: sha256.New(), emit: emit}
}

// blank returns b with the bytes of the masked ranges it covers replaced,
// in a copy (b is the caller's); b itself when none is covered.
func (d *digester) blank(b []byte) []byte {
	start, end := d.raw, d.raw+uint64(len(b))
	d.raw = end
	var out []byte
	for _, r := range d.ranges {
		lo, hi := max(r.Off, start), min(r.Off+r.Len, end)
		if lo >= hi {
			continue
		}
		if out == nil {
			out = append([]byte(nil), b...)
		}
		for i := lo; i < hi; i++ {
			out[i-start] = rangeFill
		}
	}
	if out == nil {
		return b
	}
	return out
}

// Write digests more output.
func (d *digester) Write(b []byte) {
	if len(d.ranges) > 0 {
		b = d.blank(b)
	}
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		take := len(b)
		if i >= 0 {
			take = i + 1
		}
		if room := MaxRecord - len(d.pending); take > room {
			d.pending = append(d.pending, b[:room]...)
			b = b[room:]
			d.record(d.pending)
			d.pending = d.pending[:0]
			continue
		}
		if i < 0 {
			d.pending = append(d.pending, b...)
			return
		}
		if len(d.pending) == 0 {
			d.record(b[:take])
		} else {
			d.pending = append(d.pending, b[:take]...)
			d.record(d.pending)
			d.pending = d.pending[:0]
		}
		b = b[take:]
	}
}

func (d *digester) record(r []byte) {
	for _, m := range d.masks {
		need := m.need
		if !m.needSet { // a rule not made by NewMaskRule
			need = requiredLiteral(m.Re)
		}
		if need != nil && !bytes.Contains(r, need) {
			continue
		}
		r = m.Re.ReplaceAll(r, m.Replace)
	}
	d.h.Write(r)
	d.n += uint64(len(r))
	d.since += uint64(len(r))
	d.records++
	if d.since >= CheckpointBytes || d.records >= CheckpointRecords {
		d.checkpoint(false)
	}
}

func (d *digester) checkpoint(final bool) {
	d.seq++
	rep := DigestReport{Conn: d.conn, Seq: d.seq, Len: d.n, Final: final}
	copy(rep.Sum[:], d.h.Sum(nil))
	d.since, d.records = 0, 0
	d.emit(rep)
}

// EOF takes the final checkpoint: the server ended its output.
func (d *digester) EOF() {
	if len(d.pending) > 0 {
		d.record(d.pending)
		d.pending = nil
	}
	d.checkpoint(true)
}
