package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"lockstep/checkpoint"
	"lockstep/container"
	"lockstep/paxos"
)

// CheckpointOptions turn on checkpoints and recovery (Options.Checkpoints).
//
// Every Every log entries one backup, chosen from the log (round robin by
// index over the voters other than the current epoch's leader), stops
// applying, lets its feeder deliver everything up to that index, detaches
// from the in-container feeder, dumps its container with CRIU (left
// running), reattaches and goes on. It stores the image with the
// replica's replicated state at that index and announces it through the
// log (a Checkpoint event). Every replica, on applying the announcement,
// fetches the checkpoint (unless it took it), then compacts its log at
// the checkpoint's index with a raft snapshot naming it and prunes old
// checkpoints: the log is compacted only below a checkpoint the replica
// holds itself. A replica given a raft snapshot (at a restart, when too
// far behind, when it joins) restores the checkpoint it names (from its
// own store, else from the announcer or any peer) and replays the log
// after it.
type CheckpointOptions struct {
	// Server is the replica's containerised server (also its feeder).
	Server *LXCServer
	// StoreDir keeps the checkpoints.
	StoreDir string
	// App names the server in manifests.
	App string
	// Every is the number of log entries between periodic checkpoints
	// (0: only on demand).
	Every uint64
	// Keep is how many checkpoints to keep (default 2).
	Keep int
	// AutoRebuild: a replica whose output diverges from the majority
	// stops with ErrRebuild (the caller restarts it with FromPeers).
	AutoRebuild bool
	// FromPeers: a snapshot's checkpoint is fetched from a peer even if
	// the replica's own store has it (a rebuild).
	FromPeers bool
}

// ErrRebuild stops a replica that must be rebuilt from a peer's
// checkpoint (asked for, or its output diverged with AutoRebuild).
var ErrRebuild = errors.New("proxy: replica to be rebuilt from a peer's checkpoint")

// CheckpointRef is what a raft snapshot's data holds: the checkpoint the
// log was compacted at, and where it was announced from.
type CheckpointRef struct {
	ID      string `json:"id"`
	Index   uint64 `json:"index"`
	SHA256  string `json:"sha256"`
	Replica uint64 `json:"replica"`
	URL     string `json:"url"`
}

// stateFile holds the replica's replicated state in a checkpoint.
const stateFile = "replica-state.json"

type savedConn struct {
	ID       uint64 `json:"id"`
	Off      uint64 `json:"off"`
	InClosed bool   `json:"in_closed,omitempty"`
}

type savedState struct {
	Index       uint64      `json:"index"`
	EpochLeader uint64      `json:"epoch_leader"`
	EpochTerm   uint64      `json:"epoch_term"`
	EpochAddr   string      `json:"epoch_addr"`
	Conns       []savedConn `json:"conns"`
	FeederIndex uint64      `json:"feeder_index"`
}

// CheckpointRecord is one checkpoint this replica took or restored, for
// /checkpoints/status and the benchmarks.
type CheckpointRecord struct {
	Op    string `json:"op"` // "dump" or "restore"
	ID    string `json:"id"`
	Index uint64 `json:"index"`
	// Pause is how long the server was frozen (dump); Detach and Attach
	// the feeder's disconnection around it.
	PauseMS  float64 `json:"pause_ms,omitempty"`
	DetachMS float64 `json:"detach_ms,omitempty"`
	AttachMS float64 `json:"attach_ms,omitempty"`
	// CRIU's split of the pause (dump): freezing the tree, the time
	// frozen, and within it collecting and writing memory pages.
	FreezingMS float64 `json:"freezing_ms,omitempty"`
	FrozenMS   float64 `json:"frozen_ms,omitempty"`
	MemDumpMS  float64 `json:"memdump_ms,omitempty"`
	MemWriteMS float64 `json:"memwrite_ms,omitempty"`
	// The data volume (dump): its snapshot, within the pause, and its
	// archiving, after it; (restore) the extraction before CRIU.
	SnapshotMS float64 `json:"snapshot_ms,omitempty"`
	ArchiveMS  float64 `json:"archive_ms,omitempty"`
	ExtractMS  float64 `json:"extract_ms,omitempty"`
	// ApplyStopMS is how long the replica stopped applying the log.
	ApplyStopMS float64 `json:"apply_stop_ms,omitempty"`
	ImageBytes  int64   `json:"image_bytes"`
	// Restore: fetch, CRIU restore and total.
	FetchMS   float64   `json:"fetch_ms,omitempty"`
	RestoreMS float64   `json:"restore_ms,omitempty"`
	TotalMS   float64   `json:"total_ms,omitempty"`
	Fetched   bool      `json:"fetched,omitempty"`
	At        time.Time `json:"at"`
}

