package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// membershipAdmin adds the membership endpoints to the admin mux
// (/status/log: the log node's view, members and learners; the others act
// on the leader only):
//
//	POST /join?id=N&peer=HOST:PORT   add replica N as a learner
//	POST /promote?id=N               make learner N a voter
func (r *Replica) membershipAdmin(mux *http.ServeMux) {
	mux.HandleFunc("/status/log", func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(r.node.Status())
	})
	handle := func(path string, f func(ctx context.Context, id uint64, req *http.Request) error) {
		mux.HandleFunc(path, func(w http.ResponseWriter, req *http.Request) {
			if req.Method != http.MethodPost {
				http.Error(w, "POST", http.StatusMethodNotAllowed)
				return
			}
			id, err := strconv.ParseUint(req.URL.Query().Get("id"), 10, 64)
			if err != nil || id == 0 {
				http.Error(w, "id: a replica id is required", http.StatusBadRequest)
				return
			}
			if !r.node.IsLeader() {
				http.Error(w, fmt.Sprintf("not the leader; the leader is %d", r.node.Leader()), http.StatusMisdirectedRequest)
				return
			}
			ctx, cancel := context.WithTimeout(req.Context(), 30*time.Second)
			defer cancel()
			if err := f(ctx, id, req); err != nil {
				http.Error(w, err.Error(), http.StatusConflict)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(r.node.Status())
		})
	}
	handle("/join", func(ctx context.Context, id uint64, req *http.Request) error {
		peer := req.URL.Query().Get("peer")
		if peer == "" {
			for _, rep := range r.o.Replicas {
				if rep.ID == id {
					peer = rep.Peer
				}
			}
		}
		if peer == "" {
			return fmt.Errorf("replica %d: no peer address", id)
		}
		r.log.Infof("proxy: adding replica %d (%s) as a learner", id, peer)
		if err := r.node.AddLearner(ctx, id, peer); err != nil {
			return err
		}
		if r.ck != nil {
			// A raft snapshot names the members of its time: a learner
			// accepts only one that includes it, so a backup takes a new
			// checkpoint (and everyone compacts at it) now.
			r.goFunc(func() { r.requestCheckpoint(id) })
		}
		return nil
	})
	handle("/promote", func(ctx context.Context, id uint64, req *http.Request) error {
		r.log.Infof("proxy: promoting learner %d", id)
		return r.node.Promote(ctx, id)
	})
}

// promoteWhenCaughtUp runs on a joining replica: once it is a learner
// that has applied what was committed when it looked, it asks the leader
// (through the leader's admin address, from the replica list) to promote
// it.
func (r *Replica) promoteWhenCaughtUp() {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	client := &http.Client{Timeout: 30 * time.Second}
	var target uint64
	wasLearner := false // the node lists itself as a member before it is added
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		ns := r.node.Status()
		learner := false
		for _, id := range ns.Learners {
			learner = learner || id == r.o.ID
		}
		if learner {
			wasLearner = true
		} else if wasLearner {
			r.log.Info("proxy: promoted to a voter")
			return
		}
		if !learner || ns.Leader == 0 || ns.Commit == 0 {
			continue
		}
		if target == 0 {
			target = ns.Commit
		}
		if r.Applied() < target {
			continue
		}
		var admin string
		for _, rep := range r.o.Replicas {
			if rep.ID == ns.Leader {
				admin = rep.Admin
			}
		}
		if admin == "" {
			continue
		}
		resp, err := client.Post(fmt.Sprintf("http://%s/promote?id=%d", admin, r.o.ID), "", nil)
		if err != nil {
			r.log.WithError(err).Warn("proxy: asking the leader for promotion")
			continue
		}
		resp.Body.Close()
		target = 0
	}
}

// requestCheckpoint asks a backup (a voter other than this leader and
// than the joining replica) to checkpoint now.
func (r *Replica) requestCheckpoint(joining uint64) {
	client := &http.Client{Timeout: 5 * time.Minute}
	ns := r.node.Status()
	for _, rep := range r.o.Replicas {
		if rep.ID == r.o.ID || rep.ID == joining || rep.Admin == "" || strings.HasSuffix(rep.Admin, ":0") {
			continue
		}
		if _, ok := ns.Members[rep.ID]; !ok {
			continue
		}
		resp, err := client.Post("http://"+rep.Admin+"/checkpoint", "", nil)
		if err != nil {
			r.log.WithError(err).Warnf("proxy: asking replica %d for a checkpoint", rep.ID)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return
		}
	}
	r.log.Warn("proxy: no backup took a checkpoint for the joining replica; the next periodic one will do")
}
