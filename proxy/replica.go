package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"lockstep/configs"
	"lockstep/paxos"
)

// Options start a Replica.
type Options struct {
	// ID is this replica's id among Replicas.
	ID uint64
	// ClusterID keeps clusters apart on the wire.
	ClusterID uint64
	// Replicas are every member: id, peer (log) address, client listen
	// address, admin address. Listen and Admin may have port 0 (tests):
	// a leader announces its real client address in its Epoch event.
	Replicas []configs.Replica
	// DataDir holds the log (WAL and snapshots).
	DataDir string
	// Log tunes the replicated log (tick, election, fsync).
	Log configs.Log
	// MaxConnections bounds the client connections at this replica
	// (default 1024).
	MaxConnections int
	// Masks are the output mask rules (configs.Output.Mask, compiled).
	Masks []configs.Mask
	// StartServer starts this replica's copy of the server from clean data.
	StartServer StartServerFunc
	// NewFeeder builds the feeder toward the server (default: TCP).
	NewFeeder func(srv Server, out Output, log logrus.FieldLogger) Feeder

	// Window bounds the bytes of one client connection read but not yet
	// delivered to the leader's own server (default 4 MiB): backpressure
	// to the client.
	Window int
	// MaxUncommitted bounds the client bytes this leader has proposed and
	// not yet seen committed, over all connections (default 32 MiB).
	MaxUncommitted int64
	// ReadSize is the largest Data event (default 128 KiB).
	ReadSize int
	// ConnectWait is how long the leader waits for a new client's first
	// bytes before it proposes the Connect alone (default 300µs; negative:
	// never wait). Connect and the first bytes then commit in one round.
	ConnectWait time.Duration
	// LeaderWait is how long a new client waits for a leader before it is
	// refused (default 5s).
	LeaderWait time.Duration
	// DigestFlush is how often digest checkpoints are proposed (default 50ms).
	DigestFlush time.Duration
	// Linger is how long the leader keeps reading a client whose server
	// has ended its output (default 5s).
	Linger time.Duration
	// Restore is given a raft snapshot (a checkpoint of the server at its
	// index, from Compact) to restore before the log after it is applied.
	// Nil: a snapshot is fatal, as there are no checkpoints yet and the
	// log is never compacted.
	Restore func(paxos.Snapshot) error
	// Checkpoints turn on checkpoints and recovery (ckpt.go); the server
	// is then Checkpoints.Server, started when the log does not begin
	// with a snapshot (StartServer is not used).
	Checkpoints *CheckpointOptions
	// Join starts a replica that is not an initial member: it waits, empty,
	// until the leader adds it as a learner (POST /join on the leader's
	// admin), then catches up (from a checkpoint when the log is
	// compacted) and asks to be promoted.
	Join bool
	// KeepEntries are kept in the log below a compaction (default 4096).
	KeepEntries uint64

	// Registry receives the proxy's and the log's metrics and is served
	// at /metrics (default: a new registry).
	Registry *prometheus.Registry
	Logger   logrus.FieldLogger
}

func (o *Options) setDefaults() error {
	if o.ID == 0 {
		return errors.New("proxy: replica id must not be 0")
	}
	if o.Checkpoints != nil && o.StartServer == nil {
		srv := o.Checkpoints.Server
		o.StartServer = func(context.Context) (Server, error) { return srv, nil }
	}
	if o.StartServer == nil {
		return errors.New("proxy: StartServer is required")
	}
	if o.DataDir == "" {
		return errors.New("proxy: DataDir is required")
	}
	if _, ok := o.self(); !ok {
		return fmt.Errorf("proxy: replica %d is not among the replicas", o.ID)
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 1024
	}
	if o.Window <= 0 {
		o.Window = 4 << 20
	}
	if o.MaxUncommitted <= 0 {
		o.MaxUncommitted = 32 << 20
	}
	if o.ReadSize <= 0 {
		o.ReadSize = 128 << 10
	}
	if o.ConnectWait == 0 {
		o.ConnectWait = 300 * time.Microsecond
	}
	if o.LeaderWait <= 0 {
		o.LeaderWait = 5 * time.Second
	}
	if o.DigestFlush <= 0 {
		o.DigestFlush = 50 * time.Millisecond
	}
	if o.Linger <= 0 {
		o.Linger = 5 * time.Second
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	o.Logger = o.Logger.WithField("replica", o.ID)
	if o.NewFeeder == nil {
		o.NewFeeder = func(srv Server, out Output, log logrus.FieldLogger) Feeder {
			if ls, ok := srv.(*LXCServer); ok {
				ls.SetOutput(out)
				return ls
			}
			// A backup behind the log must not run a client's next
			// connection beside the one it ended first (OrderConnects).
			return NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: out, Logger: log, OrderConnects: true, BatchCloses: true})
		}
	}
	return nil
}

