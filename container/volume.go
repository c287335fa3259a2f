//go:build linux

package container

// Data volumes: a container's writable data on a copy-on-write file
// system, so that a checkpoint takes it in constant time while the
// container is frozen and archives it once the container runs again.
//
// A tmpfs inside the container (LXCOptions.DataDir without a volume) goes
// into the CRIU image itself: CRIU archives it with tar while the tree is
// frozen, which for MariaDB with 1.3 GiB of tables froze the server for
// 1.5-2.5 s. A volume is a btrfs file system on a loop device whose
// backing file lives in a tmpfs of its own (the data stays in memory, as
// before; fsync costs no disk write), bound into the container. A dump
// (proxy/ckpt.go) marks the bind external (it is not in the image), takes
// a read-only snapshot of it from CRIU's post-dump notification, while the
// tree is still frozen (tens of milliseconds: the snapshot flushes what
// was written since the Sync before the dump), and archives the snapshot
// into the images directory (VolumeArchive) after the tree runs again. A
// restore makes a fresh volume, extracts the archive into it and hands it
// to CRIU as the external mount's source.
//
// Layout on the host, under VolumeRoot (a private mount, so that volumes
// made later do not propagate into running containers; a container that
// LXC starts unmounts its copy of it, see StartLXC):
//
//	<VolumeRoot>/<name>/mem       tmpfs holding the backing file "disk"
//	<VolumeRoot>/<name>/fs        the btrfs file system (mount -o loop)
//	<VolumeRoot>/<name>/fs/data   subvolume: the container's data directory
//	<VolumeRoot>/<name>/fs/snap-* read-only snapshots, while archived
//
// Volumes need mkfs.btrfs (Debian's btrfs-progs) and loop devices; without
// them callers keep the in-container tmpfs (VolumesSupported).

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VolumeRoot holds one directory per data volume, named after its
// container.
const VolumeRoot = "/run/lockstep/volumes"

// VolumeKey is the key under which a dump marks a container's data volume
// external and Restore binds the new one.
const VolumeKey = "lockstep-data"

// VolumeArchive is the archive of a volume's snapshot in an images
// directory (a tar, as CRIU's own archive of a tmpfs).
const VolumeArchive = "lockstep-data.tar"

// minVolumeBytes: a btrfs smaller than this is refused or cramped.
const minVolumeBytes = 256 << 20

// Volume is a container's data volume.
type Volume struct {
	name string
	dir  string
}

var (
	volSupportOnce sync.Once
	volSupportErr  error
)

// VolumesSupported says whether data volumes can be made here (nil) or
// why not.
func VolumesSupported() error {
	volSupportOnce.Do(func() {
		if _, err := exec.LookPath("mkfs.btrfs"); err != nil {
			volSupportErr = errors.New("container: no mkfs.btrfs (btrfs-progs): data volumes are unavailable")
			return
		}
		if _, err := os.Stat("/dev/loop-control"); err != nil {
			volSupportErr = fmt.Errorf("container: no loop devices: %w", err)
			return
		}
		if !hasFilesystem("btrfs") {
			volSupportErr = errors.New("container: the kernel has no btrfs")
		}
	})
	return volSupportErr
}

func hasFilesystem(fs string) bool {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 0 && f[len(f)-1] == fs {
			return true
		}
	}
	return false
}

// OpenVolume is the volume of container name (it may not exist).
func OpenVolume(name string) *Volume {
	return &Volume{name: name, dir: filepath.Join(VolumeRoot, name)}
}

// Data is the host path of the volume's data directory (the subvolume
// bound into the container).
func (v *Volume) Data() string { return filepath.Join(v.dir, "fs", "data") }

func (v *Volume) fs() string  { return filepath.Join(v.dir, "fs") }
func (v *Volume) mem() string { return filepath.Join(v.dir, "mem") }

