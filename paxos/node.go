// Package paxos is lockstep's replicated log: consensus on etcd raft
// (go.etcd.io/raft/v3), made durable by a write-ahead log and carried
// between replicas by a Transport.
//
// One goroutine owns the raft state machine (a RawNode) and does all its
// IO at the edges: it steps messages, ticks, batches proposals, persists
// each Ready with one fsync (group commit) and hands committed entries to
// the application in order. The package knows nothing of sockets between
// clients and servers: entries are opaque bytes.
package paxos

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"

	"lockstep/paxos/transport"
	"lockstep/paxos/wal"
)

var (
	// ErrStopped: the node is stopped (or stopped itself on a fatal error).
	ErrStopped = errors.New("paxos: node stopped")
	// ErrNoLeader: no leader is known; try again after an election.
	ErrNoLeader = errors.New("paxos: no leader")
	// ErrUnknownOutcome: leadership changed while the proposal was in
	// flight; it may or may not be committed.
	ErrUnknownOutcome = errors.New("paxos: leadership changed, outcome unknown")
	// ErrBusy: too many uncommitted proposals; back off.
	ErrBusy = errors.New("paxos: too many uncommitted proposals")
)

// Entry is one committed application entry.
type Entry struct {
	Index uint64
	Term  uint64
	Data  []byte
}

// Snapshot is the application's state at Index, as it gave it to Compact.
type Snapshot struct {
	Index uint64
	Term  uint64
	Data  []byte
}

// Apply is the next piece of committed log, in order. When Snapshot is
// set, the application first restores it (its state at Snapshot.Index);
// Entries follow it.
type Apply struct {
	Snapshot *Snapshot
	Entries  []Entry
}

// Status is a node's view of the cluster.
type Status struct {
	ID      uint64            `json:"id"`
	Role    string            `json:"role"`
	Leader  uint64            `json:"leader"`
	Term    uint64            `json:"term"`
	Commit  uint64            `json:"commit"`
	Applied uint64            `json:"applied"`
	Members map[uint64]string `json:"members"`
	// Learners are members that receive the log but do not vote.
	Learners []uint64 `json:"learners,omitempty"`
	// Match is, on the leader, how far each member's log is known to match.
	Match map[uint64]uint64 `json:"match,omitempty"`
}

// Node is one member of the replicated log.
type Node struct {
	cfg     Config
	rn      *raft.RawNode
	storage *raft.MemoryStorage
	wal     *wal.WAL
	snaps   *wal.Snapshotter
	tr      transport.Transport
	m       *metrics
	log     interface{ Warnf(string, ...any) }

	recvc   chan raftpb.Message
	reportc chan func(*raft.RawNode)
	ctlc    chan func()
	stopc   chan struct{}
	quit    chan struct{} // closed when the loop has exited, before cleanup
	done    chan struct{}
	err     error // why the loop ended; read after done

	props   proposalQueue
	waiters waiters

	applyMu   sync.Mutex
	applyQ    []Apply
	applyWake chan struct{}
	applyc    chan Apply

	// Owned by the loop goroutine.
	confState raftpb.ConfState
	// Copies of members and learners for Status, rebuilt only when
	// viewsStale says they changed.
	membersView  map[uint64]string
	learnersView []uint64
	viewsStale   bool
	members      map[uint64]string
	soft         raft.SoftState
	term         uint64
	commit       uint64
	// held: per follower, the leader's latest append without entries
	// (it only moves the follower's commit index), kept up to
	// CommitDelay for the next append to carry the index instead.
	held      map[uint64]raftpb.Message
	heldTimer *time.Timer
	heldArmed bool
	heldSince time.Time // when held last went from empty to not
	sendBuf   []raftpb.Message

	applied atomic.Uint64
	status  atomic.Pointer[Status]
}

