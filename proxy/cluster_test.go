package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// fixtureCluster runs n replicas, each with its own fixture server.
type fixtureCluster struct {
	*testCluster
	mu       sync.Mutex
	fixtures map[uint64]*fixture
}

func newFixtureCluster(t *testing.T, n int, opts func(*Options)) *fixtureCluster {
	fc := &fixtureCluster{fixtures: map[uint64]*fixture{}}
	fc.testCluster = newTestCluster(t, n, func(id uint64) StartServerFunc {
		return func(context.Context) (Server, error) {
			f := newFixture(t)
			fc.mu.Lock()
			fc.fixtures[id] = f
			fc.mu.Unlock()
			return f, nil
		}
	}, opts)
	return fc
}

func (fc *fixtureCluster) fixture(id uint64) *fixture {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	return fc.fixtures[id]
}

// agree checks that every live replica's server received the same
// connections in the same order, and returns them. With exact, every
// connection must be identical; otherwise a connection that some copy saw
// reset (a client abandoned it, a leader failed) may have been cut at a
// different place on each copy, and only the ones that ended cleanly
// everywhere must be identical: the others must be prefixes of each other.
func (fc *fixtureCluster) agree(t *testing.T, exact bool) []fixRecord {
	t.Helper()
	var ref []fixRecord
	var refID uint64
	for i, r := range fc.live() {
		recs := fc.fixture(r.o.ID).records()
		if i == 0 {
			ref, refID = recs, r.o.ID
			continue
		}
		if exact {
			if !reflect.DeepEqual(recs, ref) {
				t.Fatalf("server of replica %d received %d connections, replica %d's %d: they differ\n%s",
					r.o.ID, len(recs), refID, len(ref), firstDiff(recs, ref))
			}
			continue
		}
		if len(recs) != len(ref) {
			t.Fatalf("server of replica %d received %d connections, replica %d's %d", r.o.ID, len(recs), refID, len(ref))
		}
		for k := range recs {
			a, b := recs[k], ref[k]
			if a.State == "eof" && b.State == "eof" {
				if a != b {
					t.Fatalf("connection %d differs between replicas %d and %d:\n%s", k, r.o.ID, refID, firstDiff(recs[k:], ref[k:]))
				}
			} else if !strings.HasPrefix(a.Data, b.Data) && !strings.HasPrefix(b.Data, a.Data) {
				t.Fatalf("connection %d: replicas %d and %d received different bytes:\n%s", k, r.o.ID, refID, firstDiff(recs[k:], ref[k:]))
			}
		}
	}
	return ref
}

func firstDiff(a, b []fixRecord) string {
	for i := 0; i < min(len(a), len(b)); i++ {
		if a[i] != b[i] {
			return fmt.Sprintf("connection %d: %q (%s) vs %q (%s)", i, trunc(a[i].Data), a[i].State, trunc(b[i].Data), b[i].State)
		}
	}
	return "one is a prefix of the other"
}

