package main

// End-to-end tests of checkpoints and recovery (proxy_only): real
// `lockstep replica` processes on loopback, each with its server in an LXC
// container, checkpointed with CRIU. They need root, CRIU (scripts/criu.sh),
// LXC, and Apache or MariaDB with sysbench; they skip, saying why, without.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"lockstep/checkpoint"
	"lockstep/container"
	"lockstep/proxy"
)

// TestMain removes the binary the recovery tests build.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var (
	binDir    string
	buildOnce sync.Once
	buildBin  string
	buildErr  error
)

func needRecoveryTools(t *testing.T, progs ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (LXC containers, CRIU)")
	}
	for _, p := range append([]string{"/usr/sbin/init.lxc", "lxc-info"}, progs...) {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s: %v", p, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := checkpoint.Check(ctx); err != nil {
		t.Skipf("CRIU does not work here: %v", err)
	}
}

// lockstepBin builds the lockstep binary once per test run.
func lockstepBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "lockstep-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildBin = filepath.Join(dir, "lockstep")
		out, err := exec.Command("go", "build", "-o", buildBin, ".").CombinedOutput()
		binDir = dir
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// rcluster is a cluster of replica processes on loopback.
type rcluster struct {
	t       *testing.T
	bin     string
	cfg     string
	dir     string
	name    string
	n       int // replicas in the config (the last may be a joiner)
	ports   []int
	mu      sync.Mutex
	procs   map[int]*exec.Cmd
	started time.Time
}

// newRCluster writes a config for n replicas (the last one with join =
// true if join) from configs/<app>.toml with extra [checkpoint] settings.
func newRCluster(t *testing.T, app string, n int, join bool, checkpointTOML string, edit func(string) string) *rcluster {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "configs", app+".toml"))
	if err != nil {
		t.Fatal(err)
	}
	return newRClusterFrom(t, app, string(raw), n, join, checkpointTOML, edit)
}

// newRClusterFrom is newRCluster with the app's config given as text.
func newRClusterFrom(t *testing.T, app, s string, n int, join bool, checkpointTOML string, edit func(string) string) *rcluster {
	t.Helper()
	bin := lockstepBin(t)
	c := &rcluster{t: t, bin: bin, dir: t.TempDir(), n: n, procs: map[int]*exec.Cmd{}, ports: freePorts(t, 3*n)}
	// The data directory's parents must be searchable by servers that
	// drop privileges.
	_ = os.Chmod(c.dir, 0o755)
	_ = os.Chmod(filepath.Dir(c.dir), 0o755)
	c.name = fmt.Sprintf("t%s%d", app[:3], os.Getpid()%10000)
	s = regexp.MustCompile(`(?m)^name = .*$`).ReplaceAllString(s, fmt.Sprintf("name = %q", c.name))
	appDir, _ := filepath.Abs(filepath.Join("..", "..", "apps", app))
	s = regexp.MustCompile(`(?m)^app = .*$`).ReplaceAllString(s, fmt.Sprintf("app = %q", appDir))
	s = regexp.MustCompile(`(?m)^data_dir = "/tmp.*$`).ReplaceAllString(s, fmt.Sprintf("data_dir = %q", c.dir))
	s = strings.Replace(s, "no_sync = false", "no_sync = true", 1)
	// The app's [checkpoint] table goes (the test's own is appended), up to
	// the next table, whatever it is ([[output.mask]] follows it in
	// mariadb.toml).
	s = regexp.MustCompile(`(?ms)^\[checkpoint\]\n.*?(^\[)`).ReplaceAllString(s, "$1")
	var reps strings.Builder
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&reps, "\n[[cluster.replica]]\nid = %d\npeer = \"127.0.0.1:%d\"\nlisten = \"127.0.0.1:%d\"\nadmin = \"127.0.0.1:%d\"\n",
			i, c.ports[3*(i-1)], c.ports[3*(i-1)+1], c.ports[3*(i-1)+2])
		if join && i == n {
			reps.WriteString("join = true\n")
		}
	}
	s = strings.Replace(s, "\n[log]", reps.String()+"\n[log]", 1)
	s += "\n[checkpoint]\n" + checkpointTOML + "\n"
	if edit != nil {
		s = edit(s)
	}
	c.cfg = filepath.Join(c.dir, app+".toml")
	if err := os.WriteFile(c.cfg, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stopAll)
	return c
}

