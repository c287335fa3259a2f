package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// lockDir holds one lock file per run name.
const lockDir = "/run/lockstep"

// lockRun takes the run's lock without waiting. The file stays behind
// after release on purpose: deleting a lock file races with a process that
// has just opened it. The lock goes with the process (Go opens files
// close-on-exec, so children started in the cluster do not inherit it),
// which is what lets CleanupStale run after a crash.
func lockRun(run string) (*os.File, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	path := filepath.Join(lockDir, run+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			holder, _ := os.ReadFile(path)
			return nil, fmt.Errorf("lock: run %q is in use (%s held by pid %s)", run, path, strings.TrimSpace(string(holder)))
		}
		return nil, fmt.Errorf("lock: %s: %w", path, err)
	}
	// The pid is only informative, for the message above.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}
