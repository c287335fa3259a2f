package checkpoint

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// DefaultCriu is where scripts/criu.sh installs CRIU.
const DefaultCriu = "/usr/local/sbin/criu"

// CriuEnv names an environment variable that overrides the criu binary.
const CriuEnv = "LOCKSTEP_CRIU"

// NetnsKey is the key under which Dump marks an external network namespace
// and Restore hands one back.
const NetnsKey = "lockstep-netns"

// Log files that CRIU writes into Options.WorkDir.
const (
	DumpLog    = "dump.log"
	PreDumpLog = "pre-dump.log"
	RestoreLog = "restore.log"
)

// ErrNoDirtyTracking says that the kernel cannot track dirty memory
// (CONFIG_MEM_SOFT_DIRTY is off), so a pre-dump would not shorten the
// pause of the dump that follows it.
var ErrNoDirtyTracking = errors.New("checkpoint: the kernel has no memory dirty tracking (CONFIG_MEM_SOFT_DIRTY); pre-dumps are unavailable")

// Criu returns the criu binary to use: $LOCKSTEP_CRIU, else DefaultCriu if
// it exists, else "criu" from $PATH.
func Criu() string {
	if p := os.Getenv(CriuEnv); p != "" {
		return p
	}
	if _, err := os.Stat(DefaultCriu); err == nil {
		return DefaultCriu
	}
	if p, err := exec.LookPath("criu"); err == nil {
		return p
	}
	return DefaultCriu
}