func (o *Options) self() (configs.Replica, bool) {
	for _, r := range o.Replicas {
		if r.ID == o.ID {
			return r, true
		}
	}
	return configs.Replica{}, false
}

// FromConfig fills Options from a config file's cluster, log and output
// sections for replica id; the caller adds StartServer and DataDir.
func FromConfig(cfg *configs.Config, id uint64) Options {
	return Options{
		ID: id, ClusterID: cfg.Cluster.ID, Replicas: cfg.Cluster.Replicas, Log: cfg.Log,
		MaxConnections: cfg.Cluster.MaxConnections, Masks: cfg.Output.Mask,
	}
}

// Replica is one member of a lockstep cluster: its share of the log, its
// copy of the server, the listener its clients connect to and its admin
// endpoint.
type Replica struct {
	o      Options
	log    logrus.FieldLogger
	m      *metrics
	node   *paxos.Node
	srv    Server
	feeder Feeder
	masks  []MaskRule
	ranges []ByteRange
	ck     *checkpointer
	// started: the server was started or restored (by the apply loop,
	// with checkpoints).
	started bool

	ln        net.Listener
	adminLn   net.Listener
	admin     *http.Server
	advertise string // client address announced in Epoch
	sem       chan struct{}

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	done     chan struct{}
	stopOnce sync.Once
	errMu    sync.Mutex
	err      error

	// Replicated state, owned by the apply loop; smu guards reads from
	// elsewhere.
	smu   sync.Mutex
	epoch Event // the last Epoch applied
	conns map[uint64]*connState
	cmp   *comparator
	swept uint64 // index of the last comparator sweep

	// Apply progress and the quiesce gate.
	pmu     sync.Mutex
	pcond   *sync.Cond
	applied uint64
	pauseAt uint64

	// Leadership, as seen by the watcher.
	lmu       sync.Mutex
	tenure    uint64 // the term this replica leads in, 0 if it does not
	serving   bool   // its Epoch for tenure has been applied here
	nextConn  uint32
	leader    uint64 // the known leader
	sessions  map[uint64]*session
	relays    map[*relay]struct{}
	servingCh chan struct{} // closed and replaced on leadership changes

	// Output side.
	dmu     sync.Mutex
	digests map[uint64]*digester

	// Digest reports waiting to be proposed.
	rmu     sync.Mutex
	reports []DigestReport

	readBufs sync.Pool // sessions' read buffers

	// Uncommitted client bytes proposed by this leader.
	umu         sync.Mutex
	ucond       *sync.Cond
	uncommitted int64
}

// sweepEvery is how many log indices apart stale digest comparisons are
// swept.
const sweepEvery = 4096

type connState struct {
	off      uint64 // next expected stream offset
	inClosed bool   // the client half-closed
}

