package proxy

import (
	"sort"
)

// Divergence: a replica's server output on a connection differed from the
// majority's (or no majority agreed: Agree is empty).
type Divergence struct {
	Conn uint64 `json:"conn"`
	// Seq is the digest checkpoint that differed (see digest.go).
	Seq uint64 `json:"seq"`
	// Index is the log index of the digest report that revealed it.
	Index uint64 `json:"index"`
	// Replica is the replica whose output differs.
	Replica uint64 `json:"replica"`
	// Agree are the replicas whose outputs agree, a majority.
	Agree []uint64 `json:"agree,omitempty"`
	// Len and AgreeLen are the masked output lengths at the checkpoint.
	Len      uint64 `json:"len"`
	AgreeLen uint64 `json:"agree_len"`
	Final    bool   `json:"final"`
}

// comparator matches the digest reports of all replicas, as they come out
// of the log. It is part of the replicated state machine: every replica
// finds the same divergences at the same log index.
type comparator struct {
	size int    // replicas in the cluster, but for joiners not heard of yet
	keep uint64 // log entries an incomplete comparison is kept
	// joiners: replicas configured to join later (configs.Replica.Join),
	// counted in size from their first report on (a replica that never
	// joined must not hold every comparison open).
	joiners map[uint64]bool
	m       map[cmpKey]*cmpEntry

	compared  uint64 // checkpoints every replica reported alike
	mismatch  uint64 // checkpoints where some replica differed
	total     uint64 // divergences found
	recent    []Divergence
	maxRecent int
}

type cmpKey struct{ conn, seq uint64 }

type cmpEntry struct {
	reports map[uint64]DigestReport
	flagged map[uint64]bool
	touched uint64
}

func newComparator(size int, joiners ...uint64) *comparator {
	c := &comparator{size: size - len(joiners), keep: 1 << 18, m: map[cmpKey]*cmpEntry{}, maxRecent: 100,
		joiners: map[uint64]bool{}}
	for _, id := range joiners {
		c.joiners[id] = true
	}
	return c
}

type digestKey struct {
	n     uint64
	final bool
	sum   [16]byte
}

// report records one replica's checkpoint and returns the divergences it
// reveals.
func (c *comparator) report(index, replica uint64, r DigestReport) []Divergence {
	if c.joiners[replica] {
		delete(c.joiners, replica)
		c.size++
	}
	k := cmpKey{r.Conn, r.Seq}
	e := c.m[k]
	if e == nil {
		e = &cmpEntry{reports: map[uint64]DigestReport{}}
		c.m[k] = e
	}
	e.reports[replica] = r
	e.touched = index
	complete := len(e.reports) >= c.size
	divs := c.evaluate(index, k, e, complete)
	if complete {
		delete(c.m, k)
	}
	return divs
}

// evaluate flags every replica outside the majority; with no majority it
// flags everyone, but only once every replica reported (or the comparison
// is given up).
func (c *comparator) evaluate(index uint64, k cmpKey, e *cmpEntry, final bool) []Divergence {
	groups := map[digestKey][]uint64{}
	for id, r := range e.reports {
		dk := digestKey{r.Len, r.Final, r.Sum}
		groups[dk] = append(groups[dk], id)
	}
	if len(groups) == 1 {
		if final {
			c.compared++
		}
		return nil
	}
	var major digestKey
	var agree []uint64
	for dk, ids := range groups {
		if len(ids) > c.size/2 {
			major, agree = dk, ids
		}
	}
	if agree == nil && !final {
		return nil // wait for the other reports
	}
	if final {
		c.mismatch++
	}
	sort.Slice(agree, func(i, j int) bool { return agree[i] < agree[j] })
	ids := make([]uint64, 0, len(e.reports))
	for id := range e.reports {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var out []Divergence
	for _, id := range ids {
		r := e.reports[id]
		if agree != nil && (digestKey{r.Len, r.Final, r.Sum}) == major {
			continue
		}
		if e.flagged[id] {
			continue
		}
		if e.flagged == nil {
			e.flagged = map[uint64]bool{}
		}
		e.flagged[id] = true
		d := Divergence{Conn: k.conn, Seq: k.seq, Index: index, Replica: id, Len: r.Len, Final: r.Final}
		if agree != nil {
			d.Agree = append([]uint64(nil), agree...)
			d.AgreeLen = major.n
		}
		out = append(out, d)
	}
	c.total += uint64(len(out))
	c.recent = append(c.recent, out...)
	if over := len(c.recent) - c.maxRecent; over > 0 {
		c.recent = append(c.recent[:0:0], c.recent[over:]...)
	}
	return out
}

// sweep gives up comparisons not touched for keep entries (a replica that
// never reported: it was down, lagging far behind, or its connection was
// reset), flagging what they had revealed.
func (c *comparator) sweep(index uint64) []Divergence {
	if index < c.keep {
		return nil
	}
	var keys []cmpKey
	for k, e := range c.m {
		if e.touched+c.keep < index {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].conn != keys[j].conn {
			return keys[i].conn < keys[j].conn
		}
		return keys[i].seq < keys[j].seq
	})
	var out []Divergence
	for _, k := range keys {
		e := c.m[k]
		if len(e.reports) > 1 {
			out = append(out, c.evaluate(index, k, e, true)...)
		}
		delete(c.m, k)
	}
	return out
}