// Check runs `criu check` and returns its complaint, if any, with a hint.
func Check(ctx context.Context) error {
	bin := Criu()
	out, err := exec.CommandContext(ctx, bin, "check").CombinedOutput()
	if err != nil {
		return fmt.Errorf("checkpoint: `%s check` failed (%v): %s; scripts/criu.sh installs a CRIU that works on this kernel", bin, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Options says what to dump or restore. Fields not marked (dump) or
// (restore) apply to both.
type Options struct {
	// Pid is the root of the process tree (dump). For a container it is
	// the container's init.
	Pid int
	// ImagesDir holds the image (written by Dump, read by Restore).
	ImagesDir string
	// WorkDir receives CRIU's log (default ImagesDir). CRIU always writes
	// its statistics (stats-dump, stats-restore) into ImagesDir.
	WorkDir string
	// ParentDir is the images directory of a previous PreDump, relative to
	// ImagesDir or absolute (dump, pre-dump): only memory changed since
	// then is written.
	ParentDir string
	// LeaveRunning lets the tree run on after the dump (dump); otherwise
	// CRIU kills it once the image is complete.
	LeaveRunning bool
	// TCPEstablished dumps and restores established TCP connections with
	// TCP repair.
	TCPEstablished bool
	// ShellJob allows a tree whose session or process group leader is
	// outside it (a process started from a shell without setsid).
	ShellJob bool
	// FileLocks dumps and restores file locks.
	FileLocks bool
	// ExternalNetns leaves the tree's network namespace out of the image
	// (dump), marked external under NetnsKey: the namespace belongs to the
	// replica, and Restore needs Netns. Without it a tree in a network
	// namespace of its own takes that namespace (devices, addresses,
	// routes) into the image.
	ExternalNetns bool
	// Netns is a network namespace file (/run/netns/NAME or
	// /proc/PID/ns/net) to restore the tree into (restore), for images
	// dumped with ExternalNetns.
	Netns string
	// External are further CRIU --external specifications
	// ("mnt[/path]:key", "veth[inner]:outer@bridge", ...).
	External []string
	// InheritFiles hands open files to CRIU by key (restore), for
	// resources marked external at dump time.
	InheritFiles map[string]*os.File
	// SkipMounts are mount points (inside the tree's mount namespace) to
	// leave out of the image (dump). Dump adds every nsfs mount by itself.
	SkipMounts []string
	// Root is the root directory for a restored mount namespace (restore;
	// default "/", which fits containers that share the host's root).
	Root string
	// CgroupRoot moves the restored tree under another cgroup (restore),
	// e.g. "/lxc.payload.r2-apache" when restoring r1's image as r2.
	CgroupRoot string
	// TrackMem asks the kernel to track memory written after this dump or
	// pre-dump, so that the next one writes only that (needs dirty
	// tracking, see ErrNoDirtyTracking).
	TrackMem bool
	// NetworkLock is how CRIU blocks the tree's TCP traffic while it is
	// checkpointed: "nftables" (default; iptables is not installed here),
	// "iptables" or "skip".
	NetworkLock string
	// PostDump, if set, runs when the image is complete and the tree is
	// still frozen (dump; CRIU's post-dump notification): what it does
	// sees the tree's state exactly as imaged, e.g. a snapshot of a file
	// system the tree writes (see Volume). An error fails the dump and
	// the tree runs on.
	PostDump func() error
	// LogLevel of CRIU's log, 0-4 (default 2: errors and warnings).
	LogLevel int
	// Criu is the binary (default Criu()).
	Criu string
}

// Stats describes one dump or restore.
type Stats struct {
	// Pause is how long the tree was stopped by the dump: from the start
	// of freezing to the end of the dump (CRIU's freezing + frozen time).
	// A dump that kills the tree is down from then until its restore.
	Pause time.Duration
	// Freezing and Frozen are CRIU's own split of Pause; MemDump and
	// MemWrite are the parts spent collecting and writing memory.
	Freezing, Frozen, MemDump, MemWrite time.Duration
	// PagesScanned, PagesWritten and PagesSkippedParent count memory
	// pages (PagesSkippedParent: unchanged since the parent pre-dump).
	PagesScanned, PagesWritten, PagesSkippedParent uint64
	// ImageBytes is the size of the images directory after the dump.
	ImageBytes int64
	// Wall is the time of the whole call, including starting CRIU.
	Wall time.Duration
	// Restore is CRIU's restore time (Restore only; Wall includes it).
	Restore time.Duration
	// For a tree whose data is a Volume: DataSync is the sync before the
	// dump, DataSnapshot the snapshot within Pause, DataArchive the
	// archiving after the tree ran on (dump); DataExtract the making of
	// a volume from the archive before CRIU ran (restore).
	DataSync, DataSnapshot, DataArchive, DataExtract time.Duration
	// Pid is the restored root's pid in the caller's namespace (Restore).
	Pid int
}

// Dump checkpoints the process tree rooted at o.Pid into o.ImagesDir
// (created if missing). Unless o.LeaveRunning, the tree is gone when Dump
// returns successfully; if Dump fails, CRIU resumes it.
//
// ctx is checked before CRIU starts and its deadline is passed to CRIU as
// its timeout for freezing the tree; a running dump is not interrupted (it
// would leave the tree frozen with CRIU's parasite inside).
func Dump(ctx context.Context, o Options) (Stats, error) {
	return dump(ctx, o, false)
}

// PreDump writes the tree's memory to o.ImagesDir while it keeps running
// (iterative migration): a following Dump with ParentDir pointing here
// writes only the pages changed since, which shortens its pause. Needs
// kernel memory dirty tracking, otherwise ErrNoDirtyTracking.
func PreDump(ctx context.Context, o Options) (Stats, error) {
	if err := DirtyTracking(ctx, o.Criu); err != nil {
		return Stats{}, err
	}
	o.TrackMem = true
	o.LeaveRunning = true
	return dump(ctx, o, true)
}

// DirtyTracking says whether pre-dumps work here (nil) or not
// (ErrNoDirtyTracking, or the error of asking CRIU). It asks the criu
// binary (`criu check --feature mem_dirty_track`): go-criu's FeatureCheck
// returns the request rather than CRIU's answer.
func DirtyTracking(ctx context.Context, bin string) error {
	if bin == "" {
		bin = Criu()
	}
	out, err := exec.CommandContext(ctx, bin, "check", "--feature", "mem_dirty_track").CombinedOutput()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil || strings.Contains(string(out), "OFF") {
		if _, ok := err.(*exec.ExitError); ok || err == nil {
			return ErrNoDirtyTracking
		}
		return fmt.Errorf("checkpoint: %s check: %w", bin, err)
	}
	return nil
}

func newCriu(bin string) *criu.Criu {
	c := criu.MakeCriu()
	if bin == "" {
		bin = Criu()
	}
	c.SetCriuPath(bin)
	return c
}

func dump(ctx context.Context, o Options, pre bool) (st Stats, err error) {
	if o.Pid <= 0 {
		return st, errors.New("checkpoint: dump needs the pid of the tree's root")
	}
	if o.ImagesDir == "" {
		return st, errors.New("checkpoint: dump needs an images directory")
	}
	if err := ctx.Err(); err != nil {
		return st, err
	}
	if err := os.MkdirAll(o.ImagesDir, 0o700); err != nil {
		return st, fmt.Errorf("checkpoint: %w", err)
	}
	logName := DumpLog
	if pre {
		logName = PreDumpLog
	}
	opts, closeDirs, err := baseOpts(o, logName)
	if err != nil {
		return st, err
	}
	defer closeDirs()
	opts.Pid = proto.Int32(int32(o.Pid))
	opts.LeaveRunning = proto.Bool(o.LeaveRunning)
	opts.TrackMem = proto.Bool(o.TrackMem)
	if o.ParentDir != "" {
		opts.ParentImg = proto.String(o.ParentDir)
	}
	if d, ok := ctx.Deadline(); ok {
		secs := int(time.Until(d).Seconds())
		opts.Timeout = proto.Uint32(uint32(max(secs, 1)))
	}
	switch o.NetworkLock {
	case "", "nftables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_NFTABLES.Enum()
	case "iptables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_IPTABLES.Enum()
	case "skip":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_SKIP.Enum()
	default:
		return st, fmt.Errorf("checkpoint: unknown network lock %q", o.NetworkLock)
	}

	// CRIU compares the tree's namespaces with its own, which are those
	// of the thread that starts it: stay on one thread from the
	// comparison here to the start.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ours, err := nsInode("thread-self", "net")
	if err != nil {
		return st, err
	}
	theirs, err := nsInode(strconv.Itoa(o.Pid), "net")
	if err != nil {
		return st, fmt.Errorf("checkpoint: process %d: %w", o.Pid, err)
	}
	if o.ExternalNetns {
		if theirs == ours {
			return st, fmt.Errorf("checkpoint: ExternalNetns: process %d shares this process's network namespace", o.Pid)
		}
		opts.External = append(opts.External, fmt.Sprintf("net[%d]:%s", theirs, NetnsKey))
	}

	// A tree in a mount namespace of its own: the mounts it shares with
	// the host are external (bound back at restore), nsfs mounts (network
	// namespaces bound under /run/netns) cannot be restored and are left
	// out.
	myMnt, err := nsInode("thread-self", "mnt")
	if err != nil {
		return st, err
	}
	theirMnt, err := nsInode(strconv.Itoa(o.Pid), "mnt")
	if err != nil {
		return st, fmt.Errorf("checkpoint: process %d: %w", o.Pid, err)
	}
	skip := append([]string(nil), o.SkipMounts...)
	if theirMnt != myMnt {
		setAutoMounts(opts)
		ns, err := nsfsMounts(o.Pid)
		if err != nil {
			return st, err
		}
		skip = append(skip, ns...)
	}
	opts.SkipMnt = skip

	c := newCriu(o.Criu)
	var nfy criu.Notify
	if o.PostDump != nil {
		nfy = &dumpNotify{post: o.PostDump}
	}
	start := time.Now()
	if pre {
		err = c.PreDump(opts, nfy)
	} else {
		err = c.Dump(opts, nfy)
	}
	st.Wall = time.Since(start)
	if err != nil {
		return st, criuError("dump", err, workDir(o), logName)
	}
	if s, err := readDumpStats(o.ImagesDir); err == nil {
		st.Freezing = usec(s.GetFreezingTime())
		st.Frozen = usec(s.GetFrozenTime())
		st.MemDump = usec(s.GetMemdumpTime())
		st.MemWrite = usec(s.GetMemwriteTime())
		st.Pause = st.Freezing + st.Frozen
		st.PagesScanned = s.GetPagesScanned()
		st.PagesWritten = s.GetPagesWritten()
		st.PagesSkippedParent = s.GetPagesSkippedParent()
	}
	st.ImageBytes, _ = DirSize(o.ImagesDir)
	return st, nil
}

// Restore brings back the tree imaged in o.ImagesDir and returns its
// root's pid. The root is a child of the calling process (CRIU's
// restore-sibling mode): wait for it (os.FindProcess(pid).Wait()) or it
// stays a zombie when it exits. Its parent is a thread of this process
// that lives as long as the process, so that a parent-death signal (LXC
// gives a container's init SIGKILL) only comes when the process ends.
func Restore(ctx context.Context, o Options) (int, error) {
	st, err := RestoreStats(ctx, o)
	return st.Pid, err
}

// RestoreStats is Restore, returning the time it took as well.
func RestoreStats(ctx context.Context, o Options) (st Stats, err error) {
	if o.ImagesDir == "" {
		return st, errors.New("checkpoint: restore needs an images directory")
	}
	if err := ctx.Err(); err != nil {
		return st, err
	}
	opts, closeDirs, err := baseOpts(o, RestoreLog)
	if err != nil {
		return st, err
	}
	defer closeDirs()
	opts.RstSibling = proto.Bool(true)
	root := o.Root
	if root == "" {
		root = "/"
	}
	opts.Root = proto.String(root)
	setAutoMounts(opts)
	if o.CgroupRoot != "" {
		opts.CgRoot = []*rpc.CgroupRoot{{Path: proto.String(o.CgroupRoot)}}
	}

	// Files handed to CRIU by key must be open in the criu process: they
	// are inherited (a descriptor without close-on-exec) when go-criu
	// starts `criu swrk`, and closed here once it has started.
	var inherit []*os.File
	defer func() {
		for _, f := range inherit {
			f.Close()
		}
	}()
	addInherit := func(key string, f *os.File) error {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD, 3)
		if err != nil {
			return fmt.Errorf("checkpoint: passing %s to criu: %w", key, err)
		}
		dup := os.NewFile(uintptr(fd), key)
		inherit = append(inherit, dup)
		opts.InheritFd = append(opts.InheritFd, &rpc.InheritFd{Key: proto.String(key), Fd: proto.Int32(int32(fd))})
		return nil
	}
	if o.Netns != "" {
		f, err := os.Open(o.Netns)
		if err != nil {
			return st, fmt.Errorf("checkpoint: network namespace: %w", err)
		}
		err = addInherit(NetnsKey, f)
		f.Close()
		if err != nil {
			return st, err
		}
	}
	for key, f := range o.InheritFiles {
		if err := addInherit(key, f); err != nil {
			return st, err
		}
	}

	c := newCriu(o.Criu)
	nfy := &restoreNotify{}
	start := time.Now()
	if err := prepareSwrk(c, inherit); err != nil {
		return st, fmt.Errorf("checkpoint: starting criu: %w", err)
	}
	for _, f := range inherit {
		f.Close()
	}
	inherit = nil
	err = c.Restore(opts, nfy)
	if cerr := c.Cleanup(); cerr != nil && err == nil {
		err = cerr
	}
	st.Wall = time.Since(start)
	if err != nil {
		return st, criuError("restore", err, workDir(o), RestoreLog)
	}
	if nfy.pid <= 0 {
		return st, errors.New("checkpoint: criu restored without telling the pid")
	}
	st.Pid = int(nfy.pid)
	if s, err := readRestoreStats(o.ImagesDir); err == nil {
		st.Restore = usec(s.GetRestoreTime())
	}
	return st, nil
}

// swrkMu serialises starting criu processes that inherit descriptors, so
// that two restores do not hand each other their files.
var swrkMu sync.Mutex

// prepareSwrk starts `criu swrk` from the parent thread. A restored root
// becomes a child of that very thread (CRIU clones it with CLONE_PARENT),
// and the kernel sends a parent-death signal (LXC gives a container's init
// SIGKILL) when the parent *thread* exits. Go ends threads whenever a
// goroutine exits while locked to one, which any code may do (namespace
// switches do), so CRIU must be started from a thread that never ends.
func prepareSwrk(c *criu.Criu, inherit []*os.File) error {
	if len(inherit) > 0 {
		swrkMu.Lock()
		defer swrkMu.Unlock()
	}
	var err error
	onParentThread(func() { err = c.Prepare() })
	return err
}

var parentThread struct {
	once sync.Once
	ch   chan func()
}

// onParentThread runs fn on a thread that is locked to a goroutine that
// never returns, so that the thread lives as long as the process.
func onParentThread(fn func()) {
	parentThread.once.Do(func() {
		parentThread.ch = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked
			for f := range parentThread.ch {
				f()
			}
		}()
	})
	done := make(chan struct{})
	parentThread.ch <- func() {
		defer close(done)
		fn()
	}
	<-done
}

type dumpNotify struct {
	criu.NoNotify
	post func() error
}

func (n *dumpNotify) PostDump() error { return n.post() }

type restoreNotify struct {
	criu.NoNotify
	pid int32
}

func (n *restoreNotify) PostRestore(pid int32) error {
	n.pid = pid
	return nil
}

// baseOpts fills the options common to dump and restore; closeDirs closes
// the directory descriptors CRIU reads through /proc.
func baseOpts(o Options, logName string) (*rpc.CriuOpts, func(), error) {
	img, err := os.Open(o.ImagesDir)
	if err != nil {
		return nil, nil, fmt.Errorf("checkpoint: images directory: %w", err)
	}
	files := []*os.File{img}
	closeDirs := func() {
		for _, f := range files {
			f.Close()
		}
	}
	opts := &rpc.CriuOpts{
		ImagesDirFd:    proto.Int32(int32(img.Fd())),
		LogFile:        proto.String(logName),
		LogLevel:       proto.Int32(2),
		TcpEstablished: proto.Bool(o.TCPEstablished),
		ShellJob:       proto.Bool(o.ShellJob),
		FileLocks:      proto.Bool(o.FileLocks),
		External:       append([]string(nil), o.External...),
		// Unlinked-but-open files are common in servers (temp files).
		LinkRemap: proto.Bool(true),
	}
	if o.LogLevel > 0 {
		opts.LogLevel = proto.Int32(int32(o.LogLevel))
	}
	if o.WorkDir != "" && o.WorkDir != o.ImagesDir {
		if err := os.MkdirAll(o.WorkDir, 0o700); err != nil {
			closeDirs()
			return nil, nil, fmt.Errorf("checkpoint: %w", err)
		}
		wd, err := os.Open(o.WorkDir)
		if err != nil {
			closeDirs()
			return nil, nil, fmt.Errorf("checkpoint: work directory: %w", err)
		}
		files = append(files, wd)
		opts.WorkDirFd = proto.Int32(int32(wd.Fd()))
	}
	return opts, closeDirs, nil
}

// setAutoMounts lets CRIU treat mounts that also exist in its own mount
// namespace as external: bound back from the host at restore.
func setAutoMounts(opts *rpc.CriuOpts) {
	opts.AutoExtMnt = proto.Bool(true)
	opts.ExtSharing = proto.Bool(true)
	opts.ExtMasters = proto.Bool(true)
}

func workDir(o Options) string {
	if o.WorkDir != "" {
		return o.WorkDir
	}
	return o.ImagesDir
}

// criuError adds the error lines of CRIU's log to err.
func criuError(op string, err error, dir, logName string) error {
	path := filepath.Join(dir, logName)
	lines := logErrors(path, 12)
	if len(lines) == 0 {
		return fmt.Errorf("checkpoint: criu %s: %w (log: %s)", op, err, path)
	}
	return fmt.Errorf("checkpoint: criu %s: %w (log: %s):\n%s", op, err, path, strings.Join(lines, "\n"))
}

// logErrors returns up to n "Error" lines of a CRIU log, the last ones.
func logErrors(path string, n int) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		// CRIU always complains about RLIMIT_NOFILE as root in a VM; it
		// is harmless.
		if strings.Contains(l, "Error") && !strings.Contains(l, "RLIMIT_NOFILE") {
			lines = append(lines, l)
			if len(lines) > n {
				lines = lines[1:]
			}
		}
	}
	return lines
}

func usec(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }

func readDumpStats(dir string) (*stats.DumpStatsEntry, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return stats.CriuGetDumpStats(d)
}

func readRestoreStats(dir string) (*stats.RestoreStatsEntry, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return stats.CriuGetRestoreStats(d)
}

// nsInode is the inode of /proc/<pid>/ns/<kind>.
func nsInode(pid, kind string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join("/proc", pid, "ns", kind), &st); err != nil {
		return 0, fmt.Errorf("checkpoint: %s namespace: %w", kind, err)
	}
	return st.Ino, nil
}

// nsfsMounts lists the nsfs mounts (bound namespace files, such as
// /run/netns/NAME) in the mount namespace of pid.
func nsfsMounts(pid int) ([]string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && len(fields) > 4 {
				if fields[i+1] == "nsfs" {
					out = append(out, unescapeMount(fields[4]))
				}
				break
			}
		}
	}
	return out, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// DirSize is the total size of the regular files under dir.
func DirSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	return n, err
}