// CheckpointStatus is served at /checkpoints/status.
type CheckpointStatus struct {
	Compacted uint64             `json:"compacted"`
	Latest    *CheckpointRef     `json:"latest,omitempty"`
	Stored    []uint64           `json:"stored"`
	Records   []CheckpointRecord `json:"records"`
	// RestoredAt is the index of the last restore and CaughtUpMS how long
	// after it the replica had applied the commit index it saw then.
	RestoredAt uint64  `json:"restored_at,omitempty"`
	CaughtUpMS float64 `json:"caught_up_ms,omitempty"`
	// CaughtUpTo is the index it had then applied (the replay rate is
	// (CaughtUpTo-RestoredAt)/CaughtUpMS).
	CaughtUpTo uint64 `json:"caught_up_to,omitempty"`
	// InitPid is the server container's init (for nsenter).
	InitPid int `json:"init_pid"`
}

type checkpointer struct {
	r     *Replica
	o     CheckpointOptions
	store *checkpoint.Store

	mu        sync.Mutex
	latest    *CheckpointRef
	compacted uint64
	// compactedID names the checkpoint of the log's snapshot.
	compactedID string
	// pastUpTo: the log up to here was committed before this incarnation
	// started applying it (at its start, or at its restore).
	pastUpTo  uint64
	records   []CheckpointRecord
	fetchMu   sync.Mutex // one fetch+compact at a time
	restored  map[uint64]bool
	prevIndex uint64
	catchup   struct {
		target uint64
		start  time.Time
		ms     float64
		at, to uint64
	}
	rebuildOnce sync.Once
	// takeMu: one checkpoint at a time (a periodic one in the apply loop,
	// one asked for through the admin).
	takeMu sync.Mutex
}

func newCheckpointer(r *Replica, o CheckpointOptions) (*checkpointer, error) {
	if o.Server == nil {
		return nil, errors.New("proxy: checkpoints need a containerised server (LXCServer)")
	}
	if o.Keep <= 0 {
		o.Keep = 2
	}
	st, err := checkpoint.OpenStore(o.StoreDir)
	if err != nil {
		return nil, err
	}
	_ = st.Clean(time.Minute)
	return &checkpointer{r: r, o: o, store: st, restored: map[uint64]bool{}}, nil
}

// url is where this replica serves its checkpoints.
func (c *checkpointer) url() string { return "http://" + c.r.AdminAddr() + "/checkpoints" }

// peerURLs are the other replicas' checkpoint stores.
func (c *checkpointer) peerURLs() []string {
	var urls []string
	for _, rep := range c.r.o.Replicas {
		if rep.ID == c.r.o.ID || rep.Admin == "" {
			continue
		}
		if _, port, err := splitPort(rep.Admin); err == nil && port != "0" {
			urls = append(urls, "http://"+rep.Admin+"/checkpoints")
		}
	}
	return urls
}

func splitPort(hostport string) (string, string, error) {
	i := strings.LastIndex(hostport, ":")
	if i < 0 {
		return "", "", errors.New("no port")
	}
	return hostport[:i], hostport[i+1:], nil
}

