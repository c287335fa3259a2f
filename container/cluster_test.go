package container

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func rootLinks(t *testing.T) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	slices.Sort(names)
	return names
}

func TestClusterNetwork(t *testing.T) {
	requireRoot(t)
	const run = "ct-net"
	before := rootLinks(t)
	hosts := []string{"r1", "r2", "r3", "client"}
	c, err := NewCluster(ClusterOptions{Name: run, Hosts: hosts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// A second run of the same name is refused while this one lives.
	if _, err := NewCluster(ClusterOptions{Name: run, Hosts: hosts}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second NewCluster with the same name: %v, want an 'in use' error", err)
	}
	if err := CleanupStale(run); err == nil {
		t.Fatal("CleanupStale of a live run succeeded")
	}

	_, subnet, _ := net.ParseCIDR(DefaultSubnet)
	for i, h := range hosts {
		ip := net.ParseIP(c.Addr(h))
		if ip == nil || !subnet.Contains(ip) {
			t.Fatalf("Addr(%s) = %q, not in %s", h, c.Addr(h), subnet)
		}
		if want := fmt.Sprintf("10.77.0.%d", i+1); c.Addr(h) != want {
			t.Errorf("Addr(%s) = %s, want %s", h, c.Addr(h), want)
		}
	}
	if c.Addr("nope") != "" {
		t.Error("Addr of an unknown host is not empty")
	}

	// Every host listens (a Go listener made inside its namespace) ...
	for _, h := range hosts {
		l, err := c.Listen(h, "tcp", net.JoinHostPort(c.Addr(h), "7000"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func(h string) {
			for {
				conn, err := l.Accept()
				if err != nil {
					return
				}
				io.WriteString(conn, h)
				conn.Close()
			}
		}(h)
	}
	// ... and every host reaches every host, itself included.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, from := range hosts {
		for _, to := range hosts {
			conn, err := c.DialContext(ctx, from, "tcp", net.JoinHostPort(c.Addr(to), "7000"))
			if err != nil {
				t.Fatalf("%s -> %s: %v", from, to, err)
			}
			got, _ := io.ReadAll(conn)
			conn.Close()
			if string(got) != to {
				t.Fatalf("%s -> %s: got %q", from, to, got)
			}
		}
	}
	// Inside, only the subnet is routed: there is no way out (asked of
	// the routing table; nothing is sent).
	err = c.Do("r1", func() error {
		_, err := netlink.RouteGet(net.ParseIP("198.51.100.1"))
		return err
	})
	if err == nil {
		t.Error("r1 has a route out of the cluster")
	}
	if _, err := c.DialContext(ctx, "r1", "tcp", "example.org:80"); err == nil {
		t.Fatal("DialContext accepted a host name")
	}

	// A process started with Exec lives in the host's namespace and
	// cgroup and is reachable from the other hosts.
	var out strings.Builder
	cmd := helperCmd(c.Exec("r2", testBinary(t)), "listen", "LSTEST_ADDR="+c.Addr("r2")+":7001", "LSTEST_GREETING=exec")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line := waitLine(t, stdout); line != "ready" {
		t.Fatalf("exec helper: %q, stderr %q", line, out.String())
	}
	if !sameNetns(cmd.Process.Pid, c.NetnsPath("r2")) {
		t.Error("Exec'd process is not in r2's namespace")
	}
	if !inCgroup(t, c.CgroupDir("r2"), cmd.Process.Pid) {
		t.Errorf("Exec'd process %d is not in %s", cmd.Process.Pid, c.CgroupDir("r2"))
	}
	for _, from := range []string{"r1", "client"} {
		conn, err := c.DialContext(ctx, from, "tcp", c.Addr("r2")+":7001")
		if err != nil {
			t.Fatalf("%s -> Exec'd listener: %v", from, err)
		}
		got, _ := io.ReadAll(conn)
		conn.Close()
		if string(got) != "exec" {
			t.Fatalf("%s -> Exec'd listener: %q", from, got)
		}
	}
	if err := c.Exec("nope", "true").Run(); err == nil {
		t.Error("Exec on an unknown host ran")
	}

	// The root namespace holds no address, route or link of the cluster.
	// The reachability check dials bound to lo so that, whatever happens,
	// no packet can take the default route off the machine.
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if subnet.Contains(a.IP) {
			t.Errorf("root namespace has cluster address %s", a.IPNet)
		}
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP.To4() != nil && !r.Dst.IP.IsUnspecified() && (r.Dst.Contains(subnet.IP) || subnet.Contains(r.Dst.IP)) {
			t.Errorf("root namespace routes the cluster subnet: %s", r)
		}
	}
	if got := rootLinks(t); !slices.Equal(got, before) {
		t.Errorf("root namespace links changed: %v -> %v", before, got)
	}
	d := net.Dialer{Timeout: 300 * time.Millisecond, Control: bindToLo}
	if conn, err := d.Dial("tcp", c.Addr("r1")+":7000"); err == nil {
		conn.Close()
		t.Error("the root namespace reached r1")
	}

	// Close removes everything. Keep a handle on the switch namespace to
	// look inside it afterwards.
	sw, err := netns.GetFromName(nsName(run, switchHost))
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	cgDir := filepath.Dir(c.CgroupDir("r1"))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if left := runNamespaces(run); len(left) > 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
	if _, err := os.Stat(cgDir); !os.IsNotExist(err) {
		t.Errorf("cgroup %s left after Close (%v)", cgDir, err)
	}
	nl, err := netlink.NewHandleAt(sw)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if l.Attrs().Name != "lo" {
			t.Errorf("link %s left in the switch namespace", l.Attrs().Name)
		}
	}
	if got := rootLinks(t); !slices.Equal(got, before) {
		t.Errorf("root namespace links changed: %v -> %v", before, got)
	}
	time.Sleep(50 * time.Millisecond)
	if alive(cmd.Process.Pid) {
		t.Error("Exec'd process survived Close")
	}
	if err := c.Exec("r1", "true").Start(); err == nil {
		t.Error("Exec after Close started")
	}
}

// bindToLo pins a socket to the loopback device.
func bindToLo(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, "lo") })
	if err != nil {
		return err
	}
	return serr
}

