package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"lockstep/configs"
)

// ---------------------------------------------------------------------
// fixture is a small real TCP server: it echoes what it receives and says
// "bye\n" when the client half-closes, or, for a stream that starts with
// "SHA\n", answers the hex SHA-256 of the rest. It records every
// connection, in accept order.

type fixture struct {
	ln     net.Listener
	exited chan struct{}
	mu     sync.Mutex
	conns  []*fixConn
	gate   chan struct{} // closed: running; open: paused
	wg     sync.WaitGroup
}

type fixConn struct {
	f     *fixture
	c     net.Conn
	mu    sync.Mutex
	data  []byte // received, echo mode
	sha   string // sha mode: the hash of the body
	state string // open, eof (ended cleanly), reset
}

type fixRecord struct {
	Data  string
	SHA   string
	State string
}

func newFixture(t testing.TB) *fixture {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{ln: ln, exited: make(chan struct{}), gate: make(chan struct{})}
	close(f.gate)
	go f.serve()
	return f
}

// pause stops the server from accepting and reading (the kernel still
// completes connections and buffers what it can), like a server that is
// slow or stuck.
func (f *fixture) pause() {
	f.mu.Lock()
	f.gate = make(chan struct{})
	f.mu.Unlock()
}

func (f *fixture) resume() {
	f.mu.Lock()
	close(f.gate)
	f.mu.Unlock()
}

func (f *fixture) wait() {
	f.mu.Lock()
	g := f.gate
	f.mu.Unlock()
	select {
	case <-g:
	case <-f.exited:
	}
}

func (f *fixture) Addr() string            { return f.ln.Addr().String() }
func (f *fixture) Exited() <-chan struct{} { return f.exited }

func (f *fixture) Stop() error {
	select {
	case <-f.exited:
		return nil
	default:
	}
	f.ln.Close()
	f.mu.Lock()
	for _, fc := range f.conns {
		fc.c.Close()
	}
	select {
	case <-f.gate:
	default:
		close(f.gate)
	}
	f.mu.Unlock()
	f.wg.Wait()
	close(f.exited)
	return nil
}

func (f *fixture) serve() {
	for {
		f.wait()
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		fc := &fixConn{f: f, c: c, state: "open"}
		f.mu.Lock()
		f.conns = append(f.conns, fc)
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			fc.serve()
		}()
	}
}

func (fc *fixConn) serve() {
	defer fc.c.Close()
	end := func(state string) {
		fc.mu.Lock()
		fc.state = state
		fc.mu.Unlock()
	}
	head := make([]byte, 4)
	n, err := io.ReadFull(fc.c, head)
	var h hash.Hash
	if n == 4 && string(head) == "SHA\n" {
		h = sha256.New()
	} else {
		fc.add(head[:n])
		if _, werr := fc.c.Write(head[:n]); werr != nil {
			end("reset")
			return
		}
	}
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		end("reset")
		return
	}
	buf := make([]byte, 64<<10)
	for err == nil {
		fc.f.wait()
		n, err = fc.c.Read(buf)
		if n > 0 {
			if h != nil {
				h.Write(buf[:n])
			} else {
				fc.add(buf[:n])
				if _, werr := fc.c.Write(buf[:n]); werr != nil {
					end("reset")
					return
				}
			}
		}
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		end("reset")
		return
	}
	var reply string
	if h != nil {
		sum := hex.EncodeToString(h.Sum(nil))
		fc.mu.Lock()
		fc.sha = sum
		fc.mu.Unlock()
		reply = sum + "\n"
	} else {
		reply = "bye\n"
	}
	if _, err := fc.c.Write([]byte(reply)); err != nil {
		end("reset")
		return
	}
	end("eof")
}

func (fc *fixConn) add(b []byte) {
	fc.mu.Lock()
	fc.data = append(fc.data, b...)
	fc.mu.Unlock()
}

// records are the connections in accept order.
func (f *fixture) records() []fixRecord {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]fixRecord, len(f.conns))
	for i, fc := range f.conns {
		fc.mu.Lock()
		out[i] = fixRecord{Data: string(fc.data), SHA: fc.sha, State: fc.state}
		fc.mu.Unlock()
	}
	return out
}

func (f *fixture) open() int {
	n := 0
	for _, r := range f.records() {
		if r.State == "open" {
			n++
		}
	}
	return n
}

// clean keeps the connections that ended cleanly: the ones whose received
// bytes do not depend on when a reset arrived.
func clean(rs []fixRecord) []fixRecord {
	var out []fixRecord
	for _, r := range rs {
		if r.State == "eof" {
			out = append(out, r)
		}
	}
	return out
}