// Start starts a replica: its server, then its log, its client listener
// and its admin endpoint. A replica restarting on its data directory
// replays the whole log (or from its snapshot) into a server started from
// clean data.
func Start(ctx context.Context, o Options) (_ *Replica, err error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	self, _ := o.self()
	r := &Replica{
		o: o, log: o.Logger, conns: map[uint64]*connState{}, cmp: newComparator(len(o.Replicas), joiners(o.Replicas)...),
		sem: make(chan struct{}, o.MaxConnections), sessions: map[uint64]*session{}, relays: map[*relay]struct{}{},
		digests: map[uint64]*digester{}, done: make(chan struct{}), servingCh: make(chan struct{}),
	}
	r.pcond = sync.NewCond(&r.pmu)
	r.readBufs.New = func() any { b := make([]byte, dataHeaderRoom+o.ReadSize); return &b }
	r.ucond = sync.NewCond(&r.umu)
	for _, mk := range o.Masks {
		if mk.Length > 0 {
			r.ranges = append(r.ranges, ByteRange{Off: uint64(mk.Offset), Len: uint64(mk.Length)})
			continue
		}
		if mk.Re == nil {
			return nil, fmt.Errorf("proxy: mask %q is not compiled", mk.Pattern)
		}
		r.masks = append(r.masks, NewMaskRule(mk.Re, []byte(mk.Replace)))
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			r.Stop()
		}
	}()

	// The client listener first, so that a port-0 address is known.
	if r.ln, err = listenClients(self.Listen); err != nil {
		return nil, fmt.Errorf("proxy: client listener: %w", err)
	}
	r.advertise = advertised(self.Listen, r.ln.Addr())
	admin := self.Admin
	if admin == "" {
		admin = "127.0.0.1:0"
	}
	if r.adminLn, err = net.Listen("tcp", admin); err != nil {
		return nil, fmt.Errorf("proxy: admin listener: %w", err)
	}
	r.m = newMetrics(o.Registry,
		func() float64 {
			if b, ok := r.feeder.(interface{ Backlog() int64 }); ok {
				return float64(b.Backlog())
			}
			return 0
		},
		func() float64 { r.umu.Lock(); defer r.umu.Unlock(); return float64(r.uncommitted) })

	if r.srv, err = o.StartServer(ctx); err != nil {
		return nil, fmt.Errorf("proxy: starting the server: %w", err)
	}
	r.feeder = o.NewFeeder(r.srv, r, r.log)
	if o.Checkpoints != nil {
		if r.ck, err = newCheckpointer(r, *o.Checkpoints); err != nil {
			return nil, err
		}
	}

	peers := map[uint64]string{}
	for _, rep := range o.Replicas {
		// Replicas that join later are not initial members.
		if !rep.Join || o.Join {
			peers[rep.ID] = rep.Peer
		}
	}
	r.node, err = paxos.Start(paxos.Config{
		ID: o.ID, ClusterID: o.ClusterID, Peers: peers, DataDir: o.DataDir, Join: o.Join,
		Tick: o.Log.Tick(), ElectionTicks: o.Log.ElectionTicks, HeartbeatTicks: o.Log.HeartbeatTicks,
		NoSync: o.Log.NoSync, Registerer: o.Registry, Logger: o.Logger, KeepEntries: o.KeepEntries,
	})
	if err != nil {
		return nil, err
	}

	r.admin = &http.Server{Handler: r.adminHandler(), ReadHeaderTimeout: 5 * time.Second}
	r.goFunc(func() { _ = r.admin.Serve(r.adminLn) })
	r.goFunc(r.applyLoop)
	r.goFunc(r.watchLeadership)
	r.goFunc(r.acceptLoop)
	r.goFunc(r.flushDigests)
	if o.Join {
		r.goFunc(r.promoteWhenCaughtUp)
	}
	r.goFunc(func() {
		select {
		case <-r.srv.Exited():
			r.fail(errors.New("proxy: the server exited"))
		case <-r.node.Done():
			if err := r.node.Err(); err != nil {
				r.fail(err)
			}
		case <-r.ctx.Done():
		}
	})
	r.log.Infof("proxy: replica started: clients at %s, admin at %s, server at %s", r.advertise, r.adminLn.Addr(), r.srv.Addr())
	return r, nil
}

// advertised is the address peers should use for a listener: the
// configured one unless its port was 0 or its host unspecified.
func advertised(configured string, actual net.Addr) string {
	host, port, err := net.SplitHostPort(configured)
	_, aport, _ := net.SplitHostPort(actual.String())
	if err != nil || port == "0" || port == "" {
		port = aport
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

func (r *Replica) goFunc(f func()) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f()
	}()
}