// afterApply runs in the apply loop after each entry: it takes the
// periodic checkpoint when this replica is the one chosen for index.
func (c *checkpointer) afterApply(index uint64) {
	prev := c.prevIndex
	c.prevIndex = index
	if prev == 0 {
		c.notePast(c.r.node.Status().Commit)
	}
	c.noteCatchUp(index)
	if c.o.Every == 0 || prev == 0 || index/c.o.Every == prev/c.o.Every {
		return
	}
	ns := c.r.node.Status()
	if ns.Commit > index+c.o.Every || ns.Role == "leader" {
		return // replaying far behind, or leading: not this one
	}
	c.r.smu.Lock()
	leader := c.r.epoch.Leader
	c.r.smu.Unlock()
	learner := map[uint64]bool{}
	for _, id := range ns.Learners {
		learner[id] = true
	}
	var cand []uint64
	for id := range ns.Members {
		if id != leader && !learner[id] {
			cand = append(cand, id)
		}
	}
	if len(cand) == 0 {
		return
	}
	sort.Slice(cand, func(i, j int) bool { return cand[i] < cand[j] })
	if cand[(index/c.o.Every)%uint64(len(cand))] != c.r.o.ID {
		return
	}
	ctx, cancel := context.WithTimeout(c.r.ctx, 2*time.Minute)
	defer cancel()
	if _, err := c.take(ctx, index); err != nil {
		c.r.log.WithError(err).Warnf("proxy: checkpoint at %d failed", index)
	}
}

// take checkpoints the server at index; the apply loop is stopped at
// index (the caller is the apply loop, or holds a Quiesce).
func (c *checkpointer) take(ctx context.Context, index uint64) (CheckpointRecord, error) {
	c.takeMu.Lock()
	defer c.takeMu.Unlock()
	t0 := time.Now()
	var rec CheckpointRecord
	if applied := c.r.Applied(); applied != index {
		return rec, fmt.Errorf("proxy: checkpoint at %d, but %d is applied", index, applied)
	}
	if err := c.r.feeder.Quiesce(ctx, index); err != nil {
		return rec, err
	}
	p, err := c.store.Create(index, c.o.App)
	if err != nil {
		return rec, err
	}
	st, err := c.o.Server.Checkpoint(ctx, filepath.Join(p.Dir(), "criu"))
	if err != nil {
		_ = p.Abort()
		return rec, err
	}
	if err := c.saveState(filepath.Join(p.Dir(), stateFile), index); err != nil {
		_ = p.Abort()
		return rec, err
	}
	p.SetMeta("replica", strconv.FormatUint(c.r.o.ID, 10))
	p.SetMeta("pause", st.Pause.String())
	ck, err := p.Commit()
	if err != nil {
		return rec, err
	}
	rec = CheckpointRecord{Op: "dump", ID: ck.ID, Index: index, PauseMS: ms(st.Pause), DetachMS: ms(st.Detach),
		AttachMS: ms(st.Attach), FreezingMS: ms(st.Freezing), FrozenMS: ms(st.Frozen), MemDumpMS: ms(st.MemDump),
		MemWriteMS: ms(st.MemWrite), SnapshotMS: ms(st.DataSnapshot), ArchiveMS: ms(st.DataArchive),
		ApplyStopMS: ms(time.Since(t0)), ImageBytes: ck.Size, At: time.Now()}
	c.record(rec)
	c.r.log.Infof("proxy: checkpoint %s at index %d: server paused %v, replica stopped %v, image %d KiB",
		ck.ID, index, st.Pause.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond), ck.Size>>10)
	ev := Event{Type: Checkpoint, Replica: c.r.o.ID, CkptIndex: index, CkptID: ck.ID, CkptDigest: ck.SHA256, Addr: c.url()}
	go func() {
		pctx, cancel := context.WithTimeout(c.r.ctx, 30*time.Second)
		defer cancel()
		if _, err := c.r.node.Propose(pctx, EncodeEvent(ev)); err != nil {
			c.r.log.WithError(err).Warnf("proxy: announcing checkpoint %s", ck.ID)
		}
	}()
	return rec, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (c *checkpointer) record(rec CheckpointRecord) {
	c.mu.Lock()
	c.records = append(c.records, rec)
	if len(c.records) > 100 {
		c.records = c.records[len(c.records)-100:]
	}
	c.mu.Unlock()
}

