// Package proxy is the part of lockstep between clients and the server:
// it agrees through the replicated log (paxos) on every socket-level event
// clients cause and feeds every replica's copy of the server the same
// events in the same order.
//
// # Events
//
// The log carries events (event.go; a compact, versioned binary codec,
// fuzzed by FuzzDecodeEvent), not requests:
//
//	connect(conn, term)        a client connected to the leader of term
//	data(conn, offset, bytes)  it sent bytes; offset = stream position
//	shutdown(conn, offset)     it half-closed (FIN) after offset bytes
//	close(conn, abort)         its connection is gone (abort: reset)
//	server_close(conn, abort)  the leader's server ended its output
//	epoch(leader, term, addr)  a new leader serves clients at addr
//	digest(replica, reports)   a replica's output digests
//	bubble(ticks, time)        joint_sched: the runtime's clock advances
//	                           (proposed by the leader, bubble.go)
//
// Who proposes what: the leader proposes connect, data, shutdown, close
// and server_close for the clients it serves, and an epoch when it starts
// leading; every replica proposes digest batches (a backup's proposals are
// forwarded to the leader by raft). Connection ids are chosen by the
// leader (its id, its term, a counter).
//
// # The replicated state machine
//
// Every replica applies the committed events in log order (Replica's
// apply loop) and keeps the same state: the open connections, the stream
// offset of each, the current epoch and the digest comparisons. What it
// decides depends only on the log, so every replica decides alike:
//
//   - An epoch of a newer term aborts every open connection: a leader
//     carries only the connections it originated, and those of an old
//     leader were reset at their clients anyway.
//   - A connect counts only if its term is the current epoch's (a deposed
//     leader's late proposals are dropped).
//   - A data or shutdown whose offset is not the next expected one means a
//     proposal of that stream was lost: the connection is aborted.
//   - Events of unknown or closed connections are dropped.
//
// What must reach the server goes, stamped with its log index, to the
// replica's Feeder (feeder.go): the boundary between "committed" and
// "delivered". The TCPFeeder opens a real connection per client
// connection (non-blocking connects issued in log order, so the server
// accepts them in the log's order), writes the bytes, half-closes and
// closes as the client did; what would block goes to that connection's own
// queue and writer, so the apply loop never waits for a server socket and
// a slow server (or a slow backup) never holds up the leader. A feeder can
// be quiesced at a log index (Replica.Quiesce), for a checkpoint of the
// server at that index. In joint_sched the DMTFeeder (dmtfeeder.go) also
// tells the deterministic runtime, through its shared-memory channel,
// which input comes next.
//
// # Clients
//
// Every replica listens for clients (unmodified, plain TCP). The leader
// serves them: it proposes connect together with the client's first bytes
// (waiting up to ConnectWait for them, so that both commit in one round),
// then data as it reads, without waiting for earlier events to commit. A
// connection may have at most Window bytes read from the client and not
// yet written to the leader's own server, and all of them together at
// most MaxUncommitted bytes uncommitted: beyond, the proxy stops reading
// and TCP pushes back on the client. The leader's server sees an event
// only once it is committed; the leader relays its server's output to the
// client. A backup relays its clients' bytes to the leader's client
// listener (the address of the leader's epoch) and back. When leadership
// changes, the old leader resets the clients it served and the backups
// reset the connections they relayed to it; clients reconnect to any
// replica. cluster.max_connections bounds the clients of each replica
// (more are reset at once).
//
// # Output digests
//
// Every replica digests its server's output per connection (digest.go):
// the output is cut into lines, the config's output.mask rules are applied
// to each line (so a masked header never straddles two reads), and a
// running SHA-256 over the masked lines is checkpointed every 64 KiB or
// 256 lines and when the server ends its output. Checkpoints are proposed
// in batches as digest events; every replica compares them as they come
// out of the log (compare.go), so all find the same divergences at the
// same log index: a replica outside the majority for a checkpoint is
// logged (connection, log index, replica), counted in
// lockstep_proxy_divergences_total and listed by /status and `lockstep
// status`. A connection reset before the server finished has only a
// prefix of the checkpoints, which is never a divergence.
//
// # Restarts
//
// There are no checkpoints yet, so the log is never compacted. A replica
// that restarts starts its server from clean data (`lockstep replica`
// first kills a server its previous run left behind) and its apply loop
// replays the log from the start: the paxos node hands it every committed
// entry from index 1 (or from a snapshot, which Options.Restore must
// restore), each applied exactly once. Connections that were open when it
// stopped are closed by the next epoch like any other.
//
// # Admin
//
// Each replica serves /metrics (lockstep_proxy_* and the log's
// lockstep_log_*) and /status (JSON: role, term, commit, applied,
// connections, divergences) on its admin address.
package proxy