// fail stops the replica on a fatal error (the server died, the log
// stopped): better gone, so that another replica leads, than serving
// wrongly.
func (r *Replica) fail(err error) {
	r.errMu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.errMu.Unlock()
	r.log.WithError(err).Error("proxy: replica stopping")
	go r.Stop()
}

// Done is closed once the replica has stopped; Err tells why.
func (r *Replica) Done() <-chan struct{} { return r.done }

// Err is the fatal error that stopped the replica, nil after Stop.
func (r *Replica) Err() error {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	return r.err
}

// Stop stops the replica abruptly as far as clients are concerned: their
// connections are reset; the log is closed cleanly and the server stopped.
func (r *Replica) Stop() {
	r.stopOnce.Do(r.shutdown)
	<-r.done
}

func (r *Replica) shutdown() {
	r.cancel()
	if r.ln != nil {
		r.ln.Close()
	}
	r.lmu.Lock()
	r.tenure, r.serving = 0, false
	r.lmu.Unlock()
	r.resetClients(0, "stopping")
	if r.node != nil {
		r.node.Stop()
	}
	r.ucond.Broadcast()
	r.pmu.Lock()
	r.pauseAt = 0
	r.pcond.Broadcast()
	r.pmu.Unlock()
	if r.admin != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = r.admin.Shutdown(ctx)
		cancel()
	} else if r.adminLn != nil {
		r.adminLn.Close()
	}
	if r.feeder != nil {
		r.feeder.Close()
	}
	r.wg.Wait()
	if r.srv != nil {
		_ = r.srv.Stop()
	}
	close(r.done)
}

// Node is the replica's log node.
func (r *Replica) Node() *paxos.Node { return r.node }

// ClientAddr is where clients connect.
func (r *Replica) ClientAddr() string { return r.advertise }

// AdminAddr is where /metrics and /status are served.
func (r *Replica) AdminAddr() string { return r.adminLn.Addr().String() }

// Server is the replica's copy of the server.
func (r *Replica) Server() Server { return r.srv }

// Registry holds the replica's metrics.
func (r *Replica) Registry() *prometheus.Registry { return r.o.Registry }

// ---------------------------------------------------------------------
// Applying the log.

func (r *Replica) applyLoop() {
	for ap := range r.node.Applies() {
		if r.ck != nil && !r.started && ap.Snapshot == nil {
			// The log starts at its beginning: a fresh server.
			if err := r.ck.o.Server.Start(r.ctx); err != nil {
				r.fail(fmt.Errorf("proxy: starting the server: %w", err))
				return
			}
		}
		r.started = true
		if ap.Snapshot != nil {
			if err := r.restore(*ap.Snapshot); err != nil {
				r.fail(err)
				return
			}
		}
		for _, e := range ap.Entries {
			r.pmu.Lock()
			for r.pauseAt != 0 && e.Index > r.pauseAt && r.ctx.Err() == nil {
				r.pcond.Wait()
			}
			applied := r.applied
			r.pmu.Unlock()
			if r.ctx.Err() != nil {
				return
			}
			if e.Index <= applied {
				continue // never twice
			}
			r.applyEntry(e.Index, e.Data)
			r.pmu.Lock()
			r.applied = e.Index
			r.pcond.Broadcast()
			r.pmu.Unlock()
			if r.ck != nil {
				r.ck.afterApply(e.Index)
			}
		}
		if b, ok := r.feeder.(interface{ EndBatch() }); ok {
			b.EndBatch()
		}
		r.pmu.Lock()
		applied := r.applied
		r.pmu.Unlock()
		r.node.SetApplied(applied)
		r.m.appliedIndex.Set(float64(applied))
	}
}

