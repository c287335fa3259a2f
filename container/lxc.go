//go:build linux && cgo

package container

// LXC application containers for servers, through liblxc's Go bindings
// (go-lxc, from Debian's golang-gopkg-lxc-go-lxc.v2-dev: go.mod replaces
// github.com/lxc/go-lxc with its installed source, and the build needs cgo
// and lxc-dev). go-lxc sets and validates the configuration and asks the
// container's monitor for its state and init pid; starting a container is
// done by a re-executed copy of this binary (lockstep-lxc-start), since
// liblxc forks its caller to make the monitor.
//
// Checkpoints are taken and restored by package checkpoint (CRIU) on the
// container's init; a restored container runs without LXC's monitor (CRIU
// makes it a child of the restoring process), and AdoptRestoredLXC gives it
// a handle with the same Stop.

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	lxc "github.com/lxc/go-lxc"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultLXCPath is where lockstep keeps its LXC containers' configuration
// and logs (LXC's "lxcpath"): one directory per container.
const DefaultLXCPath = "/run/lockstep/lxc"

// LXCInit is LXC's minimal init (Debian package lxc): pid 1 of an
// application container, the command runs as its child.
const LXCInit = "/usr/sbin/init.lxc"

// lxcStartArg0 is the argv[0] under which the current binary, re-executed,
// starts a container for StartLXC. liblxc starts a container by forking
// the calling process and running its own code in the child; a fresh,
// small process is the safe place to do that from (a copy of a busy Go
// process is not), as LXD does with its forkstart.
//
// Helper command line: lockstep-lxc-start LXCPATH NAME -- ARGV...
const lxcStartArg0 = "lockstep-lxc-start"

