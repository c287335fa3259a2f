package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// fakeRaft records what a transport delivers and reports.
type fakeRaft struct {
	mu          sync.Mutex
	got         map[uint64][]raftpb.Message // by sender
	n           atomic.Int64
	unreachable map[uint64]int
	snaps       []snapReport
	// block, if set, is called by Process and may stall it.
	block atomic.Pointer[func(m raftpb.Message)]
	// countOnly: count messages without keeping them (benchmarks).
	countOnly atomic.Bool
}

func newFakeRaft() *fakeRaft {
	return &fakeRaft{got: map[uint64][]raftpb.Message{}, unreachable: map[uint64]int{}}
}

func (f *fakeRaft) Process(ctx context.Context, m raftpb.Message) error {
	if block := f.block.Load(); block != nil {
		(*block)(m)
	}
	if f.countOnly.Load() {
		f.n.Add(1)
		return nil
	}
	f.mu.Lock()
	f.got[m.From] = append(f.got[m.From], m)
	f.mu.Unlock()
	f.n.Add(1)
	return nil
}

func (f *fakeRaft) ReportUnreachable(id uint64) {
	f.mu.Lock()
	f.unreachable[id]++
	f.mu.Unlock()
}

func (f *fakeRaft) ReportSnapshot(id uint64, status raft.SnapshotStatus) {
	f.mu.Lock()
	f.snaps = append(f.snaps, snapReport{id, status})
	f.mu.Unlock()
}

func (f *fakeRaft) from(id uint64) []raftpb.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]raftpb.Message(nil), f.got[id]...)
}

func (f *fakeRaft) unreachableCount(id uint64) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.unreachable[id]
}

func (f *fakeRaft) snapReports() []snapReport {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]snapReport(nil), f.snaps...)
}

type node struct {
	*TCP
	raft *fakeRaft
	reg  *prometheus.Registry
	logs *logtest.Hook
}

func startNode(t testing.TB, id uint64, listen string, peers map[uint64]string, tweak func(*TCPOptions)) *node {
	t.Helper()
	logger, hook := logtest.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)
	reg := prometheus.NewRegistry()
	opts := TCPOptions{
		ID: id, ClusterID: 0xc1, Listen: listen, Peers: peers, Logger: logger, Registerer: reg,
		MaxBackoff: 100 * time.Millisecond,
	}
	if tweak != nil {
		tweak(&opts)
	}
	tr, err := NewTCP(opts)
	if err != nil {
		t.Fatal(err)
	}
	r := newFakeRaft()
	if err := tr.Start(r); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return &node{TCP: tr, raft: r, reg: reg, logs: hook}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitConnected(t testing.TB, n *node, peers ...uint64) {
	t.Helper()
	for _, p := range peers {
		waitFor(t, fmt.Sprintf("%x connected to %x", n.id, p), func() bool { return n.PeerConnected(p) })
	}
}

