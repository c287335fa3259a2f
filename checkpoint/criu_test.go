package checkpoint

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A process that keeps its state in memory is dumped (and killed), and its
// restored copy goes on from the same state, with the same pid.
func TestDumpRestoreCounter(t *testing.T) {
	needCriu(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "count")
	cmd := startHelper(t, "counter", "", "LSCKPT_FILE="+file)
	pid := cmd.Process.Pid
	waitFor(t, 5*time.Second, "the counter to reach 20", func() bool { return readCount(file) >= 20 })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	images := filepath.Join(dir, "img")
	st, err := Dump(ctx, Options{Pid: pid, ImagesDir: images})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dump: pause %v (freezing %v, frozen %v, memdump %v, memwrite %v), wall %v, image %d KiB, %d pages written",
		st.Pause, st.Freezing, st.Frozen, st.MemDump, st.MemWrite, st.Wall, st.ImageBytes>>10, st.PagesWritten)
	if st.ImageBytes == 0 || st.Pause <= 0 {
		t.Errorf("implausible stats %+v", st)
	}
	// Dump killed it: reap it, so that its pid is free for the restore.
	_, _ = cmd.Process.Wait()
	at := readCount(file)
	time.Sleep(50 * time.Millisecond)
	if n := readCount(file); n != at {
		t.Fatalf("the counter went on after the dump (%d -> %d)", at, n)
	}

	rst, err := RestoreStats(ctx, Options{ImagesDir: images})
	if err != nil {
		t.Fatal(err)
	}
	defer killWait(rst.Pid)
	t.Logf("restore: wall %v (criu restore %v), pid %d", rst.Wall, rst.Restore, rst.Pid)
	if rst.Pid != pid {
		t.Errorf("restored as pid %d, dumped as %d", rst.Pid, pid)
	}
	first := -1
	waitFor(t, 5*time.Second, "the restored counter to move", func() bool {
		n := readCount(file)
		if first < 0 && n != at {
			first = n
		}
		return n >= at+10
	})
	// The image was taken at a value <= at; a fresh start would restart
	// from 1.
	if first < at-5 || first > at+5 {
		t.Errorf("restored counter continued at %d, the dump left %d", first, at)
	}
}

// A process with an established TCP connection to a peer that is NOT in
// the dumped tree (the replica's feeder) is dumped, killed and restored:
// the connection survives, data sent while the process was down arrives,
// and the process's state (a line counter) goes on. The process lives in
// a network namespace of its own that stays outside the image
// (ExternalNetns) and is handed back at restore (Netns).
func TestDumpRestoreTCPPeerOutside(t *testing.T) {
	needCriu(t)
	ns := testNetns(t)
	l := listenIn(t, ns)
	cmd := startHelper(t, "echo", ns, "LSCKPT_ADDR="+l.Addr().String())
	pid := cmd.Process.Pid
	l.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	exchange := func(line, want string) {
		t.Helper()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintf(conn, "%s\n", line); err != nil {
			t.Fatalf("send %q: %v", line, err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reply to %q: %v", line, err)
		}
		if got != want+"\n" {
			t.Fatalf("reply to %q = %q, want %q", line, got, want)
		}
	}
	exchange("a", "1 a")
	exchange("b", "2 b")

	dir := t.TempDir()
	images := filepath.Join(dir, "img")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := Dump(ctx, Options{Pid: pid, ImagesDir: images, TCPEstablished: true, ExternalNetns: true})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = cmd.Process.Wait()
	t.Logf("dump: pause %v, wall %v, image %d KiB", st.Pause, st.Wall, st.ImageBytes>>10)

	// The feeder goes on sending while the server is down: the network
	// lock drops the packets (no reset), TCP retransmits them later.
	conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "c\n"); err != nil {
		t.Fatalf("send while down: %v", err)
	}
	time.Sleep(100 * time.Millisecond)

	down := time.Now()
	rst, err := RestoreStats(ctx, Options{ImagesDir: images, TCPEstablished: true, Netns: ns})
	if err != nil {
		t.Fatal(err)
	}
	defer killWait(rst.Pid)
	t.Logf("restore: wall %v (criu %v), pid %d", rst.Wall, rst.Restore, rst.Pid)

	conn.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := r.ReadString('\n')
	if err != nil || got != "3 c\n" {
		t.Fatalf("reply to the line sent while down = %q, %v; want \"3 c\"", got, err)
	}
	t.Logf("the line sent while down was answered %v after the restore began", time.Since(down))
	exchange("d", "4 d")

	// No lock is left behind in the namespace.
	out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "nft", "list", "tables").CombinedOutput()
	if err == nil && strings.Contains(string(out), "CRIU") {
		t.Errorf("CRIU's network lock is still there after the restore:\n%s", out)
	}
}