// Start starts a node, or restarts it from its data directory.
func Start(cfg Config) (*Node, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	n := &Node{
		cfg:       cfg,
		storage:   raft.NewMemoryStorage(),
		m:         newMetrics(cfg.Registerer),
		log:       cfg.Logger,
		recvc:     make(chan raftpb.Message, 4096),
		reportc:   make(chan func(*raft.RawNode), 1024),
		ctlc:      make(chan func()),
		stopc:     make(chan struct{}),
		quit:      make(chan struct{}),
		done:      make(chan struct{}),
		applyWake: make(chan struct{}, 1),
		applyc:    make(chan Apply, 16),
		members:   map[uint64]string{},
		held:      map[uint64]raftpb.Message{},
	}
	n.heldTimer = time.NewTimer(time.Hour)
	n.heldTimer.Stop()
	n.props.wake = make(chan struct{}, 1)
	n.props.lazyDelay = max(cfg.LazyDelay, 0)
	n.waiters.m = map[uint64]*waiter{}
	n.waiters.prefix = cfg.ID<<48 | rand.Uint64()&(1<<47-1)<<1

	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("paxos: %w", err)
	}
	snaps, err := wal.NewSnapshotter(filepath.Join(cfg.DataDir, "snap"))
	if err != nil {
		return nil, fmt.Errorf("paxos: %w", err)
	}
	n.snaps = snaps
	snap, err := snaps.Load()
	if err != nil && !errors.Is(err, wal.ErrNoSnapshot) {
		return nil, fmt.Errorf("paxos: loading snapshot: %w", err)
	}
	w, st, err := wal.Open(filepath.Join(cfg.DataDir, "wal"), wal.Options{
		SegmentSize: cfg.SegmentSize, NoSync: cfg.NoSync, Logger: cfg.Logger, OnSync: n.m.observeSync,
		Preallocate: true,
	})
	if err != nil {
		return nil, fmt.Errorf("paxos: opening WAL: %w", err)
	}
	n.wal = w
	restart := !raft.IsEmptySnap(snap) || !raft.IsEmptyHardState(st.HardState) || len(st.Entries) > 0
	var restored *Snapshot
	if !raft.IsEmptySnap(snap) {
		members, data, err := decodeSnapshotData(snap.Data)
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("paxos: snapshot %d: %w", snap.Metadata.Index, err)
		}
		if err := n.storage.ApplySnapshot(snap); err != nil {
			w.Close()
			return nil, fmt.Errorf("paxos: applying snapshot: %w", err)
		}
		n.members = members
		n.confState = snap.Metadata.ConfState
		n.viewsStale = true
		restored = &Snapshot{Index: snap.Metadata.Index, Term: snap.Metadata.Term, Data: data}
	}
	ents := st.Entries
	for len(ents) > 0 && ents[0].Index <= snap.Metadata.Index {
		ents = ents[1:]
	}
	if err := n.storage.SetHardState(st.HardState); err != nil {
		w.Close()
		return nil, fmt.Errorf("paxos: %w", err)
	}
	if err := n.storage.Append(ents); err != nil {
		w.Close()
		return nil, fmt.Errorf("paxos: replaying WAL: %w", err)
	}
	for id, addr := range cfg.Peers {
		if _, ok := n.members[id]; !ok && addr != "" {
			n.members[id] = addr
		}
	}

	rc := &raft.Config{
		ID:                        cfg.ID,
		ElectionTick:              cfg.ElectionTicks,
		HeartbeatTick:             cfg.HeartbeatTicks,
		Storage:                   n.storage,
		Applied:                   snap.Metadata.Index,
		MaxSizePerMsg:             1 << 20,
		MaxInflightMsgs:           256,
		MaxUncommittedEntriesSize: 64 << 20,
		CheckQuorum:               true,
		PreVote:                   true,
		Logger:                    raftLogger{cfg.Logger},
	}
	rn, err := raft.NewRawNode(rc)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("paxos: %w", err)
	}
	n.rn = rn
	if !restart && !cfg.Join {
		var peers []raft.Peer
		for id, addr := range cfg.Peers {
			peers = append(peers, raft.Peer{ID: id, Context: []byte(addr)})
		}
		if err := rn.Bootstrap(peers); err != nil {
			w.Close()
			return nil, fmt.Errorf("paxos: bootstrap: %w", err)
		}
	}

	n.tr = cfg.Transport
	if n.tr == nil {
		tcp, err := transport.NewTCP(transport.TCPOptions{
			ID: cfg.ID, ClusterID: cfg.ClusterID, Listen: cfg.Listen, Logger: cfg.Logger,
			Registerer: cfg.Registerer,
		})
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("paxos: transport: %w", err)
		}
		n.tr = tcp
	}
	for id, addr := range n.members {
		if id != cfg.ID {
			n.tr.AddPeer(id, addr)
		}
	}
	if err := n.tr.Start(n); err != nil {
		w.Close()
		return nil, fmt.Errorf("paxos: transport: %w", err)
	}
	if restored != nil {
		n.queueApply(Apply{Snapshot: restored})
		n.applied.Store(restored.Index)
	}
	n.publishStatus()
	go n.pumpApplies()
	go n.run()
	cfg.Logger.WithField("restart", restart).WithField("join", cfg.Join).
		Infof("paxos: node started, peer address %s", n.tr.Addr())
	return n, nil
}

