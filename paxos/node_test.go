package paxos

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// testApp is the state machine of the tests: the applied entries in order.
type testApp struct {
	mu      sync.Mutex
	node    *Node
	applied uint64
	data    []string
	snaps   int // snapshots restored
	stopped chan struct{}
}

func (a *testApp) run() {
	defer close(a.stopped)
	for ap := range a.node.Applies() {
		a.mu.Lock()
		if ap.Snapshot != nil {
			a.snaps++
			a.data = splitSnap(ap.Snapshot.Data)
			a.applied = ap.Snapshot.Index
		}
		for _, e := range ap.Entries {
			if e.Index <= a.applied {
				panic(fmt.Sprintf("entry %d applied twice (applied %d)", e.Index, a.applied))
			}
			a.data = append(a.data, string(e.Data))
			a.applied = e.Index
		}
		applied := a.applied
		a.mu.Unlock()
		a.node.SetApplied(applied)
	}
}

func (a *testApp) snapshot() (uint64, []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var b []byte
	for _, s := range a.data {
		b = append(b, s...)
		b = append(b, 0)
	}
	return a.applied, b
}

func splitSnap(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c == 0 {
			out = append(out, string(b[start:i]))
			start = i + 1
		}
	}
	return out
}

func (a *testApp) state() (uint64, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.applied, append([]string(nil), a.data...)
}

