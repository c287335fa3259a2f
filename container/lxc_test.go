//go:build linux && cgo

package container

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"lockstep/checkpoint"
)

// The LXC tests run the test binary inside containers as a small stateful
// server, picked by LSLXC_HELPER (checked before TestMain runs).
func init() {
	if os.Getenv("LSLXC_HELPER") == "counter-http" {
		lxcHelperCounterHTTP()
		os.Exit(2)
	}
}

// lxcHelperCounterHTTP serves GET / on LSLXC_ADDR with
// "n=<requests> hits=<lines of hits> seed=<seed.txt>": n is in memory,
// hits is a file in the working directory (the container's tmpfs data
// directory), seed.txt was copied in from the seed directory.
func lxcHelperCounterHTTP() {
	var mu sync.Mutex
	n := 0
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		n++
		f, err := os.OpenFile("hits", os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err == nil {
			fmt.Fprintln(f, n)
			f.Close()
		}
		hits, _ := os.ReadFile("hits")
		seed, _ := os.ReadFile("seed.txt")
		fmt.Fprintf(w, "n=%d hits=%d seed=%s", n, strings.Count(string(hits), "\n"), strings.TrimSpace(string(seed)))
	})
	srv := &http.Server{Addr: os.Getenv("LSLXC_ADDR")}
	fmt.Fprintln(os.Stderr, srv.ListenAndServe())
}

// needLXC skips unless root, liblxc and a working criu are here
// (LOCKSTEP_REQUIRE_CRIU=1 makes the skip a failure).
func needLXC(t *testing.T) {
	t.Helper()
	fail := t.Skipf
	if os.Getenv("LOCKSTEP_REQUIRE_CRIU") == "1" {
		fail = t.Fatalf
	}
	if os.Geteuid() != 0 {
		fail("LXC tests need root")
		return
	}
	if _, err := os.Stat(LXCInit); err != nil {
		fail("LXC's init.lxc is missing (Debian package lxc): %v", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := checkpoint.Check(ctx); err != nil {
		fail("no working criu: %v", err)
	}
}

// lxcTestNetns makes a network namespace with loopback up (the replica's,
// in real use), removed after the test.
func lxcTestNetns(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("lslxc-%d", os.Getpid())
	_ = exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
	return filepath.Join("/run/netns", name)
}

// httpIn is an HTTP client whose connections are made inside the network
// namespace at path.
func httpIn(path string) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type res struct {
			c   net.Conn
			err error
		}
		ch := make(chan res, 1)
		go func() {
			// Left locked on purpose: the thread ends with the goroutine.
			runtime.LockOSThread()
			fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				ch <- res{err: err}
				return
			}
			defer unix.Close(fd)
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				ch <- res{err: err}
				return
			}
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			ch <- res{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
	}
}

// dialIn opens a TCP connection from inside the network namespace at
// path.
func dialIn(path, addr string) (net.Conn, error) {
	tr := httpIn(path).Transport.(*http.Transport)
	return tr.DialContext(context.Background(), "tcp", addr)
}

// keepAliveGet sends GET / on a kept-alive connection and returns the body.
func keepAliveGet(t *testing.T, c net.Conn, r *bufio.Reader) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatalf("keep-alive request: %v", err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("keep-alive response: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("keep-alive body: %v", err)
	}
	return string(b)
}