// Propose appends data to the log and returns its index once committed.
// Concurrent proposals share raft steps, fsyncs and network writes.
func (n *Node) Propose(ctx context.Context, data []byte) (uint64, error) {
	w := n.waiters.add()
	buf := make([]byte, 8+len(data))
	binary.BigEndian.PutUint64(buf, w.id)
	copy(buf[8:], data)
	if !n.props.push(proposal{id: w.id, data: buf}) {
		n.waiters.remove(w.id)
		return 0, ErrStopped
	}
	select {
	case r := <-w.ch:
		if r.err != nil {
			n.m.failed.Inc()
		}
		return r.index, r.err
	case <-ctx.Done():
		n.waiters.remove(w.id)
		n.m.failed.Inc()
		return 0, ctx.Err()
	case <-n.done:
		return 0, ErrStopped
	}
}

// Applies delivers the committed log in order. The application must keep
// reading it; the node buffers meanwhile rather than stall consensus.
func (n *Node) Applies() <-chan Apply { return n.applyc }

// SetApplied records how far the application has applied the log.
func (n *Node) SetApplied(index uint64) {
	n.applied.Store(index)
	n.m.applied.Set(float64(index))
}

// Compact records the application's state at index (data: e.g. a
// checkpoint id) as the raft snapshot, and drops the log below it but for
// KeepEntries. A follower too far behind receives this snapshot.
func (n *Node) Compact(ctx context.Context, index uint64, data []byte) error {
	return n.do(ctx, func() error { return n.compact(index, data) })
}

// Status is a recent view of the node, cheap to call.
func (n *Node) Status() Status { return *n.status.Load() }

// Leader is the known leader's id, 0 if none.
func (n *Node) Leader() uint64 { return n.status.Load().Leader }

// IsLeader tells whether this node leads.
func (n *Node) IsLeader() bool { return n.Leader() == n.cfg.ID }

// ID is this node's raft id.
func (n *Node) ID() uint64 { return n.cfg.ID }

// Addr is where peers reach this node.
func (n *Node) Addr() string { return n.tr.Addr() }

// TransferLeadership asks the leader (this node) to hand over to another
// member and waits until it has, or ctx ends.
func (n *Node) TransferLeadership(ctx context.Context, to uint64) error {
	// raft abandons a transfer after an election timeout, e.g. when the
	// transferee has not yet applied its own promotion; ask again then.
	retry := time.Duration(n.cfg.ElectionTicks) * n.cfg.Tick
	for n.Leader() != to {
		if err := n.do(ctx, func() error {
			if n.soft.RaftState != raft.StateLeader {
				return fmt.Errorf("paxos: node %d is not the leader (leader is %d)", n.cfg.ID, n.soft.Lead)
			}
			n.rn.TransferLeader(to)
			return nil
		}); err != nil {
			return err
		}
		deadline := time.Now().Add(retry)
		for n.Leader() != to && time.Now().Before(deadline) {
			select {
			case <-ctx.Done():
				return fmt.Errorf("paxos: leadership transfer to %d: %w", to, ctx.Err())
			case <-n.done:
				return ErrStopped
			case <-time.After(n.cfg.Tick / 2):
			}
		}
	}
	return nil
}

// AddLearner adds a member that receives the log but does not vote, and
// returns once the change is committed and applied here.
func (n *Node) AddLearner(ctx context.Context, id uint64, addr string) error {
	return n.changeConf(ctx, raftpb.ConfChange{Type: raftpb.ConfChangeAddLearnerNode, NodeID: id, Context: []byte(addr)})
}

// Promote makes a learner a voter.
func (n *Node) Promote(ctx context.Context, id uint64) error {
	addr := n.Status().Members[id]
	return n.changeConf(ctx, raftpb.ConfChange{Type: raftpb.ConfChangeAddNode, NodeID: id, Context: []byte(addr)})
}

