package main

import (
	"bufio"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"lockstep/dmt"
)

// racyConfig is a config for the interleaving fixture (apps/racy) at
// path racy, in containers.
func racyConfig(racy string) string {
	return fmt.Sprintf(`name = "racy"

[cluster]
id = 7
data_dir = "/tmp/lockstep/racy"
max_connections = 64
cpu_quota = 0

[log]
tick_ms = 100
election_ticks = 10
heartbeat_ticks = 1
no_sync = false
snapshot_entries = 100000

[server]
app = "racy"
start = [%q, "-p", "{{.Port}}"]
stop_signal = "TERM"
listen = "127.0.0.1:7700"

[server.health]
http = ""
timeout_ms = 10000

[checkpoint]

[client]
command = ["true"]
parser = "exit"
`, racy)
}

// buildRacy builds the runtime and the fixture (repo .build/).
func buildRacy(t *testing.T) string {
	t.Helper()
	root, err := dmt.RepoRoot()
	if err != nil {
		t.Skip(err)
	}
	if _, err := dmt.Library(); err != nil {
		t.Skipf("cannot build the runtime: %v", err)
	}
	out := filepath.Join(root, ".build", "racy")
	if err := dmt.Make(filepath.Join(root, "apps", "racy"), out); err != nil {
		t.Skipf("cannot build the fixture: %v", err)
	}
	return filepath.Join(out, "racy")
}

// racyLoad runs clients connections to addr at once, each sending reqs
// requests "RUN 3 6" one at a time, then STATE; it returns the STATE
// answers.
func racyLoad(t *testing.T, addr string, clients, reqs int) []string {
	t.Helper()
	var wg sync.WaitGroup
	states := make([]string, clients)
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
			r := bufio.NewReader(c)
			for j := 0; j <= reqs; j++ {
				req := "RUN 3 6\n"
				if j == reqs {
					req = "STATE\n"
				}
				if _, err := c.Write([]byte(req)); err != nil {
					errs <- err
					return
				}
				line, err := r.ReadString('\n')
				if err != nil {
					errs <- fmt.Errorf("client %d, request %d: %w", i, j, err)
					return
				}
				if j < reqs && !strings.HasPrefix(line, "OK ") || j == reqs && !strings.HasPrefix(line, "STATE ") {
					errs <- fmt.Errorf("client %d: answer %q", i, line)
					return
				}
				if j == reqs {
					states[i] = strings.TrimSpace(line)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return states
}

// settleDigests waits until the leader's count of digests compared and
// divergences stops growing (the last reports ride with later events).
func (c *rcluster) settleDigests(leader int) {
	c.t.Helper()
	var last uint64
	stable := 0
	deadline := time.Now().Add(30 * time.Second)
	for stable < 3 && time.Now().Before(deadline) {
		s, err := c.status(leader)
		n := s.DigestsCompared + s.Divergences
		if err == nil && n == last && last > 0 {
			stable++
		} else {
			stable = 0
		}
		last = n
		time.Sleep(500 * time.Millisecond)
	}
}

// noDivergences fails the test for any divergence on ids, once the
// digests settled.
func (c *rcluster) noDivergences(leader int, ids ...int) {
	c.t.Helper()
	c.settleDigests(leader)
	for _, id := range ids {
		s, err := c.status(id)
		if err != nil {
			c.t.Fatal(err)
		}
		c.t.Logf("replica %d: %d output digests compared alike, %d divergences", id, s.DigestsCompared, s.Divergences)
		if s.Divergences != 0 {
			c.t.Errorf("replica %d: %d divergences: %+v", id, s.Divergences, s.DivergenceList)
		}
	}
}

// TestRecoverRacyJointSched: the interleaving fixture under joint_sched in
// containers with periodic checkpoints. A backup is SIGKILLed with its
// container while clients run, started again: it restores its newest
// checkpoint (the server with its runtime, the runtime's input channel
// and the in-container feeder) and replays the log. Afterwards its
// answers, and the fixture's state (STATE: every run's result in the
// order the runs ended, across connections), are the same as the others'
// (no output digest diverges).
func TestRecoverRacyJointSched(t *testing.T) {
	needRecoveryTools(t)
	racy := buildRacy(t)
	empty := t.TempDir()
	c := newRClusterFrom(t, "racy", racyConfig(racy), 3, false,
		"enabled = true\nevery_entries = 150\nkeep = 2\nkeep_entries = 50\ndata_size = \"16m\"",
		func(s string) string {
			return strings.Replace(s, fmt.Sprintf("app = %q", mustAbs(t, "../../apps/racy")), fmt.Sprintf("app = %q", empty), 1)
		})
	leader := c.startInitial(60*time.Second, "--dmt")
	addr := c.clientAddr(leader)
	victim := leader%3 + 1
	t.Logf("before: %v", racyLoad(t, addr, 4, 40))
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := c.ckStatus(victim)
		if err == nil && st.Compacted > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint on replica %d: %+v %v", victim, st, err)
		}
		racyLoad(t, addr, 2, 10)
	}
	c.kill(victim)
	t.Logf("replica %d (a backup) SIGKILLed with its container", victim)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t.Logf("during the recovery: %v", racyLoad(t, addr, 4, 40))
	}()
	time.Sleep(time.Second)
	restart := time.Now()
	c.start(victim, "--dmt")
	st, rec := c.waitRestored(60*time.Second, victim)
	t.Logf("replica %d restored checkpoint %s at %d (image %d KiB, restore %.0f ms), caught up to %d; %.1f s after its restart",
		victim, rec.ID, rec.Index, rec.ImageBytes>>10, rec.RestoreMS, st.CaughtUpTo, time.Since(restart).Seconds())
	wg.Wait()
	t.Logf("after: %v", racyLoad(t, addr, 4, 20))
	c.waitApplied(60*time.Second, leader, 1, 2, 3)
	c.noDivergences(leader, 1, 2, 3)
	// A comparison completes when every replica's report is in the log;
	// reports go out every DigestFlush, so the last ones may still be on
	// their way when the applied indices first agree.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if s, _ := c.status(victim); s.DigestsCompared > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("replica %d compared no digests", victim)
			break
		}
	}
}

func mustAbs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