func (c *checkpointer) saveState(path string, index uint64) error {
	r := c.r
	r.smu.Lock()
	s := savedState{Index: index, EpochLeader: r.epoch.Leader, EpochTerm: r.epoch.Term, EpochAddr: r.epoch.Addr,
		FeederIndex: c.o.Server.FeederIndex()}
	for id, st := range r.conns {
		s.Conns = append(s.Conns, savedConn{ID: id, Off: st.off, InClosed: st.inClosed})
	}
	r.smu.Unlock()
	sort.Slice(s.Conns, func(i, j int) bool { return s.Conns[i].ID < s.Conns[j].ID })
	b, err := json.MarshalIndent(s, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// announced is called by the apply loop for a Checkpoint event.
func (c *checkpointer) announced(ev Event) {
	ref := CheckpointRef{ID: ev.CkptID, Index: ev.CkptIndex, SHA256: ev.CkptDigest, Replica: ev.Replica, URL: ev.Addr}
	c.mu.Lock()
	if c.latest != nil && c.latest.Index >= ref.Index || ref.Index <= c.compacted {
		c.mu.Unlock()
		return
	}
	c.latest = &ref
	c.mu.Unlock()
	c.r.goFunc(func() { c.fetchAndCompact(ref) })
}

func (c *checkpointer) fetchAndCompact(ref CheckpointRef) {
	c.fetchMu.Lock()
	defer c.fetchMu.Unlock()
	c.mu.Lock()
	newer := c.latest != nil && c.latest.Index > ref.Index || ref.Index <= c.compacted
	c.mu.Unlock()
	if newer {
		return
	}
	ctx, cancel := context.WithTimeout(c.r.ctx, 10*time.Minute)
	defer cancel()
	if _, err := c.store.Get(ref.ID); err != nil {
		if _, err := checkpoint.FetchDigest(ctx, ref.URL+"/"+ref.ID, c.store.Root(), ref.SHA256); err != nil {
			c.r.log.WithError(err).Warnf("proxy: cannot fetch checkpoint %s from %s: the log is not compacted", ref.ID, ref.URL)
			return
		}
	}
	data, _ := json.Marshal(ref)
	if err := c.r.node.Compact(ctx, ref.Index, data); err != nil {
		c.r.log.WithError(err).Warnf("proxy: compacting at %d", ref.Index)
		return
	}
	c.mu.Lock()
	keepID := c.compactedID
	if ref.Index > c.compacted {
		keepID = ref.ID
	}
	c.mu.Unlock()
	// Never the one the log is compacted at, whatever newer ones exist.
	// Pruned before the compaction is published so that /status never
	// shows the new compaction point beside more than Keep checkpoints.
	if _, err := c.store.PruneExcept(c.o.Keep, keepID); err != nil {
		c.r.log.WithError(err).Warn("proxy: pruning checkpoints")
	}
	c.mu.Lock()
	if ref.Index > c.compacted {
		c.compacted, c.compactedID = ref.Index, ref.ID
	}
	c.mu.Unlock()
	c.r.log.Infof("proxy: log compacted at index %d (checkpoint %s of replica %d)", ref.Index, ref.ID, ref.Replica)
}

// restore is the Restore of a raft snapshot: the checkpoint it names is
// restored and the replica's replicated state set to its index.
func (c *checkpointer) restore(s paxos.Snapshot) (uint64, error) {
	var ref CheckpointRef
	if err := json.Unmarshal(s.Data, &ref); err != nil {
		return 0, fmt.Errorf("proxy: snapshot data: %w", err)
	}
	if ref.Index != s.Index {
		return 0, fmt.Errorf("proxy: snapshot at %d names checkpoint %s at %d", s.Index, ref.ID, ref.Index)
	}
	t0 := time.Now()
	rec := CheckpointRecord{Op: "restore", ID: ref.ID, Index: ref.Index}
	ctx, cancel := context.WithTimeout(c.r.ctx, 10*time.Minute)
	defer cancel()
	ck, err := c.store.Get(ref.ID)
	if err != nil || c.o.FromPeers {
		urls := []string{}
		if ref.Replica != c.r.o.ID || !c.o.FromPeers {
			urls = append(urls, ref.URL)
		}
		urls = append(urls, c.peerURLs()...)
		var errs []error
		for _, u := range urls {
			if u == c.url() {
				continue
			}
			if ck, err = checkpoint.FetchDigest(ctx, u+"/"+ref.ID, c.store.Root(), ref.SHA256); err == nil {
				rec.Fetched = true
				break
			}
			errs = append(errs, fmt.Errorf("%s: %w", u, err))
		}
		if !rec.Fetched {
			// Gone everywhere (pruned): a newer checkpoint does as well,
			// as the entries up to it are then skipped.
			for _, u := range c.peerURLs() {
				nck, err := checkpoint.Fetch(ctx, u+"/newest", c.store.Root())
				if err == nil && nck.Index >= ref.Index {
					ck, rec.Fetched = nck, true
					ref = CheckpointRef{ID: nck.ID, Index: nck.Index, SHA256: nck.SHA256, URL: u}
					if rid, err := strconv.ParseUint(nck.Meta["replica"], 10, 64); err == nil {
						ref.Replica = rid
					}
					rec.ID, rec.Index = ref.ID, ref.Index
					break
				}
			}
		}
		if !rec.Fetched {
			return 0, fmt.Errorf("proxy: checkpoint %s at %d is neither here nor at any peer: %w", ref.ID, ref.Index, errors.Join(errs...))
		}
	}
	rec.FetchMS = ms(time.Since(t0))
	raw, err := os.ReadFile(filepath.Join(ck.Dir, stateFile))
	if err != nil {
		return 0, err
	}
	var st savedState
	if err := json.Unmarshal(raw, &st); err != nil {
		return 0, fmt.Errorf("proxy: %s: %w", stateFile, err)
	}
	t1 := time.Now()
	rs, err := c.o.Server.Restore(ctx, filepath.Join(ck.Dir, "criu"))
	if err != nil {
		return 0, err
	}
	rec.RestoreMS = ms(time.Since(t1))
	rec.ExtractMS = ms(rs.DataExtract)
	if fi := c.o.Server.FeederIndex(); fi > ref.Index {
		return 0, fmt.Errorf("proxy: the restored feeder was fed up to %d, beyond the checkpoint's %d", fi, ref.Index)
	}
	r := c.r
	r.smu.Lock()
	r.epoch = Event{Type: Epoch, Leader: st.EpochLeader, Term: st.EpochTerm, Addr: st.EpochAddr}
	r.conns = map[uint64]*connState{}
	c.mu.Lock()
	c.restored = map[uint64]bool{}
	for _, sc := range st.Conns {
		r.conns[sc.ID] = &connState{off: sc.Off, inClosed: sc.InClosed}
		c.restored[sc.ID] = true
	}
	if ref.Index > c.compacted {
		c.compacted, c.compactedID = ref.Index, ref.ID
	}
	if c.latest == nil || c.latest.Index < ref.Index {
		c.latest = &ref
	}
	c.catchup.target = r.node.Status().Commit
	if c.catchup.target > c.pastUpTo {
		c.pastUpTo = c.catchup.target
	}
	c.catchup.start = time.Now()
	c.catchup.at = ref.Index
	c.catchup.ms = 0
	c.mu.Unlock()
	r.smu.Unlock()
	r.dmu.Lock()
	r.digests = map[uint64]*digester{}
	r.dmu.Unlock()
	c.prevIndex = ref.Index
	rec.ImageBytes = ck.Size
	rec.TotalMS = ms(time.Since(t0))
	rec.At = time.Now()
	c.record(rec)
	r.log.Infof("proxy: restored checkpoint %s at index %d (fetched %v, criu %v, total %v); replaying the log after it",
		ref.ID, ref.Index, rec.Fetched, rs.Wall.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	return ref.Index, nil
}

// noteCatchUp records when a restored replica has applied the commit
// index it saw at its restore.
func (c *checkpointer) noteCatchUp(index uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.catchup.target != 0 && index >= c.catchup.target {
		c.catchup.ms = ms(time.Since(c.catchup.start))
		c.catchup.target, c.catchup.to = 0, index
		c.r.log.Infof("proxy: caught up with index %d %.0f ms after the restore", index, c.catchup.ms)
	}
}

// skipDigest: connections restored from a checkpoint were digested from
// their start elsewhere; this replica reports none of them.
func (c *checkpointer) skipDigest(conn uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.restored[conn]
}

func (c *checkpointer) status() CheckpointStatus {
	c.mu.Lock()
	s := CheckpointStatus{Compacted: c.compacted, Records: append([]CheckpointRecord(nil), c.records...),
		RestoredAt: c.catchup.at, CaughtUpMS: c.catchup.ms, CaughtUpTo: c.catchup.to, InitPid: c.o.Server.InitPid()}
	if c.latest != nil {
		l := *c.latest
		s.Latest = &l
	}
	c.mu.Unlock()
	if l, err := c.store.List(); err == nil {
		for _, ck := range l {
			s.Stored = append(s.Stored, ck.Index)
		}
	}
	return s
}

// notePast records that the log up to index was committed before this
// incarnation of the replica started applying it.
func (c *checkpointer) notePast(index uint64) {
	c.mu.Lock()
	if index > c.pastUpTo {
		c.pastUpTo = index
	}
	c.mu.Unlock()
}

func (c *checkpointer) divergence(d Divergence) {
	// A divergence the log revealed before this incarnation restored (or
	// started) is an earlier incarnation's: the log keeps that one's
	// digest reports and a replay compares them again. Rebuilding for it
	// would rebuild forever; what this incarnation's server answers is
	// judged by its own reports, committed later.
	c.mu.Lock()
	past := d.Index <= c.pastUpTo
	c.mu.Unlock()
	if past {
		return
	}
	if c.o.AutoRebuild && d.Replica == c.r.o.ID {
		c.rebuildOnce.Do(func() {
			c.r.log.Warnf("proxy: this replica's output diverged at index %d: rebuilding from a peer's checkpoint", d.Index)
			c.r.fail(ErrRebuild)
		})
	}
}

// CheckpointNow takes a checkpoint at the current applied index (the
// admin's POST /checkpoint). The leader refuses unless force.
func (r *Replica) CheckpointNow(ctx context.Context, force bool) (CheckpointRecord, error) {
	c := r.ck
	if c == nil {
		return CheckpointRecord{}, errors.New("proxy: checkpoints are off")
	}
	if r.node.IsLeader() && !force {
		return CheckpointRecord{}, errors.New("proxy: the leader does not checkpoint (its clients would wait)")
	}
	for try := 0; ; try++ {
		index := r.Applied()
		resume, err := r.Quiesce(ctx, index)
		if err != nil {
			if try < 20 && ctx.Err() == nil && strings.Contains(err.Error(), "already applied") {
				continue
			}
			return CheckpointRecord{}, err
		}
		rec, err := c.take(ctx, index)
		resume()
		return rec, err
	}
}

// checkpointAdmin adds the checkpoint endpoints to the admin mux.
func (r *Replica) checkpointAdmin(mux *http.ServeMux) {
	c := r.ck
	mux.Handle("/checkpoints/", http.StripPrefix("/checkpoints", c.store.Handler()))
	mux.HandleFunc("/checkpoints/status", func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.status())
	})
	mux.HandleFunc("/checkpoint", func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodPost {
			http.Error(w, "POST", http.StatusMethodNotAllowed)
			return
		}
		rec, err := r.CheckpointNow(req.Context(), req.URL.Query().Get("force") == "1")
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		_ = json.NewEncoder(w).Encode(rec)
	})
	mux.HandleFunc("/rebuild", func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodPost {
			http.Error(w, "POST", http.StatusMethodNotAllowed)
			return
		}
		_, _ = io.WriteString(w, "rebuilding\n")
		c.rebuildOnce.Do(func() { go r.fail(ErrRebuild) })
	})
}