func TestClusterOptionsValidation(t *testing.T) {
	for _, o := range []ClusterOptions{
		{Name: "", Hosts: []string{"a"}},
		{Name: "Bad/Name", Hosts: []string{"a"}},
		{Name: "ok", Hosts: nil},
		{Name: "ok", Hosts: []string{"a", "a"}},
		{Name: "ok", Hosts: []string{"has-dash"}},
		{Name: "ok", Hosts: []string{"sw"}},
		{Name: "ok", Hosts: []string{"a"}, Subnet: "fd00::/64"},
		{Name: "ok", Hosts: []string{"a", "b", "c"}, Subnet: "10.1.0.0/30"},
		{Name: "ok", Hosts: []string{"a"}, CPUQuota: -1},
	} {
		if _, err := NewCluster(o); err == nil {
			t.Errorf("NewCluster(%+v) succeeded", o)
		}
	}
	if err := CleanupStale("../etc"); err == nil {
		t.Error("CleanupStale accepted a path")
	}
}

func TestCleanupStale(t *testing.T) {
	requireRoot(t)
	const run = "ct-crash"
	// Another process builds a cluster, starts a process in it and dies
	// without Close.
	helper := helperCmd(exec.Command(testBinary(t)), "crash", "LSTEST_RUN="+run)
	var stderr strings.Builder
	helper.Stderr = &stderr
	stdout, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	line := waitLine(t, stdout)
	sleepPid, err := strconv.Atoi(line)
	if err != nil {
		helper.Process.Kill()
		helper.Wait()
		t.Fatalf("crash helper: %q, stderr %q", line, stderr.String())
	}
	helper.Process.Kill()
	helper.Wait()

	if got := runNamespaces(run); len(got) != 3 {
		t.Fatalf("after the crash: namespaces %v, want switch, r1, r2", got)
	}
	if !alive(sleepPid) {
		t.Fatal("the crashed run's process is already gone")
	}

	// The lock went with the process: a new run of that name cleans up
	// and starts.
	c, err := NewCluster(ClusterOptions{Name: run, Hosts: []string{"r1"}})
	if err != nil {
		t.Fatal(err)
	}
	if alive(sleepPid) {
		t.Error("the crashed run's process survived")
	}
	if got := runNamespaces(run); !slices.Equal(got, []string{nsName(run, "r1"), nsName(run, switchHost)}) {
		t.Errorf("namespaces %v", got)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(c.CgroupDir("r1")), "r2")); !os.IsNotExist(err) {
		t.Errorf("stale cgroup r2 left (%v)", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := CleanupStale(run); err != nil {
		t.Errorf("CleanupStale with nothing to do: %v", err)
	}
}

func TestCPUQuota(t *testing.T) {
	requireRoot(t)
	c, err := NewCluster(ClusterOptions{Name: "ct-cpu", Hosts: []string{"a"}, CPUQuota: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dir := c.CgroupDir("a")
	read := func(file string) string {
		raw, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(raw))
	}
	v2 := c.cg.v2
	if v2 {
		if got := read("cpu.max"); got != "50000 100000" {
			t.Errorf("cpu.max = %q", got)
		}
	} else if p, q := read("cpu.cfs_period_us"), read("cpu.cfs_quota_us"); p != "100000" || q != "50000" {
		t.Errorf("period %s quota %s, want 100000 50000", p, q)
	}

	spin := helperCmd(c.Exec("a", testBinary(t)), "spin")
	if err := spin.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { spin.Process.Kill(); spin.Wait() }()
	// The helper joins the cgroup before it execs the program, which may
	// be a moment after Start returns.
	if !eventually(func() bool { return inCgroup(t, dir, spin.Process.Pid) }) {
		t.Fatal("spinner not in the host's cgroup")
	}
	// Children of Exec'd processes land there too.
	sh := c.Exec("a", "sh", "-c", "sleep 30 & echo $!; wait")
	out, err := sh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sh.Process.Kill(); sh.Wait() }()
	child, err := strconv.Atoi(waitLine(t, out))
	if err != nil {
		t.Fatal(err)
	}
	if !eventually(func() bool { return inCgroup(t, dir, child) }) {
		t.Errorf("child %d of an Exec'd shell is not in the cgroup", child)
	}
	syscall.Kill(child, syscall.SIGKILL)

	// Usage over a second: 0.5 core, give or take; the bound is generous.
	t0, u0 := time.Now(), cpuTicks(t, spin.Process.Pid)
	time.Sleep(1200 * time.Millisecond)
	t1, u1 := time.Now(), cpuTicks(t, spin.Process.Pid)
	cores := float64(u1-u0) / 100 / t1.Sub(t0).Seconds() // USER_HZ is 100
	t.Logf("spinner under a 0.5 core quota used %.2f cores", cores)
	if cores > 0.7 {
		t.Errorf("spinner used %.2f cores under a 0.5 core quota", cores)
	}
	if !v2 {
		if stat := read("cpu.stat"); !strings.Contains(stat, "nr_throttled") || strings.Contains(stat, "nr_throttled 0\n") {
			t.Errorf("not throttled: %s", stat)
		}
	}
	if err := c.SetCPUQuota("a", 0); err != nil {
		t.Fatal(err)
	}
	if !v2 && read("cpu.cfs_quota_us") != "-1" {
		t.Errorf("quota after lifting: %s", read("cpu.cfs_quota_us"))
	}
}

// cpuTicks is utime+stime of pid in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// Fields after comm: state(0) ... utime(11) stime(12).
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return u + st
}
