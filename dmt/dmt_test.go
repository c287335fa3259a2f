package dmt

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// built builds the runtime and the racy fixture once per test binary.
var built struct {
	once      sync.Once
	lib, racy string
	err       error
}

func build(t *testing.T) (lib, racy string) {
	t.Helper()
	built.once.Do(func() {
		if built.lib, built.err = Library(); built.err != nil {
			return
		}
		root, err := RepoRoot()
		if err != nil {
			built.err = err
			return
		}
		out := filepath.Join(root, ".build", "racy")
		if built.err = Make(filepath.Join(root, "apps", "racy"), out); built.err == nil {
			built.racy = filepath.Join(out, "racy")
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.lib, built.racy
}

// racyRequests are fed one at a time, each answered before the next is sent.
var racyRequests = []string{"RUN 4 40", "RUN 3 30", "RUN 8 60", "RUN 2 100", "RUN 16 20"}

// racyRun is one run of the fixture: its answers and, under the runtime,
// its statistics once it is idle again.
type racyRun struct {
	answers []string
	stats   *Stats
}

// runRacy starts the fixture with env added, feeds it racyRequests on one
// connection and collects its answers. With shm set, it then waits until
// the server is idle (its two remaining threads blocked in accept and recv)
// and reads its statistics.
func runRacy(t *testing.T, racy string, env []string, shm string) racyRun {
	t.Helper()
	cmd := exec.Command(racy)
	cmd.Env = MergeEnv(os.Environ(), env)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	var port int
	if _, err := fmt.Fscanf(bufio.NewReader(stdout), "PORT %d\n", &port); err != nil {
		t.Fatalf("racy: reading its port: %v", err)
	}
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(c)
	var run racyRun
	for _, req := range racyRequests {
		if _, err := fmt.Fprintf(c, "%s\n", req); err != nil {
			t.Fatal(err)
		}
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("racy: %s: %v", req, err)
		}
		if !strings.HasPrefix(line, "OK ") {
			t.Fatalf("racy: %s: %q", req, line)
		}
		run.answers = append(run.answers, strings.TrimSpace(line))
	}
	if shm == "" {
		return run
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := ReadStats(shm)
		if err == nil && st.LiveProcesses == 1 && st.LiveThreads == 2 && st.Blocked == 2 {
			run.stats = &st
			return run
		}
		if time.Now().After(deadline) {
			t.Fatalf("racy: not idle after its answers: %+v (%v)", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Under plain execution the answers depend on how the threads interleave.
func TestRacyOrigVaries(t *testing.T) {
	_, racy := build(t)
	distinct := map[string]int{}
	for i := 0; i < 5; i++ {
		distinct[strings.Join(runRacy(t, racy, nil, "").answers, "\n")]++
	}
	if len(distinct) < 2 {
		t.Fatalf("orig: 5 runs gave 1 distinct answer; the fixture does not race")
	}
	t.Logf("orig: 5 runs, %d distinct answers", len(distinct))
}

// Under the runtime the same requests give the same answers, the same
// number of turns and the same operations, every run.
func TestRacyXternDeterministic(t *testing.T) {
	lib, racy := build(t)
	var first racyRun
	for i := 0; i < 5; i++ {
		shm := filepath.Join(t.TempDir(), "dmt.shm")
		env, err := Env(Options{Library: lib, Shm: shm})
		if err != nil {
			t.Fatal(err)
		}
		run := runRacy(t, racy, env, shm)
		st := run.stats
		if i == 0 {
			first = run
			t.Logf("xtern_only: turns=%d waits=%d wait=%v timeouts=%d idle=%d threads=%d ops=%v",
				st.Total.Turns, st.Total.Waits, time.Duration(st.Total.WaitNS), st.Total.Timeouts,
				st.Total.IdleAdvances, st.Total.Threads, st.Total.Ops)
			checkRacyStats(t, st)
			checkCollector(t, shm)
			continue
		}
		for j := range run.answers {
			if run.answers[j] != first.answers[j] {
				t.Fatalf("run %d, request %q: answer differs:\n%s\nfirst run:\n%s", i, racyRequests[j],
					run.answers[j], first.answers[j])
			}
		}
		if st.Total.Turns != first.stats.Total.Turns || !reflect.DeepEqual(st.Total.Ops, first.stats.Total.Ops) ||
			st.Total.Timeouts != first.stats.Total.Timeouts {
			t.Fatalf("run %d: schedule differs: turns %d ops %v timeouts %d; first run: turns %d ops %v timeouts %d",
				i, st.Total.Turns, st.Total.Ops, st.Total.Timeouts,
				first.stats.Total.Turns, first.stats.Total.Ops, first.stats.Total.Timeouts)
		}
	}
}

// checkRacyStats checks that the statistics count what the fixture did.
func checkRacyStats(t *testing.T, st *Stats) {
	t.Helper()
	k := 0
	for _, r := range racyRequests {
		var n, m int
		fmt.Sscanf(r, "RUN %d %d", &n, &m)
		k += n
	}
	ops := st.Total.Ops
	// one connection thread, then k workers per request
	if ops["thread_create"] != uint64(k+1) || ops["thread_join"] != uint64(k) || ops["barrier_wait"] != uint64(k) {
		t.Errorf("ops %v: want %d creates, %d joins, %d barrier waits", ops, k+1, k, k)
	}
	if ops["mutex_lock"] == 0 || ops["mutex_lock"]+ops["mutex_lock_private"] != ops["mutex_unlock"]+ops["mutex_unlock_private"] {
		t.Errorf("ops %v: mutex locks and unlocks do not pair", ops)
	}
	for _, op := range []string{"cond_wait", "cond_signal", "cond_broadcast", "rwlock_rdlock", "rwlock_wrlock",
		"sem_wait", "sem_post", "sleep", "yield", "accept", "recv", "send"} {
		if ops[op] == 0 {
			t.Errorf("ops %v: no %s", ops, op)
		}
	}
	if st.Total.Timeouts == 0 {
		t.Errorf("no timed wait expired; the fixture's timed waits should")
	}
	if st.Total.Turns < ops["mutex_lock"] {
		t.Errorf("turns %d < mutex locks %d", st.Total.Turns, ops["mutex_lock"])
	}
}

// checkCollector checks the Prometheus view of a statistics file whose
// server has exited (so that it no longer changes).
func checkCollector(t *testing.T, shm string) {
	t.Helper()
	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(shm))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "{" + l.GetValue() + "}"
			}
			if c := m.GetCounter(); c != nil {
				got[name] = c.GetValue()
			} else if g := m.GetGauge(); g != nil {
				got[name] = g.GetValue()
			}
		}
	}
	want := map[string]float64{
		"lockstep_dmt_up":                       1,
		"lockstep_dmt_turns_total":              float64(st.Total.Turns),
		"lockstep_dmt_ops_total{mutex_lock}":    float64(st.Total.Ops["mutex_lock"]),
		"lockstep_dmt_threads_created_total":    float64(st.Total.Threads),
		"lockstep_dmt_steals_total":             float64(st.Total.Steals),
		"lockstep_dmt_processes":                0, // the server is gone by now
		"lockstep_dmt_blocked_threads":          0,
		"lockstep_dmt_ops_total{thread_create}": float64(st.Total.Ops["thread_create"]),
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("collector: %s = %v (present: %v), want %v", k, g, ok, v)
		}
	}
}