// RemoveMember removes a member.
func (n *Node) RemoveMember(ctx context.Context, id uint64) error {
	return n.changeConf(ctx, raftpb.ConfChange{Type: raftpb.ConfChangeRemoveNode, NodeID: id})
}

// Done is closed when the node has stopped; Err tells why.
func (n *Node) Done() <-chan struct{} { return n.done }

// Err is the fatal error that stopped the node, nil after Stop.
func (n *Node) Err() error {
	select {
	case <-n.done:
		return n.err
	default:
		return nil
	}
}

// Stop stops the node and waits for it; the WAL is closed cleanly.
func (n *Node) Stop() {
	select {
	case <-n.stopc:
	default:
		close(n.stopc)
	}
	<-n.done
}

// Process implements transport.Raft.
func (n *Node) Process(ctx context.Context, m raftpb.Message) error {
	select {
	case n.recvc <- m:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.quit:
		return ErrStopped
	}
}

// ReportUnreachable implements transport.Raft.
func (n *Node) ReportUnreachable(id uint64) {
	select {
	case n.reportc <- func(rn *raft.RawNode) { rn.ReportUnreachable(id) }:
	default: // raft learns it again on the next failed send
	}
}

// ReportSnapshot implements transport.Raft.
func (n *Node) ReportSnapshot(id uint64, status raft.SnapshotStatus) {
	select {
	case n.reportc <- func(rn *raft.RawNode) { rn.ReportSnapshot(id, status) }:
	case <-n.quit: // the transport is closing under a stopped loop
	}
}

func (n *Node) changeConf(ctx context.Context, cc raftpb.ConfChange) error {
	w := n.waiters.add()
	cc.ID = w.id
	if err := n.do(ctx, func() error {
		if n.soft.RaftState != raft.StateLeader {
			return fmt.Errorf("paxos: membership changes go through the leader (node %d)", n.soft.Lead)
		}
		return n.rn.ProposeConfChange(cc)
	}); err != nil {
		n.waiters.remove(w.id)
		return err
	}
	select {
	case r := <-w.ch:
		return r.err
	case <-ctx.Done():
		n.waiters.remove(w.id)
		return ctx.Err()
	case <-n.done:
		return ErrStopped
	}
}

// do runs f on the loop goroutine.
func (n *Node) do(ctx context.Context, f func() error) error {
	errc := make(chan error, 1)
	select {
	case n.ctlc <- func() { errc <- f() }:
	case <-ctx.Done():
		return ctx.Err()
	case <-n.done:
		return ErrStopped
	}
	select {
	case err := <-errc:
		return err
	case <-n.done:
		return ErrStopped
	}
}

func (n *Node) run() {
	ticker := time.NewTicker(n.cfg.Tick)
	defer ticker.Stop()
	err := n.loop(ticker.C)
	if err != nil {
		n.cfg.Logger.WithError(err).Error("paxos: node stopped on a fatal error")
	}
	n.err = err
	close(n.quit)
	n.props.close()
	n.waiters.failAll(ErrStopped)
	n.tr.Close()
	if cerr := n.wal.Close(); cerr != nil && n.err == nil {
		n.err = cerr
	}
	close(n.done)
}

func (n *Node) loop(tick <-chan time.Time) error {
	for {
		select {
		case <-n.stopc:
			return nil
		case <-tick:
			n.rn.Tick()
		case m := <-n.recvc:
			n.step(m)
			// Take whatever else has arrived so that one Ready covers it.
			for drained := false; !drained; {
				select {
				case m := <-n.recvc:
					n.step(m)
				default:
					drained = true
				}
			}
		case <-n.props.wake:
			n.proposeQueued()
		case f := <-n.reportc:
			f(n.rn)
		case f := <-n.ctlc:
			f()
		case <-n.heldTimer.C:
			n.sendHeld()
		}
		// Advance may move the commit index (our own append counts only
		// then), so look again rather than wait for the next event.
		for n.rn.HasReady() {
			if err := n.handleReady(n.rn.Ready()); err != nil {
				return err
			}
		}
	}
}

func (n *Node) step(m raftpb.Message) {
	if err := n.rn.Step(m); err != nil && !errors.Is(err, raft.ErrStepPeerNotFound) {
		n.cfg.Logger.WithError(err).Debugf("paxos: step %s from %d", m.Type, m.From)
	}
}

