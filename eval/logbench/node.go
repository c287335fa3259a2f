package logbench

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"lockstep/paxos"
)

// NodeOptions run one log node that serves clients.
type NodeOptions struct {
	Paxos paxos.Config
	// Client is where clients propose (host:port).
	Client string
	// Admin serves /metrics and /status (empty: none).
	Admin string
	// Record keeps every applied entry so that tests can compare replicas.
	Record bool
	// SnapshotEvery compacts the log after this many entries (0: never).
	SnapshotEvery uint64
}

// sequence is the node's state machine: the applied entries in order.
type sequence struct {
	mu      sync.Mutex
	recs    []Record
	applied uint64
	record  bool
}

// encode is the snapshot of the sequence: applied index, then records.
func (s *sequence) encode() []byte {
	b := binary.AppendUvarint(nil, s.applied)
	return append(b, encodeRecords(s.recs)...)
}

func (s *sequence) restore(b []byte) error {
	applied, k := binary.Uvarint(b)
	if k <= 0 {
		return errFrame
	}
	recs, err := decodeRecords(b[k:])
	if err != nil {
		return err
	}
	s.applied, s.recs = applied, recs
	return nil
}

// RunNode serves until ctx ends or the node fails.
func RunNode(ctx context.Context, opts NodeOptions) error {
	log := opts.Paxos.Logger
	if log == nil {
		log = logrus.StandardLogger()
	}
	reg := prometheus.NewRegistry()
	opts.Paxos.Registerer = reg
	node, err := paxos.Start(opts.Paxos)
	if err != nil {
		return err
	}
	defer node.Stop()

	seq := &sequence{record: opts.Record}
	applyErr := make(chan error, 1)
	go func() { applyErr <- applyLoop(ctx, node, seq, opts.SnapshotEvery) }()

	ln, err := net.Listen("tcp", opts.Client)
	if err != nil {
		return fmt.Errorf("logbench: client listener: %w", err)
	}
	defer ln.Close()
	go serveClients(ln, node, seq, log)

	if opts.Admin != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
			_ = json.NewEncoder(w).Encode(node.Status())
		})
		srv := &http.Server{Addr: opts.Admin, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.WithError(err).Warn("logbench: admin server")
			}
		}()
		defer srv.Close()
	}

	select {
	case <-ctx.Done():
		return nil
	case <-node.Done():
		return node.Err()
	case err := <-applyErr:
		return err
	}
}

func applyLoop(ctx context.Context, node *paxos.Node, seq *sequence, every uint64) error {
	var sinceSnap uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case a, ok := <-node.Applies():
			if !ok {
				return nil
			}
			seq.mu.Lock()
			if a.Snapshot != nil {
				if err := seq.restore(a.Snapshot.Data); err != nil && len(a.Snapshot.Data) > 0 {
					seq.mu.Unlock()
					return fmt.Errorf("logbench: restoring snapshot at %d: %w", a.Snapshot.Index, err)
				}
				seq.applied = a.Snapshot.Index
			}
			for _, e := range a.Entries {
				if e.Index <= seq.applied {
					continue
				}
				if seq.record {
					seq.recs = append(seq.recs, Record{Index: e.Index, Data: e.Data})
				}
				seq.applied = e.Index
				sinceSnap++
			}
			applied := seq.applied
			var snap []byte
			if every > 0 && sinceSnap >= every {
				snap = seq.encode()
				sinceSnap = 0
			}
			seq.mu.Unlock()
			node.SetApplied(applied)
			if snap != nil {
				if err := node.Compact(ctx, applied, snap); err != nil && !errors.Is(err, context.Canceled) {
					return fmt.Errorf("logbench: compacting at %d: %w", applied, err)
				}
			}
		}
	}
}

func serveClients(ln net.Listener, node *paxos.Node, seq *sequence, log logrus.FieldLogger) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go serveClient(c, node, seq, log)
	}
}

// serveClient answers pipelined requests; responses may come out of order
// and carry the request's id.
func serveClient(c net.Conn, node *paxos.Node, seq *sequence, log logrus.FieldLogger) {
	defer c.Close()
	r := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	var wmu sync.Mutex
	reply := func(f frame) {
		wmu.Lock()
		defer wmu.Unlock()
		if writeFrame(w, f) == nil {
			_ = w.Flush()
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for {
		req, err := readFrame(r)
		if err != nil {
			if errors.Is(err, errFrame) {
				log.WithError(err).Warnf("logbench: client %s sent garbage; closing", c.RemoteAddr())
			}
			return
		}
		switch req.kind {
		case opPropose:
			go func(req frame) {
				pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
				defer pcancel()
				idx, err := node.Propose(pctx, req.payload)
				if err != nil {
					reply(frame{kind: statusErr, id: req.id, payload: []byte(err.Error())})
					return
				}
				reply(frame{kind: statusOK, id: req.id, payload: binary.BigEndian.AppendUint64(nil, idx)})
			}(req)
		case opDump:
			seq.mu.Lock()
			b := encodeRecords(seq.recs)
			seq.mu.Unlock()
			reply(frame{kind: statusOK, id: req.id, payload: b})
		case opStatus:
			b, _ := json.Marshal(node.Status())
			reply(frame{kind: statusOK, id: req.id, payload: b})
		default:
			reply(frame{kind: statusErr, id: req.id, payload: []byte(fmt.Sprintf("unknown op %d", req.kind))})
		}
	}
}
