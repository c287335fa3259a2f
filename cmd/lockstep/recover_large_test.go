package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"lockstep/proxy"
)

// TestRecoverMariaDBLarge measures a recovery with a large data set: four
// sysbench tables of LOCKSTEP_MARIADB_ROWS rows each (1000000: about 1 GiB
// with indexes and redo log), a checkpoint of a backup on demand, then the
// backup SIGKILLed with its container under load and started again once
// the load is over. It logs the pause, the image, the restore, and the
// time from the restart until the backup's server was fed the whole log
// and until its tables equal the others'. Not in make test
// (the prepare alone takes many minutes): set the variable to run it.
func TestRecoverMariaDBLarge(t *testing.T) {
	rows, _ := strconv.Atoi(os.Getenv("LOCKSTEP_MARIADB_ROWS"))
	if rows <= 0 {
		t.Skip("set LOCKSTEP_MARIADB_ROWS (rows per table, 4 tables) to measure a large recovery")
	}
	needRecoveryTools(t, "/usr/sbin/mariadbd", "mariadb-install-db", "sysbench", "nsenter")
	c := newRCluster(t, "mariadb", 3, false, "enabled = true\nevery_entries = 0\nkeep = 2\nkeep_entries = 200\ndata_size = \"3g\"",
		func(s string) string {
			return strings.Replace(s, "election_ticks = 10", "election_ticks = 30", 1)
		})
	leader := c.startInitial(90 * time.Second)
	sb := func(args ...string) []string { return sysbenchTables(c.clientAddr(leader), 4, rows, args...) }
	t0 := time.Now()
	// One table per thread: each table's rows are inserted on one
	// connection, in the same order on every replica.
	run(t, 90*time.Minute, "sysbench", sb("--threads=4", "prepare")...)
	c.waitApplied(10*time.Minute, leader, 1, 2, 3)
	t.Logf("sysbench prepare of 4 x %d rows through the leader: %.0f s", rows, time.Since(t0).Seconds())

	tables := "sbtest1, sbtest2, sbtest3, sbtest4"
	victim := leader%3 + 1
	others := []int{leader, 6 - leader - victim}
	// Several checkpoints in a row (LOCKSTEP_CKPT_REPEAT, default 3): the
	// pause on a shared machine is noisy. Each waits until the other
	// replicas have fetched the previous one (their fetch competes for
	// the CPUs).
	repeat, _ := strconv.Atoi(os.Getenv("LOCKSTEP_CKPT_REPEAT"))
	if repeat <= 0 {
		repeat = 3
	}
	var pauses []float64
	for i := 0; i < repeat; i++ {
		out := run(t, 20*time.Minute, c.bin, "checkpoint", "--config", c.cfg, "--id", strconv.Itoa(victim))
		var r proxy.CheckpointRecord
		if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
			t.Fatalf("lockstep checkpoint --id %d: %v: %s", victim, err, out)
		}
		pauses = append(pauses, r.PauseMS)
		t.Logf("replica %d: checkpoint at %d: server paused %.0f ms (freezing %.0f, frozen %.0f: memdump %.0f, memwrite %.0f, "+
			"data snapshot %.0f), data archived after it in %.0f ms, replica stopped %.0f ms, image %d MiB", victim, r.Index,
			r.PauseMS, r.FreezingMS, r.FrozenMS, r.MemDumpMS, r.MemWriteMS, r.SnapshotMS, r.ArchiveMS, r.ApplyStopMS, r.ImageBytes>>20)
		c.waitCompactedAt(10*time.Minute, r.Index, others...)
	}
	sort.Float64s(pauses)
	t.Logf("pause over %d checkpoints: median %.0f ms, min %.0f, max %.0f", len(pauses), pauses[len(pauses)/2], pauses[0], pauses[len(pauses)-1])

	// Load; the victim is killed in its middle and started again once it
	// is over, so that "back in step" can be told from its tables alone.
	load := exec.Command("sysbench", sb("--threads=1", "--time=30", "--report-interval=0", "run")...)
	var loadOut bytes.Buffer
	load.Stdout, load.Stderr = &loadOut, &loadOut
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second)
	c.kill(victim)
	if err := load.Wait(); err != nil {
		t.Fatalf("sysbench: %v\n%s", err, loadOut.String())
	}
	t.Logf("sysbench:\n%s", grepLines(loadOut.String(), "transactions:", "ignored errors:"))
	c.waitApplied(5*time.Minute, leader, others...)
	want := c.sameChecksums(5*time.Minute, tables, others...)

	restart := time.Now()
	c.start(victim)
	st, rec := c.waitRestored(20*time.Minute, victim)
	t.Logf("replica %d restored checkpoint %s at %d (image %d MiB, restore %.0f ms, of which data extraction %.0f) and fed its server the log to %d %.0f ms later: %.1f s after its restart",
		victim, rec.ID, rec.Index, rec.ImageBytes>>20, rec.RestoreMS, rec.ExtractMS, st.CaughtUpTo, st.CaughtUpMS, time.Since(restart).Seconds())
	deadline := time.Now().Add(20 * time.Minute)
	// Its server has done all the work in the log once it has committed
	// as many transactions as the others (a cheap probe, polled often);
	// its tables must then be the others'.
	commits, err := c.mariadbStatus(others[0], "Com_commit")
	if err != nil {
		t.Fatalf("replica %d: %v: %s", others[0], err, commits)
	}
	for {
		got, err := c.mariadbStatus(victim, "Com_commit")
		if err == nil && got == commits {
			t.Logf("replica %d committed as many transactions as the others (%s) %.1f s after its restart", victim, got, time.Since(restart).Seconds())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %d's commits never matched: %q (%v), want %q", victim, got, err, commits)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Each CHECKSUM TABLE of the 4 tables takes a while itself: an upper
	// bound.
	for {
		got, err := c.mariadbChecksums(victim, tables)
		if err == nil && got == want {
			t.Logf("replica %d's tables equal the others' %.1f s after its restart: %s", victim, time.Since(restart).Seconds(), strings.ReplaceAll(got, "\n", "; "))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %d's tables never matched: %q (%v), want %q", victim, got, err, want)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// mariadbStatus is a global status variable of replica id's server.
func (c *rcluster) mariadbStatus(id int, name string) (string, error) {
	st, err := c.ckStatus(id)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(st.InitPid), "-n", "mariadb", "-h127.0.0.1", "-P3306",
		"-usbtest", "sbtest", "-N", "-e", "SHOW GLOBAL STATUS LIKE '"+name+"'").CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// waitCompactedAt waits until each replica's log is compacted at index or
// later (it has fetched the checkpoint taken there).
func (c *rcluster) waitCompactedAt(timeout time.Duration, index uint64, ids ...int) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for _, id := range ids {
		for {
			st, err := c.ckStatus(id)
			if err == nil && st.Compacted >= index {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("replica %d: log not compacted at %d: %+v %v", id, index, st, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}
