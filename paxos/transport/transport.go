// Package transport carries raft messages between replicas.
//
// The node loop depends only on the Transport interface, so that a
// transport other than TCP (RDMA through libfabric) can be added without
// touching the rest of paxos/.
package transport

import (
	"context"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// Raft is what a transport delivers to: the local node.
type Raft interface {
	// Process steps one message received from a peer into the local node.
	// Messages from one peer are delivered in order, from one goroutine
	// per peer; ctx is cancelled when the transport closes.
	Process(ctx context.Context, m raftpb.Message) error
	// ReportUnreachable tells raft that a peer could not be reached, so
	// that it stops pipelining to it until it answers again. The TCP
	// transport calls it and ReportSnapshot from its own goroutine, never
	// from inside Send.
	ReportUnreachable(id uint64)
	// ReportSnapshot tells raft whether a snapshot sent to a peer arrived.
	ReportSnapshot(id uint64, status raft.SnapshotStatus)
}

// Transport sends raft messages to peers and receives theirs.
//
// Send never blocks the caller on the network: each peer has a bounded
// queue, and a message that does not fit is dropped and the peer reported
// unreachable (raft retransmits).
type Transport interface {
	// Start begins accepting peers' streams and delivering to r.
	Start(r Raft) error
	// Send queues messages for their recipients (m.To).
	Send(msgs []raftpb.Message)
	// AddPeer makes a peer known, or updates its address.
	AddPeer(id uint64, addr string)
	// RemovePeer forgets a peer and closes its stream.
	RemovePeer(id uint64)
	// Addr is the address the transport listens on.
	Addr() string
	// Close stops all streams and the listener.
	Close() error
}