func (r *Replica) restore(s paxos.Snapshot) error {
	if r.ck != nil {
		// The checkpoint restored may be newer than the snapshot (when the
		// snapshot's is gone): the entries up to it are then skipped.
		index, err := r.ck.restore(s)
		if err != nil {
			return fmt.Errorf("proxy: restoring the snapshot at %d: %w", s.Index, err)
		}
		r.pmu.Lock()
		r.applied = index
		r.pmu.Unlock()
		return nil
	}
	if r.o.Restore == nil {
		return fmt.Errorf("proxy: the log starts with a snapshot at %d, but this replica cannot restore checkpoints", s.Index)
	}
	if err := r.o.Restore(s); err != nil {
		return fmt.Errorf("proxy: restoring the snapshot at %d: %w", s.Index, err)
	}
	r.pmu.Lock()
	r.applied = s.Index
	r.pmu.Unlock()
	return nil
}

// applyEntry is the replicated state machine: what it feeds, divergences
// it finds and its state depend only on the log.
func (r *Replica) applyEntry(index uint64, data []byte) {
	ev, err := DecodeEvent(data)
	if err != nil {
		r.m.malformed.Inc()
		r.log.WithError(err).Warnf("proxy: skipping entry %d", index)
		return
	}
	feed := func(e Event) { r.feeder.Feed(Committed{Index: index, Event: e}) }
	ignore := func() { r.m.ignored.WithLabelValues(ev.Type.String()).Inc() }
	r.m.applied.WithLabelValues(ev.Type.String()).Inc()

	r.smu.Lock()
	defer r.smu.Unlock()
	if index >= r.swept+sweepEvery {
		// Give up comparisons that will not complete (every replica sees
		// the same indices, so they all sweep at the same one).
		r.swept = index
		for _, d := range r.cmp.sweep(index) {
			r.divergence(d)
		}
	}
	switch ev.Type {
	case Epoch:
		if ev.Term <= r.epoch.Term {
			ignore()
			return
		}
		ids := make([]uint64, 0, len(r.conns))
		for id := range r.conns {
			ids = append(ids, id)
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
		for _, id := range ids {
			feed(Event{Type: Close, Conn: id, Abort: true})
			delete(r.conns, id)
		}
		r.epoch = ev
		r.log.Infof("proxy: epoch of leader %d term %d at index %d (%d connections of the previous epoch reset)", ev.Leader, ev.Term, index, len(ids))
		serving := false
		if ev.Leader == r.o.ID {
			r.lmu.Lock()
			if r.tenure == ev.Term {
				r.serving = true
				close(r.servingCh)
				r.servingCh = make(chan struct{})
				serving = true
			}
			r.lmu.Unlock()
		}
		// A replica serving from here on is not behind the log: its
		// feeder need not wait on ended connections. Any other (a backup,
		// or a replay of this replica's own past terms) must.
		r.setFeederOrdering(!serving)
	case Connect:
		if ev.Term != r.epoch.Term || r.conns[ev.Conn] != nil {
			ignore()
			return
		}
		r.conns[ev.Conn] = &connState{}
		feed(ev)
	case Data, Shutdown:
		st := r.conns[ev.Conn]
		if st == nil || st.inClosed {
			ignore()
			return
		}
		if ev.Off != st.off {
			// An event of this stream was lost (a failed proposal): the
			// stream cannot be delivered whole, so every replica resets it.
			r.m.gaps.Inc()
			r.log.Warnf("proxy: connection %x: %s at offset %d, expected %d: reset at index %d", ev.Conn, ev.Type, ev.Off, st.off, index)
			feed(Event{Type: Close, Conn: ev.Conn, Abort: true})
			delete(r.conns, ev.Conn)
			return
		}
		if ev.Type == Data {
			st.off += uint64(len(ev.Data))
			r.m.bytesApplied.Add(float64(len(ev.Data)))
		} else {
			st.inClosed = true
		}
		feed(ev)
	case Close, ServerClose:
		if r.conns[ev.Conn] == nil {
			ignore()
			return
		}
		delete(r.conns, ev.Conn)
		feed(ev)
	case Digest:
		before := r.cmp.compared
		defer func() { r.m.compared.Add(float64(r.cmp.compared - before)) }()
		for _, rep := range ev.Reports {
			for _, d := range r.cmp.report(index, ev.Replica, rep) {
				r.divergence(d)
			}
		}
	case Bubble:
		feed(ev)
	case Checkpoint:
		if r.ck != nil {
			r.ck.announced(ev)
		}
	}
	r.m.connsOpen.Set(float64(len(r.conns)))
}

func (r *Replica) divergence(d Divergence) {
	r.m.divergences.WithLabelValues(strconv.FormatUint(d.Replica, 10)).Inc()
	r.log.WithFields(logrus.Fields{
		"conn": fmt.Sprintf("%x", d.Conn), "index": d.Index, "diverging_replica": d.Replica,
		"checkpoint": d.Seq, "agree": d.Agree, "len": d.Len, "agree_len": d.AgreeLen,
	}).Warn("proxy: output divergence")
	if r.ck != nil {
		r.ck.divergence(d)
	}
}

// Quiesce stops applying the log after index and returns once everything
// up to index has reached the server, so that a checkpoint of the server
// taken now is the state at index. resume lets the replica go on. index
// must not be below what is already applied.
func (r *Replica) Quiesce(ctx context.Context, index uint64) (resume func(), err error) {
	r.pmu.Lock()
	if r.applied > index {
		applied := r.applied
		r.pmu.Unlock()
		return nil, fmt.Errorf("proxy: cannot quiesce at %d: already applied %d", index, applied)
	}
	r.pauseAt = index
	r.pmu.Unlock()
	resume = func() {
		r.pmu.Lock()
		r.pauseAt = 0
		r.pcond.Broadcast()
		r.pmu.Unlock()
	}
	stop := context.AfterFunc(ctx, func() {
		r.pmu.Lock()
		r.pcond.Broadcast()
		r.pmu.Unlock()
	})
	defer stop()
	r.pmu.Lock()
	for r.applied < index && ctx.Err() == nil && r.ctx.Err() == nil {
		r.pcond.Wait()
	}
	r.pmu.Unlock()
	if err := ctx.Err(); err != nil {
		resume()
		return nil, err
	}
	if err := r.feeder.Quiesce(ctx, index); err != nil {
		resume()
		return nil, err
	}
	return resume, nil
}

// Applied is the last log index applied.
func (r *Replica) Applied() uint64 {
	r.pmu.Lock()
	defer r.pmu.Unlock()
	return r.applied
}

// ---------------------------------------------------------------------
// Output of the local server (Output).

// ServerData implements Output: relay to the client when this replica
// leads the connection, then digest (the client need not wait for that).
func (r *Replica) ServerData(conn uint64, b []byte) {
	r.m.bytesOutput.Add(float64(len(b)))
	if s := r.session(conn); s != nil {
		s.output(b)
	}
	if r.ck == nil || !r.ck.skipDigest(conn) {
		r.digester(conn).Write(b)
	}
}

// ServerEOF implements Output: the client first, as in ServerData.
func (r *Replica) ServerEOF(conn uint64, err error) {
	if s := r.session(conn); s != nil {
		s.serverEOF(err)
	}
	r.dmu.Lock()
	d := r.digests[conn]
	delete(r.digests, conn)
	r.dmu.Unlock()
	if err == nil && (r.ck == nil || !r.ck.skipDigest(conn)) {
		if d == nil {
			d = newDigester(conn, r.masks, r.ranges, r.addReport)
		}
		d.EOF()
	}
}

// Delivered implements Output.
func (r *Replica) Delivered(conn uint64, n int) {
	if s := r.session(conn); s != nil {
		s.delivered(n)
	}
}

func (r *Replica) digester(conn uint64) *digester {
	r.dmu.Lock()
	defer r.dmu.Unlock()
	d := r.digests[conn]
	if d == nil {
		d = newDigester(conn, r.masks, r.ranges, r.addReport)
		r.digests[conn] = d
	}
	return d
}

func (r *Replica) addReport(rep DigestReport) {
	r.m.digestReports.Inc()
	r.rmu.Lock()
	if len(r.reports) >= 1<<16 {
		r.m.digestDropped.Inc()
	} else {
		r.reports = append(r.reports, rep)
	}
	r.rmu.Unlock()
}

// flushDigests proposes the pending digest checkpoints in batches.
func (r *Replica) flushDigests() {
	t := time.NewTicker(r.o.DigestFlush)
	defer t.Stop()
	const maxBatch = 512
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		r.rmu.Lock()
		reps := r.reports
		r.reports = nil
		r.rmu.Unlock()
		for len(reps) > 0 {
			k := min(len(reps), maxBatch)
			batch := reps[:k]
			reps = reps[k:]
			if r.node.Leader() == 0 {
				r.m.digestDropped.Add(float64(len(batch)))
				continue
			}
			ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
			// Lazy: digests ride with client traffic when there is some.
			ch := r.node.ProposeAsyncLazy(ctx, EncodeEvent(Event{Type: Digest, Replica: r.o.ID, Reports: batch}))
			r.m.proposed.WithLabelValues(Digest.String()).Inc()
			n := len(batch)
			go func() {
				defer cancel()
				if res := <-ch; res.Err != nil {
					r.m.proposeFailed.WithLabelValues(Digest.String()).Inc()
					r.m.digestDropped.Add(float64(n))
				}
			}()
		}
	}
}

