package checkpoint

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the processes that the tests checkpoint:
// LSCKPT_HELPER picks which.
const helperEnv = "LSCKPT_HELPER"

// The main goroutine keeps the main thread, so that no test goroutine that
// switches its thread's network namespace (listenIn) can run on it: the
// main thread's namespaces are the process's (/proc/self/ns), and Go
// cannot end it if such a goroutine leaves it locked.
func init() { runtime.LockOSThread() }

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "counter":
		helperCounter(os.Getenv("LSCKPT_FILE"))
	case "echo":
		helperEcho(os.Getenv("LSCKPT_ADDR"))
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
	}
	os.Exit(2)
}

// helperCounter keeps a counter in memory and publishes it to path every
// 10 ms: a restored copy goes on from where the image left it.
func helperCounter(path string) {
	for n := 1; ; n++ {
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(strconv.Itoa(n)), 0o644); err == nil {
			_ = os.Rename(tmp, path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// helperEcho dials addr (the feeder) and answers each line with
// "<n> <line>", n counting the lines it has seen: the state that must
// survive a checkpoint.
func helperEcho(addr string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	r := bufio.NewReader(c)
	for n := 1; ; n++ {
		line, err := r.ReadString('\n')
		if err != nil {
			os.Exit(0)
		}
		fmt.Fprintf(c, "%d %s", n, line)
	}
}

// needCriu skips a test that needs root and a working criu, unless
// LOCKSTEP_REQUIRE_CRIU=1, which turns the skip into a failure (for
// machines that are meant to have them).
func needCriu(t testing.TB) {
	t.Helper()
	fail := t.Skipf
	if os.Getenv("LOCKSTEP_REQUIRE_CRIU") == "1" {
		fail = t.Fatalf
	}
	if os.Geteuid() != 0 {
		fail("checkpoint tests need root (CRIU)")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := Check(ctx); err != nil {
		fail("no working criu: %v", err)
	}
}

// startHelper starts the test binary as helper name in a session of its
// own (so that its tree is self-contained for CRIU) with stdio on
// /dev/null; netns, if set, is the network namespace to run it in.
func startHelper(t *testing.T, name, netns string, env ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cmd *exec.Cmd
	if netns != "" {
		// nsenter only switches the network namespace and execs: the
		// helper keeps nsenter's pid and shares everything else.
		cmd = exec.Command("nsenter", "--net="+netns, "--", self)
	} else {
		cmd = exec.Command(self)
	}
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + name}, env...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
	})
	return cmd
}

// killWait SIGKILLs a child and reaps it.
func killWait(pid int) {
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if p, err := os.FindProcess(pid); err == nil {
		_, _ = p.Wait()
	}
}

// waitFor polls cond every 5 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func readCount(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return n
}

// testNetns makes a network namespace with loopback up, removed at the
// end of the test; it returns its path.
func testNetns(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("lsckpt-%d-%d", os.Getpid(), time.Now().UnixNano()%100000)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("cannot make a network namespace (ip netns add): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
	return filepath.Join("/run/netns", name)
}

// listenIn opens a TCP listener inside the network namespace at path: the
// socket belongs to the namespace of the thread that made it.
func listenIn(t *testing.T, path string) net.Listener {
	t.Helper()
	type res struct {
		l   net.Listener
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// The thread is left locked on purpose: it dies with this
		// goroutine, so that its namespace cannot leak to others.
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
		l, err := net.Listen("tcp", "127.0.0.1:0")
		ch <- res{l, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.l.Close() })
	return r.l
}
