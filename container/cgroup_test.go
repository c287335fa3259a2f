package container

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseMountinfo(t *testing.T) {
	hybrid := `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
`
	tree, err := parseMountinfo(strings.NewReader(hybrid))
	if err != nil || tree.v2 || !tree.cpu || tree.mount != "/sys/fs/cgroup/cpu,cpuacct" {
		t.Errorf("hybrid: %+v %v", tree, err)
	}
	fake := t.TempDir()
	os.WriteFile(filepath.Join(fake, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644)
	unified := "30 23 0:27 / " + fake + " rw - cgroup2 cgroup2 rw\n"
	tree, err = parseMountinfo(strings.NewReader(unified))
	if err != nil || !tree.v2 || !tree.cpu || tree.mount != fake {
		t.Errorf("unified: %+v %v", tree, err)
	}
	if _, err := parseMountinfo(strings.NewReader("22 1 0:5 / /proc rw - proc proc rw\n")); err == nil {
		t.Error("no cgroup mount, no error")
	}
	if got := unescapeMount(`/a\040b`); got != "/a b" {
		t.Errorf("unescape: %q", got)
	}
}

// fakeCgroup lays out the control files the kernel would provide.
func fakeCgroup(t *testing.T, files ...string) string {
	t.Helper()
	root := t.TempDir()
	for _, f := range files {
		p := filepath.Join(root, f)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(raw))
}

func TestCgroupV2Quota(t *testing.T) {
	root := fakeCgroup(t, "cgroup.subtree_control", "lockstep/cgroup.subtree_control",
		"lockstep/run/cgroup.subtree_control", "lockstep/run/h/cpu.max")
	tree := &cgroupTree{mount: root, v2: true, cpu: true}
	dir, err := tree.createHost("run", "h", 0.5)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{root, filepath.Join(root, "lockstep"), filepath.Join(root, "lockstep", "run")} {
		if got := readTrim(t, filepath.Join(d, "cgroup.subtree_control")); got != "+cpu" {
			t.Errorf("%s/cgroup.subtree_control = %q", d, got)
		}
	}
	if got := readTrim(t, filepath.Join(dir, "cpu.max")); got != "50000 100000" {
		t.Errorf("cpu.max = %q", got)
	}
	if err := tree.setQuota(dir, 0); err != nil {
		t.Fatal(err)
	}
	if got := readTrim(t, filepath.Join(dir, "cpu.max")); got != "max 100000" {
		t.Errorf("cpu.max = %q", got)
	}
	noCPU := &cgroupTree{mount: root, v2: true}
	if err := noCPU.setQuota(dir, 1); err == nil {
		t.Error("quota without a cpu controller accepted")
	}
	if err := noCPU.setQuota(dir, 0); err != nil {
		t.Errorf("no quota without a cpu controller: %v", err)
	}
}

func TestCgroupV1Quota(t *testing.T) {
	root := fakeCgroup(t, "lockstep/run/h/cpu.cfs_period_us", "lockstep/run/h/cpu.cfs_quota_us")
	tree := &cgroupTree{mount: root, cpu: true}
	dir, err := tree.createHost("run", "h", 0.001)
	if err != nil {
		t.Fatal(err)
	}
	if p, q := readTrim(t, filepath.Join(dir, "cpu.cfs_period_us")), readTrim(t, filepath.Join(dir, "cpu.cfs_quota_us")); p != "100000" || q != "1000" {
		t.Errorf("period %s quota %s (the kernel's minimum is 1000)", p, q)
	}
	if err := tree.setQuota(dir, -1); err == nil {
		t.Error("negative quota accepted")
	}
}