// metric returns the value of the counter or gauge name with the given
// label values (in label-name order), or 0.
func metric(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i, lp := range m.GetLabel() {
				if i >= len(labels) || lp.GetValue() != labels[i] {
					continue next
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// sendSeq sends count MsgApps from -> to with Index start..start+count-1,
// in Send batches of 50.
func sendSeq(n *node, to uint64, start, count int) {
	batch := make([]raftpb.Message, 0, 50)
	for i := range count {
		batch = append(batch, testMsg(n.id, to, uint64(start+i), []byte("entry")))
		if len(batch) == cap(batch) || i == count-1 {
			n.Send(batch)
			batch = make([]raftpb.Message, 0, 50)
		}
	}
}

// checkSeq verifies that got holds exactly Index start..start+count-1 in
// order.
func checkSeq(t testing.TB, got []raftpb.Message, from, to uint64, start, count int) {
	t.Helper()
	if len(got) != count {
		t.Fatalf("%x -> %x: got %d messages, want %d", from, to, len(got), count)
	}
	for i, m := range got {
		if m.Index != uint64(start+i) || m.From != from || m.To != to {
			t.Fatalf("%x -> %x: message %d is %v (index %d), want index %d", from, to, i, m.Type, m.Index, start+i)
		}
	}
}

func bigQueue(o *TCPOptions) { o.QueueSize = 1 << 14 }

func TestTwoTransportsExchange(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, bigQueue)
	b := startNode(t, 2, "127.0.0.1:0", map[uint64]string{1: a.Addr()}, bigQueue)
	a.AddPeer(2, b.Addr())
	waitConnected(t, a, 2)
	waitConnected(t, b, 1)

	const count = 5000
	var wg sync.WaitGroup
	wg.Go(func() { sendSeq(a, 2, 0, count) })
	wg.Go(func() { sendSeq(b, 1, 0, count) })
	wg.Wait()
	waitFor(t, "delivery", func() bool { return a.raft.n.Load() == count && b.raft.n.Load() == count })
	checkSeq(t, b.raft.from(1), 1, 2, 0, count)
	checkSeq(t, a.raft.from(2), 2, 1, 0, count)

	if v := metric(t, a.reg, "lockstep_transport_messages_sent_total", "2"); v != count {
		t.Errorf("a sent metric = %v, want %d", v, count)
	}
	if v := metric(t, b.reg, "lockstep_transport_messages_received_total", "1"); v != count {
		t.Errorf("b received metric = %v, want %d", v, count)
	}
	sent := metric(t, a.reg, "lockstep_transport_bytes_sent_total", "2")
	if recv := metric(t, b.reg, "lockstep_transport_bytes_received_total", "1"); sent == 0 || sent != recv {
		t.Errorf("bytes sent %v, received %v", sent, recv)
	}
	if v := metric(t, a.reg, "lockstep_transport_peer_connected", "2"); v != 1 {
		t.Errorf("peer_connected = %v", v)
	}
	if n := a.raft.unreachableCount(2); n != 0 {
		t.Errorf("%d unreachable reports on a healthy link", n)
	}
}

// Messages larger than the socket takes at once, one Send call at a time
// (the caller writes directly while the stream is idle and leaves the rest
// to the writer) mixed with small ones: all arrive whole and in order.
func TestDirectWritesKeepOrder(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, bigQueue)
	b := startNode(t, 2, "127.0.0.1:0", nil, bigQueue)
	a.AddPeer(2, b.Addr())
	waitConnected(t, a, 2)

	big := bytes.Repeat([]byte("x"), 3<<20)
	const count = 150
	for i := range count {
		data := []byte("small")
		if i%7 == 3 {
			data = big
		}
		a.Send([]raftpb.Message{testMsg(1, 2, uint64(i), data)})
		if i%20 == 0 {
			time.Sleep(time.Millisecond) // let the stream go idle now and then
		}
	}
	waitFor(t, "delivery", func() bool { return b.raft.n.Load() == count })
	got := b.raft.from(1)
	checkSeq(t, got, 1, 2, 0, count)
	for i, m := range got {
		want := len("small")
		if i%7 == 3 {
			want = len(big)
		}
		if len(m.Entries) != 1 || len(m.Entries[0].Data) != want {
			t.Fatalf("message %d arrived with the wrong payload", i)
		}
	}
	if n := a.raft.unreachableCount(2); n != 0 {
		t.Errorf("%d unreachable reports", n)
	}
}

func TestThreeTransportsExchange(t *testing.T) {
	nodes := make([]*node, 3)
	for i := range nodes {
		nodes[i] = startNode(t, uint64(i+1), "127.0.0.1:0", nil, bigQueue)
	}
	for _, n := range nodes {
		for _, p := range nodes {
			n.AddPeer(p.id, p.Addr()) // self is ignored
		}
	}
	for _, n := range nodes {
		for _, p := range nodes {
			if p != n {
				waitConnected(t, n, p.id)
			}
		}
	}
	const count = 2000
	var wg sync.WaitGroup
	for _, n := range nodes {
		for _, p := range nodes {
			if p != n {
				wg.Go(func() { sendSeq(n, p.id, 100, count) })
			}
		}
	}
	wg.Wait()
	for _, n := range nodes {
		waitFor(t, "delivery", func() bool { return n.raft.n.Load() == 2*count })
		for _, p := range nodes {
			if p != n {
				checkSeq(t, n.raft.from(p.id), p.id, n.id, 100, count)
			}
		}
	}
}

// freeAddr returns a loopback address nothing listens on (for now).
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestPeerDownThenUp(t *testing.T) {
	addrB := freeAddr(t)
	a := startNode(t, 1, "127.0.0.1:0", map[uint64]string{2: addrB}, nil)

	// B is down: messages are dropped and B reported unreachable.
	sendSeq(a, 2, 0, 10)
	waitFor(t, "unreachable report", func() bool { return a.raft.unreachableCount(2) > 0 })
	if v := metric(t, a.reg, "lockstep_transport_messages_dropped_total", "2", dropDisconnected); v != 10 {
		t.Errorf("dropped{disconnected} = %v, want 10", v)
	}

	// B comes up on that address: A redials by itself.
	b := startNode(t, 2, addrB, map[uint64]string{1: a.Addr()}, nil)
	waitConnected(t, a, 2)
	sendSeq(a, 2, 10, 10)
	waitFor(t, "delivery to b", func() bool { return b.raft.n.Load() == 10 })
	checkSeq(t, b.raft.from(1), 1, 2, 10, 10)

	// B goes down again: A notices without sending (the read side sees EOF).
	b.Close()
	waitFor(t, "a to notice b is down", func() bool { return !a.PeerConnected(2) })
	before := a.raft.unreachableCount(2)
	sendSeq(a, 2, 20, 10)
	waitFor(t, "unreachable report", func() bool { return a.raft.unreachableCount(2) > before })

	// And up again, on the same address.
	b2 := startNode(t, 2, addrB, map[uint64]string{1: a.Addr()}, nil)
	waitConnected(t, a, 2)
	sendSeq(a, 2, 30, 10)
	waitFor(t, "delivery to b2", func() bool { return b2.raft.n.Load() == 10 })
	checkSeq(t, b2.raft.from(1), 1, 2, 30, 10)
}

// A peer that accepts but never reads must not block Send; the overflow is
// dropped and reported.
func TestFullQueueDoesNotBlockSend(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // hold it open, never read
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-acceptDone
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})

	a := startNode(t, 1, "127.0.0.1:0", map[uint64]string{2: ln.Addr().String()}, func(o *TCPOptions) {
		o.QueueSize = 64
		o.WriteTimeout = time.Minute // keep the stuck stream for the whole test
	})
	waitConnected(t, a, 2)

	data := make([]byte, 16<<10)
	batch := make([]raftpb.Message, 100)
	for i := range batch {
		batch[i] = testMsg(1, 2, uint64(i), data)
	}
	start := time.Now()
	for range 200 { // 20k messages, 320 MB: far more than socket buffers hold
		a.Send(batch)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Send blocked: 200 calls took %v", d)
	}
	waitFor(t, "unreachable report", func() bool { return a.raft.unreachableCount(2) > 0 })
	if v := metric(t, a.reg, "lockstep_transport_messages_dropped_total", "2", dropQueueFull); v == 0 {
		t.Error("no queue_full drops counted")
	}
	// Close must not hang on the writer stuck in Write.
	start = time.Now()
	a.Close()
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v", d)
	}
}

