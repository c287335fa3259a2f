package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces live, shared with iproute2 so
// that `ip netns exec ls-<run>-<host> ...` works for debugging.
const netnsDir = "/run/netns"

// inThread runs fn on a fresh OS thread that is thrown away afterwards:
// the goroutine stays locked, so the runtime ends the thread rather than
// reuse it, and a namespace switch made by fn can never leak to other
// goroutines.
func inThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- fn()
	}()
	return <-errc
}

// ensureNetnsDir makes /run/netns a shared mount point, as `ip netns add`
// does, so that namespace mounts propagate into mount namespaces made later
// (e.g. by `ip netns exec`).
func ensureNetnsDir() error {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("netns: %w", err)
	}
	err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		// Not a mount point yet: bind it onto itself first.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("netns: bind-mounting %s: %w", netnsDir, err)
		}
		err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("netns: making %s shared: %w", netnsDir, err)
	}
	return nil
}

// createNetns makes a new named network namespace, like `ip netns add`:
// unshare on a throw-away thread, then bind-mount the thread's namespace
// onto /run/netns/<name> so that it outlives the thread.
func createNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	return inThread(func() error {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
		if err != nil {
			return fmt.Errorf("netns: %w", err)
		}
		f.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			os.Remove(path)
			return fmt.Errorf("netns: unshare: %w", err)
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			os.Remove(path)
			return fmt.Errorf("netns: bind-mounting %s: %w", path, err)
		}
		return nil
	})
}

// deleteNetns unmounts and removes a named namespace; the kernel frees it
// once no process or file descriptor refers to it any more.
func deleteNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("netns: unmounting %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("netns: %w", err)
	}
	return nil
}

// nsID identifies a namespace by its nsfs device and inode.
type nsID struct{ dev, ino uint64 }

func statNS(path string) (nsID, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsID{}, false
	}
	return nsID{st.Dev, st.Ino}, true
}

// pidsInNetns finds the processes (other than this one) whose network
// namespace is one of ids, like `ip netns pids`.
func pidsInNetns(ids map[nsID]bool) []int {
	if len(ids) == 0 {
		return nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if id, ok := statNS(filepath.Join("/proc", e.Name(), "ns", "net")); ok && ids[id] {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killAll SIGKILLs whatever list() returns until it returns nothing, so
// that processes forked in the meantime go too. Zombies are skipped: they
// hold no namespace and their parent reaps them.
func killAll(list func() []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var live []int
		for _, pid := range list() {
			if pid != os.Getpid() && !isZombie(pid) {
				live = append(live, pid)
			}
		}
		if len(live) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v survive SIGKILL", live)
		}
		for _, pid := range live {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func isZombie(pid int) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// pid (comm) S ...: comm may contain spaces and parentheses.
	i := strings.LastIndexByte(string(raw), ')')
	return i < 0 || i+2 >= len(raw) || raw[i+2] == 'Z' || raw[i+2] == 'X'
}
