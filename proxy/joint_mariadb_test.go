package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"lockstep/configs"
	"lockstep/dmt"
)

// MariaDB under joint_sched on 3 replicas: sysbench oltp_read_write with
// 8 threads through the leader completes, and CHECKSUM TABLE of every
// table gives the same result on every replica's server afterwards
// (asked on each server's own unix socket, outside the log), and with
// configs/mariadb.toml's masks the replies' digests agree but for rare
// residual differences (see the end). Long: set
// LOCKSTEP_JOINT_MARIADB=1 (LOCKSTEP_SYSBENCH_SECONDS, default 60).
func TestMariaDBJointSched(t *testing.T) {
	if os.Getenv("LOCKSTEP_JOINT_MARIADB") == "" && os.Getenv("LOCKSTEP_SOAK") == "" {
		t.Skip("long: set LOCKSTEP_JOINT_MARIADB=1 (or LOCKSTEP_SOAK=1) to run")
	}
	need(t, "/usr/sbin/mariadbd", "mariadb-install-db", "mariadb", "sysbench")
	lib, _ := buildRacy(t)
	secs := envInt("LOCKSTEP_SYSBENCH_SECONDS", 60)
	dirOf := replicaDirs(t)
	var asRoot []string
	if os.Geteuid() == 0 {
		asRoot = []string{"--user=root"}
	}
	server := func(id uint64) StartServerFunc {
		return func(ctx context.Context) (Server, error) {
			dir, addr := dirOf(id), freePort(t)
			_, port, _ := net.SplitHostPort(addr)
			data := filepath.Join(dir, "data")
			if out, err := exec.Command("mariadb-install-db", append([]string{"--no-defaults", "--datadir=" + data, "--skip-test-db"}, asRoot...)...).CombinedOutput(); err != nil {
				return nil, fmt.Errorf("mariadb-install-db: %v\n%s", err, out)
			}
			shm := filepath.Join(dir, "dmt.shm")
			if err := dmt.CreateChan(shm); err != nil {
				return nil, err
			}
			env, err := dmt.Env(dmt.Options{Library: lib, Shm: shm, Joint: true})
			if err != nil {
				return nil, err
			}
			args := append([]string{"/usr/sbin/mariadbd", "--no-defaults", "--datadir=" + data, "--socket=" + filepath.Join(dir, "sock"),
				"--port=" + port, "--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-name-resolve",
				"--pid-file=" + filepath.Join(dir, "mariadbd.pid"), "--log-error=" + filepath.Join(dir, "error.log"),
				"--innodb-buffer-pool-size=128M"}, asRoot...)
			return StartExec(ctx, ExecOptions{Args: args, Dir: dir, Addr: addr, Env: env, StopSignal: syscall.SIGTERM, HealthTimeout: 90 * time.Second, HealthListen: true})
		}
	}
	// The shipped config's masks: its byte ranges blank the login
	// challenge, the only bytes in which the copies may differ.
	cfg, err := configs.Load("../configs/mariadb.toml")
	if err != nil {
		t.Fatal(err)
	}
	opts := func(o *Options) {
		o.Masks = cfg.Output.Mask
		o.NewFeeder = jointFeeder(t, dirOf(o.ID), nil)
	}
	c := newTestCluster(t, 3, server, opts)
	addr := c.leader().ClientAddr()
	host, port, _ := net.SplitHostPort(addr)
	sql := func(q string) (string, error) {
		out, err := exec.Command("mariadb", "--no-defaults", "--protocol=tcp", "-h", host, "-P", port, "-u", "root", "-e", q).CombinedOutput()
		return string(out), err
	}
	if out, err := sql("CREATE DATABASE sbtest"); err != nil {
		t.Fatalf("CREATE DATABASE: %v\n%s", err, out)
	}
	sb := []string{"oltp_read_write", "--db-driver=mysql", "--mysql-host=" + host, "--mysql-port=" + port,
		"--mysql-user=root", "--mysql-db=sbtest", "--tables=4", "--table-size=10000"}
	if out, err := exec.Command("sysbench", append(sb, "--threads=4", "prepare")...).CombinedOutput(); err != nil {
		t.Fatalf("sysbench prepare: %v\n%s", err, out)
	}
	out, err := exec.Command("sysbench", append(sb, "--threads=8", fmt.Sprintf("--time=%d", secs), "--report-interval=0", "run")...).CombinedOutput()
	if err != nil {
		t.Fatalf("sysbench run: %v\n%s", err, out)
	}
	res := string(out)
	for _, l := range strings.Split(res, "\n") {
		if strings.Contains(l, "transactions:") || strings.Contains(l, "queries:") || strings.Contains(l, "ignored errors:") {
			t.Logf("sysbench 8 threads %ds: %s", secs, strings.TrimSpace(l))
		}
	}
	c.settle(t)
	tables := "sbtest.sbtest1, sbtest.sbtest2, sbtest.sbtest3, sbtest.sbtest4"
	var ref string
	for id := uint64(1); id <= 3; id++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := exec.CommandContext(ctx, "mariadb", "--no-defaults", "-S", filepath.Join(dirOf(id), "sock"), "-u", "root", "-N", "-e", "CHECKSUM TABLE "+tables).CombinedOutput()
		cancel()
		if err != nil {
			for j := uint64(1); j <= 3; j++ {
				if ch, err := dmt.OpenChan(filepath.Join(dirOf(j), "dmt.shm")); err == nil {
					st, clk := ch.Starving()
					t.Logf("replica %d channel: starving %v at %d, starved %d times, pushed %d, admitted %d, consumer %d", j, st, clk, ch.StarveCount(), ch.Pushed(), ch.Admitted(), ch.Consumer())
				}
			}
			t.Logf("bubbles proposed: %d; leader %d", BubblesProposed(), c.leader().o.ID)
			for _, r := range c.live() {
				st := r.Status()
				t.Logf("replica %d: commit %d applied %d serving %v conns %d", st.ID, st.Commit, st.Applied, st.Serving, st.Connections)
				if f, ok := r.feeder.(*DMTFeeder); ok && f.bubbler != nil {
					st, _ := f.ch.Starving()
					t.Logf("replica %d bubbler: inflight %v leading %v starving %v", r.o.ID, f.bubbler.inflight.Load(), f.bubbler.leading(), st)
				}
			}
			t.Fatalf("replica %d: CHECKSUM TABLE: %v\n%s", id, err, out)
		}
		t.Logf("replica %d: %s", id, strings.Join(strings.Fields(string(out)), " "))
		if id == 1 {
			ref = string(out)
		} else if string(out) != ref {
			t.Errorf("replica %d's tables differ from replica 1's", id)
		}
	}
	// Every byte of every reply should agree but the masked login
	// challenge. A rare statement answered differently on one replica
	// remains (one of three 60 s runs: one connection, whose later
	// checkpoints then all differ; docs/BENCHMARKS.md): reported. What
	// fails is a systematic difference, such as an unmasked challenge,
	// which makes every connection's every checkpoint differ.
	for _, r := range c.live() {
		st := r.Status()
		// DigestsCompared counts the checkpoints every replica agreed on.
		total := st.DigestsCompared + st.Divergences
		if total == 0 {
			t.Errorf("replica %d compared no digests", st.ID)
		}
		t.Logf("replica %d: %d digest checkpoints agreed, %d diverged", st.ID, st.DigestsCompared, st.Divergences)
		if st.Divergences == 0 {
			continue
		}
		if 2*st.Divergences >= total {
			t.Errorf("replica %d: %d of %d digest checkpoints differ, e.g. %+v", st.ID, st.Divergences, total, st.DivergenceList[0])
		} else {
			t.Logf("replica %d: divergences (a known residual of joint_sched with InnoDB), e.g. %+v", st.ID, st.DivergenceList[0])
		}
	}
}