// dumpContainer dumps the container of s, whose init is pid, into
// imagesDir and lets it run on. A container whose data directory is a
// data volume (container.Volume) has the volume synced first, then
// snapshotted while CRIU holds the container frozen, and the snapshot
// archived into imagesDir once it runs again: the pause does not grow
// with the data. Otherwise CRIU archives the data tmpfs itself, frozen.
func dumpContainer(ctx context.Context, s *LXCServer, pid int, imagesDir string) (checkpoint.Stats, error) {
	o := checkpoint.Options{Pid: pid, ImagesDir: imagesDir, LeaveRunning: true, TCPEstablished: true, FileLocks: true}
	vol := container.OpenVolume(s.o.Name)
	if !vol.BoundAt(pid, s.o.DataDir) {
		return checkpoint.Dump(ctx, o)
	}
	t0 := time.Now()
	if err := vol.Sync(); err != nil {
		return checkpoint.Stats{}, err
	}
	sync := time.Since(t0)
	var snap string
	var snapTime time.Duration
	o.External = append(o.External, "mnt["+filepath.Clean(s.o.DataDir)+"]:"+container.VolumeKey)
	o.PostDump = func() error {
		t := time.Now()
		var err error
		snap, err = vol.Snapshot()
		snapTime = time.Since(t)
		return err
	}
	st, err := checkpoint.Dump(ctx, o)
	st.DataSync, st.DataSnapshot = sync, snapTime
	if snap != "" {
		defer func() {
			if err := vol.DeleteSnapshot(snap); err != nil {
				s.log.WithError(err).Warn("proxy: data volume")
			}
		}()
	}
	if err != nil {
		return st, err
	}
	t1 := time.Now()
	if err := container.ArchiveDir(snap, filepath.Join(imagesDir, container.VolumeArchive)); err != nil {
		return st, err
	}
	st.DataArchive = time.Since(t1)
	st.ImageBytes, _ = checkpoint.DirSize(imagesDir)
	return st, nil
}

