package dmt

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var dmtcheck struct {
	once sync.Once
	path string
	err  error
}

// buildCheck compiles testdata/dmtcheck.c with the system compiler.
func buildCheck(t *testing.T) string {
	t.Helper()
	dmtcheck.once.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			dmtcheck.err = err
			return
		}
		dir := filepath.Join(root, ".build", "dmt")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			dmtcheck.err = err
			return
		}
		dmtcheck.path = filepath.Join(dir, "dmtcheck")
		out, err := exec.Command("cc", "-O2", "-pthread", "-Wall", "-o", dmtcheck.path,
			filepath.Join(root, "dmt", "testdata", "dmtcheck.c")).CombinedOutput()
		if err != nil {
			dmtcheck.err = &buildError{err, string(out)}
		}
	})
	if dmtcheck.err != nil {
		t.Fatal(dmtcheck.err)
	}
	return dmtcheck.path
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "cc dmtcheck.c: " + e.err.Error() + "\n" + e.out }

// runCheck runs one mode of dmtcheck under the runtime and returns its
// statistics.
func runCheck(t *testing.T, mode string) Stats {
	t.Helper()
	lib, _ := build(t)
	bin := buildCheck(t)
	shm := filepath.Join(t.TempDir(), "dmt.shm")
	env, err := Env(Options{Library: lib, Shm: shm})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, mode)
	cmd.Env = MergeEnv(os.Environ(), env)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("dmtcheck %s: still running after 30s (deadlock?)\n%s", mode, out)
	}
	if err != nil || !strings.Contains(string(out), "OK "+mode) {
		t.Fatalf("dmtcheck %s: %v\n%s", mode, err, out)
	}
	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// A thread blocked in a system call the runtime cannot see, whose wake-up
// needs another thread to get the turn first, must not stall the process:
// the safety net takes it out of the run queue.
func TestSafetyNetUnknownBlockingCall(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the test program's raw system call is written for amd64")
	}
	st := runCheck(t, "steal")
	if st.Total.Steals == 0 {
		t.Errorf("no steal counted; the test program did not block where it should: %+v", st.Total)
	}
}

// fork with threads running: parent and child each keep a working runtime.
func TestFork(t *testing.T) {
	st := runCheck(t, "fork")
	if len(st.Processes) != 2 || st.Total.Forks != 1 {
		t.Fatalf("want 2 processes and 1 fork, got %d processes, %d forks", len(st.Processes), st.Total.Forks)
	}
	for _, p := range st.Processes {
		if p.Ops["mutex_lock"]+p.Ops["mutex_lock_private"] == 0 || p.Ops["thread_create"] == 0 {
			t.Errorf("process %d did no work under the runtime: %v", p.PID, p.Ops)
		}
	}
}

// Logical sleeps and timed waits end when nobody else runs, and a handled
// signal interrupts a sleep.
func TestLogicalTime(t *testing.T) {
	st := runCheck(t, "time")
	if st.Total.Timeouts < 2 || st.Total.IdleAdvances < 2 {
		t.Errorf("want the sleep and the timed wait to expire while idle: timeouts %d, idle advances %d",
			st.Total.Timeouts, st.Total.IdleAdvances)
	}
}

// pthread_once, spin locks, trylock, recursive and errorcheck mutexes,
// detached threads.
func TestMiscPrimitives(t *testing.T) {
	st := runCheck(t, "misc")
	for _, op := range []string{"once", "spin", "thread_exit"} {
		if st.Total.Ops[op] == 0 {
			t.Errorf("no %s counted: %v", op, st.Total.Ops)
		}
	}
}
