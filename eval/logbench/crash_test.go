package logbench

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var lockstepBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lockstep-bin-")
	if err != nil {
		panic(err)
	}
	lockstepBin = filepath.Join(dir, "lockstep")
	out, err := exec.Command("go", "build", "-o", lockstepBin, "lockstep/cmd/lockstep").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building lockstep: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// TestLeaderKilledRepeatedly runs three node processes with fsync on while
// clients propose, and SIGKILLs whichever node leads, again and again. At
// the end every proposal that was acknowledged is in the log exactly once,
// at the index it was acknowledged with, and every replica holds the same
// sequence.
func TestLeaderKilledRepeatedly(t *testing.T) {
	c, err := StartCluster(lockstepBin, t.TempDir(), 3, false, 300)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Leader(15 * time.Second); err != nil {
		t.Fatal(err)
	}

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		mu      sync.Mutex
		acked   = map[string]uint64{}
		failed  int
		maxIdx  uint64
		clients = 8
	)
	for k := 0; k < clients; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			var cl *Client
			for i := 0; !stop.Load(); i++ {
				if cl == nil {
					var err error
					cl, err = Dial(c.Nodes[(k+i)%len(c.Nodes)].Client, 300*time.Millisecond)
					if err != nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
				}
				v := fmt.Sprintf("c%d-%d", k, i)
				idx, err := cl.Propose([]byte(v), 3*time.Second)
				mu.Lock()
				if err == nil {
					acked[v] = idx
					maxIdx = max(maxIdx, idx)
				} else {
					failed++
				}
				mu.Unlock()
				var re *RemoteError
				if err != nil && !errors.As(err, &re) {
					cl.Close()
					cl = nil
				}
			}
			if cl != nil {
				cl.Close()
			}
		}(k)
	}

	kills := 5
	if os.Getenv("LOCKSTEP_SOAK") != "" {
		kills = 40
	}
	for round := 0; round < kills; round++ {
		time.Sleep(700 * time.Millisecond)
		li, err := c.Leader(15 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Kill(li)
		time.Sleep(700 * time.Millisecond)
		if err := c.Start(li); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second)
	stop.Store(true)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d proposals acknowledged, %d failed or unknown, over %d leader kills", len(acked), failed, kills)
	if len(acked) < 100 {
		t.Fatalf("only %d proposals acknowledged: the cluster made too little progress", len(acked))
	}
	var ref []Record
	for i := range c.Nodes {
		recs, err := c.Dump(i, maxIdx, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if ref == nil {
			ref = recs
			continue
		}
		n := min(len(ref), len(recs))
		for j := 0; j < n; j++ {
			if ref[j].Index != recs[j].Index || string(ref[j].Data) != string(recs[j].Data) {
				t.Fatalf("node %d differs from node 1 at position %d: %d:%q vs %d:%q",
					c.Nodes[i].ID, j, recs[j].Index, recs[j].Data, ref[j].Index, ref[j].Data)
			}
		}
	}
	seen := map[string]uint64{}
	for _, r := range ref {
		if prev, dup := seen[string(r.Data)]; dup {
			t.Fatalf("%q is in the log twice, at %d and %d", r.Data, prev, r.Index)
		}
		seen[string(r.Data)] = r.Index
	}
	for v, idx := range acked {
		got, ok := seen[v]
		if !ok {
			t.Fatalf("acknowledged proposal %q (index %d) is missing", v, idx)
		}
		if got != idx {
			t.Fatalf("acknowledged proposal %q at index %d is at %d", v, idx, got)
		}
	}
}

// TestMetricsServed scrapes a node's admin address after some proposals.
func TestMetricsServed(t *testing.T) {
	c, err := StartCluster(lockstepBin, t.TempDir(), 3, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	li, err := c.Leader(15 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := Dial(c.Nodes[li].Client, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for i := 0; i < 20; i++ {
		if _, err := cl.Propose([]byte("m"), 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := http.Get("http://" + c.Nodes[li].Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"lockstep_log_commit_index", "lockstep_log_is_leader 1",
		"lockstep_log_proposals_total 20", "lockstep_log_fsync_seconds_bucket", "lockstep_log_term"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