// rawDial opens a TCP connection to n and writes b.
func rawDial(t *testing.T, n *node, b []byte) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", n.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	return c
}

// waitClosedByPeer waits for the other side to close c.
func waitClosedByPeer(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: connection not closed by the transport", what)
	}
}

func hasLog(h *logtest.Hook, level logrus.Level, substr string) bool {
	for _, e := range h.AllEntries() {
		if e.Level == level && (strings.Contains(e.Message, substr) || strings.Contains(fmt.Sprint(e.Data[logrus.ErrorKey]), substr)) {
			return true
		}
	}
	return false
}

func TestGarbageInbound(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, func(o *TCPOptions) { o.HandshakeTimeout = time.Second })
	b := startNode(t, 2, "127.0.0.1:0", map[uint64]string{1: a.Addr()}, nil)
	a.AddPeer(2, b.Addr())
	waitConnected(t, b, 1)

	good := handshake{version: ProtocolVersion, clusterID: 0xc1, from: 7, to: 1}.appendTo(nil)
	junk := bytes.Repeat([]byte{0xff}, 4096) // never valid: not as magic, not as protobuf
	frameOf := func(m raftpb.Message) []byte { f, _ := AppendFrame(nil, &m); return f }
	cases := []struct {
		name, log string
		in        []byte
	}{
		{"random bytes", "bad handshake magic", junk},
		{"bad version", "unsupported protocol version",
			handshake{version: 99, clusterID: 0xc1, from: 7, to: 1}.appendTo(nil)},
		{"wrong recipient", "meant for another node",
			handshake{version: ProtocolVersion, clusterID: 0xc1, from: 7, to: 9}.appendTo(nil)},
		{"oversize length", "frame too large", append(append([]byte{}, good...), 0xff, 0xff, 0xff, 0xff)},
		{"garbage frame", "decode message frame",
			append(binary.BigEndian.AppendUint32(append([]byte{}, good...), 64), junk[:64]...)},
		{"sender mismatch", "on the stream from", append(append([]byte{}, good...), frameOf(testMsg(2, 1, 5, nil))...)},
		{"handshake timeout", "read handshake", good[:10]},
	}
	for _, tc := range cases {
		c := rawDial(t, a, tc.in)
		waitClosedByPeer(t, c, tc.name)
		waitFor(t, tc.name+" log", func() bool { return hasLog(a.logs, logrus.ErrorLevel, tc.log) })
	}
	// A frame that claims 100 MiB and then stalls only costs what arrived.
	stall := rawDial(t, a, append(binary.BigEndian.AppendUint32(append([]byte{}, good...), 100<<20), junk[:100]...))

	// Real peers are unaffected.
	sendSeq(b, 1, 0, 100)
	waitFor(t, "delivery", func() bool { return len(a.raft.from(2)) == 100 })
	checkSeq(t, a.raft.from(2), 2, 1, 0, 100)
	if got := a.raft.from(7); len(got) != 0 {
		t.Errorf("delivered %d messages from garbage connections", len(got))
	}
	if v := metric(t, a.reg, "lockstep_transport_rejected_streams_total", rejectVersion); v != 1 {
		t.Errorf("rejected{bad_version} = %v", v)
	}
	stall.Close()
	waitFor(t, "stalled stream to end", func() bool { return hasLog(a.logs, logrus.InfoLevel, "closed by peer") })
}