// proposeQueued hands every queued proposal to raft in as few steps as
// MaxBatch allows.
func (n *Node) proposeQueued() {
	batch := n.props.take()
	for len(batch) > 0 {
		k := min(len(batch), n.cfg.MaxBatch)
		ents := make([]raftpb.Entry, k)
		for i, p := range batch[:k] {
			ents[i] = raftpb.Entry{Data: p.data}
		}
		err := n.rn.Step(raftpb.Message{Type: raftpb.MsgProp, From: n.cfg.ID, Entries: ents})
		if err != nil {
			why := ErrNoLeader
			if n.soft.Lead != raft.None {
				why = ErrBusy
			}
			for _, p := range batch[:k] {
				n.waiters.fail(p.id, why)
			}
		}
		batch = batch[k:]
	}
}

func (n *Node) handleReady(rd raft.Ready) error {
	if rd.SoftState != nil {
		n.onSoftState(*rd.SoftState)
	}
	if !raft.IsEmptyHardState(rd.HardState) {
		n.term = rd.HardState.Term
		n.m.term.Set(float64(rd.HardState.Term))
	}
	// A leader may send before its own write is durable (raft thesis
	// 10.2.1): its entries count toward a quorum only once persisted, and
	// this overlaps its fsync with the followers'.
	leader := n.soft.RaftState == raft.StateLeader
	if leader {
		n.tr.Send(n.holdCommits(rd.Messages))
	}
	if !raft.IsEmptySnap(rd.Snapshot) {
		if err := n.installSnapshot(rd.Snapshot); err != nil {
			return err
		}
	}
	// Committed entries this node persisted in an earlier Ready are
	// applied before this Ready's WAL write, not after it. A follower
	// learns that an entry is committed with the next append, and a busy
	// leader commits while it appends more, so a Ready often brings both:
	// the server's work on the last request then overlaps the wait for
	// the disk rather than the leader's work on the next one. (A commit
	// alone still saves its unsynced hard state, after.)
	committed := rd.CommittedEntries
	if len(committed) > 0 && raft.IsEmptySnap(rd.Snapshot) {
		stable, err := n.storage.LastIndex()
		if err != nil {
			return fmt.Errorf("paxos: %w", err)
		}
		k := sort.Search(len(committed), func(i int) bool { return committed[i].Index > stable })
		if k > 0 {
			n.applyCommitted(committed[:k])
			committed = committed[k:]
		}
	}
	// raft says when the write must be durable before anything depends on
	// it: new entries, a new term or vote. A moved commit index alone need
	// not be (it is learned again after a crash), which saves an fsync per
	// commit on the latency path.
	save := n.wal.Save
	if !rd.MustSync {
		save = n.wal.SaveUnsynced
	}
	if err := save(rd.HardState, rd.Entries); err != nil {
		return fmt.Errorf("paxos: WAL write: %w", err)
	}
	if len(rd.Entries) > 0 {
		n.m.batch.Observe(float64(len(rd.Entries)))
	}
	if !raft.IsEmptyHardState(rd.HardState) {
		if err := n.storage.SetHardState(rd.HardState); err != nil {
			return fmt.Errorf("paxos: %w", err)
		}
	}
	if err := n.storage.Append(rd.Entries); err != nil {
		return fmt.Errorf("paxos: %w", err)
	}
	if !leader {
		n.tr.Send(rd.Messages)
	}
	if len(committed) > 0 {
		n.applyCommitted(committed)
	}
	n.rn.Advance(rd)
	n.publishStatus()
	return nil
}

// holdCommits returns the leader's messages to send now. An append that
// carries no entries only moves a follower's commit index (or probes it):
// it is held, for CommitDelay at most, and dropped if another append to
// that follower goes first, since that one carries a commit index at
// least as new (raft tolerates a lost message in any case). Any other
// message to the follower sends the held one first, in order. The
// leader's own commit does not wait for this; its followers apply a
// little later, and a busy leader sends half the messages per round.
func (n *Node) holdCommits(msgs []raftpb.Message) []raftpb.Message {
	if n.cfg.CommitDelay < 0 {
		return msgs
	}
	out := n.sendBuf[:0]
	for _, m := range msgs {
		if m.Type == raftpb.MsgApp && len(m.Entries) == 0 {
			if len(n.held) == 0 {
				n.heldSince = time.Now()
			}
			n.held[m.To] = m
			if !n.heldArmed {
				n.heldArmed = true
				n.heldTimer.Reset(n.cfg.CommitDelay)
			}
			continue
		}
		if h, ok := n.held[m.To]; ok {
			delete(n.held, m.To)
			if m.Type != raftpb.MsgApp {
				out = append(out, h)
			}
		}
		out = append(out, m)
	}
	n.sendBuf = out
	return out
}