// CreateVolume makes a fresh, empty volume for container name that holds
// at least size (tmpfs size syntax: 512m, 3g), replacing one an earlier
// run left.
func CreateVolume(name, size string) (*Volume, error) {
	if err := VolumesSupported(); err != nil {
		return nil, err
	}
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("container: bad volume name %q", name)
	}
	want, err := parseSize(size)
	if err != nil {
		return nil, err
	}
	// btrfs keeps metadata twice and allocates in chunks: room above the
	// data's own bound. The backing file is sparse: unused room costs
	// no memory.
	bytes := max(want+want/4, minVolumeBytes)
	if err := volumeRoot(); err != nil {
		return nil, err
	}
	v := OpenVolume(name)
	if err := v.Remove(); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = v.Remove()
		}
	}()
	for _, d := range []string{v.mem(), v.fs()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("container: %w", err)
		}
	}
	if err := unix.Mount("tmpfs", v.mem(), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV,
		fmt.Sprintf("size=%d,mode=0700", bytes+16<<20)); err != nil {
		return nil, fmt.Errorf("container: mounting the tmpfs of volume %s: %w", name, err)
	}
	disk := filepath.Join(v.mem(), "disk")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if err := os.Truncate(disk, bytes); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if out, err := exec.Command("mkfs.btrfs", "-q", "-f", disk).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("container: mkfs.btrfs for volume %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	// mount(8) sets the loop device up with autoclear: it goes with
	// the file system's last mount. nodatasum: no checksums to compute
	// on every write and read (the data is in memory); discard=async
	// gives deleted files' blocks back to the tmpfs.
	if out, err := exec.Command("mount", "-t", "btrfs", "-o", "loop,noatime,nodatasum,discard=async", disk, v.fs()).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("container: mounting volume %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	if err := btrfsVolArgs(v.fs(), btrfsIocSubvolCreate, -1, "data"); err != nil {
		return nil, fmt.Errorf("container: volume %s: creating its subvolume: %w", name, err)
	}
	if err := os.Chmod(v.Data(), 0o755); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	ok = true
	return v, nil
}