func TestWrongClusterRefused(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, nil)
	b := startNode(t, 2, "127.0.0.1:0", map[uint64]string{1: a.Addr()}, func(o *TCPOptions) { o.ClusterID = 0xbad })
	waitFor(t, "rejection", func() bool {
		return metric(t, a.reg, "lockstep_transport_rejected_streams_total", rejectCluster) > 0
	})
	if !hasLog(a.logs, logrus.ErrorLevel, "cluster id mismatch") {
		t.Error("no error log for the wrong cluster")
	}
	for range 20 {
		sendSeq(b, 1, 0, 5)
		time.Sleep(10 * time.Millisecond)
	}
	waitFor(t, "unreachable report", func() bool { return b.raft.unreachableCount(1) > 0 })
	if n := a.raft.n.Load(); n != 0 {
		t.Fatalf("delivered %d messages from another cluster", n)
	}
}

func TestAddRemovePeer(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, nil)
	b := startNode(t, 2, "127.0.0.1:0", nil, nil)
	c := startNode(t, 3, "127.0.0.1:0", nil, nil)

	// Unknown peer: dropped and reported.
	sendSeq(a, 2, 0, 3)
	waitFor(t, "unreachable report", func() bool { return a.raft.unreachableCount(2) > 0 })
	if v := metric(t, a.reg, "lockstep_transport_messages_dropped_total", "2", dropUnknownPeer); v != 3 {
		t.Errorf("dropped{unknown_peer} = %v, want 3", v)
	}

	a.AddPeer(1, a.Addr()) // self: ignored
	a.AddPeer(2, b.Addr())
	a.AddPeer(2, b.Addr()) // same address: no-op
	waitConnected(t, a, 2)
	sendSeq(a, 2, 10, 5)
	waitFor(t, "delivery to b", func() bool { return b.raft.n.Load() == 5 })

	// Node 2 moves to a new address: the stream follows.
	b2 := startNode(t, 2, "127.0.0.1:0", nil, nil)
	a.AddPeer(2, b2.Addr())
	waitFor(t, "redial to new address", func() bool {
		sendSeq(a, 2, 100, 1)
		time.Sleep(10 * time.Millisecond)
		return b2.raft.n.Load() > 0
	})

	// A stream addressed to 2 arriving at node 3 is refused.
	a.AddPeer(2, c.Addr())
	waitFor(t, "wrong recipient refused", func() bool {
		return metric(t, c.reg, "lockstep_transport_rejected_streams_total", rejectRecipient) > 0
	})

	a.RemovePeer(2)
	if a.PeerConnected(2) {
		t.Error("removed peer still connected")
	}
	before := a.raft.unreachableCount(2)
	sendSeq(a, 2, 200, 3)
	waitFor(t, "unreachable after remove", func() bool { return a.raft.unreachableCount(2) > before })
	a.RemovePeer(2) // idempotent
	a.RemovePeer(42)
	if n := c.raft.n.Load(); n != 0 {
		t.Errorf("node 3 processed %d messages meant for 2", n)
	}
}