// ---------------------------------------------------------------------
// Status.

// Status is what /status serves and `lockstep status` prints.
type Status struct {
	ID      uint64 `json:"id"`
	Role    string `json:"role"`
	Leader  uint64 `json:"leader"`
	Term    uint64 `json:"term"`
	Commit  uint64 `json:"commit"`
	Applied uint64 `json:"applied"`
	// Serving: this replica leads and serves clients itself.
	Serving bool `json:"serving"`
	// Connections open in the replicated state (fed to the server).
	Connections int `json:"connections"`
	// Clients connected to this replica (served or relayed).
	Clients     int    `json:"clients"`
	ClientAddr  string `json:"client_addr"`
	ServerAddr  string `json:"server_addr"`
	EpochLeader uint64 `json:"epoch_leader"`
	EpochTerm   uint64 `json:"epoch_term"`
	// DigestsCompared are output checkpoints every replica reported alike.
	DigestsCompared uint64 `json:"digests_compared"`
	// Divergences found in total; the most recent are listed.
	Divergences    uint64       `json:"divergences"`
	DivergenceList []Divergence `json:"divergence_list,omitempty"`
	Error          string       `json:"error,omitempty"`
}

// joiners are the replicas configured to join later.
func joiners(reps []configs.Replica) []uint64 {
	var ids []uint64
	for _, r := range reps {
		if r.Join {
			ids = append(ids, r.ID)
		}
	}
	return ids
}

