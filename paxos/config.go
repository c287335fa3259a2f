package paxos

import (
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"lockstep/paxos/transport"
)

// Config starts or restarts a node.
type Config struct {
	// ID is this node's raft id, never 0 and never reused for a new node.
	ID uint64
	// ClusterID keeps nodes of different clusters apart on the wire.
	ClusterID uint64
	// Peers maps every initial member's id to its peer address, this node
	// included. On a restart it only supplies addresses; membership comes
	// from the log.
	Peers map[uint64]string
	// Join starts a node that is not an initial member: it waits, empty,
	// for the leader (which added it with AddLearner) to send it the log.
	Join bool
	// Listen is where peers reach this node (default Peers[ID]).
	Listen string
	// DataDir holds the WAL and snapshot files.
	DataDir string

	Tick           time.Duration // raft tick (default 100ms)
	ElectionTicks  int           // default 10
	HeartbeatTicks int           // default 1
	// NoSync skips fsync: for tests and benchmarks that say so, never in
	// production.
	NoSync bool
	// MaxBatch bounds how many proposals one raft step carries.
	MaxBatch int
	// LazyDelay is the longest a ProposeAsyncLazy entry waits for an
	// eager proposal to ride with (default 2ms; negative: no wait).
	LazyDelay time.Duration
	// CommitDelay is how long the leader may hold a message that only
	// tells a follower of a new commit index (an append without entries),
	// waiting for the next append to that follower to carry the index
	// instead (default 2ms; negative: send at once). Followers then apply
	// a little later, and each round costs one message and one raft step
	// less per follower; the leader's own commits are not delayed.
	CommitDelay time.Duration
	// SegmentSize of WAL files.
	SegmentSize int64
	// KeepEntries are kept below a snapshot so that a slightly slow
	// follower catches up from the log rather than needing the snapshot.
	KeepEntries uint64

	// Transport defaults to TCP on Listen.
	Transport transport.Transport
	// Registerer receives the node's metrics (nil: not registered).
	Registerer prometheus.Registerer
	Logger     logrus.FieldLogger
}

func (c *Config) setDefaults() error {
	if c.ID == 0 {
		return errors.New("paxos: node id must not be 0")
	}
	if c.DataDir == "" {
		return errors.New("paxos: DataDir is required")
	}
	if c.Listen == "" {
		c.Listen = c.Peers[c.ID]
	}
	if c.Listen == "" && c.Transport == nil {
		return fmt.Errorf("paxos: node %d has no peer address (Listen or Peers[%d])", c.ID, c.ID)
	}
	if !c.Join {
		if _, ok := c.Peers[c.ID]; !ok {
			return fmt.Errorf("paxos: node %d is not among the initial peers; use Join to add a node", c.ID)
		}
	}
	if c.Tick == 0 {
		c.Tick = 100 * time.Millisecond
	}
	if c.ElectionTicks == 0 {
		c.ElectionTicks = 10
	}
	if c.HeartbeatTicks == 0 {
		c.HeartbeatTicks = 1
	}
	if c.ElectionTicks <= c.HeartbeatTicks {
		return fmt.Errorf("paxos: ElectionTicks (%d) must exceed HeartbeatTicks (%d)", c.ElectionTicks, c.HeartbeatTicks)
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = 4096
	}
	if c.LazyDelay == 0 {
		c.LazyDelay = 2 * time.Millisecond
	}
	if c.CommitDelay == 0 {
		c.CommitDelay = 2 * time.Millisecond
	}
	if c.KeepEntries == 0 {
		c.KeepEntries = 4096
	}
	if c.Logger == nil {
		c.Logger = logrus.StandardLogger()
	}
	c.Logger = c.Logger.WithField("node", c.ID)
	return nil
}