func getBody(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// A server in an LXC application container that shares the replica's
// network namespace is checkpointed with package checkpoint (which kills
// it), restored, and serves again with the same state: its in-memory
// counter and the files of its tmpfs data directory.
func TestLXCCheckpointRestore(t *testing.T) {
	needLXC(t)
	ns := lxcTestNetns(t)
	tmp := t.TempDir()
	seed := filepath.Join(tmp, "seed")
	os.MkdirAll(seed, 0o755)
	os.WriteFile(filepath.Join(seed, "seed.txt"), []byte("from-the-app-dir\n"), 0o644)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("lstest-%d", os.Getpid())
	lxcpath := filepath.Join(tmp, "lxc")
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()

	start := time.Now()
	l, err := StartLXC(ctx, LXCOptions{
		Name:    name,
		LXCPath: lxcpath,
		Command: []string{self},
		// Go listens with MPTCP by default since 1.24, which CRIU cannot
		// dump ("Unsupported proto 262"): plain TCP, as C servers use.
		Env:      []string{"LSLXC_HELPER=counter-http", "LSLXC_ADDR=127.0.0.1:8080", "GODEBUG=multipathtcp=0"},
		Netns:    ns,
		DataDir:  filepath.Join(tmp, "data"),
		SeedDir:  seed,
		DataSize: "16m",
		// The raw CRIU path: the tmpfs goes into the image.
		TmpfsData: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Destroy(); err != nil {
			t.Error(err)
		}
	})
	t.Logf("liblxc %s: container %s started in %v, init pid %d", LXCVersion(), name, time.Since(start), l.InitPid())

	client := httpIn(ns)
	url := "http://127.0.0.1:8080/"
	var body string
	deadline := time.Now().Add(10 * time.Second)
	for {
		if body, err = getBody(client, url); err == nil {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(lxcpath, name, "console.log"))
			t.Fatalf("server in the container does not answer: %v\n%s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if want := "n=1 hits=1 seed=from-the-app-dir"; body != want {
		t.Fatalf("first answer %q, want %q", body, want)
	}
	for i := 2; i <= 3; i++ {
		if body, err = getBody(client, url); err != nil || body != fmt.Sprintf("n=%d hits=%d seed=from-the-app-dir", i, i) {
			t.Fatalf("answer %d: %q, %v", i, body, err)
		}
	}
	// The feeder's end: one connection held open across the checkpoint
	// (HTTP keep-alive), outside the container's process tree but in the
	// namespace it shares.
	feeder, err := dialIn(ns, "127.0.0.1:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer feeder.Close()
	fr := bufio.NewReader(feeder)
	if got := keepAliveGet(t, feeder, fr); got != "n=4 hits=4 seed=from-the-app-dir" {
		t.Fatalf("keep-alive answer %q", got)
	}

	// The data directory is the container's own: the host sees nothing.
	if ents, _ := os.ReadDir(filepath.Join(tmp, "data")); len(ents) != 0 {
		t.Errorf("the container's data directory leaks to the host: %v", ents)
	}

	images := filepath.Join(tmp, "img")
	st, err := checkpoint.Dump(ctx, checkpoint.Options{
		Pid: l.InitPid(), ImagesDir: images, ExternalNetns: true, TCPEstablished: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dump: pause %v (frozen %v), wall %v, image %d KiB, %d pages", st.Pause, st.Frozen, st.Wall, st.ImageBytes>>10, st.PagesWritten)
	if err := l.WaitGone(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	// While it is down, CRIU's network lock drops packets to it rather
	// than refusing them: a new client waits (and retries) instead of
	// seeing a reset.
	down := httpIn(ns)
	down.Timeout = 300 * time.Millisecond
	if _, err := getBody(down, url); err == nil {
		t.Fatal("the server still answers after the checkpoint killed it")
	}

	rst, err := checkpoint.RestoreStats(ctx, checkpoint.Options{ImagesDir: images, Netns: ns, TCPEstablished: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restore: wall %v (criu %v), init pid %d", rst.Wall, rst.Restore, rst.Pid)
	r, err := AdoptRestoredLXC(name, lxcpath, rst.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Stop(5 * time.Second); err != nil {
			t.Error(err)
		}
	})
	body, err = getBody(client, url)
	if err != nil {
		t.Fatal(err)
	}
	if want := "n=5 hits=5 seed=from-the-app-dir"; body != want {
		t.Fatalf("after the restore: %q, want %q", body, want)
	}
	// The connection held across the checkpoint still works.
	if got := keepAliveGet(t, feeder, fr); got != "n=6 hits=6 seed=from-the-app-dir" {
		t.Fatalf("keep-alive answer after the restore %q", got)
	}
	if !r.Running() {
		t.Fatal("restored container not running")
	}
}

// Debian's Apache (apps/apache, worker MPM: a parent and one child with 8
// threads, a shared-memory scoreboard, pipes between them) in an LXC
// container: checkpointed, killed, restored, and it serves again with its
// state: the access log in its tmpfs directory goes on from where it was.
func TestLXCApacheCheckpointRestore(t *testing.T) {
	needLXC(t)
	if _, err := os.Stat("/usr/sbin/apache2"); err != nil {
		t.Skip("apache2 is not installed (scripts/setup.sh installs it)")
	}
	ns := lxcTestNetns(t)
	// Apache's child runs as www-data: its directory's parents must be
	// searchable, which a test's temporary directory is not.
	base := fmt.Sprintf("/run/lockstep/lxc-test-%d", os.Getpid())
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod("/run/lockstep", 0o755)
	t.Cleanup(func() { os.RemoveAll(base) })
	data := filepath.Join(base, "apache")
	seed := filepath.Join(base, "seed")
	lookup := func(k string) (string, bool) { return "", false }
	if err := renderDir("../apps/apache", seed, newTemplateData(data, "apache", "127.0.0.1", 8080), templateFuncs(lookup)); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("lsapache-%d", os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	l, err := StartLXC(ctx, LXCOptions{
		Name:      name,
		LXCPath:   filepath.Join(base, "lxc"),
		Command:   []string{"/usr/sbin/apache2", "-f", filepath.Join(data, "apache2.conf"), "-DFOREGROUND"},
		Netns:     ns,
		DataDir:   data,
		SeedDir:   seed,
		DataSize:  "32m",
		TmpfsData: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Destroy() })

	client := httpIn(ns)
	url := "http://127.0.0.1:8080/index.html"
	deadline := time.Now().Add(10 * time.Second)
	var page string
	for {
		if page, err = getBody(client, url); err == nil {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(base, "lxc", name, "console.log"))
			t.Fatalf("apache in the container does not answer: %v\n%s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 4; i++ {
		if _, err := getBody(client, url); err != nil {
			t.Fatal(err)
		}
	}
	// The log is in the container's tmpfs: read it through the init's
	// view of the file system.
	accessLog := func(pid int) int {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/root%s/access.log", pid, data))
		return strings.Count(string(b), "\n")
	}
	// Apache logs a request after its response: wait for the line.
	waitLines := func(pid, want int, when string) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for n := accessLog(pid); n != want; n = accessLog(pid) {
			if n > want || time.Now().After(deadline) {
				t.Fatalf("access log has %d lines %s, want %d", n, when, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitLines(l.InitPid(), 5, "before the checkpoint")

	images := filepath.Join(base, "img")
	st, err := checkpoint.Dump(ctx, checkpoint.Options{
		Pid: l.InitPid(), ImagesDir: images, ExternalNetns: true, TCPEstablished: true, FileLocks: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("apache dump: pause %v, wall %v, image %d KiB, %d pages", st.Pause, st.Wall, st.ImageBytes>>10, st.PagesWritten)
	if err := l.WaitGone(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	rst, err := checkpoint.RestoreStats(ctx, checkpoint.Options{ImagesDir: images, Netns: ns, TCPEstablished: true, FileLocks: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("apache restore: wall %v (criu %v)", rst.Wall, rst.Restore)
	r, err := AdoptRestoredLXC(name, filepath.Join(base, "lxc"), rst.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Stop(5 * time.Second); err != nil {
			t.Error(err)
		}
	})
	for i := 0; i < 3; i++ {
		got, err := getBody(client, url)
		if err != nil {
			t.Fatalf("after the restore: %v", err)
		}
		if got != page {
			t.Fatalf("after the restore the page differs: %q", got)
		}
	}
	waitLines(rst.Pid, 8, "after the restore (5 before, 3 after)")
}

// A container with a network namespace of its own, joined by a veth pair
// to a bridge in another namespace (a cluster's switch): it is reachable
// through the bridge, and CRIU takes its namespace (device, address) into
// the image; at restore the host end is made again and re-attached.
func TestLXCVethCheckpointRestore(t *testing.T) {
	needLXC(t)
	sw := lxcTestNetns(t)
	swName := filepath.Base(sw)
	for _, args := range [][]string{
		{"link", "add", "br0", "type", "bridge"},
		{"addr", "add", "10.78.0.1/24", "dev", "br0"},
		{"link", "set", "br0", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", swName}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	self, _ := os.Executable()
	tmp := t.TempDir()
	name := fmt.Sprintf("lsveth-%d", os.Getpid())
	veth := &LXCVeth{Netns: sw, Bridge: "br0", Address: "10.78.0.2/24"}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	l, err := StartLXC(ctx, LXCOptions{
		Name:      name,
		LXCPath:   filepath.Join(tmp, "lxc"),
		Command:   []string{self},
		Env:       []string{"LSLXC_HELPER=counter-http", "LSLXC_ADDR=0.0.0.0:8080", "GODEBUG=multipathtcp=0"},
		Veth:      veth,
		DataDir:   filepath.Join(tmp, "data"),
		TmpfsData: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Destroy() })
	client := httpIn(sw)
	url := "http://10.78.0.2:8080/"
	deadline := time.Now().Add(10 * time.Second)
	for {
		body, err := getBody(client, url)
		if err == nil {
			if body != "n=1 hits=1 seed=" {
				t.Fatalf("first answer %q", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container does not answer through the bridge: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	images := filepath.Join(tmp, "img")
	host := vethHostName(name, veth)
	st, err := checkpoint.Dump(ctx, checkpoint.Options{Pid: l.InitPid(), ImagesDir: images, TCPEstablished: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dump with its own network namespace: pause %v, image %d KiB", st.Pause, st.ImageBytes>>10)
	if err := l.WaitGone(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	pid, err := checkpoint.Restore(ctx, checkpoint.Options{ImagesDir: images, TCPEstablished: true,
		External: []string{"veth[eth0]:" + host}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := AdoptRestoredLXC(name, filepath.Join(tmp, "lxc"), pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Stop(5 * time.Second) })
	if err := attachVeth(host, sw, "br0"); err != nil {
		t.Fatal(err)
	}
	body, err := getBody(client, url)
	if err != nil || body != "n=2 hits=2 seed=" {
		t.Fatalf("after the restore: %q, %v", body, err)
	}
}