func init() {
	if len(os.Args) > 0 && os.Args[0] == lxcStartArg0 {
		runtime.LockOSThread()
		if err := lxcStartHelper(os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", lxcStartArg0, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

var lxcNameRe = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,47}$`)

// LXCOptions describes an application container: lxc-execute style (LXC's
// small init, LXCInit, as pid 1, the command as its child), the host's root file
// system, and namespaces of its own for pids, mounts, hostname, IPC and
// cgroups.
type LXCOptions struct {
	// Name of the container (also its hostname and the cgroup
	// lxc.payload.<Name>).
	Name string
	// LXCPath holds the container's directory (default DefaultLXCPath).
	LXCPath string
	// Command is the program and its arguments.
	Command []string
	// Env is the command's environment (KEY=VALUE); PATH is added if
	// missing.
	Env []string
	// Cwd is the command's working directory (default DataDir, else /).
	Cwd string

	// Netns, if set, is a network namespace file (/run/netns/NAME) that
	// the container shares, e.g. the replica's own: the feeder's end of
	// every server connection then lives in the same namespace, over
	// loopback. Dump such a container with checkpoint.Options
	// {ExternalNetns: true} and restore it with Netns set to the same (or
	// the new replica's) namespace.
	Netns string
	// Veth gives the container a network namespace of its own instead,
	// joined to a bridge by a veth pair. Ignored when Netns is set. With
	// neither, the container gets an empty network namespace (loopback
	// only).
	Veth *LXCVeth

	// DataDir is a directory inside the container backed by a tmpfs of
	// its own: the server's writable state. It is filled from SeedDir (a
	// copy, e.g. the app's rendered folder) before the command starts.
	// Being a tmpfs, its content goes into every CRIU image of the
	// container and comes back with it, consistent with the processes'
	// memory. It must not exist on the host or be empty there (the tmpfs
	// hides it).
	DataDir string
	// SeedDir is copied into DataDir at start.
	SeedDir string
	// DataSize bounds the tmpfs (tmpfs size= syntax, default "256m").
	DataSize string
	// Where a data volume can be made (VolumesSupported: btrfs on a loop
	// device backed by a tmpfs of the host), DataDir is one, bound into
	// the container, instead of a tmpfs inside it: its content is then
	// not in a CRIU image of the container, and a dump must snapshot and
	// archive it (Volume; proxy does) to keep the pause short. TmpfsData
	// (or LOCKSTEP_DATA_TMPFS=1 in the environment) keeps the tmpfs inside
	// the container, which CRIU archives itself.
	TmpfsData bool
	// Binds are host directories bound into the container at the same
	// path, writable: state that stays on the host (not in the images).
	Binds []string

	// Config are further LXC configuration items, applied last.
	Config [][2]string
	// LogLevel of LXC's log (<LXCPath>/<Name>/lxc.log; default WARN).
	LogLevel string
	// Output receives the command's stdout and stderr (default
	// <LXCPath>/<Name>/console.log).
	Output string
}

// LXCVeth is a container network device: eth0 inside, its peer (the host
// end) attached to a bridge.
type LXCVeth struct {
	// Netns is the network namespace file of the bridge (e.g. a
	// Cluster's switch namespace, /run/netns/ls-<run>-sw): the host end
	// is moved there once the container runs. Empty: the caller's.
	Netns string
	// Bridge the host end is attached to.
	Bridge string
	// HostName of the host end (default "vl" and a hash of the
	// container's name).
	HostName string
	// Address of the container's eth0 in CIDR form, e.g. 10.77.0.10/24.
	Address string
	// Gateway, optional.
	Gateway string
}

// LXC is a running application container, started by LXC or restored by
// CRIU (then LXC's monitor is gone and Stop kills the init directly).
type LXC struct {
	name, lxcpath string
	dir           string
	pid           int
	restored      bool
	proc          *os.Process // a restored init is our child

	mu      sync.Mutex
	stopped bool
}

// LXCVersion is liblxc's version.
func LXCVersion() string { return lxc.Version() }

// StartLXC configures and starts an application container and waits until
// its init runs. ctx bounds the start.
func StartLXC(ctx context.Context, o LXCOptions) (*LXC, error) {
	if !lxcNameRe.MatchString(o.Name) {
		return nil, fmt.Errorf("container: lxc name %q must match %s", o.Name, lxcNameRe)
	}
	if len(o.Command) == 0 {
		return nil, errors.New("container: lxc needs a command")
	}
	if o.LXCPath == "" {
		o.LXCPath = DefaultLXCPath
	}
	dir := filepath.Join(o.LXCPath, o.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	c, err := lxc.NewContainer(o.Name, o.LXCPath)
	if err != nil {
		return nil, fmt.Errorf("container: lxc %s: %w", o.Name, err)
	}
	defer c.Release()
	if c.Running() {
		return nil, fmt.Errorf("container: lxc %s is already running", o.Name)
	}
	var vol *Volume
	if o.DataDir != "" && !o.TmpfsData && os.Getenv("LOCKSTEP_DATA_TMPFS") != "1" && VolumesSupported() == nil {
		size := o.DataSize
		if size == "" {
			size = "256m"
		}
		if vol, err = CreateVolume(o.Name, size); err != nil {
			return nil, fmt.Errorf("container: lxc %s: %w", o.Name, err)
		}
	}
	ok := false
	defer func() {
		if !ok && vol != nil {
			_ = vol.Remove()
		}
	}()
	volData := ""
	if vol != nil {
		volData = vol.Data()
	}
	items, command, err := lxcConfig(o, dir, volData)
	if err != nil {
		return nil, err
	}
	c.ClearConfig()
	for _, kv := range items {
		if err := c.SetConfigItem(kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("container: lxc %s: setting %s = %q: %w", o.Name, kv[0], kv[1], err)
		}
	}
	if err := c.SaveConfigFile(filepath.Join(dir, "config")); err != nil {
		return nil, fmt.Errorf("container: lxc %s: %w", o.Name, err)
	}

	out := o.Output
	if out == "" {
		out = filepath.Join(dir, "console.log")
	}
	outf, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	defer outf.Close()
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	helper := &exec.Cmd{
		Path:   self,
		Args:   append([]string{lxcStartArg0, o.LXCPath, o.Name, "--"}, command...),
		Stdout: outf,
		Stderr: outf,
		// Its own session: the container's monitor and init, which it
		// leaves behind, must not share the caller's terminal or group.
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	helper.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if err := helper.Run(); err != nil {
		return nil, fmt.Errorf("container: starting lxc %s: %w (see %s and %s)", o.Name, err, out, filepath.Join(dir, "lxc.log"))
	}
	l := &LXC{name: o.Name, lxcpath: o.LXCPath, dir: dir}
	for {
		if c.Running() {
			if pid := c.InitPid(); pid > 0 {
				l.pid = pid
				if v := o.Veth; v != nil && o.Netns == "" && v.Netns != "" {
					if err := attachVeth(vethHostName(o.Name, v), v.Netns, v.Bridge); err != nil {
						_ = c.Stop()
						return nil, fmt.Errorf("container: lxc %s: %w", o.Name, err)
					}
				}
				ok = true
				return l, nil
			}
		}
		if !c.Defined() || c.State() == lxc.STOPPED {
			return nil, fmt.Errorf("container: lxc %s stopped right after its start (see %s)", o.Name, filepath.Join(dir, "lxc.log"))
		}
		select {
		case <-ctx.Done():
			_ = c.Stop()
			return nil, fmt.Errorf("container: lxc %s: %w", o.Name, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// lxcStartHelper runs in the re-executed helper: it starts the container
// daemonized (liblxc forks the monitor) and returns once it is running.
func lxcStartHelper(args []string) error {
	if len(args) < 4 || args[2] != "--" {
		return fmt.Errorf("usage: %s LXCPATH NAME -- ARGV...", lxcStartArg0)
	}
	c, err := lxc.NewContainer(args[1], args[0])
	if err != nil {
		return err
	}
	defer c.Release()
	if err := c.WantDaemonize(true); err != nil {
		return err
	}
	if err := c.WantCloseAllFds(true); err != nil {
		return err
	}
	// lxc-execute style, but with LXC's init as a program of the
	// container: liblxc's own execute mode runs the calling binary as
	// init through a descriptor opened before the container's mount
	// namespace existed, and CRIU cannot place such a mapping.
	argv := append([]string{LXCInit, "-n", args[1], "-q", "--"}, args[3:]...)
	if err := c.StartWithArgs(argv); err != nil {
		return fmt.Errorf("lxc start %s: %w", args[1], err)
	}
	if !c.Wait(lxc.RUNNING, 10*time.Second) {
		return fmt.Errorf("lxc %s did not reach RUNNING", args[1])
	}
	return nil
}

// lxcConfig returns the configuration items and the command to run (the
// given one, behind a seeding step when DataDir is set). volData, if set,
// is the host directory (a data volume) bound at DataDir instead of a
// tmpfs.
func lxcConfig(o LXCOptions, dir, volData string) ([][2]string, []string, error) {
	logLevel := o.LogLevel
	if logLevel == "" {
		logLevel = "WARN"
	}
	items := [][2]string{
		{"lxc.uts.name", o.Name},
		{"lxc.log.file", filepath.Join(dir, "lxc.log")},
		{"lxc.log.level", logLevel},
		// An application container: no console, no terminals, no
		// AppArmor profile (CRIU restores it unconfined anyway).
		{"lxc.console.path", "none"},
		{"lxc.pty.max", "0"},
		{"lxc.tty.max", "0"},
		{"lxc.apparmor.profile", "unconfined"},
		// /proc of the container's own pid namespace.
		{"lxc.mount.auto", "proc:rw"},
		// No autodev: the host's /dev stays (an app container shares the
		// host's root), and there is no extra tmpfs for CRIU to image.
		{"lxc.autodev", "0"},
	}
	switch {
	case o.Netns != "":
		if _, err := os.Stat(o.Netns); err != nil {
			return nil, nil, fmt.Errorf("container: lxc %s: network namespace: %w", o.Name, err)
		}
		items = append(items, [2]string{"lxc.namespace.share.net", o.Netns})
	case o.Veth != nil:
		v := o.Veth
		items = append(items,
			[2]string{"lxc.net.0.type", "veth"},
			[2]string{"lxc.net.0.name", "eth0"},
			[2]string{"lxc.net.0.flags", "up"},
		)
		// LXC attaches the host end to a bridge of its own namespace
		// only; one elsewhere is joined by attachVeth after the start.
		if v.Bridge != "" && v.Netns == "" {
			items = append(items, [2]string{"lxc.net.0.link", v.Bridge})
		}
		items = append(items, [2]string{"lxc.net.0.veth.pair", vethHostName(o.Name, v)})
		if v.Address != "" {
			items = append(items, [2]string{"lxc.net.0.ipv4.address", v.Address})
		}
		if v.Gateway != "" {
			items = append(items, [2]string{"lxc.net.0.ipv4.gateway", v.Gateway})
		}
	default:
		items = append(items, [2]string{"lxc.net.0.type", "empty"})
	}

	cwd := o.Cwd
	if o.DataDir != "" {
		if !filepath.IsAbs(o.DataDir) || filepath.Clean(o.DataDir) == "/" {
			return nil, nil, fmt.Errorf("container: lxc %s: DataDir %q must be an absolute path below /", o.Name, o.DataDir)
		}
		size := o.DataSize
		if size == "" {
			size = "256m"
		}
		if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
			return nil, nil, fmt.Errorf("container: %w", err)
		}
		// lxc.mount.entry targets are relative to the root file system,
		// which is the host's.
		target := strings.TrimPrefix(filepath.Clean(o.DataDir), "/")
		if volData != "" {
			items = append(items, [2]string{"lxc.mount.entry", fmt.Sprintf("%s %s none bind,rw 0 0", volData, target)})
		} else {
			items = append(items, [2]string{"lxc.mount.entry", fmt.Sprintf("tmpfs %s tmpfs size=%s,mode=0755 0 0", target, size)})
		}
		if cwd == "" {
			cwd = o.DataDir
		}
	}
	for _, b := range o.Binds {
		if !filepath.IsAbs(b) {
			return nil, nil, fmt.Errorf("container: lxc %s: bind %q must be absolute", o.Name, b)
		}
		rel := strings.TrimPrefix(filepath.Clean(b), "/")
		items = append(items, [2]string{"lxc.mount.entry", fmt.Sprintf("%s %s none bind,rw 0 0", b, rel)})
	}
	if cwd == "" {
		cwd = "/"
	}
	items = append(items, [2]string{"lxc.init.cwd", cwd})
	env := append([]string(nil), o.Env...)
	hasPath := false
	for _, e := range env {
		if strings.HasPrefix(e, "PATH=") {
			hasPath = true
		}
	}
	if !hasPath {
		env = append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	for _, e := range env {
		if !strings.Contains(e, "=") {
			return nil, nil, fmt.Errorf("container: lxc %s: environment entry %q is not KEY=VALUE", o.Name, e)
		}
		items = append(items, [2]string{"lxc.environment", e})
	}
	items = append(items, o.Config...)

	command := o.Command
	// The container's mount namespace starts as a copy of the host's,
	// data volumes included (this container's and others'): the copy of
	// their root is unmounted first, so that no image holds them and a
	// container does not keep another's volume alive.
	unmount := ""
	if _, err := os.Stat(VolumeRoot); err == nil {
		unmount = "umount -l " + VolumeRoot + " 2>/dev/null; "
	}
	switch {
	case o.DataDir != "" && o.SeedDir != "":
		// Seed the data directory, then become the command.
		command = append([]string{"/bin/sh", "-c", unmount + `cp -a "$1"/. "$2"/ && shift 2 && exec "$@"`, "lockstep-seed", o.SeedDir, o.DataDir}, o.Command...)
	case unmount != "":
		command = append([]string{"/bin/sh", "-c", unmount + `exec "$@"`, "lockstep-start"}, o.Command...)
	}
	return items, command, nil
}

// Name is the container's name.
func (l *LXC) Name() string { return l.name }

// InitPid is the pid (in the caller's pid namespace) of the container's
// init: the root of the process tree to checkpoint.
func (l *LXC) InitPid() int { return l.pid }

// Restored says whether the container was brought back by CRIU.
func (l *LXC) Restored() bool { return l.restored }

// AdoptRestoredLXC makes a handle for a container that CRIU restored
// (checkpoint.Restore of an image of InitPid) as pid, a child of this
// process. name and lxcpath are those the container was started with (or
// a new name, when restored elsewhere with another cgroup root).
func AdoptRestoredLXC(name, lxcpath string, pid int) (*LXC, error) {
	if lxcpath == "" {
		lxcpath = DefaultLXCPath
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if err := p.Signal(syscall.Signal(0)); err != nil {
		return nil, fmt.Errorf("container: restored init %d: %w", pid, err)
	}
	return &LXC{name: name, lxcpath: lxcpath, dir: filepath.Join(lxcpath, name), pid: pid, restored: true, proc: p}, nil
}

// Running says whether the container's init is alive.
func (l *LXC) Running() bool {
	if l.restored {
		return !isZombie(l.pid)
	}
	c, err := lxc.NewContainer(l.name, l.lxcpath)
	if err != nil {
		return false
	}
	defer c.Release()
	return c.Running() && c.InitPid() == l.pid
}

// Stop kills the container (SIGKILL to its init: the kernel then kills
// every process of its pid namespace) and waits until it is gone, at most
// timeout. A container LXC started is stopped through its monitor, which
// also removes its cgroups; for a restored one Stop does that itself.
func (l *LXC) Stop(timeout time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return nil
	}
	if timeout <= 0 {
		timeout = killWait
	}
	if l.restored {
		_ = l.proc.Kill()
		done := make(chan error, 1)
		go func() { _, err := l.proc.Wait(); done <- err }()
		select {
		case <-done:
		case <-time.After(timeout):
			return fmt.Errorf("container: restored lxc %s (init %d) survives SIGKILL", l.name, l.pid)
		}
		l.stopped = true
		return errors.Join(removeLXCCgroups(l.name), OpenVolume(l.name).Remove())
	}
	c, err := lxc.NewContainer(l.name, l.lxcpath)
	if err != nil {
		return fmt.Errorf("container: lxc %s: %w", l.name, err)
	}
	defer c.Release()
	if c.Running() && c.InitPid() == l.pid {
		if err := c.Stop(); err != nil && c.Running() {
			return fmt.Errorf("container: stopping lxc %s: %w", l.name, err)
		}
	}
	if !c.Wait(lxc.STOPPED, timeout) {
		return fmt.Errorf("container: lxc %s did not stop within %v", l.name, timeout)
	}
	// Wait until the init is really gone (the monitor reaps it).
	deadline := time.Now().Add(timeout)
	for !isZombie(l.pid) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	l.stopped = true
	return OpenVolume(l.name).Remove()
}

// WaitGone waits until LXC's monitor has noticed that the container's
// init is gone (after a checkpoint that killed it) and cleaned up, so
// that the name can be used again.
func (l *LXC) WaitGone(timeout time.Duration) error {
	if l.restored {
		return nil
	}
	c, err := lxc.NewContainer(l.name, l.lxcpath)
	if err != nil {
		return fmt.Errorf("container: lxc %s: %w", l.name, err)
	}
	defer c.Release()
	if !c.Wait(lxc.STOPPED, timeout) {
		return fmt.Errorf("container: lxc %s still %s after %v", l.name, c.State(), timeout)
	}
	l.mu.Lock()
	l.stopped = true
	l.mu.Unlock()
	return nil
}

// Destroy stops the container and removes its directory.
func (l *LXC) Destroy() error {
	err := l.Stop(0)
	if rerr := os.RemoveAll(l.dir); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// removeLXCCgroups removes the cgroup directories lxc.payload.<name> that
// CRIU recreated for a restored container, in every hierarchy, deepest
// first.
func removeLXCCgroups(name string) error {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	var errs []error
	for _, root := range roots {
		dir := filepath.Join(root, "lxc.payload."+name)
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for try := 0; try < 50; try++ {
				// A cgroup is busy for a moment after its last task
				// exits.
				if err = unix.Rmdir(dirs[i]); err == nil || errors.Is(err, unix.ENOENT) {
					err = nil
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("container: removing cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// vethHostName is the host end's name: at most 15 bytes (IFNAMSIZ).
func vethHostName(container string, v *LXCVeth) string {
	if v.HostName != "" {
		return v.HostName
	}
	h := fnv.New32a()
	h.Write([]byte(container))
	return fmt.Sprintf("vl%08x", h.Sum32())
}

// attachVeth moves the host end of a container's veth into the namespace
// at nsPath, attaches it to bridge there and sets it up.
func attachVeth(name, nsPath, bridge string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("veth %s: %w", name, err)
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("opening %s: %w", nsPath, err)
	}
	defer ns.Close()
	if err := netlink.LinkSetNsFd(link, int(ns)); err != nil {
		return fmt.Errorf("moving veth %s to %s: %w", name, nsPath, err)
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer nl.Close()
	link, err = nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("veth %s in %s: %w", name, nsPath, err)
	}
	if bridge != "" {
		br, err := nl.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("bridge %s in %s: %w", bridge, nsPath, err)
		}
		if err := nl.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("attaching %s to %s: %w", name, bridge, err)
		}
	}
	if err := nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up: %w", name, err)
	}
	return nil
}