// Remove unmounts the volume and removes its directory. A container
// that still has it bound keeps its data until it ends.
func (v *Volume) Remove() error {
	if _, err := os.Stat(v.dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, m := range []string{v.fs(), v.mem()} {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("container: unmounting %s: %w", m, err))
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(v.dir); err != nil {
			errs = append(errs, fmt.Errorf("container: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Sync writes the volume's dirty data to its device, so that a snapshot
// that follows has little left to flush.
func (v *Volume) Sync() error {
	f, err := os.Open(v.fs())
	if err != nil {
		return fmt.Errorf("container: %w", err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("container: syncing volume %s: %w", v.name, err)
	}
	return nil
}

// Snapshot takes a read-only snapshot of the data and returns its path.
func (v *Volume) Snapshot() (string, error) {
	src, err := os.Open(v.Data())
	if err != nil {
		return "", fmt.Errorf("container: %w", err)
	}
	defer src.Close()
	name := "snap-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := btrfsSnapshot(v.fs(), int(src.Fd()), name); err != nil {
		return "", fmt.Errorf("container: snapshot of volume %s: %w", v.name, err)
	}
	return filepath.Join(v.fs(), name), nil
}

// DeleteSnapshot deletes a snapshot that Snapshot took.
func (v *Volume) DeleteSnapshot(path string) error {
	if filepath.Dir(path) != v.fs() || !strings.HasPrefix(filepath.Base(path), "snap-") {
		return fmt.Errorf("container: %s is no snapshot of volume %s", path, v.name)
	}
	if err := btrfsVolArgs(v.fs(), btrfsIocSnapDestroy, -1, filepath.Base(path)); err != nil {
		return fmt.Errorf("container: deleting snapshot %s: %w", path, err)
	}
	return nil
}

// BoundAt says whether the mount at dir in the mount namespace of process
// pid is this volume's data (a container that runs on it). Mounts are
// told apart by their file system's device (mountinfo's major:minor; a
// btrfs subvolume's st_dev is another) and root.
func (v *Volume) BoundAt(pid int, dir string) bool {
	dev, _ := mountAt("self", v.fs())
	if dev == "" {
		return false
	}
	d, root := mountAt(strconv.Itoa(pid), filepath.Clean(dir))
	return d == dev && root == "/data"
}

// mountAt returns the device (major:minor) and root of the mount seen at
// dir in the mount namespace of /proc/<pid> (the last one mounted there).
func mountAt(pid, dir string) (dev, root string) {
	f, err := os.Open("/proc/" + pid + "/mountinfo")
	if err != nil {
		return "", ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint ...
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMount(fields[4]) == dir {
			dev, root = fields[2], unescapeMount(fields[3])
		}
	}
	return dev, root
}

// tarCreate are CRIU's own flags for archiving a tmpfs, with 1 MiB
// records.
var tarCreate = []string{"--create", "--no-unquote", "--no-wildcards", "--one-file-system", "--check-links",
	"--preserve-permissions", "--sparse", "--numeric-owner", "--blocking-factor=2048"}

// ArchiveDir writes the tree under dir into the tar file at path.
func ArchiveDir(dir, path string) error {
	args := append(append([]string(nil), tarCreate...), "--file", path, "--directory", dir, ".")
	if out, err := exec.Command("tar", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("container: archiving %s: %v: %s", dir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ExtractArchive unpacks a tar file written by ArchiveDir into dir.
func ExtractArchive(path, dir string) error {
	out, err := exec.Command("tar", "--extract", "--no-unquote", "--no-wildcards", "--preserve-permissions",
		"--numeric-owner", "--blocking-factor=2048", "--file", path, "--directory", dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("container: extracting %s: %v: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// volumeRoot makes VolumeRoot a private mount of its own, once.
func volumeRoot() error {
	if err := os.MkdirAll(VolumeRoot, 0o700); err != nil {
		return fmt.Errorf("container: %w", err)
	}
	if dev, _ := mountAt("self", VolumeRoot); dev != "" {
		return nil
	}
	if err := unix.Mount(VolumeRoot, VolumeRoot, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("container: binding %s: %w", VolumeRoot, err)
	}
	if err := unix.Mount("", VolumeRoot, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("container: making %s private: %w", VolumeRoot, err)
	}
	return nil
}

// parseSize reads a tmpfs-style size: bytes, or a number with k, m or g.
func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, errors.New("container: a volume needs a size")
	}
	mult := int64(1)
	switch s[len(s)-1] {
	case 'k', 'K':
		mult = 1 << 10
	case 'm', 'M':
		mult = 1 << 20
	case 'g', 'G':
		mult = 1 << 30
	}
	num := s
	if mult > 1 {
		num = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)/mult {
		return 0, fmt.Errorf("container: bad size %q", s)
	}
	return n * mult, nil
}

// btrfs ioctls (linux/btrfs.h): _IOW(0x94, nr, 4096-byte argument).
const (
	btrfsIocSubvolCreate = 0x5000940e // BTRFS_IOC_SUBVOL_CREATE, struct btrfs_ioctl_vol_args
	btrfsIocSnapDestroy  = 0x5000940f // BTRFS_IOC_SNAP_DESTROY, struct btrfs_ioctl_vol_args
	btrfsIocSnapCreateV2 = 0x50009417 // BTRFS_IOC_SNAP_CREATE_V2, struct btrfs_ioctl_vol_args_v2
	btrfsSubvolRdonly    = 1 << 1
)

// btrfs_ioctl_vol_args: __s64 fd; char name[4088].
type btrfsVolArgsT struct {
	fd   int64
	name [4088]byte
}

// btrfs_ioctl_vol_args_v2: __s64 fd; __u64 transid, flags; __u64
// unused[4]; char name[4040].
type btrfsVolArgsV2T struct {
	fd      int64
	transid uint64
	flags   uint64
	unused  [4]uint64
	name    [4040]byte
}

func btrfsVolArgs(dir string, req uintptr, fd int, name string) error {
	var a btrfsVolArgsT
	if len(name) >= len(a.name) {
		return errors.New("name too long")
	}
	a.fd = int64(fd)
	copy(a.name[:], name)
	return dirIoctl(dir, req, unsafe.Pointer(&a))
}

func btrfsSnapshot(dir string, src int, name string) error {
	var a btrfsVolArgsV2T
	if len(name) >= len(a.name) {
		return errors.New("name too long")
	}
	a.fd = int64(src)
	a.flags = btrfsSubvolRdonly
	copy(a.name[:], name)
	return dirIoctl(dir, btrfsIocSnapCreateV2, unsafe.Pointer(&a))
}

func dirIoctl(dir string, req uintptr, arg unsafe.Pointer) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, d.Fd(), req, uintptr(arg)); e != 0 {
		return e
	}
	return nil
}
