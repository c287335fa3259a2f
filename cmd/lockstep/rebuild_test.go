package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"testing"
	"time"
)

// TestRebuildDivergentReplica: a backup whose server starts answering
// differently (its page is changed inside its container, behind the
// log's back) is caught by the digests and, with auto_rebuild, rebuilt
// from a peer's checkpoint; then `lockstep rebuild` rebuilds another
// backup on demand. Each time the rebuilt replica is back in step (no new
// divergence under more load) and ab sees no failure.
func TestRebuildDivergentReplica(t *testing.T) {
	needRecoveryTools(t, "/usr/sbin/apache2", "ab")
	c := newRCluster(t, "apache", 3, false, "enabled = true\nevery_entries = 300\nkeep = 2\nkeep_entries = 100\ndata_size = \"64m\"\nauto_rebuild = true", nil)
	leader := c.startInitial(60 * time.Second)
	all := []int{1, 2, 3}
	ab := func(n int) {
		t.Helper()
		out := run(t, 3*time.Minute, "ab", "-q", "-c", "4", "-n", fmt.Sprint(n), "http://"+c.clientAddr(leader)+"/index.html")
		if !regexp.MustCompile(`(?m)^Failed requests:\s+0$`).MatchString(out) || regexp.MustCompile(`Non-2xx`).MatchString(out) {
			t.Fatalf("ab saw failures:\n%s", out)
		}
	}
	// Enough entries for checkpoints that every replica has compacted at.
	ab(1500)
	c.waitApplied(30*time.Second, leader, all...)
	c.waitCompacted(30*time.Second, all...)
	divergences := func() uint64 {
		t.Helper()
		st, err := c.status(leader)
		if err != nil {
			t.Fatal(err)
		}
		return st.Divergences
	}
	if d := divergences(); d != 0 {
		t.Fatalf("%d divergences before any tampering", d)
	}

	victim := leader%3 + 1
	st, err := c.ckStatus(victim)
	if err != nil || st.InitPid == 0 {
		t.Fatalf("replica %d's container: %+v %v", victim, st, err)
	}
	page := fmt.Sprintf("/proc/%d/root/run/lockstep-data/%s/htdocs/index.html", st.InitPid, c.name)
	if err := os.WriteFile(page, []byte("<html><body>changed behind the log's back</body></html>\n"), 0o644); err != nil {
		t.Fatalf("changing replica %d's page: %v", victim, err)
	}
	ab(200)
	c.waitRebuilt(90*time.Second, victim, "auto_rebuild")
	if d := divergences(); d == 0 {
		t.Fatal("the changed page was not detected")
	}
	c.checkInStep(leader, all, ab)

	// On demand: the other backup, healthy, rebuilt by the command.
	other := 6 - leader - victim
	out, err := exec.Command(c.bin, "rebuild", "--config", c.cfg, "--id", fmt.Sprint(other)).CombinedOutput()
	if err != nil {
		t.Fatalf("lockstep rebuild: %v\n%s", err, out)
	}
	t.Logf("lockstep rebuild --id %d: %s", other, out)
	ab(300)
	c.waitRebuilt(90*time.Second, other, "lockstep rebuild")
	c.checkInStep(leader, all, ab)
}

// waitCompacted waits until each replica's log is compacted at a
// checkpoint.
func (c *rcluster) waitCompacted(timeout time.Duration, ids ...int) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for _, id := range ids {
		for {
			st, err := c.ckStatus(id)
			if err == nil && st.Compacted > 0 {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("replica %d: log not compacted: %+v %v", id, st, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// waitRebuilt waits until id has restored a checkpoint fetched from a
// peer and caught up with the log.
func (c *rcluster) waitRebuilt(timeout time.Duration, id int, why string) {
	c.t.Helper()
	st, r := c.waitRestored(timeout, id)
	if !r.Fetched {
		c.t.Fatalf("replica %d (%s) restored its own checkpoint %s, not a peer's", id, why, r.ID)
	}
	c.t.Logf("replica %d (%s) restored checkpoint %s of a peer at %d (fetch %.0f ms, restore %.0f ms), caught up to %d %.0f ms later",
		id, why, r.ID, r.Index, r.FetchMS, r.RestoreMS, st.CaughtUpTo, st.CaughtUpMS)
}

// checkInStep: under more load, no replica's output diverges any more.
func (c *rcluster) checkInStep(leader int, all []int, ab func(int)) {
	c.t.Helper()
	// Let the comparisons of the connections before settle.
	c.waitApplied(30*time.Second, leader, all...)
	time.Sleep(2 * time.Second)
	before, err := c.status(leader)
	if err != nil {
		c.t.Fatal(err)
	}
	ab(300)
	c.waitApplied(30*time.Second, leader, all...)
	time.Sleep(2 * time.Second)
	after, err := c.status(leader)
	if err != nil {
		c.t.Fatal(err)
	}
	if after.Divergences != before.Divergences {
		c.t.Fatalf("%d new divergences after the rebuild: %+v", after.Divergences-before.Divergences, after.DivergenceList)
	}
	if after.DigestsCompared <= before.DigestsCompared {
		c.t.Fatalf("no digests compared after the rebuild (%d then %d)", before.DigestsCompared, after.DigestsCompared)
	}
}