func (c *rcluster) clientAddr(id int) string { return fmt.Sprintf("127.0.0.1:%d", c.ports[3*(id-1)+1]) }
func (c *rcluster) admin(id int) string      { return fmt.Sprintf("127.0.0.1:%d", c.ports[3*(id-1)+2]) }

func (c *rcluster) start(id int, args ...string) {
	c.t.Helper()
	logf, err := os.OpenFile(filepath.Join(c.dir, fmt.Sprintf("replica-%d.log", id)), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(c.bin, append([]string{"replica", "--config", c.cfg, "--id", strconv.Itoa(id)}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	go func() { _ = cmd.Wait() }()
	c.mu.Lock()
	c.procs[id] = cmd
	c.mu.Unlock()
}

// startInitial starts the three initial replicas with args and returns
// the leader once they agree on one that serves.
func (c *rcluster) startInitial(timeout time.Duration, args ...string) int {
	c.t.Helper()
	for i := 1; i <= 3; i++ {
		c.start(i, args...)
	}
	return c.waitServing(timeout, 1, 2, 3)
}

// kill SIGKILLs replica id's process group and its container's init.
func (c *rcluster) kill(id int) {
	c.t.Helper()
	init := 0
	if st, err := c.ckStatus(id); err == nil {
		init = st.InitPid
	}
	c.mu.Lock()
	cmd := c.procs[id]
	delete(c.procs, id)
	c.mu.Unlock()
	if cmd != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if init > 0 {
		_ = syscall.Kill(init, syscall.SIGKILL)
	}
}

func (c *rcluster) stopAll() {
	c.mu.Lock()
	procs := c.procs
	c.procs = map[int]*exec.Cmd{}
	c.mu.Unlock()
	for _, cmd := range procs {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, cmd := range procs {
		for syscall.Kill(cmd.Process.Pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	// Containers LXC started outlive a SIGKILLed replica (their monitor
	// is their parent); restored ones die with their replica.
	defer func() {
		for i := 1; i <= c.n; i++ {
			name := fmt.Sprintf("ls-%s-%d", c.name, i)
			if err := container.StopLXCByName(name, container.DefaultLXCPath); err != nil {
				c.t.Logf("stopping %s: %v", name, err)
			}
			_ = os.RemoveAll(filepath.Join(container.DefaultLXCPath, name))
			_ = os.RemoveAll(filepath.Join(container.DefaultLXCPath, name+"-restore"))
		}
		_ = os.Remove(filepath.Join(container.DefaultLXCPath, "console-"+c.name+".log"))
		// The containers' data directory (default checkpoint.data_dir),
		// an empty mount point on the host once they are all gone.
		_ = os.Remove(filepath.Join("/run/lockstep-data", c.name))
	}()
	if c.t.Failed() {
		for i := 1; i <= c.n; i++ {
			raw, _ := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("replica-%d.log", i)))
			lines := strings.Split(string(raw), "\n")
			var keep []string
			for _, l := range lines {
				if strings.Contains(l, "level=error") || strings.Contains(l, "level=warn") && !strings.Contains(l, "no stream") && !strings.Contains(l, "divergence") {
					keep = append(keep, l)
				}
			}
			if len(keep) > 30 {
				keep = keep[len(keep)-30:]
			}
			c.t.Logf("replica %d warnings and errors:\n%s", i, strings.Join(keep, "\n"))
		}
		// The feeders' messages (why a server did not start, with its
		// logs) go to the shared console log, removed below.
		if raw, err := os.ReadFile(filepath.Join(container.DefaultLXCPath, "console-"+c.name+".log")); err == nil && len(raw) > 0 {
			if len(raw) > 8192 {
				raw = raw[len(raw)-8192:]
			}
			c.t.Logf("the containers' console log (tail):\n%s", raw)
		}
	}
}

func getJSON(url string, v any) error {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (c *rcluster) status(id int) (proxy.Status, error) {
	var s proxy.Status
	return s, getJSON("http://"+c.admin(id)+"/status", &s)
}

func (c *rcluster) ckStatus(id int) (proxy.CheckpointStatus, error) {
	var s proxy.CheckpointStatus
	return s, getJSON("http://"+c.admin(id)+"/checkpoints/status", &s)
}

// waitRestored waits until id has restored a checkpoint and caught up with
// the log; it returns its status and the last restore's record.
func (c *rcluster) waitRestored(timeout time.Duration, id int) (proxy.CheckpointStatus, proxy.CheckpointRecord) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := c.ckStatus(id)
		if err == nil && st.RestoredAt > 0 && st.CaughtUpMS > 0 {
			var rec proxy.CheckpointRecord
			for _, r := range st.Records {
				if r.Op == "restore" {
					rec = r
				}
			}
			return st, rec
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("replica %d did not restore and catch up within %v: %+v %v", id, timeout, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitServing waits until ids agree on a leader that serves, and returns it.
func (c *rcluster) waitServing(timeout time.Duration, ids ...int) int {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, id := range ids {
			if s, err := c.status(id); err == nil && s.Serving {
				return id
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("no leader serving within %v", timeout)
	return 0
}

// waitApplied waits until every id has applied at least the leader's
// commit index as seen now.
func (c *rcluster) waitApplied(timeout time.Duration, leader int, ids ...int) {
	c.t.Helper()
	ls, err := c.status(leader)
	if err != nil {
		c.t.Fatal(err)
	}
	deadline := time.Now().Add(timeout)
	for _, id := range ids {
		for {
			s, err := c.status(id)
			if err == nil && s.Applied >= ls.Commit {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("replica %d has not applied %d within %v: %+v %v", id, ls.Commit, timeout, s, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func run(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestCheckpointsApacheUnderLoad: periodic checkpoints on the backups
// while ab loads the leader: no failed request, checkpoints stored with
// their indices, every replica's log compacted at the newest.
func TestCheckpointsApacheUnderLoad(t *testing.T) {
	needRecoveryTools(t, "/usr/sbin/apache2", "ab")
	c := newRCluster(t, "apache", 3, false, "enabled = true\nevery_entries = 300\nkeep = 2\nkeep_entries = 100\ndata_size = \"64m\"", nil)
	leader := c.startInitial(60 * time.Second)
	out := run(t, 3*time.Minute, "ab", "-q", "-c", "8", "-n", "4000", "http://"+c.clientAddr(leader)+"/index.html")
	t.Logf("ab against replica %d:\n%s", leader, grepLines(out, "Complete requests", "Failed requests", "Requests per second", "Non-2xx"))
	if !regexp.MustCompile(`(?m)^Failed requests:\s+0$`).MatchString(out) || strings.Contains(out, "Non-2xx") {
		t.Fatalf("ab saw failures:\n%s", out)
	}
	all := []int{1, 2, 3}
	c.waitApplied(30*time.Second, leader, all...)
	// A checkpoint still being taken or fetched when the load ends is
	// announced a little later: wait until every replica has compacted at
	// the same newest one.
	var newest uint64
	sts := map[int]proxy.CheckpointStatus{}
	deadline := time.Now().Add(20 * time.Second)
	for {
		newest = 0
		agreed := true
		for _, id := range all {
			st, err := c.ckStatus(id)
			if err != nil {
				t.Fatal(err)
			}
			sts[id] = st
			ok := st.Latest != nil && st.Compacted == st.Latest.Index && len(st.Stored) > 0 && st.Stored[len(st.Stored)-1] == st.Latest.Index
			if !ok {
				if time.Now().After(deadline) {
					t.Fatalf("replica %d: log not compacted at the newest checkpoint: %+v", id, st)
				}
				agreed = false
				break
			}
			if newest != 0 && st.Latest.Index != newest {
				if time.Now().After(deadline) {
					t.Fatalf("replica %d: newest checkpoint at %d, another replica's at %d", id, st.Latest.Index, newest)
				}
				agreed = false
				break
			}
			newest = st.Latest.Index
		}
		if agreed {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	dumps := 0
	for _, id := range all {
		st := sts[id]
		if len(st.Stored) > 2 {
			t.Errorf("replica %d keeps %d checkpoints, want at most 2: %v", id, len(st.Stored), st.Stored)
		}
		for _, r := range st.Records {
			if r.Op == "dump" {
				dumps++
				if id == leader {
					t.Errorf("the leader (%d) took checkpoint %s", id, r.ID)
				}
				t.Logf("replica %d: checkpoint at %d: server paused %.0f ms, replica stopped %.0f ms, image %d KiB",
					id, r.Index, r.PauseMS, r.ApplyStopMS, r.ImageBytes>>10)
			}
		}
	}
	if dumps < 2 {
		t.Fatalf("%d checkpoints taken, want at least 2", dumps)
	}
	// The checkpoint is served to peers with its index.
	var ms []checkpoint.Manifest
	if err := getJSON("http://"+c.admin(leader)+"/checkpoints/", &ms); err != nil || len(ms) == 0 || ms[len(ms)-1].Index != newest {
		t.Fatalf("leader's store: %+v %v, want the newest at %d", ms, err, newest)
	}

	// A backup SIGKILLed with its container comes back under load from
	// its newest checkpoint.
	victim := leader%3 + 1
	c.kill(victim)
	ab := exec.Command("ab", "-q", "-c", "8", "-n", "3000", "http://"+c.clientAddr(leader)+"/index.html")
	var abOut bytes.Buffer
	ab.Stdout, ab.Stderr = &abOut, &abOut
	if err := ab.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	restart := time.Now()
	c.start(victim)
	st, r := c.waitRestored(60*time.Second, victim)
	t.Logf("replica %d restored checkpoint %s at %d (image %d KiB, restore %.0f ms), replayed to %d %.0f ms later (%.0f entries/s); %.1f s after its restart",
		victim, r.ID, r.Index, r.ImageBytes>>10, r.RestoreMS, st.CaughtUpTo, st.CaughtUpMS,
		float64(st.CaughtUpTo-st.RestoredAt)/max(st.CaughtUpMS, 1)*1000, time.Since(restart).Seconds())
	if err := ab.Wait(); err != nil || !regexp.MustCompile(`(?m)^Failed requests:\s+0$`).MatchString(abOut.String()) {
		t.Fatalf("ab during the recovery: %v\n%s", err, abOut.String())
	}
	c.waitApplied(30*time.Second, leader, all...)
	for _, id := range all {
		if s, err := c.status(id); err != nil || s.Divergences != 0 {
			t.Errorf("replica %d: %d divergences (%v)", id, s.Divergences, err)
		}
	}
}

func grepLines(s string, prefixes ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(strings.TrimSpace(l), p) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

// mariadbChecksums runs CHECKSUM TABLE in replica id's container.
func (c *rcluster) mariadbChecksums(id int, tables string) (string, error) {
	st, err := c.ckStatus(id)
	if err != nil {
		return "", err
	}
	if st.InitPid <= 0 {
		return "", fmt.Errorf("replica %d has no container", id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(st.InitPid), "-n", "mariadb", "-h127.0.0.1", "-P3306",
		"-usbtest", "sbtest", "-N", "-e", "CHECKSUM TABLE "+tables).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// sameChecksums waits until every id's tables checksum alike (a backup's
// server may still be working through what it was fed).
func (c *rcluster) sameChecksums(timeout time.Duration, tables string, ids ...int) string {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		sums := map[int]string{}
		same := true
		for _, id := range ids {
			s, err := c.mariadbChecksums(id, tables)
			if err != nil {
				s = "error: " + err.Error() + ": " + s
			}
			sums[id] = s
			same = same && err == nil && s == sums[ids[0]]
		}
		if same {
			return sums[ids[0]]
		}
		if time.Now().After(deadline) {
			for _, id := range ids {
				st, _ := c.ckStatus(id)
				out, _ := exec.Command("nsenter", "-t", strconv.Itoa(st.InitPid), "-n", "mariadb", "-h127.0.0.1", "-P3306",
					"-usbtest", "sbtest", "-N", "-e", "SELECT COUNT(*), SUM(k) FROM sbtest1; SELECT COUNT(*), SUM(k) FROM sbtest2; "+
						"SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit','Com_stmt_execute','Questions','Connections','Uptime')").CombinedOutput()
				c.t.Logf("replica %d: %s", id, strings.Join(strings.Fields(string(out)), " "))
			}
			c.t.Fatalf("CHECKSUM TABLE differs: %v", sums)
		}
		time.Sleep(time.Second)
	}
}

// checksums is sameChecksums, or under joint_sched loggedChecksums.
func (c *rcluster) checksums(joint bool, leader int, tables string, ids ...int) string {
	c.t.Helper()
	if joint {
		return c.loggedChecksums(leader, tables, ids...)
	}
	return c.sameChecksums(60*time.Second, tables, ids...)
}

// loggedChecksums runs CHECKSUM TABLE through the leader: under
// joint_sched a connection to a server that is not in the log is never
// admitted (mariadbChecksums cannot ask the backups). Every replica's
// server answers it from the log and the answers are compared as output
// digests: each of ids must compare more digests alike, and none may
// diverge on the query's connection, whose whole output (handshake and
// answer) is one small final digest checkpoint. Divergences revealed
// meanwhile on sysbench's connections (long outputs; a replica restored
// from a checkpoint reports them late) are logged: a residual of
// joint_sched for MariaDB (dmt/doc.go).
func (c *rcluster) loggedChecksums(leader int, tables string, ids ...int) string {
	c.t.Helper()
	c.settleDigests(leader)
	before := map[int]proxy.Status{}
	for _, id := range ids {
		s, err := c.status(id)
		if err != nil {
			c.t.Fatal(err)
		}
		before[id] = s
	}
	host, port, _ := net.SplitHostPort(c.clientAddr(leader))
	sum := strings.TrimSpace(run(c.t, time.Minute, "mariadb", "-h"+host, "-P"+port, "-usbtest", "sbtest", "-N", "-e", "CHECKSUM TABLE "+tables))
	deadline := time.Now().Add(60 * time.Second)
	for _, id := range ids {
		for {
			s, err := c.status(id)
			if err == nil && s.DigestsCompared > before[id].DigestsCompared {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("replica %d compared no digest of CHECKSUM TABLE: %+v %v", id, s, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	c.settleDigests(leader)
	for _, id := range ids {
		s, err := c.status(id)
		if err != nil {
			c.t.Fatal(err)
		}
		n := int(s.Divergences - before[id].Divergences)
		if n == 0 {
			continue
		}
		news := s.DivergenceList[max(len(s.DivergenceList)-n, 0):]
		for _, d := range news {
			if d.Final && d.Seq <= 1 && d.Len < 4096 {
				c.t.Fatalf("replica %d: CHECKSUM TABLE through the log diverged: %+v", id, d)
			}
		}
		c.t.Logf("replica %d: %d divergences on sysbench's connections revealed meanwhile: %+v", id, n, news)
	}
	return sum
}

func sysbench(addr string, args ...string) []string { return sysbenchTables(addr, 2, 5000, args...) }

// sysbenchTables: oltp_read_write's arguments for tables of rows each,
// against addr, then args.
func sysbenchTables(addr string, tables, rows int, args ...string) []string {
	host, port, _ := net.SplitHostPort(addr)
	return append([]string{"oltp_read_write", "--mysql-host=" + host, "--mysql-port=" + port, "--mysql-user=sbtest",
		"--mysql-db=sbtest", "--tables=" + strconv.Itoa(tables), "--table-size=" + strconv.Itoa(rows)}, args...)
}

// TestRecoverMariaDB: sysbench (one thread: proxy_only) runs against the
// leader; a backup is SIGKILLed with its container, started again: it
// restores its newest checkpoint, replays the log and its tables match
// the others'. Then a fresh fourth replica joins as a learner, restores a
// peer's checkpoint, replays, is promoted and matches too.
func TestRecoverMariaDB(t *testing.T) {
	// Long (three MariaDBs, sysbench, a join): with the soaks. It used to
	// fail one run in four: a replica behind the log ran sysbench's run
	// connection beside its prepare connection (TCPFeederOptions.
	// OrderConnects); 7 runs in a row pass since.
	if os.Getenv("LOCKSTEP_SOAK") == "" {
		t.Skip("MariaDB kill/restore/join under sysbench: long; run with LOCKSTEP_SOAK=1 (make soak)")
	}
	recoverMariaDB(t, false, 1, 25, 15)
}

// TestRecoverMariaDBJointSched is TestRecoverMariaDB under joint_sched
// (the servers under the deterministic runtime fed by the log, every
// image carrying the runtime and its input channel) with 4 sysbench
// threads, shorter.
func TestRecoverMariaDBJointSched(t *testing.T) {
	recoverMariaDB(t, true, 4, 15, 10)
}

// recoverMariaDB: sysbench runs against the leader (threads, for
// killSecs, then for joinSecs); a backup is SIGKILLed with its container,
// started again; then a fresh replica joins. Joint runs the servers under
// joint_sched.
func recoverMariaDB(t *testing.T, joint bool, threads, killSecs, joinSecs int) {
	needRecoveryTools(t, "/usr/sbin/mariadbd", "mariadb-install-db", "sysbench", "nsenter")
	c := newRCluster(t, "mariadb", 4, true, "enabled = true\nevery_entries = 1000\nkeep = 2\nkeep_entries = 200\ndata_size = \"512m\"",
		func(s string) string {
			// Three MariaDBs, sysbench and CRIU on two cores stall a replica
			// for a second at times: a longer election timeout keeps the
			// leader (a lost quorum resets the clients).
			s = strings.Replace(s, "election_ticks = 10", "election_ticks = 30", 1)
			return strings.Replace(s, `MARIADB_BUFFER_POOL = "256M"`, `MARIADB_BUFFER_POOL = "32M"`, 1)
		})
	var flags []string
	if joint {
		flags = []string{"--dmt"}
	}
	leader := c.startInitial(90*time.Second, flags...)
	addr := c.clientAddr(leader)
	run(t, 2*time.Minute, "sysbench", sysbench(addr, "prepare")...)

	victim := leader%3 + 1
	load := exec.Command("sysbench", sysbench(addr, fmt.Sprintf("--threads=%d", threads), fmt.Sprintf("--time=%d", killSecs), "--report-interval=0", "run")...)
	var loadOut bytes.Buffer
	load.Stdout, load.Stderr = &loadOut, &loadOut
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for a checkpoint of the victim, or at least one it can fetch.
	c.waitCompactedAt(60*time.Second, 1, victim)
	for _, id := range []int{1, 2, 3} {
		if st, err := c.ckStatus(id); err == nil {
			for _, r := range st.Records {
				if r.Op == "dump" {
					t.Logf("replica %d: checkpoint at %d: server paused %.0f ms, replica stopped %.0f ms, image %d KiB",
						id, r.Index, r.PauseMS, r.ApplyStopMS, r.ImageBytes>>10)
				}
			}
		}
	}
	c.kill(victim)
	t.Logf("replica %d (a backup) SIGKILLed with its container", victim)
	time.Sleep(2 * time.Second)
	restart := time.Now()
	c.start(victim, flags...)
	st, rec := c.waitRestored(60*time.Second, victim)
	t.Logf("replica %d restored checkpoint %s at %d (image %d KiB, fetched %v, restore %.0f ms), replayed to %d %.0f ms later (%.0f entries/s); %.1f s after its restart",
		victim, rec.ID, rec.Index, rec.ImageBytes>>10, rec.Fetched, rec.RestoreMS, st.CaughtUpTo, st.CaughtUpMS,
		float64(st.CaughtUpTo-st.RestoredAt)/max(st.CaughtUpMS, 1)*1000, time.Since(restart).Seconds())
	if err := load.Wait(); err != nil {
		t.Fatalf("sysbench: %v\n%s", err, loadOut.String())
	}
	t.Logf("sysbench:\n%s", grepLines(loadOut.String(), "transactions:", "ignored errors:"))
	// With more than one thread InnoDB may pick a deadlock victim, which
	// sysbench retries and counts as ignored; sysbench fails on any other.
	if threads == 1 && !regexp.MustCompile(`ignored errors:\s+0 `).MatchString(loadOut.String()) {
		t.Errorf("sysbench saw errors:\n%s", loadOut.String())
	}
	c.waitApplied(60*time.Second, leader, 1, 2, 3)
	sum := c.checksums(joint, leader, "sbtest1, sbtest2", 1, 2, 3)
	t.Logf("after the recovery, CHECKSUM TABLE alike on replicas 1-3: %s", strings.ReplaceAll(sum, "\n", "; "))

	// A fresh replica joins under load.
	load = exec.Command("sysbench", sysbench(addr, fmt.Sprintf("--threads=%d", threads), fmt.Sprintf("--time=%d", joinSecs), "--report-interval=0", "run")...)
	loadOut.Reset()
	load.Stdout, load.Stderr = &loadOut, &loadOut
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	c.start(4, append([]string{"--join"}, flags...)...)
	time.Sleep(time.Second)
	joined := time.Now()
	out := run(t, time.Minute, c.bin, "join", "--config", c.cfg, "--id", "4")
	t.Log(strings.TrimSpace(out))
	deadline := time.Now().Add(90 * time.Second)
	for {
		st, err := c.ckStatus(4)
		ns := nodeStatus(c, leader)
		if err == nil && st.RestoredAt > 0 && ns != nil {
			if _, ok := ns.Members[4]; ok && !contains(ns.Learners, 4) {
				t.Logf("replica 4 restored the checkpoint at %d from a peer, caught up and was promoted %.1f s after being added",
					st.RestoredAt, time.Since(joined).Seconds())
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica 4 did not restore and get promoted: %+v %v %+v", st, err, ns)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := load.Wait(); err != nil {
		t.Fatalf("sysbench: %v\n%s", err, loadOut.String())
	}
	c.waitApplied(60*time.Second, leader, 1, 2, 3, 4)
	sum4 := c.checksums(joint, leader, "sbtest1, sbtest2", 1, 2, 3, 4)
	t.Logf("after the join, CHECKSUM TABLE alike on replicas 1-4: %s", strings.ReplaceAll(sum4, "\n", "; "))
	if sum4 == sum {
		t.Error("the tables did not change during the join's load")
	}
	for id := 1; id <= 4; id++ {
		// Reported, not asserted: under proxy_only replies differ by
		// design, and under joint_sched a few may (dmt/doc.go).
		if s, err := c.status(id); err == nil {
			t.Logf("replica %d: %d output digests compared alike, %d divergences", id, s.DigestsCompared, s.Divergences)
		}
	}
}

type nodeStatusT struct {
	Learners []uint64          `json:"learners"`
	Members  map[uint64]string `json:"members"`
}

// nodeStatus is the log node's view of the membership (/status/log).
func nodeStatus(c *rcluster, id int) *nodeStatusT {
	var ns nodeStatusT
	if err := getJSON("http://"+c.admin(id)+"/status/log", &ns); err != nil {
		return nil
	}
	return &ns
}

func contains(ids []uint64, id uint64) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}
