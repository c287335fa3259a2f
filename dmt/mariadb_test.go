package dmt

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMariaDBSysbenchXtern runs MariaDB under the runtime and sysbench
// oltp_read_write with 8 threads against it, and wants no error: 10 s in
// `make test`, the 60 s with LOCKSTEP_SOAK=1 (`make soak`) or
// LOCKSTEP_DMT_MARIADB=1; LOCKSTEP_DMT_SYSBENCH_SECONDS sets any duration.
// Needs Debian's mariadb-server and sysbench.
func TestMariaDBSysbenchXtern(t *testing.T) {
	secs := 10
	if os.Getenv("LOCKSTEP_DMT_MARIADB") != "" || os.Getenv("LOCKSTEP_SOAK") != "" {
		secs = 60
	}
	if v := os.Getenv("LOCKSTEP_DMT_SYSBENCH_SECONDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("LOCKSTEP_DMT_SYSBENCH_SECONDS=%q", v)
		}
		secs = n
	}
	mariadbd := "/usr/sbin/mariadbd"
	for _, bin := range []string{mariadbd, "mariadb-install-db", "mariadb", "sysbench"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s missing (apt-get install mariadb-server sysbench): %v", bin, err)
		}
	}
	lib, _ := build(t)
	dir := t.TempDir()
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	var asRoot []string
	if os.Geteuid() == 0 {
		asRoot = []string{"--user=root"}
	}
	install := append([]string{"--no-defaults", "--datadir=" + data, "--skip-test-db"}, asRoot...)
	if out, err := exec.Command("mariadb-install-db", install...).CombinedOutput(); err != nil {
		t.Fatalf("mariadb-install-db: %v\n%s", err, out)
	}

	shm := filepath.Join(dir, "dmt.shm")
	env, err := Env(Options{Library: lib, Shm: shm})
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	args := append([]string{"--no-defaults", "--datadir=" + data, "--socket=" + sock,
		"--port=" + strconv.Itoa(port), "--bind-address=127.0.0.1", "--skip-grant-tables",
		"--skip-name-resolve", "--pid-file=" + filepath.Join(dir, "mariadbd.pid"),
		"--log-error=" + filepath.Join(dir, "error.log"), "--innodb-buffer-pool-size=128M"}, asRoot...)
	cmd := exec.Command(mariadbd, args...)
	cmd.Env = MergeEnv(os.Environ(), env)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	errlog := func() string {
		b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		return string(b)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("mariadbd did not stop within 60s of SIGTERM\n%s", errlog())
		}
	}
	defer stop()

	sql := func(q string) error {
		return exec.Command("mariadb", "--no-defaults", "-S", sock, "-u", "root", "-e", q).Run()
	}
	for deadline := time.Now().Add(90 * time.Second); sql("SELECT 1") != nil; {
		select {
		case err := <-done:
			t.Fatalf("mariadbd exited: %v\n%s", err, errlog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("mariadbd not answering after 90s\n%s", errlog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := sql("CREATE DATABASE sbtest"); err != nil {
		t.Fatal(err)
	}
	sb := []string{"oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
		"--mysql-port=" + strconv.Itoa(port), "--mysql-user=root", "--mysql-db=sbtest",
		"--tables=4", "--table-size=10000"}
	if out, err := exec.Command("sysbench", append(sb, "--threads=4", "prepare")...).CombinedOutput(); err != nil {
		t.Fatalf("sysbench prepare: %v\n%s\n%s", err, out, errlog())
	}
	out, err := exec.Command("sysbench", append(sb, "--threads=8", fmt.Sprintf("--time=%d", secs),
		"--report-interval=10", "run")...).CombinedOutput()
	if err != nil {
		t.Fatalf("sysbench run: %v\n%s\n%s", err, out, errlog())
	}
	res := string(out)
	for _, bad := range []string{"FATAL", "ALERT"} {
		if strings.Contains(res, bad) {
			t.Fatalf("sysbench reports %s:\n%s", bad, res)
		}
	}
	if f := sbField(res, "reconnects:"); f != "0" {
		t.Errorf("sysbench: %s reconnects\n%s", f, res)
	}
	tx := sbField(res, "transactions:")
	ntx, _ := strconv.Atoi(tx)
	if ntx == 0 {
		t.Fatalf("sysbench: no transactions\n%s", res)
	}
	// Ignored errors are deadlocks InnoDB found and sysbench retried:
	// concurrent transactions on random rows may deadlock under any
	// schedule, so a few are no fault; more than 1% would be.
	if f := sbField(res, "ignored errors:"); f != "0" {
		if n, err := strconv.Atoi(f); err != nil || n*100 > ntx {
			t.Errorf("sysbench: %s ignored errors in %d transactions\n%s", f, ntx, res)
		} else {
			t.Logf("sysbench: %d deadlocks retried", n)
		}
	}
	t.Logf("sysbench oltp_read_write, 8 threads, %ds under xtern_only: %s transactions %s",
		secs, tx, sbRate(res, "transactions:"))

	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	stop()
	t.Logf("mariadbd stats: turns=%d waits=%d wait=%v threads=%d steals=%d ops=%v", st.Total.Turns,
		st.Total.Waits, time.Duration(st.Total.WaitNS), st.Total.Threads, st.Total.Steals, st.Total.Ops)
	if st.Total.Turns == 0 || st.Total.Ops["recv"] == 0 || st.Total.Ops["mutex_lock"] == 0 {
		t.Errorf("mariadbd did not run under the runtime: %+v", st.Total)
	}
}

// sbField returns the first word after label in sysbench's report.
func sbField(out, label string) string {
	i := strings.Index(out, label)
	if i < 0 {
		return ""
	}
	f := strings.Fields(out[i+len(label):])
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

// sbRate returns the "(N per sec.)" after label.
func sbRate(out, label string) string {
	i := strings.Index(out, label)
	if i < 0 {
		return ""
	}
	rest := out[i:]
	a, b := strings.Index(rest, "("), strings.Index(rest, ")")
	if a < 0 || b < a {
		return ""
	}
	return rest[a : b+1]
}
