package container

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cfsPeriodUs is the CFS period used for quotas: 100 ms, the kernel's
// default, so that a quota of 0.5 core means 50 ms of every 100 ms.
const cfsPeriodUs = 100000

// cgroupTree is the cgroup hierarchy lockstep puts hosts in: the cgroup v1
// hierarchy carrying the cpu controller when there is one (this machine),
// otherwise the cgroup v2 unified hierarchy.
type cgroupTree struct {
	mount string // where the hierarchy is mounted
	v2    bool
	cpu   bool // the cpu controller is usable (always true for v1)
}

// findCgroupTree reads /proc/self/mountinfo. A v1 cpu hierarchy wins over
// a v2 one because on hybrid systems (like this one) the v2 hierarchy has
// no controllers.
func findCgroupTree() (*cgroupTree, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	defer f.Close()
	return parseMountinfo(f)
}

func parseMountinfo(r io.Reader) (*cgroupTree, error) {
	var v2 string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// 32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 {
			continue
		}
		switch qf[0] {
		case "cgroup":
			for _, o := range strings.Split(qf[2], ",") {
				if o == "cpu" {
					return &cgroupTree{mount: unescapeMount(pf[4]), cpu: true}, nil
				}
			}
		case "cgroup2":
			if v2 == "" {
				v2 = unescapeMount(pf[4])
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("cgroup: reading mountinfo: %w", err)
	}
	if v2 == "" {
		return nil, errors.New("cgroup: neither a cgroup v1 cpu hierarchy nor cgroup v2 is mounted")
	}
	ctrl, _ := os.ReadFile(filepath.Join(v2, "cgroup.controllers"))
	return &cgroupTree{mount: v2, v2: true, cpu: hasWord(string(ctrl), "cpu")}, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// runDir is the cgroup of a whole run; hosts are its children.
func (t *cgroupTree) runDir(run string) string {
	return filepath.Join(t.mount, "lockstep", run)
}

func (t *cgroupTree) hostDir(run, host string) string {
	return filepath.Join(t.runDir(run), host)
}

// createHost makes the host's cgroup (and its parents) and sets its quota.
func (t *cgroupTree) createHost(run, host string, cores float64) (string, error) {
	dir := t.hostDir(run, host)
	if t.v2 && t.cpu {
		// v2 only hands a controller to children whose parent enabled it.
		if err := t.enableCPU(t.mount, filepath.Join(t.mount, "lockstep"), t.runDir(run)); err != nil {
			return "", err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("cgroup: %w", err)
	}
	if err := t.setQuota(dir, cores); err != nil {
		return "", err
	}
	return dir, nil
}

// enableCPU creates each directory and enables +cpu for its children.
func (t *cgroupTree) enableCPU(dirs ...string) error {
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("cgroup: %w", err)
		}
		cur, _ := os.ReadFile(filepath.Join(d, "cgroup.subtree_control"))
		if hasWord(string(cur), "cpu") {
			continue
		}
		if err := writeFile(filepath.Join(d, "cgroup.subtree_control"), "+cpu"); err != nil {
			return err
		}
	}
	return nil
}

// setQuota limits dir to cores CPUs; 0 removes the limit.
func (t *cgroupTree) setQuota(dir string, cores float64) error {
	if cores < 0 {
		return fmt.Errorf("cgroup: negative CPU quota %v", cores)
	}
	if !t.cpu {
		if cores == 0 {
			return nil
		}
		return fmt.Errorf("cgroup: CPU quota %v requested but the cpu controller is not available in %s", cores, t.mount)
	}
	quota := int64(-1)
	if cores > 0 {
		// The kernel refuses quotas below 1 ms.
		quota = max(int64(cores*cfsPeriodUs), 1000)
	}
	if t.v2 {
		v := "max"
		if quota > 0 {
			v = strconv.FormatInt(quota, 10)
		}
		return writeFile(filepath.Join(dir, "cpu.max"), fmt.Sprintf("%s %d", v, cfsPeriodUs))
	}
	if err := writeFile(filepath.Join(dir, "cpu.cfs_period_us"), strconv.Itoa(cfsPeriodUs)); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, "cpu.cfs_quota_us"), strconv.FormatInt(quota, 10))
}

// cgroupProcs lists the processes of a cgroup; a missing cgroup has none.
func cgroupProcs(dir string) ([]int, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	var pids []int
	for _, f := range strings.Fields(string(raw)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// removeRun removes the run's cgroup and its host cgroups, which must be
// empty by now (the kernel may take a moment to let go of dead tasks, hence
// the retries). The shared "lockstep" parent is removed when it is empty.
func (t *cgroupTree) removeRun(run string) error {
	root := t.runDir(run)
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	var errs []error
	for _, e := range ents {
		if e.IsDir() {
			errs = append(errs, rmdirRetry(filepath.Join(root, e.Name())))
		}
	}
	errs = append(errs, rmdirRetry(root))
	// Other runs may still use it: not an error.
	_ = unix.Rmdir(filepath.Join(t.mount, "lockstep"))
	return errors.Join(errs...)
}

func rmdirRetry(dir string) error {
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("cgroup: removing %s: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// writeFile writes a cgroup control file in one write, as `echo v > f`
// does; it never creates one.
func writeFile(path, val string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	_, err = f.WriteString(val)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cgroup: writing %q to %s: %w", val, path, err)
	}
	return nil
}
