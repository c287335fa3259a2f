package proxy

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"lockstep/dmt"
)

// The interleaving fixture (apps/racy) on 3 replicas with 8 concurrent
// clients: under joint_sched every replica's server writes the same bytes
// on every connection; under proxy_only (the same server without the
// runtime) the transcripts differ.

var racyBuild struct {
	once      sync.Once
	lib, racy string
	err       error
}

func buildRacy(t *testing.T) (lib, racy string) {
	t.Helper()
	racyBuild.once.Do(func() {
		root, err := dmt.RepoRoot()
		if err != nil {
			racyBuild.err = err
			return
		}
		if racyBuild.lib, err = dmt.Library(); err != nil {
			racyBuild.err = err
			return
		}
		out := filepath.Join(root, ".build", "racy")
		if racyBuild.err = dmt.Make(filepath.Join(root, "apps", "racy"), out); racyBuild.err == nil {
			racyBuild.racy = filepath.Join(out, "racy")
		}
	})
	if racyBuild.err != nil {
		t.Skipf("cannot build the runtime or the fixture: %v", racyBuild.err)
	}
	return racyBuild.lib, racyBuild.racy
}

// transcripts records each replica's server output per connection.
type transcripts struct {
	mu sync.Mutex
	m  map[uint64]map[uint64][]byte // replica -> conn -> output
}

func (ts *transcripts) tap(id uint64) func(conn uint64, b []byte) {
	return func(conn uint64, b []byte) {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		if ts.m[id] == nil {
			ts.m[id] = map[uint64][]byte{}
		}
		ts.m[id][conn] = append(ts.m[id][conn], b...)
	}
}

func (ts *transcripts) size() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	n := 0
	for _, cs := range ts.m {
		for _, b := range cs {
			n += len(b)
		}
	}
	return n
}

// diff compares every replica's transcripts with replica 1's: the number
// of connections that differ (or are missing) somewhere.
func (ts *transcripts) diff(t *testing.T, ids []uint64) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	conns := map[uint64]bool{}
	for _, id := range ids {
		for c := range ts.m[id] {
			conns[c] = true
		}
	}
	bad := 0
	for c := range conns {
		ref := ts.m[ids[0]][c]
		for _, id := range ids[1:] {
			if got := ts.m[id][c]; string(got) != string(ref) {
				if bad == 0 {
					t.Logf("connection %x: replica %d wrote %d bytes, replica %d %d; first difference: %s", c, ids[0], len(ref), id, len(got), firstByteDiff(ref, got))
				}
				bad++
				break
			}
		}
	}
	return bad
}

func firstByteDiff(a, b []byte) string {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	lo := max(0, i-20)
	return fmt.Sprintf("at %d: %q vs %q", i, a[lo:min(len(a), i+40)], b[lo:min(len(b), i+40)])
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// racyCluster runs the fixture on 3 replicas, joint (joint_sched) or
// not (proxy_only), drives clients x reqs requests through the leader and
// returns the transcripts once every replica has written them all.
func racyCluster(t *testing.T, joint bool, clients, reqs int, req string) (*transcripts, *testCluster) {
	lib, racy := buildRacy(t)
	ts := &transcripts{m: map[uint64]map[uint64][]byte{}}
	dirOf := replicaDirs(t)
	server := func(id uint64) StartServerFunc {
		return func(ctx context.Context) (Server, error) {
			dir, addr := dirOf(id), freePort(t)
			_, port, _ := net.SplitHostPort(addr)
			o := ExecOptions{Args: []string{racy, "-p", port}, Dir: dir, Addr: addr, HealthListen: joint}
			if joint {
				shm := filepath.Join(dir, "dmt.shm")
				if err := dmt.CreateChan(shm); err != nil {
					return nil, err
				}
				// LOCKSTEP_RACY_XTERN=1: the runtime without the channel
				// (each replica deterministic alone), a negative control
				xtern := os.Getenv("LOCKSTEP_RACY_XTERN") == "1"
				env, err := dmt.Env(dmt.Options{Library: lib, Shm: shm, Joint: !xtern})
				if err != nil {
					return nil, err
				}
				o.Env = env
			}
			return StartExec(ctx, o)
		}
	}
	opts := func(o *Options) {
		id := o.ID
		if !joint {
			o.NewFeeder = func(srv Server, out Output, log logrus.FieldLogger) Feeder {
				return NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: tapOutput{Output: out, tap: ts.tap(id)}, Logger: log})
			}
			return
		}
		if os.Getenv("LOCKSTEP_RACY_XTERN") == "1" {
			o.NewFeeder = func(srv Server, out Output, log logrus.FieldLogger) Feeder {
				return NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: tapOutput{Output: out, tap: ts.tap(id)}, Logger: log})
			}
			return
		}
		o.NewFeeder = jointFeeder(t, dirOf(id), ts.tap(id))
	}
	c := newTestCluster(t, 3, server, opts)
	addr := c.leader().ClientAddr()

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	replies := 0
	var rmu sync.Mutex
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			br := bufio.NewReader(conn)
			for j := 0; j < reqs; j++ {
				_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
				if _, err := fmt.Fprintf(conn, "%s\n", req); err != nil {
					errs <- err
					return
				}
				line, err := br.ReadString('\n')
				if err != nil {
					errs <- fmt.Errorf("client %d, request %d: %w", i, j, err)
					return
				}
				if len(line) < 3 || line[:3] != "OK " {
					errs <- fmt.Errorf("client %d: %q", i, line)
					return
				}
				rmu.Lock()
				replies++
				rmu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Wait until every replica's server has answered everything: the
	// transcripts stop growing.
	c.settle(t)
	last, stable := -1, 0
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline) && stable < 5; {
		n := ts.size()
		if n == last {
			stable++
		} else {
			stable = 0
		}
		last = n
		time.Sleep(100 * time.Millisecond)
	}
	return ts, c
}