func trunc(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// echoClient sends msgs one at a time, checks each echo, half-closes and
// expects "bye\n" then EOF.
func echoClient(addr string, msgs []string) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, m := range msgs {
		if _, err := c.Write([]byte(m)); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		got, err := readFull(c, len(m), 10*time.Second)
		if err != nil {
			return fmt.Errorf("echo of %q: %w", m, err)
		}
		if string(got) != m {
			return fmt.Errorf("echo %q, want %q", got, m)
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("after half-close: %w", err)
	}
	if string(rest) != "bye\n" {
		return fmt.Errorf("after half-close got %q, want bye", rest)
	}
	return nil
}

func TestFixtureCluster(t *testing.T) {
	c := newFixtureCluster(t, 3, func(o *Options) { o.MaxConnections = 8 })

	t.Run("streams", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		var sent []string
		for i := 0; i < 6; i++ {
			r := c.live()[i%3]
			var msgs []string
			for j := 0; j < 15; j++ {
				msgs = append(msgs, fmt.Sprintf("client %d via %d, message %d: %s\n", i, r.o.ID, j, strings.Repeat("x", mrand.IntN(3000))))
			}
			sent = append(sent, strings.Join(msgs, ""))
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := echoClient(r.ClientAddr(), msgs); err != nil {
					errs <- fmt.Errorf("client %d via replica %d: %w", i, r.o.ID, err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if t.Failed() {
			return
		}
		c.settle(t)
		got := c.agree(t, true)
		var recv []string
		for _, r := range got {
			if r.State != "eof" {
				t.Errorf("a connection ended %s", r.State)
			}
			recv = append(recv, r.Data)
		}
		sort.Strings(sent)
		sort.Strings(recv)
		if !reflect.DeepEqual(sent, recv) {
			t.Fatalf("the servers received %d streams, not the %d sent", len(recv), len(sent))
		}
		eventually(t, 5*time.Second, "digests compared", func() bool {
			return c.leader().Status().DigestsCompared >= 6
		})
		c.noDivergence(t)
	})

	t.Run("upload64MiB", func(t *testing.T) {
		start := time.Now()
		r := c.backups()[0] // relayed to the leader
		conn := dial(t, r.ClientAddr())
		defer conn.Close()
		h := sha256.New()
		errc := make(chan error, 1)
		go func() {
			if _, err := conn.Write([]byte("SHA\n")); err != nil {
				errc <- err
				return
			}
			buf := make([]byte, 1<<20)
			for i := 0; i < 64; i++ {
				_, _ = rand.Read(buf)
				h.Write(buf)
				if _, err := conn.Write(buf); err != nil {
					errc <- err
					return
				}
			}
			errc <- conn.CloseWrite()
		}()
		_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
		reply, err := io.ReadAll(conn)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		want := hex.EncodeToString(h.Sum(nil))
		if strings.TrimSpace(string(reply)) != want {
			t.Fatalf("reply %q, want %s", reply, want)
		}
		t.Logf("64 MiB through replica %d (a backup) in %v", r.o.ID, time.Since(start))
		c.settle(t)
		for _, rep := range c.live() {
			recs := c.fixture(rep.o.ID).records()
			if last := recs[len(recs)-1]; last.SHA != want {
				t.Errorf("server of replica %d hashed %q", rep.o.ID, last.SHA)
			}
		}
		c.agree(t, true)
	})

	t.Run("maxConnections", func(t *testing.T) {
		l := c.leader()
		eventually(t, 10*time.Second, "no clients left", func() bool {
			for _, r := range c.live() {
				if r.Status().Clients != 0 {
					return false
				}
			}
			return true
		})
		var held []*net.TCPConn
		defer func() {
			for _, h := range held {
				h.Close()
			}
		}()
		for i := 0; i < 8; i++ {
			h := dial(t, l.ClientAddr())
			held = append(held, h)
			if _, err := h.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			if b, err := readFull(h, 4, 5*time.Second); err != nil || string(b) != "ping" {
				t.Fatalf("connection %d: %q %v", i, b, err)
			}
		}
		// The replica resets a connection over the bound at once; the
		// reset may even reach the dial.
		if extra, err := net.DialTimeout("tcp", l.ClientAddr(), 3*time.Second); err == nil {
			_, _ = extra.Write([]byte("ping"))
			if b, err := readFull(extra, 4, 3*time.Second); err == nil {
				t.Fatalf("a ninth connection was served (%q)", b)
			}
			extra.Close()
		}
		// Free one: a new connection is served again.
		_ = held[0].CloseWrite()
		if rest, err := readFull(held[0], 4, 5*time.Second); err != nil || string(rest) != "bye\n" {
			t.Fatalf("closing: %q %v", rest, err)
		}
		eventually(t, 5*time.Second, "a slot frees", func() bool { return l.Status().Clients <= 7 })
		if err := echoClient(l.ClientAddr(), []string{"again"}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("garbage", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := 0; i < 40; i++ {
			r := c.live()[i%3]
			wg.Add(1)
			go func() {
				defer wg.Done()
				conn, err := net.DialTimeout("tcp", r.ClientAddr(), 3*time.Second)
				if err != nil {
					return // refused while full is fine
				}
				tc := conn.(*net.TCPConn)
				junk := make([]byte, 1+mrand.IntN(200000))
				_, _ = rand.Read(junk)
				switch i % 5 {
				case 0: // connect and reset
				case 1: // junk, then reset
					_, _ = tc.Write(junk)
				case 2: // junk and a plain close without reading
					_, _ = tc.Write(junk)
					tc.Close()
					return
				case 3: // connect and close
					tc.Close()
					return
				case 4: // junk, half-close, reset before reading
					_, _ = tc.Write(junk)
					_ = tc.CloseWrite()
					time.Sleep(time.Duration(mrand.IntN(20)) * time.Millisecond)
				}
				resetConn(tc)
			}()
		}
		// Junk on the log's port and the admin port too.
		for _, r := range c.live() {
			for _, addr := range []string{r.Node().Addr(), r.AdminAddr()} {
				if conn, err := net.Dial("tcp", addr); err == nil {
					junk := make([]byte, 4096)
					_, _ = rand.Read(junk)
					_, _ = conn.Write(junk)
					conn.Close()
				}
			}
		}
		wg.Wait()
		// Until the replicas are done with the abusive clients, their slots
		// (max_connections 8, relayed ones counting at the leader too) may
		// still be taken.
		eventually(t, 10*time.Second, "the replicas release the abusive clients", func() bool {
			for _, r := range c.live() {
				if r.Status().Clients != 0 {
					return false
				}
			}
			return true
		})
		for _, r := range c.live() {
			if err := echoClient(r.ClientAddr(), []string{"still there?\n", "yes\n"}); err != nil {
				t.Fatalf("via replica %d after the abuse: %v", r.o.ID, err)
			}
		}
		c.settle(t)
		c.agree(t, false)
		eventually(t, 10*time.Second, "connections closed", func() bool {
			for _, r := range c.live() {
				if r.Status().Connections != 0 || c.fixture(r.o.ID).open() != 0 {
					return false
				}
			}
			return true
		})
		for _, r := range c.live() {
			if err := r.Err(); err != nil {
				t.Fatalf("replica %d: %v", r.o.ID, err)
			}
		}
		c.noDivergence(t)
	})

	t.Run("metricsAndStatus", func(t *testing.T) {
		l := c.leader()
		resp, err := http.Get("http://" + l.AdminAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{"lockstep_proxy_events_proposed_total{type=\"data\"}", "lockstep_proxy_events_applied_total{type=\"connect\"}",
			"lockstep_proxy_divergences_total", "lockstep_log_commit_index", "lockstep_proxy_client_connections"} {
			if !bytes.Contains(body, []byte(want)) && !strings.HasPrefix(want, "lockstep_proxy_divergences") {
				t.Errorf("/metrics lacks %s", want)
			}
		}
		resp, err = http.Get("http://" + l.AdminAddr() + "/status")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if !bytes.Contains(body, []byte(`"role": "leader"`)) {
			t.Fatalf("/status: %s", body)
		}
	})
}

// TestLeaderFailure stops the leader in the middle of traffic.
func TestLeaderFailure(t *testing.T) {
	c := newFixtureCluster(t, 3, nil)
	old := c.leader()
	// Long-lived clients: through the leader, and relayed by each backup.
	type client struct {
		conn *net.TCPConn
		via  uint64
		done chan error
	}
	var clients []*client
	stop := make(chan struct{})
	for i, r := range []*Replica{old, old, c.backups()[0], c.backups()[1]} {
		cl := &client{conn: dial(t, r.ClientAddr()), via: r.o.ID, done: make(chan error, 1)}
		clients = append(clients, cl)
		go func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
				default:
				}
				m := fmt.Sprintf("client %d message %d\n", i, j)
				if _, err := cl.conn.Write([]byte(m)); err != nil {
					cl.done <- err
					return
				}
				if _, err := readFull(cl.conn, len(m), 10*time.Second); err != nil {
					cl.done <- err
					return
				}
			}
		}()
	}
	defer close(stop)
	time.Sleep(300 * time.Millisecond)
	for _, cl := range clients {
		select {
		case err := <-cl.done:
			t.Fatalf("client via %d failed before the leader did: %v", cl.via, err)
		default:
		}
	}

	killed := time.Now()
	c.stop(old.o.ID)
	for _, cl := range clients {
		select {
		case err := <-cl.done:
			t.Logf("client via replica %d: %v", cl.via, err)
		case <-time.After(5 * time.Second):
			t.Fatalf("the connection of a client via replica %d was not reset", cl.via)
		}
		cl.conn.Close()
	}
	// New connections to every survivor succeed within 3 s.
	for _, r := range c.live() {
		var err error
		for time.Since(killed) < 3*time.Second {
			if err = echoClient(r.ClientAddr(), []string{"after the failure\n"}); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("no service via replica %d %v after the leader failed: %v", r.o.ID, time.Since(killed), err)
		}
	}
	t.Logf("new leader %d serving %v after the failure", c.leader().o.ID, time.Since(killed))
	c.settle(t)
	recs := c.agree(t, false)
	if len(recs) == 0 || recs[len(recs)-1].Data != "after the failure\n" {
		t.Fatalf("the survivors' last connection: %+v", recs[len(recs)-1:])
	}
	// The old leader's connections were closed alike everywhere.
	eventually(t, 10*time.Second, "old connections closed on the survivors", func() bool {
		for _, r := range c.live() {
			if c.fixture(r.o.ID).open() != 0 || r.Status().Connections != 0 {
				return false
			}
		}
		return true
	})
	c.noDivergence(t)
}

// TestRestartReplays: a replica that restarts starts its server from clean
// data and replays the log, exactly once, to the same state.
func TestRestartReplays(t *testing.T) {
	c := newFixtureCluster(t, 3, nil)
	for i := 0; i < 5; i++ {
		if err := echoClient(c.leader().ClientAddr(), []string{fmt.Sprintf("before %d\n", i)}); err != nil {
			t.Fatal(err)
		}
	}
	b := c.backups()[0]
	id := b.o.ID
	c.stop(id)
	for i := 0; i < 5; i++ {
		if err := echoClient(c.live()[i%2].ClientAddr(), []string{fmt.Sprintf("while down %d\n", i)}); err != nil {
			t.Fatal(err)
		}
	}
	c.start(id)
	if err := echoClient(c.rep(id).ClientAddr(), []string{"after\n"}); err != nil {
		t.Fatal(err)
	}
	c.settle(t)
	recs := c.agree(t, true)
	if len(recs) != 11 {
		t.Fatalf("%d connections replayed, want 11: %+v", len(recs), recs)
	}
	c.noDivergence(t)
}

// upload sends "SHA\n" and size random bytes, half-closes and checks the
// hash the server answers.
func upload(addr string, size int, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	h := sha256.New()
	errc := make(chan error, 1)
	go func() {
		if _, err := c.Write([]byte("SHA\n")); err != nil {
			errc <- err
			return
		}
		buf := make([]byte, 256<<10)
		for sent := 0; sent < size; sent += len(buf) {
			_, _ = rand.Read(buf)
			h.Write(buf)
			if _, err := c.Write(buf); err != nil {
				errc <- err
				return
			}
		}
		errc <- c.(*net.TCPConn).CloseWrite()
	}()
	reply, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if want := hex.EncodeToString(h.Sum(nil)); strings.TrimSpace(string(reply)) != want {
		return fmt.Errorf("reply %q, want %s", reply, want)
	}
	return nil
}

// TestSlowBackup: a backup whose server is stuck does not hold up the
// leader; it catches up from its queues once the server goes on.
func TestSlowBackup(t *testing.T) {
	c := newFixtureCluster(t, 3, nil)
	l := c.leader()
	slow := c.backups()[0]
	c.fixture(slow.o.ID).pause()
	start := time.Now()
	for i := 0; i < 10; i++ {
		if err := echoClient(l.ClientAddr(), []string{fmt.Sprintf("request %d\n", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := upload(l.ClientAddr(), 16<<20, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("served 10 requests and 16 MiB with a stuck backup in %v", time.Since(start))
	eventually(t, 5*time.Second, "the stuck backup applies the log", func() bool { return slow.Applied() == l.Applied() })
	if b := slow.feeder.(*TCPFeeder).Backlog(); b < 8<<20 {
		t.Fatalf("the stuck backup's feeder holds only %d bytes", b)
	}
	c.fixture(slow.o.ID).resume()
	c.settle(t)
	eventually(t, 10*time.Second, "the backup's server catches up", func() bool {
		return slow.feeder.(*TCPFeeder).Backlog() == 0 && c.fixture(slow.o.ID).open() == 0
	})
	c.agree(t, true)
	eventually(t, 5*time.Second, "digests compared", func() bool { return l.Status().DigestsCompared >= 11 })
	c.noDivergence(t)
}

// TestBackpressure: a client cannot push more than the window ahead of the
// leader's own server.
func TestBackpressure(t *testing.T) {
	const window = 1 << 20
	c := newFixtureCluster(t, 3, func(o *Options) { o.Window = window })
	l := c.leader()
	for _, r := range c.live() {
		c.fixture(r.o.ID).pause()
	}
	done := make(chan error, 1)
	go func() { done <- upload(l.ClientAddr(), 32<<20, 30*time.Second) }()
	time.Sleep(time.Second)
	proposed := counterValue(t, l, "lockstep_proxy_bytes_proposed_total")
	t.Logf("%.1f MiB proposed while the servers did not read (window %d KiB)", proposed/(1<<20), window>>10)
	// The window, one read, and what the server's socket buffers took.
	if limit := float64(window + l.o.ReadSize + 8<<20); proposed > limit || proposed < window {
		t.Fatalf("%d bytes proposed while the server did not read (window %d)", int(proposed), window)
	}
	select {
	case err := <-done:
		t.Fatalf("the upload finished while the server did not read: %v", err)
	default:
	}
	for _, r := range c.live() {
		c.fixture(r.o.ID).resume()
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c.settle(t)
	c.agree(t, true)
}

func counterValue(t *testing.T, r *Replica, name string) float64 {
	t.Helper()
	mfs, err := r.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestLeadershipTransfer: a leader that steps down but lives on resets
// the clients it served; the new leader closes their connections through
// the log on every replica, and serves new ones.
func TestLeadershipTransfer(t *testing.T) {
	c := newFixtureCluster(t, 3, nil)
	old := c.leader()
	to := c.backups()[0]
	conns := []*net.TCPConn{dial(t, old.ClientAddr()), dial(t, to.ClientAddr())}
	for _, conn := range conns {
		if _, err := conn.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if b, err := readFull(conn, 4, 5*time.Second); err != nil || string(b) != "ping" {
			t.Fatalf("%q %v", b, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := old.Node().TransferLeadership(ctx, to.o.ID); err != nil {
		t.Fatal(err)
	}
	for i, conn := range conns {
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := conn.Read(make([]byte, 1)); err == nil || n > 0 {
			t.Fatalf("client %d was not reset", i)
		}
		conn.Close()
	}
	eventually(t, 5*time.Second, "the new leader serves", func() bool { return to.Status().Serving })
	for _, r := range c.live() {
		if err := echoClient(r.ClientAddr(), []string{"after the transfer\n"}); err != nil {
			t.Fatalf("via replica %d: %v", r.o.ID, err)
		}
	}
	c.settle(t)
	recs := c.agree(t, false)
	if len(recs) != 5 {
		t.Fatalf("%d connections, want 5", len(recs))
	}
	eventually(t, 5*time.Second, "the old connections closed everywhere", func() bool {
		for _, r := range c.live() {
			if c.fixture(r.o.ID).open() != 0 || r.Status().Connections != 0 {
				return false
			}
		}
		return true
	})
	c.noDivergence(t)
}