// restoreContainer restores the image in imagesDir as the container of s
// (stopped). An image whose data was archived from a data volume gets a
// fresh volume with that data, bound where the image had it.
func restoreContainer(ctx context.Context, s *LXCServer, imagesDir string) (checkpoint.Stats, error) {
	o := checkpoint.Options{ImagesDir: imagesDir, WorkDir: filepath.Join(s.o.LXCPath, s.o.Name+"-restore"),
		TCPEstablished: true, FileLocks: true, CgroupRoot: "/lxc.payload." + s.o.Name}
	archive := filepath.Join(imagesDir, container.VolumeArchive)
	if _, err := os.Stat(archive); err != nil {
		// CRIU brings the data tmpfs back from the image itself.
		if err := container.OpenVolume(s.o.Name).Remove(); err != nil {
			return checkpoint.Stats{}, err
		}
		return checkpoint.RestoreStats(ctx, o)
	}
	t0 := time.Now()
	vol, err := container.CreateVolume(s.o.Name, s.o.DataSize)
	if err != nil {
		return checkpoint.Stats{}, fmt.Errorf("proxy: the checkpoint's data needs a data volume: %w", err)
	}
	if err := container.ExtractArchive(archive, vol.Data()); err != nil {
		_ = vol.Remove()
		return checkpoint.Stats{}, err
	}
	extract := time.Since(t0)
	o.External = append(o.External, "mnt["+container.VolumeKey+"]:"+vol.Data())
	st, err := checkpoint.RestoreStats(ctx, o)
	st.DataExtract = extract
	if err != nil {
		_ = vol.Remove()
	}
	return st, err
}