// sendHeld sends the held commit messages once CommitDelay has passed.
func (n *Node) sendHeld() {
	n.heldArmed = false
	if len(n.held) == 0 {
		return
	}
	// The timer was armed for messages that appends may have carried
	// since; those held now wait their own delay. (Sending them early cost
	// a third of the requests at one at a time a message and an ack per
	// follower more.)
	if wait := n.cfg.CommitDelay - time.Since(n.heldSince); wait > 0 {
		n.heldArmed = true
		n.heldTimer.Reset(wait)
		return
	}
	out := n.sendBuf[:0]
	for id, m := range n.held {
		out = append(out, m)
		delete(n.held, id)
	}
	n.sendBuf = out
	n.tr.Send(out)
}

func (n *Node) onSoftState(ss raft.SoftState) {
	if ss.Lead != n.soft.Lead || ss.RaftState != n.soft.RaftState {
		n.cfg.Logger.Infof("paxos: role %s, leader %d", ss.RaftState, ss.Lead)
		// Proposals in flight may have been lost with the old leader. We
		// cannot tell, so their callers learn that the outcome is unknown.
		if n.soft.Lead != raft.None {
			n.waiters.failAll(ErrUnknownOutcome)
		}
	}
	if ss.RaftState != raft.StateLeader {
		clear(n.held) // a former leader's messages are stale
	}
	n.soft = ss
	n.m.leader.Set(float64(ss.Lead))
	if ss.RaftState == raft.StateLeader {
		n.m.isLeader.Set(1)
	} else {
		n.m.isLeader.Set(0)
	}
}

func (n *Node) installSnapshot(snap raftpb.Snapshot) error {
	members, data, err := decodeSnapshotData(snap.Data)
	if err != nil {
		return fmt.Errorf("paxos: snapshot from leader at %d: %w", snap.Metadata.Index, err)
	}
	if err := n.snaps.Save(snap); err != nil {
		return fmt.Errorf("paxos: saving snapshot: %w", err)
	}
	if err := n.wal.SaveSnapshot(snap.Metadata); err != nil {
		return fmt.Errorf("paxos: WAL snapshot marker: %w", err)
	}
	if err := n.storage.ApplySnapshot(snap); err != nil {
		return fmt.Errorf("paxos: %w", err)
	}
	n.confState = snap.Metadata.ConfState
	n.viewsStale = true
	n.setMembers(members)
	n.commit = snap.Metadata.Index
	n.queueApply(Apply{Snapshot: &Snapshot{Index: snap.Metadata.Index, Term: snap.Metadata.Term, Data: data}})
	n.cfg.Logger.Infof("paxos: installed snapshot at index %d from the leader", snap.Metadata.Index)
	return nil
}

func (n *Node) setMembers(members map[uint64]string) {
	for id := range n.members {
		if _, ok := members[id]; !ok && id != n.cfg.ID {
			n.tr.RemovePeer(id)
		}
	}
	for id, addr := range members {
		if id != n.cfg.ID {
			n.tr.AddPeer(id, addr)
		}
	}
	n.members = members
	n.viewsStale = true
}

func (n *Node) applyCommitted(ents []raftpb.Entry) {
	out := make([]Entry, 0, len(ents))
	for _, e := range ents {
		switch e.Type {
		case raftpb.EntryNormal:
			if len(e.Data) < 8 {
				continue // the leader's empty entry on election
			}
			id := binary.BigEndian.Uint64(e.Data)
			out = append(out, Entry{Index: e.Index, Term: e.Term, Data: e.Data[8:]})
			if n.waiters.done(id, e.Index) {
				n.m.proposals.Inc()
			}
		case raftpb.EntryConfChange:
			var cc raftpb.ConfChange
			if err := cc.Unmarshal(e.Data); err != nil {
				n.cfg.Logger.WithError(err).Errorf("paxos: bad conf change at %d", e.Index)
				continue
			}
			n.applyConfChange(cc)
			// Whoever waits for the change may look at Status next.
			n.publishStatus()
			n.waiters.done(cc.ID, e.Index)
		}
	}
	last := ents[len(ents)-1].Index
	n.commit = last
	n.m.commit.Set(float64(last))
	if len(out) > 0 {
		n.queueApply(Apply{Entries: out})
	}
}