func TestRacyJointSched(t *testing.T) {
	if testing.Short() {
		t.Skip("long")
	}
	runs := envInt("LOCKSTEP_RACY_RUNS", 5)
	reqs := envInt("LOCKSTEP_RACY_REQS", 500)
	for run := 1; run <= runs; run++ {
		t.Run(fmt.Sprintf("run%d", run), func(t *testing.T) {
			start := time.Now()
			ts, c := racyCluster(t, true, 8, reqs, "RUN 3 6")
			if bad := ts.diff(t, []uint64{1, 2, 3}); bad != 0 {
				t.Fatalf("joint_sched: %d connections differ between replicas", bad)
			}
			ts.mu.Lock()
			conns := len(ts.m[1])
			ts.mu.Unlock()
			if conns < 8 {
				t.Fatalf("only %d connections recorded", conns)
			}
			eventually(t, 10*time.Second, "digests compared", func() bool { return c.leader().Status().DigestsCompared >= 8 })
			c.noDivergence(t)
			t.Logf("joint_sched: 8 clients x %d requests, every replica's transcript of %d connections identical (%v, %d bubbles proposed so far)", reqs, conns, time.Since(start).Round(time.Millisecond), BubblesProposed())
		})
	}
}

func TestRacyProxyOnlyDiffers(t *testing.T) {
	if testing.Short() {
		t.Skip("long")
	}
	reqs := envInt("LOCKSTEP_RACY_REQS", 500)
	ts, _ := racyCluster(t, false, 8, reqs, "RUN 3 6")
	bad := ts.diff(t, []uint64{1, 2, 3})
	if bad == 0 {
		t.Fatal("proxy_only: every transcript is identical; the fixture shows no race")
	}
	t.Logf("proxy_only: %d of 8 connections differ between replicas", bad)
}

// replicaDirs gives each replica id a temporary directory of its own, made
// on first use.
func replicaDirs(t *testing.T) func(id uint64) string {
	dirs := map[uint64]string{}
	var mu sync.Mutex
	return func(id uint64) string {
		mu.Lock()
		defer mu.Unlock()
		if dirs[id] == "" {
			dirs[id] = t.TempDir()
		}
		return dirs[id]
	}
}

// jointFeeder is the joint_sched feeder of a replica whose server maps
// dir/dmt.shm (made with dmt.CreateChan before it started); tap, if set,
// records its output.
func jointFeeder(t *testing.T, dir string, tap func(conn uint64, b []byte)) func(Server, Output, logrus.FieldLogger) Feeder {
	return func(srv Server, out Output, log logrus.FieldLogger) Feeder {
		ch, err := dmt.OpenChan(filepath.Join(dir, "dmt.shm"))
		if err != nil {
			t.Errorf("%s: %v", dir, err)
			return NewTCPFeeder(TCPFeederOptions{Addr: srv.Addr, Output: out, Logger: log})
		}
		return NewDMTFeeder(DMTFeederOptions{Chan: ch, Tap: tap})(srv, out, log)
	}
}