// ---------------------------------------------------------------------
// testCluster is N replicas in this process.

type testCluster struct {
	t        *testing.T
	dir      string
	replicas []configs.Replica
	opts     func(*Options)
	server   func(id uint64) StartServerFunc
	reps     map[uint64]*Replica
	mu       sync.Mutex
}

// freePort picks a free port below the ephemeral range, so that no
// outgoing connection takes it before the replica listens on it.
func freePort(t testing.TB) string {
	for i := 0; i < 1000; i++ {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+mrand.IntN(12000))
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			ln.Close()
			return addr
		}
	}
	t.Fatal("no free port")
	return ""
}

func testLogger() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.ErrorLevel)
	if lv, err := logrus.ParseLevel(os.Getenv("LOCKSTEP_TEST_LOG")); err == nil {
		l.SetLevel(lv)
	}
	return l
}

func newTestCluster(t *testing.T, n int, server func(id uint64) StartServerFunc, opts func(*Options)) *testCluster {
	c := &testCluster{t: t, dir: t.TempDir(), server: server, opts: opts, reps: map[uint64]*Replica{}}
	for i := 1; i <= n; i++ {
		c.replicas = append(c.replicas, configs.Replica{ID: uint64(i), Peer: freePort(t), Listen: freePort(t), Admin: "127.0.0.1:0"})
	}
	for i := 1; i <= n; i++ {
		c.start(uint64(i))
	}
	t.Cleanup(c.stopAll)
	c.leader()
	return c
}

func (c *testCluster) start(id uint64) *Replica {
	c.t.Helper()
	o := Options{
		ID: id, ClusterID: 11, Replicas: c.replicas, DataDir: filepath.Join(c.dir, fmt.Sprint(id)),
		Log:         configs.Log{TickMS: 20, ElectionTicks: 15, HeartbeatTicks: 1, NoSync: true},
		StartServer: c.server(id), Logger: testLogger(), LeaderWait: 5 * time.Second,
	}
	if c.opts != nil {
		c.opts(&o)
	}
	r, err := Start(context.Background(), o)
	if err != nil {
		c.t.Fatalf("replica %d: %v", id, err)
	}
	c.mu.Lock()
	c.reps[id] = r
	c.mu.Unlock()
	return r
}

func (c *testCluster) stop(id uint64) {
	c.mu.Lock()
	r := c.reps[id]
	delete(c.reps, id)
	c.mu.Unlock()
	if r != nil {
		r.Stop()
	}
}

func (c *testCluster) stopAll() {
	c.mu.Lock()
	ids := make([]uint64, 0, len(c.reps))
	for id := range c.reps {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.stop(id)
		}()
	}
	wg.Wait()
}

func (c *testCluster) live() []*Replica {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*Replica
	for _, r := range c.reps {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].o.ID < out[j].o.ID })
	return out
}

func (c *testCluster) rep(id uint64) *Replica {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reps[id]
}

// leader waits for a replica that serves clients.
func (c *testCluster) leader() *Replica {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, r := range c.live() {
			if r.Status().Serving {
				return r
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.t.Fatal("no replica serves")
	return nil
}

func (c *testCluster) backups() []*Replica {
	l := c.leader()
	var out []*Replica
	for _, r := range c.live() {
		if r != l {
			out = append(out, r)
		}
	}
	return out
}

// settle waits until every live replica has applied the same, committed
// index, twice in a row a little apart (digest reports still trickle in).
func (c *testCluster) settle(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last uint64
	stable := 0
	for time.Now().Before(deadline) {
		rs := c.live()
		commit := uint64(0)
		for _, r := range rs {
			commit = max(commit, r.Node().Status().Commit)
		}
		same := true
		for _, r := range rs {
			if r.Applied() != commit {
				same = false
			}
		}
		if same && commit == last {
			stable++
			if stable >= 3 {
				return
			}
		} else {
			stable = 0
		}
		last = commit
		time.Sleep(60 * time.Millisecond)
	}
	for _, r := range c.live() {
		t.Logf("replica %d: %+v", r.o.ID, r.Status())
	}
	t.Fatal("replicas did not settle")
}

func (c *testCluster) noDivergence(t testing.TB) {
	t.Helper()
	for _, r := range c.live() {
		st := r.Status()
		if st.Divergences != 0 {
			t.Errorf("replica %d found %d divergences: %+v", st.ID, st.Divergences, st.DivergenceList)
		}
	}
}

func dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// readFull reads n bytes or fails.
func readFull(c net.Conn, n int, timeout time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	return b, err
}

func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