// A Process that stalls for one sender must not delay another's messages.
func TestSlowProcessIsolated(t *testing.T) {
	release := make(chan struct{})
	a := startNode(t, 1, "127.0.0.1:0", nil, nil)
	block := func(m raftpb.Message) {
		if m.From == 2 {
			<-release
		}
	}
	a.raft.block.Store(&block)
	b := startNode(t, 2, "127.0.0.1:0", map[uint64]string{1: a.Addr()}, nil)
	c := startNode(t, 3, "127.0.0.1:0", map[uint64]string{1: a.Addr()}, nil)
	waitConnected(t, b, 1)
	waitConnected(t, c, 1)
	sendSeq(b, 1, 0, 10)
	sendSeq(c, 1, 0, 10)
	waitFor(t, "delivery from c", func() bool { return len(a.raft.from(3)) == 10 })
	close(release)
	waitFor(t, "delivery from b", func() bool { return len(a.raft.from(2)) == 10 })
}

func TestSnapshotReports(t *testing.T) {
	a := startNode(t, 1, "127.0.0.1:0", nil, nil)
	b := startNode(t, 2, "127.0.0.1:0", nil, nil)
	a.AddPeer(2, b.Addr())
	waitConnected(t, a, 2)
	snap := raftpb.Message{Type: raftpb.MsgSnap, From: 1, To: 2, Term: 4, Snapshot: &raftpb.Snapshot{
		Data: make([]byte, 1<<20), Metadata: raftpb.SnapshotMetadata{Index: 99, Term: 4}}}
	a.Send([]raftpb.Message{snap})
	waitFor(t, "snapshot delivered", func() bool { return b.raft.n.Load() == 1 })
	waitFor(t, "finish report", func() bool { return len(a.raft.snapReports()) == 1 })
	if r := a.raft.snapReports()[0]; r != (snapReport{2, raft.SnapshotFinish}) {
		t.Fatalf("got %+v, want finish for 2", r)
	}
	snap.To = 9 // unknown
	a.Send([]raftpb.Message{snap})
	waitFor(t, "failure report", func() bool { return len(a.raft.snapReports()) == 2 })
	if r := a.raft.snapReports()[1]; r != (snapReport{9, raft.SnapshotFailure}) {
		t.Fatalf("got %+v, want failure for 9", r)
	}
	// Too large to frame: refused locally, reported failed.
	snap.To = 2
	snap.Snapshot = &raftpb.Snapshot{Data: make([]byte, MaxFrameSize+1)}
	a.Send([]raftpb.Message{snap})
	waitFor(t, "too-large failure report", func() bool { return len(a.raft.snapReports()) == 3 })
	if r := a.raft.snapReports()[2]; r != (snapReport{2, raft.SnapshotFailure}) {
		t.Fatalf("got %+v, want failure for 2", r)
	}
	if v := metric(t, a.reg, "lockstep_transport_messages_dropped_total", "2", dropTooLarge); v != 1 {
		t.Errorf("dropped{too_large} = %v", v)
	}
}

