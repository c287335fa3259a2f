package dmt

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
)

// LibraryName is the file name of the runtime.
const LibraryName = "liblockstep_dmt.so"

// Environment variables read by the runtime inside the server.
const (
	EnvShm       = "LOCKSTEP_DMT_SHM"          // statistics and input channel file
	EnvNsPerTurn = "LOCKSTEP_DMT_NS_PER_TURN"  // logical nanoseconds per turn
	EnvSpin      = "LOCKSTEP_DMT_SPIN"         // spins before sleeping on the turn
	EnvDebug     = "LOCKSTEP_DMT_DEBUG"        // 1: log to stderr
	EnvDisable   = "LOCKSTEP_DMT_DISABLE"      // 1: preloaded but pass-through
	EnvInput     = "LOCKSTEP_DMT_INPUT_WEIGHT" // key cost of a receive that returned data
	EnvTrace     = "LOCKSTEP_DMT_TRACE"        // prefix of per-process schedule traces
	EnvLibrary   = "LOCKSTEP_DMT_LIB"          // read by Library: a prebuilt .so
	envPreload   = "LD_PRELOAD"
)

// Options put a server under the runtime.
type Options struct {
	// Library is the runtime's path; empty: Library().
	Library string
	// Shm is the shared-memory file where every process of the server
	// publishes its counters (read with ReadStats); empty: none. The
	// runtime creates it if missing; its directory must exist.
	Shm string
	// NsPerTurn converts timeouts and sleeps to turns (logical time);
	// 0: the runtime's default, 1000.
	NsPerTurn uint64
	// Spin is how many times a thread checks for the turn before it
	// sleeps on its futex; 0: the runtime's default, 100.
	Spin int
	// InputWeight is what a receive that returned data adds to its
	// thread's place in the order (see the package doc); 0: the runtime's
	// default, 1000; 1: plain round robin.
	InputWeight uint64
	// Trace, if set, makes every process write its scheduling events to
	// Trace.<pid>.
	Trace string
	// Debug makes the runtime log to the server's stderr.
	Debug bool
	// Joint turns on joint_sched: the server's input is gated by the input
	// channel in Shm (see chan.go), which the replica's feeder fills from
	// the log. Shm must be set and made by CreateChan first.
	Joint bool
	// Quantum is how many turns the runtime may run before it must admit
	// the next entry of the channel (joint_sched); 0: 2000.
	Quantum uint64
}

// Env returns the environment entries (KEY=value) that run a server under
// the runtime. Add them to the server's environment with MergeEnv, which
// keeps an LD_PRELOAD already there.
func Env(opts Options) ([]string, error) {
	lib := opts.Library
	if lib == "" {
		var err error
		if lib, err = Library(); err != nil {
			return nil, err
		}
	}
	if !filepath.IsAbs(lib) {
		abs, err := filepath.Abs(lib)
		if err != nil {
			return nil, err
		}
		lib = abs
	}
	if strings.ContainsAny(lib, ": ") {
		return nil, fmt.Errorf("dmt: library path %q has a colon or space, which LD_PRELOAD cannot carry", lib)
	}
	env := []string{envPreload + "=" + lib}
	if opts.Shm != "" {
		env = append(env, EnvShm+"="+opts.Shm)
	}
	if opts.NsPerTurn != 0 {
		env = append(env, EnvNsPerTurn+"="+strconv.FormatUint(opts.NsPerTurn, 10))
	}
	if opts.Spin != 0 {
		spin := opts.Spin
		if spin < 0 {
			spin = 0
		}
		env = append(env, EnvSpin+"="+strconv.Itoa(spin))
	}
	if opts.InputWeight != 0 {
		env = append(env, EnvInput+"="+strconv.FormatUint(opts.InputWeight, 10))
	}
	if opts.Trace != "" {
		env = append(env, EnvTrace+"="+opts.Trace)
	}
	if opts.Debug {
		env = append(env, EnvDebug+"=1")
	}
	if opts.Joint {
		env = append(env, EnvJoint+"=1")
	}
	if opts.Quantum != 0 {
		env = append(env, EnvQuantum+"="+strconv.FormatUint(opts.Quantum, 10))
	}
	return env, nil
}

// MergeEnv returns base with the entries of add set: an entry replaces one
// of the same key, except LD_PRELOAD, whose libraries are put in front of
// those already in base.
func MergeEnv(base, add []string) []string {
	out := make([]string, 0, len(base)+len(add))
	keys := map[string]string{}
	for _, kv := range add {
		k, v, _ := strings.Cut(kv, "=")
		keys[k] = v
	}
	for _, kv := range base {
		k, v, _ := strings.Cut(kv, "=")
		nv, ok := keys[k]
		if !ok {
			out = append(out, kv)
			continue
		}
		if k == envPreload && v != "" {
			keys[k] = nv + ":" + v
		}
	}
	for _, kv := range add {
		k, _, _ := strings.Cut(kv, "=")
		out = append(out, k+"="+keys[k])
	}
	return out
}

var buildMu sync.Mutex

// Library returns the path of the built runtime, building it first with
// make and the system compiler when its sources are newer (make decides).
// $LOCKSTEP_DMT_LIB, if set, names a prebuilt library and is returned as
// is. Otherwise the sources are found from the repository root (see
// RepoRoot) and the library is built into <root>/.build/dmt/.
func Library() (string, error) {
	if p := os.Getenv(EnvLibrary); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("dmt: %s: %w", EnvLibrary, err)
		}
		return p, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(root, ".build", "dmt")
	if err := Make(filepath.Join(root, "dmt", "runtime"), out); err != nil {
		return "", err
	}
	return filepath.Join(out, LibraryName), nil
}

// Make runs make in dir with OUT=out (a Makefile of this repository's
// native parts: dmt/runtime, apps/racy).
func Make(dir, out string) error {
	buildMu.Lock()
	defer buildMu.Unlock()
	if _, err := exec.LookPath("make"); err != nil {
		return fmt.Errorf("dmt: building %s needs make and a C compiler: %w", dir, err)
	}
	cmd := exec.Command("make", "-s", "-C", dir, "OUT="+out)
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("dmt: make -C %s: %w\n%s", dir, err, buf.String())
	}
	return nil
}

// RepoRoot returns the root of the lockstep source tree: the first
// directory holding dmt/runtime/Makefile among $LOCKSTEP_ROOT, the working
// directory and its parents, the executable's directory and its parents,
// and the directory this file was compiled from.
func RepoRoot() (string, error) {
	var starts []string
	if r := os.Getenv("LOCKSTEP_ROOT"); r != "" {
		starts = append(starts, r)
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, s := range starts {
		for d := s; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "dmt", "runtime", "Makefile")); err == nil {
				return d, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return "", errors.New("dmt: cannot find the lockstep source tree (dmt/runtime/Makefile); set LOCKSTEP_ROOT or " + EnvLibrary)
}