// Status is a snapshot of the replica's state.
func (r *Replica) Status() Status {
	ns := r.node.Status()
	s := Status{ID: r.o.ID, Role: ns.Role, Leader: ns.Leader, Term: ns.Term, Commit: ns.Commit,
		Applied: r.Applied(), ClientAddr: r.advertise, ServerAddr: r.srv.Addr()}
	r.lmu.Lock()
	s.Serving = r.serving && r.tenure == ns.Term
	r.lmu.Unlock()
	s.Clients = len(r.sem)
	r.smu.Lock()
	s.Connections = len(r.conns)
	s.EpochLeader, s.EpochTerm = r.epoch.Leader, r.epoch.Term
	s.DigestsCompared = r.cmp.compared
	s.Divergences = r.cmp.total
	s.DivergenceList = append([]Divergence(nil), r.cmp.recent...)
	r.smu.Unlock()
	if err := r.Err(); err != nil {
		s.Error = err.Error()
	}
	return s
}

// setFeederOrdering switches the feeder's OrderConnects, if it has one:
// on while this replica follows the log (a backup, a replay), off while
// it leads.
func (r *Replica) setFeederOrdering(on bool) {
	if f, ok := r.feeder.(interface{ SetOrderConnects(bool) }); ok {
		f.SetOrderConnects(on)
	}
}