func TestCloseIdempotentNoLeaks(t *testing.T) {
	base := runtime.NumGoroutine()
	func() {
		nodes := make([]*node, 3)
		for i := range nodes {
			nodes[i] = startNode(t, uint64(i+1), "127.0.0.1:0", nil, nil)
		}
		for _, n := range nodes {
			for _, p := range nodes {
				n.AddPeer(p.id, p.Addr())
			}
		}
		for _, n := range nodes {
			for _, p := range nodes {
				if p != n {
					waitConnected(t, n, p.id)
					sendSeq(n, p.id, 0, 50)
				}
			}
		}
		nodes[0].RemovePeer(2)
		if busy := runtime.NumGoroutine(); busy < base+20 {
			t.Fatalf("only %d goroutines with 3 meshed transports (base %d): the leak check would be vacuous", busy, base)
		}
		var wg sync.WaitGroup
		for _, n := range nodes {
			for range 3 {
				wg.Go(func() {
					if err := n.Close(); err != nil {
						t.Errorf("close: %v", err)
					}
				})
			}
		}
		wg.Wait()
		for _, n := range nodes {
			if err := n.Close(); err != nil {
				t.Errorf("second close: %v", err)
			}
			if err := n.Start(n.raft); err == nil {
				t.Error("Start after Close succeeded")
			}
			n.Send([]raftpb.Message{testMsg(n.id, 2, 1, nil)}) // no-op, no panic
			n.AddPeer(9, "127.0.0.1:1")
			n.RemovePeer(9)
		}
	}()
	waitFor(t, "goroutines to settle", func() bool { return runtime.NumGoroutine() <= base })
}

func TestOptionsAndRegistration(t *testing.T) {
	if _, err := NewTCP(TCPOptions{Listen: "127.0.0.1:0"}); err == nil {
		t.Error("ID 0 accepted")
	}
	reg := prometheus.NewRegistry()
	a, err := NewTCP(TCPOptions{ID: 1, Listen: "127.0.0.1:0", Registerer: reg, Logger: logrus.New()})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := NewTCP(TCPOptions{ID: 2, Listen: "127.0.0.1:0", Registerer: reg}); err == nil {
		t.Error("second transport on one registry: no error")
	}
	if _, err := NewTCP(TCPOptions{ID: 2, Listen: a.Addr()}); err == nil {
		t.Error("listening on a used address: no error")
	}
	if err := a.Start(nil); err == nil {
		t.Error("Start(nil) succeeded")
	}
	if err := a.Start(newFakeRaft()); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(newFakeRaft()); err == nil {
		t.Error("second Start succeeded")
	}
}

// BenchmarkSend measures delivered throughput of 256-byte MsgApp frames
// between two transports on loopback.
func BenchmarkSend(b *testing.B) {
	const queue = 1 << 14
	opt := func(o *TCPOptions) { o.QueueSize = queue; o.Registerer = nil }
	rx := startNode(b, 2, "127.0.0.1:0", nil, opt)
	rx.raft.countOnly.Store(true)
	tx := startNode(b, 1, "127.0.0.1:0", map[uint64]string{2: rx.Addr()}, opt)
	waitConnected(b, tx, 2)

	m := testMsg(1, 2, 1, nil)
	for n := 200; m.Size() < 256; n++ {
		m.Entries[0].Data = make([]byte, n)
	}
	frame, _ := AppendFrame(nil, &m)
	b.SetBytes(int64(len(frame) - frameHeaderSize))
	batch := make([]raftpb.Message, 64)
	for i := range batch {
		batch[i] = m
	}
	b.ReportAllocs()
	b.ResetTimer()
	sent := 0
	for sent < b.N {
		// Stay within the queue so that nothing is dropped: the benchmark
		// measures the stream, not the drop path.
		for int64(sent)-rx.raft.n.Load() > queue/2 {
			time.Sleep(20 * time.Microsecond)
		}
		k := min(len(batch), b.N-sent)
		tx.Send(batch[:k])
		sent += k
	}
	for rx.raft.n.Load() < int64(b.N) {
		time.Sleep(20 * time.Microsecond)
	}
	b.StopTimer()
	if u := tx.raft.unreachableCount(2); u != 0 {
		b.Fatalf("%d drops", u)
	}
}
