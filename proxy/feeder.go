package proxy

import (
	"context"
	"errors"
)

// Committed is one event of a replica's ordered input stream: an event the
// log committed at Index and that the replica's state machine decided must
// reach the server (events for unknown or stale connections never do).
// Indices increase strictly along the stream; they are not contiguous.
type Committed struct {
	Index uint64
	Event
}

// Feeder delivers a replica's committed events, in log order, to its copy
// of the server. It is the boundary between "committed" and "delivered":
// the TCP feeder opens real connections to the server; the DMTFeeder
// (joint_sched) also tells the deterministic runtime which input comes
// next.
//
// The events a feeder receives are Connect, Data, Shutdown, Close (Abort:
// reset the server's connection; else close it once the server has ended
// its output or a grace period has passed), ServerClose (treated as a
// graceful or aborting Close) and Bubble.
type Feeder interface {
	// Feed hands over the next event. It never waits for a server socket;
	// it may wait for memory when the feeder holds more than its budget of
	// undelivered bytes.
	Feed(c Committed)
	// Quiesce returns once every event fed so far, which the caller
	// guarantees goes no further than index, has reached the server (a
	// checkpoint of the server's side is then consistent with the log at
	// index). It fails if events beyond index were fed.
	Quiesce(ctx context.Context, index uint64) error
	// Close aborts every connection and stops the feeder.
	Close() error
}

// Output receives what the server does with the connections a feeder
// opened. For each connection the calls come from one goroutine, in order,
// and ServerEOF is the last; calls for different connections are
// concurrent.
type Output interface {
	// ServerData is output of the server; b is valid only during the call.
	// Blocking here slows that connection's server output only.
	ServerData(conn uint64, b []byte)
	// ServerEOF: the server ended its output (err nil), reset the
	// connection, could not be reached, or the feeder closed the
	// connection itself (ErrAborted).
	ServerEOF(conn uint64, err error)
	// Delivered: n more bytes of the client's stream reached the server.
	Delivered(conn uint64, n int)
}

// ErrAborted is the ServerEOF error of a connection the feeder closed
// before the server ended its output.
var ErrAborted = errors.New("proxy: connection closed by the feeder")
