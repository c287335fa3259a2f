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
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// The test binary doubles as the helper programs the tests start (inside
// namespaces, through Cluster.Exec): LSTEST_HELPER picks which.
const helperEnv = "LSTEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		logrus.SetLevel(logrus.WarnLevel)
		os.Exit(m.Run())
	case "listen":
		helperListen()
	case "spin":
		for {
		}
	case "crash":
		helperCrash()
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
	}
	os.Exit(2)
}

// helperListen serves LSTEST_GREETING on LSTEST_ADDR and says "ready" on
// stdout; with LSTEST_IGNORE_TERM it ignores SIGTERM (a stubborn server).
func helperListen() {
	if os.Getenv("LSTEST_IGNORE_TERM") != "" {
		signal.Ignore(syscall.SIGTERM)
	}
	l, err := net.Listen("tcp", os.Getenv("LSTEST_ADDR"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		io.WriteString(c, os.Getenv("LSTEST_GREETING"))
		c.Close()
	}
}

// helperCrash builds a cluster, starts a process in it, prints that pid
// and waits to be SIGKILLed: a run that crashes without Close.
func helperCrash() {
	c, err := NewCluster(ClusterOptions{Name: os.Getenv("LSTEST_RUN"), Hosts: []string{"r1", "r2"}, CPUQuota: 0.5})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cmd := c.Exec("r1", "sleep", "600")
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The namespace helper joins the host's cgroup and namespace and then
	// execs: crash only once sleep runs there, or the cleanup under test
	// may look before the process has moved in.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid)); filepath.Base(exe) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "sleep did not start")
			os.Exit(1)
		}
	}
	fmt.Println(cmd.Process.Pid)
	time.Sleep(time.Hour)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, cgroups, servers dropping privileges); run the tests as root")
	}
}

func testBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// worldDir is a fresh directory that Apache's www-data child can enter
// (t.TempDir's are 0700).
func worldDir(t *testing.T, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitLine reads the first line a helper prints.
func waitLine(t *testing.T, r io.Reader) string {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(r).ReadString('\n')
		ch <- strings.TrimSpace(line)
	}()
	select {
	case line := <-ch:
		return line
	case <-time.After(10 * time.Second):
		t.Fatal("helper said nothing within 10s")
		return ""
	}
}

// httpGet fetches a URL through dial (nil: from here) without any proxy.
func httpGet(t *testing.T, dial func(context.Context, string, string) (net.Conn, error), url string) (int, string) {
	t.Helper()
	tr := &http.Transport{DialContext: dial, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(body)
}

// pidsWithCmdline finds processes whose command line contains s.
func pidsWithCmdline(s string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(strings.ReplaceAll(string(raw), "\x00", " "), s) && !isZombie(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func alive(pid int) bool {
	return syscall.Kill(pid, 0) == nil && !isZombie(pid)
}

func inCgroup(t *testing.T, dir string, pid int) bool {
	t.Helper()
	pids, err := cgroupProcs(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pids {
		if p == pid {
			return true
		}
	}
	return false
}

// sameNetns reports whether pid lives in the namespace at path.
func sameNetns(pid int, path string) bool {
	a, ok1 := statNS(fmt.Sprintf("/proc/%d/ns/net", pid))
	b, ok2 := statNS(path)
	return ok1 && ok2 && a == b
}

// helperCmd is a command running this test binary as helper kind.
func helperCmd(cmd *exec.Cmd, kind string, env ...string) *exec.Cmd {
	cmd.Env = append(append(os.Environ(), helperEnv+"="+kind), env...)
	return cmd
}

// eventually polls cond for up to 2 s.
func eventually(cond func() bool) bool {
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}