// Iterative migration: a pre-dump while the tree runs, then a dump that
// writes only what changed. Needs kernel dirty-memory tracking.
func TestPreDump(t *testing.T) {
	needCriu(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := DirtyTracking(ctx, ""); errors.Is(err, ErrNoDirtyTracking) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "count")
	cmd := startHelper(t, "counter", "", "LSCKPT_FILE="+file)
	waitFor(t, 5*time.Second, "the counter to start", func() bool { return readCount(file) >= 5 })
	pre, err := PreDump(ctx, Options{Pid: cmd.Process.Pid, ImagesDir: filepath.Join(dir, "pre")})
	if err != nil {
		t.Fatal(err)
	}
	st, err := Dump(ctx, Options{Pid: cmd.Process.Pid, ImagesDir: filepath.Join(dir, "img"), ParentDir: "../pre", TrackMem: true})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = cmd.Process.Wait()
	t.Logf("pre-dump %d pages, dump %d pages (%d skipped), pause %v", pre.PagesWritten, st.PagesWritten, st.PagesSkippedParent, st.Pause)
	if st.PagesSkippedParent == 0 {
		t.Errorf("the dump skipped no page of its parent")
	}
	pid, err := Restore(ctx, Options{ImagesDir: filepath.Join(dir, "img")})
	if err != nil {
		t.Fatal(err)
	}
	defer killWait(pid)
	at := readCount(file)
	waitFor(t, 5*time.Second, "the restored counter to move", func() bool { return readCount(file) > at })
}

func TestNsfsMountsAndUnescape(t *testing.T) {
	if got := unescapeMount(`/a\040b\134c`); got != `/a b\c` {
		t.Errorf("unescapeMount = %q", got)
	}
	if _, err := nsfsMounts(os.Getpid()); err != nil {
		t.Fatal(err)
	}
}

// The whole path of a recovery: dump into the store at a log index, serve
// it, fetch it into another replica's store, restore from there.
func TestDumpStoreFetchRestore(t *testing.T) {
	needCriu(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "count")
	cmd := startHelper(t, "counter", "", "LSCKPT_FILE="+file)
	waitFor(t, 5*time.Second, "the counter to start", func() bool { return readCount(file) >= 5 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	src, err := OpenStore(filepath.Join(dir, "r1"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := src.Create(42, "counter")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Dump(ctx, Options{Pid: cmd.Process.Pid, ImagesDir: p.Dir()}); err != nil {
		p.Abort()
		t.Fatal(err)
	}
	_, _ = cmd.Process.Wait()
	at := readCount(file)
	c, err := p.Commit()
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(src.Handler())
	defer srv.Close()
	got, err := FetchDigest(ctx, srv.URL+"/newest", filepath.Join(dir, "r2"), c.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if got.Index != 42 || got.App != "counter" {
		t.Fatalf("fetched %+v", got.Manifest)
	}
	pid, err := Restore(ctx, Options{ImagesDir: got.Dir})
	if err != nil {
		t.Fatal(err)
	}
	defer killWait(pid)
	waitFor(t, 5*time.Second, "the restored counter to move", func() bool { return readCount(file) > at })
	// A restore writes its log and statistics into the directory; the
	// checkpoint itself is unchanged.
	if err := got.Verify(); err != nil {
		t.Fatal(err)
	}
}