type testCluster struct {
	t     *testing.T
	dir   string
	peers map[uint64]string
	nodes map[uint64]*Node
	apps  map[uint64]*testApp
	// adjust changes each node's config before it starts.
	adjust func(*Config)
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func newTestCluster(t *testing.T, n int) *testCluster {
	return newTestClusterWith(t, n, nil)
}

// newTestClusterWith lets a test change its nodes' config.
func newTestClusterWith(t *testing.T, n int, adjust func(*Config)) *testCluster {
	c := &testCluster{adjust: adjust, t: t, dir: t.TempDir(), peers: map[uint64]string{}, nodes: map[uint64]*Node{}, apps: map[uint64]*testApp{}}
	for i := uint64(1); i <= uint64(n); i++ {
		c.peers[i] = freePort(t)
	}
	for id := range c.peers {
		c.start(id, false)
	}
	t.Cleanup(c.stopAll)
	return c
}

func (c *testCluster) config(id uint64, join bool) Config {
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	cfg := Config{ID: id, ClusterID: 7, Peers: c.peers, Join: join, Listen: c.peers[id],
		DataDir: filepath.Join(c.dir, fmt.Sprint(id)), Tick: 20 * time.Millisecond, KeepEntries: 10,
		Logger: log}
	if c.adjust != nil {
		c.adjust(&cfg)
	}
	return cfg
}

func (c *testCluster) start(id uint64, join bool) {
	c.t.Helper()
	n, err := Start(c.config(id, join))
	if err != nil {
		c.t.Fatalf("start node %d: %v", id, err)
	}
	app := &testApp{node: n, stopped: make(chan struct{})}
	go app.run()
	c.nodes[id], c.apps[id] = n, app
}

func (c *testCluster) stop(id uint64) {
	if n := c.nodes[id]; n != nil {
		n.Stop()
		<-c.apps[id].stopped
		delete(c.nodes, id)
	}
}

func (c *testCluster) stopAll() {
	for id := range c.nodes {
		c.stop(id)
	}
}

func (c *testCluster) leader() *Node {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, n := range c.nodes {
			if n.IsLeader() {
				return n
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.t.Fatal("no leader elected")
	return nil
}

// waitSame waits until every running node has applied through index and
// then checks that all hold the same sequence.
func (c *testCluster) waitSame(index uint64) []string {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var ref []string
		all := true
		for id := range c.nodes {
			applied, data := c.apps[id].state()
			if applied < index {
				all = false
				break
			}
			if ref == nil {
				ref = data
			} else if fmt.Sprint(ref) != fmt.Sprint(data) {
				c.t.Fatalf("node %d diverges: %d entries vs %d", id, len(data), len(ref))
			}
		}
		if all {
			return ref
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("nodes did not apply through %d in time", index)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func proposeMany(t *testing.T, n *Node, prefix string, count, workers int) uint64 {
	t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		last uint64
		errs []error
	)
	per := count / workers
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				idx, err := n.Propose(ctx, []byte(fmt.Sprintf("%s-%d-%d", prefix, w, i)))
				cancel()
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else if idx > last {
					last = idx
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d proposals failed, first: %v", len(errs), errs[0])
	}
	return last
}

func TestThreeNodesAgree(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	last := proposeMany(t, l, "a", 640, 32)
	seq := c.waitSame(last)
	if len(seq) != 640 {
		t.Fatalf("applied %d entries, want 640", len(seq))
	}
	seen := map[string]bool{}
	for _, s := range seq {
		if seen[s] {
			t.Fatalf("%q applied twice", s)
		}
		seen[s] = true
	}
	// A follower's proposals are forwarded to the leader.
	var follower *Node
	for _, n := range c.nodes {
		if !n.IsLeader() {
			follower = n
		}
	}
	last = proposeMany(t, follower, "b", 50, 5)
	if got := c.waitSame(last); len(got) != 690 {
		t.Fatalf("applied %d entries, want 690", len(got))
	}
}

func TestRestartKeepsCommittedPrefix(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	last := proposeMany(t, l, "a", 200, 8)
	c.waitSame(last)
	var victim uint64
	for id, n := range c.nodes {
		if !n.IsLeader() {
			victim = id
		}
	}
	c.stop(victim)
	last = proposeMany(t, l, "b", 200, 8)
	c.start(victim, false)
	seq := c.waitSame(last)
	if len(seq) != 400 {
		t.Fatalf("after restart: %d entries, want 400", len(seq))
	}
	// The whole cluster restarts from disk with the same log.
	c.stopAll()
	for id := range c.peers {
		c.start(id, false)
	}
	if got := c.waitSame(last); len(got) != 400 {
		t.Fatalf("after full restart: %d entries, want 400", len(got))
	}
}

func TestSnapshotCatchesUpLaggingFollower(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	var victim uint64
	for id, n := range c.nodes {
		if !n.IsLeader() {
			victim = id
		}
	}
	c.stop(victim)
	last := proposeMany(t, l, "a", 300, 10)
	// Every live node compacts: the follower's missing entries are gone.
	for id, n := range c.nodes {
		c.waitApplied(id, last)
		idx, data := c.apps[id].snapshot()
		if err := n.Compact(context.Background(), idx, data); err != nil {
			t.Fatal(err)
		}
	}
	c.start(victim, false)
	seq := c.waitSame(last)
	if len(seq) != 300 {
		t.Fatalf("lagging follower: %d entries, want 300", len(seq))
	}
	if c.apps[victim].snaps == 0 {
		t.Fatal("lagging follower caught up without a snapshot; compaction did not happen")
	}
	// Restarting a compacted node restores its own snapshot then the log.
	id := l.ID()
	c.stop(id)
	c.start(id, false)
	c.leader()
	last2 := proposeMany(t, c.leader(), "b", 20, 2)
	if got := c.waitSame(last2); len(got) != 320 {
		t.Fatalf("after restart from snapshot: %d entries, want 320", len(got))
	}
}

func (c *testCluster) waitApplied(id, index uint64) {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if applied, _ := c.apps[id].state(); applied >= index {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("node %d did not apply %d", id, index)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestMembershipAndLeadershipTransfer(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	proposeMany(t, l, "a", 100, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A fourth node joins as a learner, catches up, then votes.
	c.peers[4] = freePort(t)
	if err := l.AddLearner(ctx, 4, c.peers[4]); err != nil {
		t.Fatal(err)
	}
	c.start(4, true)
	last := proposeMany(t, l, "b", 50, 2)
	c.waitSame(last)
	if st := l.Status(); len(st.Learners) != 1 || st.Learners[0] != 4 {
		t.Fatalf("learners %v, want [4]", st.Learners)
	}
	if err := l.Promote(ctx, 4); err != nil {
		t.Fatal(err)
	}
	if st := l.Status(); len(st.Learners) != 0 || len(st.Members) != 4 {
		t.Fatalf("after promotion: learners %v members %v", st.Learners, st.Members)
	}

	// Leadership moves to the new voter, which then removes another node.
	if err := l.TransferLeadership(ctx, 4); err != nil {
		t.Fatal(err)
	}
	nl := c.nodes[4]
	if !nl.IsLeader() {
		t.Fatal("node 4 does not lead after the transfer")
	}
	var gone uint64
	for id := range c.nodes {
		if id != 4 && id != l.ID() {
			gone = id
		}
	}
	if err := nl.RemoveMember(ctx, gone); err != nil {
		t.Fatal(err)
	}
	c.stop(gone)
	last = proposeMany(t, nl, "c", 50, 2)
	if got := c.waitSame(last); len(got) != 200 {
		t.Fatalf("after membership changes: %d entries, want 200", len(got))
	}
}

func TestProposeWithoutQuorumFails(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	for id := range c.nodes {
		if id != l.ID() {
			c.stop(id)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := l.Propose(ctx, []byte("lonely")); err == nil {
		t.Fatal("a proposal committed without a quorum")
	}
}
