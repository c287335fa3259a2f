package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Cluster.Exec starts the wanted program through this helper: the current
// binary re-executed (/proc/self/exe) under the argv[0] below, which the
// init function of this package recognises before main runs. It
//
//  1. writes its own pid into the host's cgroup(s),
//  2. setns(2)es its thread into the host's network namespace,
//  3. execve(2)s the program, keeping pid, process group and environment.
//
// So the program and all its children start inside the namespace and the
// cgroup, with no window in which they could fork outside (which moving the
// pid after Start would have), no mount namespace games (`ip netns exec`
// makes one and remounts /sys) and no dependency on iproute2 or cgexec.
//
// Helper command line: lockstep-nsexec [-netns PATH] [-cgroup DIR]... -- PATH ARGV0 ARGS...
const nsexecArg0 = "lockstep-nsexec"

// deferredPreload carries the program's LD_PRELOAD through the helper: the
// helper is a dynamically linked binary too, and a library meant for the
// program (the deterministic runtime) must not load into it and schedule
// its Go threads. The helper sets LD_PRELOAD from it just before execve.
const deferredPreload = "LOCKSTEP_NSEXEC_LD_PRELOAD"

// deferPreload renames LD_PRELOAD in the environment of a command started
// through the helper; other commands are left alone.
func deferPreload(cmd *exec.Cmd) {
	if len(cmd.Args) == 0 || cmd.Args[0] != nsexecArg0 || cmd.Env == nil {
		return
	}
	for i, kv := range cmd.Env {
		if v, ok := strings.CutPrefix(kv, "LD_PRELOAD="); ok {
			cmd.Env[i] = deferredPreload + "=" + v
		}
	}
}

// programEnv is the helper's environment with LD_PRELOAD given back.
func programEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, deferredPreload+"="); ok {
			kv = "LD_PRELOAD=" + v
		}
		out = append(out, kv)
	}
	return out
}

func init() {
	if len(os.Args) > 0 && os.Args[0] == nsexecArg0 {
		// setns affects the calling thread only, and execve keeps that
		// thread's namespaces: stay on it.
		runtime.LockOSThread()
		err := nsexec(os.Args[1:])
		fmt.Fprintf(os.Stderr, "%s: %v\n", nsexecArg0, err)
		os.Exit(127)
	}
}

// nsexecArgs builds the helper's argv.
func nsexecArgs(netnsPath string, cgroups []string, path string, argv []string) []string {
	args := []string{nsexecArg0}
	if netnsPath != "" {
		args = append(args, "-netns", netnsPath)
	}
	for _, cg := range cgroups {
		args = append(args, "-cgroup", cg)
	}
	args = append(args, "--", path)
	return append(args, argv...)
}

// nsexec returns only on failure.
func nsexec(args []string) error {
	var netnsPath string
	var cgroups []string
	for len(args) > 0 && args[0] != "--" {
		if len(args) < 2 {
			return fmt.Errorf("bad arguments %q", args)
		}
		switch args[0] {
		case "-netns":
			netnsPath = args[1]
		case "-cgroup":
			cgroups = append(cgroups, args[1])
		default:
			return fmt.Errorf("unknown option %q", args[0])
		}
		args = args[2:]
	}
	if len(args) < 3 {
		return errors.New("missing program after --")
	}
	path, argv := args[1], args[2:]
	pid := strconv.Itoa(os.Getpid())
	for _, cg := range cgroups {
		if err := writeFile(filepath.Join(cg, "cgroup.procs"), pid); err != nil {
			return err
		}
	}
	if netnsPath != "" {
		fd, err := unix.Open(netnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening netns: %w", err)
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("setns %s: %w", netnsPath, err)
		}
	}
	if err := unix.Exec(path, argv, programEnv(os.Environ())); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}
