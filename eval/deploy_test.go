package eval

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"lockstep/configs"
	"lockstep/proxy"
)

var lockstepBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lockstep-eval-bin-")
	if err != nil {
		panic(err)
	}
	lockstepBin = filepath.Join(dir, "lockstep")
	if out, err := exec.Command("go", "build", "-o", lockstepBin, "lockstep/cmd/lockstep").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building lockstep: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	for _, bin := range []string{"/usr/sbin/apache2", "ab"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (make setup)", bin)
		}
	}
}

// worldDir is a temporary directory that Apache's child (www-data) can
// search, unlike t.TempDir's.
func worldDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	for _, p := range []string{filepath.Dir(d), d} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func loadApache(t *testing.T) *configs.Config {
	t.Helper()
	cfg, err := configs.Load("../configs/apache.toml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func runAB(t *testing.T, d *Deployment, replica int, args ...string) Measurement {
	t.Helper()
	argv := append([]string{"ab"}, args...)
	cmd, err := d.ClientCommand(context.Background(), argv, replica)
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	m, perr := ParseAB(string(out), nil)
	if perr != nil {
		t.Fatalf("ab: %v %v", err, perr)
	}
	return m
}

// replicaStatus reads a replica's /status from inside the client namespace.
func replicaStatus(d *Deployment, i int) (proxy.Status, error) {
	var st proxy.Status
	host := fmt.Sprintf("r%d", i+1)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.Cluster().DialContext(ctx, host, network, addr)
		}}}
	resp, err := client.Get("http://" + d.Admins()[i] + "/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// TestProxyOnlyInNamespaces runs the whole product as a user would: three
// `lockstep replica` processes in their own network namespaces with
// Apache, ab from the client namespace through a backup, then SIGKILL of
// the leader's process group: new connections succeed within 3 s and the
// survivors still agree.
func TestProxyOnlyInNamespaces(t *testing.T) {
	needRoot(t)
	cfg := loadApache(t)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	d, err := Deploy(context.Background(), DeployOptions{Config: cfg, Mode: configs.ModeProxyOnly, Replicas: 3,
		CPUQuota: 0, Bin: lockstepBin, WorkDir: worldDir(t), Run: "evaltest", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	leader := -1
	deadline := time.Now().Add(10 * time.Second)
	for leader < 0 && time.Now().Before(deadline) {
		for i := range d.Admins() {
			if st, err := replicaStatus(d, i); err == nil && st.Role == "leader" {
				leader = i
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if leader < 0 {
		t.Fatal("no leader")
	}
	backup := (leader + 1) % 3
	if _, set := os.LookupEnv("GOMAXPROCS"); !set {
		want := fmt.Sprintf("GOMAXPROCS=%d", replicaProcs(0, 3, runtime.NumCPU()))
		for i, cmd := range d.replicas {
			env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", cmd.Process.Pid))
			if err != nil || !slices.Contains(strings.Split(string(env), "\x00"), want) {
				t.Fatalf("replica %d's environment lacks %s (err %v)", i+1, want, err)
			}
		}
	}
	if got := fetchBodies(t, d, backup); got != origBodies(t, cfg) {
		t.Fatalf("bodies through proxy_only differ from orig's:\n%.300s\n---\n%.300s", got, origBodies(t, cfg))
	}
	m := runAB(t, d, backup, "-n", "300", "-c", "8", "http://{{.Addr}}/index.html")
	if m.Failed != 0 || m.Complete != 300 {
		t.Fatalf("through backup r%d: %d complete, %d failed", backup+1, m.Complete, m.Failed)
	}

	if err := d.KillReplica(leader + 1); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var served time.Duration
	for time.Since(killed) < 10*time.Second {
		cmd, _ := d.ClientCommand(context.Background(), []string{"curl", "-sf", "-m", "1", "-o", "/dev/null",
			"http://{{.Addr}}/index.html"}, backup)
		if cmd.Run() == nil {
			served = time.Since(killed)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if served == 0 || served > 3*time.Second {
		t.Fatalf("after SIGKILL of the leader, new connections succeeded after %v (want within 3s)", served)
	}
	t.Logf("a new connection succeeded %v after the leader was killed", served.Round(time.Millisecond))
	m = runAB(t, d, backup, "-n", "200", "-c", "8", "http://{{.Addr}}/index.html")
	if m.Failed != 0 {
		t.Fatalf("after failover: %d failed", m.Failed)
	}

	// The survivors applied the same log and found no divergence.
	time.Sleep(300 * time.Millisecond)
	var applied []uint64
	for i := range d.Admins() {
		if i == leader {
			continue
		}
		st, err := replicaStatus(d, i)
		if err != nil {
			t.Fatal(err)
		}
		if st.Divergences > 0 {
			t.Fatalf("replica r%d reports divergences: %+v", i+1, st.DivergenceList)
		}
		if st.DigestsCompared == 0 {
			t.Fatalf("replica r%d compared no digests", i+1)
		}
		applied = append(applied, st.Applied)
	}
	if applied[0] != applied[1] {
		t.Logf("survivors at applied %v (one may still be catching up)", applied)
	}
	logs := map[int][]byte{}
	for i := 0; i < 3; i++ {
		if i == leader {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d.opts.WorkDir, fmt.Sprintf("%d", i+1), "server", "access.log"))
		if err != nil {
			t.Fatal(err)
		}
		logs[i] = b
	}
	var counts []int
	for _, b := range logs {
		counts = append(counts, bytes.Count(b, []byte("\n")))
	}
	if counts[0] != counts[1] || counts[0] < 500 {
		t.Fatalf("survivors' access logs have %v lines (want equal, >= 500)", counts)
	}
}

// pages fetched to compare orig with the replicated modes: the static page
// and a short run of the CPU-bound one.
var pages = []string{"/index.html", "/cpu.lua?n=1000"}

func fetchBodies(t *testing.T, d *Deployment, replica int) string {
	t.Helper()
	var all strings.Builder
	for _, p := range pages {
		cmd, err := d.ClientCommand(context.Background(), []string{"curl", "-sf", "-m", "10", "http://{{.Addr}}" + p}, replica)
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("GET %s: %v", p, err)
		}
		fmt.Fprintf(&all, "%s\n%s\n", p, out)
	}
	return all.String()
}

var origBodyCache string

// origBodies are the pages as Apache alone (mode orig) serves them.
func origBodies(t *testing.T, cfg *configs.Config) string {
	t.Helper()
	if origBodyCache != "" {
		return origBodyCache
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	d, err := Deploy(context.Background(), DeployOptions{Config: cfg, Mode: configs.ModeOrig, CPUQuota: 0,
		Bin: lockstepBin, WorkDir: worldDir(t), Run: "evalorig", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	origBodyCache = fetchBodies(t, d, 0)
	return origBodyCache
}

// TestRunOrigCommand is `lockstep run --mode orig -- COMMAND`: the command
// runs in the client namespace with LOCKSTEP_ADDR and its exit status is
// lockstep's.
func TestRunOrigCommand(t *testing.T) {
	needRoot(t)
	out, err := exec.Command(lockstepBin, "run", "--config", "../configs/apache.toml", "--mode", "orig",
		"--work-dir", worldDir(t), "--log-level", "warn", "--",
		"sh", "-c", `curl -sf -o /dev/null http://$LOCKSTEP_ADDR/index.html && echo served $LOCKSTEP_ADDR; exit 7`).CombinedOutput()
	var ee *exec.ExitError
	if err == nil || !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Fatalf("exit: %v (want status 7)\n%s", err, out)
	}
	if !strings.Contains(string(out), "served 10.") {
		t.Fatalf("command did not reach the server:\n%s", out)
	}
}

// scrape reads a Prometheus text page into series -> value.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		i := strings.LastIndexByte(line, ' ')
		if line == "" || line[0] == '#' || i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			got[line[:i]] = v
		}
	}
	return got
}

// TestXternOnlyMetrics deploys Apache under the deterministic runtime
// alone (xtern_only): the runtime's statistics are served on localhost
// as lockstep_dmt_* and count the work of the requests sent meanwhile.
func TestXternOnlyMetrics(t *testing.T) {
	needRoot(t)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	d, err := Deploy(context.Background(), DeployOptions{Config: loadApache(t), Mode: configs.ModeXternOnly,
		CPUQuota: 0, Bin: lockstepBin, WorkDir: worldDir(t), Run: "evalxtern", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	url := d.DMTMetrics()
	if !strings.HasPrefix(url, "http://127.0.0.1:") {
		t.Fatalf("dmt metrics at %q, want localhost by default", url)
	}
	before := scrape(t, url)
	if m := runAB(t, d, 0, "-n", "100", "-c", "4", "http://{{.Addr}}/index.html"); m.Failed != 0 || m.Complete != 100 {
		t.Fatalf("ab: %d complete, %d failed", m.Complete, m.Failed)
	}
	after := scrape(t, url)
	const turns, accepts = "lockstep_dmt_turns_total", `lockstep_dmt_ops_total{op="accept"}`
	if after["lockstep_dmt_up"] != 1 || after[turns] <= before[turns] || before[turns] == 0 ||
		after[accepts]-before[accepts] < 100 {
		t.Fatalf("%s: up %v, turns %v -> %v, accepts %v -> %v; want up, turns growing, 100 more accepts",
			url, after["lockstep_dmt_up"], before[turns], after[turns], before[accepts], after[accepts])
	}
	// Steals are lost determinism: none in Apache, and none from the
	// helper that starts it in the namespace (it must not run under the
	// runtime meant for the server).
	if v, ok := after["lockstep_dmt_steals_total"]; !ok || v != 0 {
		t.Fatalf("%s: lockstep_dmt_steals_total %v (present %v), want 0", url, v, ok)
	}
	const waits, steals = "lockstep_dmt_turn_waits_total", "lockstep_dmt_steals_total"
	t.Logf("%s: over 100 requests turns %.0f -> %.0f, waits %.0f -> %.0f, steals %.0f -> %.0f", url,
		before[turns], after[turns], before[waits], after[waits], before[steals], after[steals])
}

// A replica gets the cores of its quota, else its share of the machine's,
// and never none.
func TestReplicaProcs(t *testing.T) {
	for _, c := range []struct {
		quota           float64
		replicas, cores int
		want            int
	}{
		{0, 3, 2, 1},
		{0, 3, 16, 5},
		{0, 1, 8, 8},
		{0, 0, 4, 4},
		{0.5, 3, 16, 1},
		{1.5, 3, 2, 2},
		{4, 3, 16, 4},
	} {
		if got := replicaProcs(c.quota, c.replicas, c.cores); got != c.want {
			t.Errorf("replicaProcs(%v, %d, %d) = %d, want %d", c.quota, c.replicas, c.cores, got, c.want)
		}
	}
}