func (n *Node) applyConfChange(cc raftpb.ConfChange) {
	n.confState = *n.rn.ApplyConfChange(cc)
	n.viewsStale = true
	switch cc.Type {
	case raftpb.ConfChangeAddNode, raftpb.ConfChangeAddLearnerNode:
		if len(cc.Context) > 0 {
			n.members[cc.NodeID] = string(cc.Context)
		}
		if cc.NodeID != n.cfg.ID && n.members[cc.NodeID] != "" {
			n.tr.AddPeer(cc.NodeID, n.members[cc.NodeID])
		}
	case raftpb.ConfChangeRemoveNode:
		delete(n.members, cc.NodeID)
		if cc.NodeID == n.cfg.ID {
			n.cfg.Logger.Warn("paxos: this node was removed from the cluster")
		} else {
			n.tr.RemovePeer(cc.NodeID)
		}
	}
	n.cfg.Logger.Infof("paxos: membership %s of %d applied; voters %v learners %v",
		cc.Type, cc.NodeID, n.confState.Voters, n.confState.Learners)
}

func (n *Node) compact(index uint64, data []byte) error {
	if index > n.commit {
		return fmt.Errorf("paxos: cannot snapshot at %d beyond commit index %d", index, n.commit)
	}
	snap, err := n.storage.CreateSnapshot(index, &n.confState, encodeSnapshotData(n.members, data))
	if errors.Is(err, raft.ErrSnapOutOfDate) {
		return nil // a newer snapshot exists already
	}
	if err != nil {
		return fmt.Errorf("paxos: snapshot at %d: %w", index, err)
	}
	if err := n.snaps.Save(snap); err != nil {
		return fmt.Errorf("paxos: saving snapshot: %w", err)
	}
	if err := n.wal.SaveSnapshot(snap.Metadata); err != nil {
		return fmt.Errorf("paxos: WAL snapshot marker: %w", err)
	}
	if index > n.cfg.KeepEntries {
		if err := n.storage.Compact(index - n.cfg.KeepEntries); err != nil && !errors.Is(err, raft.ErrCompacted) {
			return fmt.Errorf("paxos: compacting log: %w", err)
		}
	}
	if err := n.wal.ReleaseTo(index); err != nil {
		n.log.Warnf("paxos: releasing WAL segments below %d: %v", index, err)
	}
	return nil
}

// publishStatus is called after every Ready: it avoids raft's Status,
// which allocates the whole progress map each time.
func (n *Node) publishStatus() {
	st := n.rn.BasicStatus()
	if n.viewsStale || n.membersView == nil {
		n.membersView = make(map[uint64]string, len(n.members))
		for id, addr := range n.members {
			n.membersView[id] = addr
		}
		n.learnersView = append([]uint64(nil), n.confState.Learners...)
		n.viewsStale = false
	}
	s := &Status{
		ID: n.cfg.ID, Role: roleName(st.RaftState), Leader: st.Lead, Term: st.Term,
		Commit: st.Commit, Applied: n.applied.Load(), Members: n.membersView,
		Learners: n.learnersView,
	}
	if st.RaftState == raft.StateLeader {
		s.Match = make(map[uint64]uint64, len(n.membersView))
		n.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
			s.Match[id] = pr.Match
		})
	}
	n.status.Store(s)
}

func roleName(s raft.StateType) string {
	switch s {
	case raft.StateLeader:
		return "leader"
	case raft.StateCandidate, raft.StatePreCandidate:
		return "candidate"
	default:
		return "follower"
	}
}

// queueApply hands work to pumpApplies without ever blocking the loop.
func (n *Node) queueApply(a Apply) {
	n.applyMu.Lock()
	n.applyQ = append(n.applyQ, a)
	n.applyMu.Unlock()
	select {
	case n.applyWake <- struct{}{}:
	default:
	}
}

func (n *Node) pumpApplies() {
	defer close(n.applyc)
	for {
		n.applyMu.Lock()
		q := n.applyQ
		n.applyQ = nil
		n.applyMu.Unlock()
		for _, a := range q {
			select {
			case n.applyc <- a:
			case <-n.done:
				return
			}
		}
		select {
		case <-n.applyWake:
		case <-n.done:
			return
		}
	}
}
