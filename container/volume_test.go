//go:build linux

package container

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestBtrfsIoctlArgSizes(t *testing.T) {
	if n := unsafe.Sizeof(btrfsVolArgsT{}); n != 4096 {
		t.Errorf("btrfs_ioctl_vol_args is %d bytes, want 4096", n)
	}
	if n := unsafe.Sizeof(btrfsVolArgsV2T{}); n != 4096 {
		t.Errorf("btrfs_ioctl_vol_args_v2 is %d bytes, want 4096", n)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "64k": 64 << 10, "512m": 512 << 20, "3g": 3 << 30, "2G": 2 << 30} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "m", "-1m", "1x", "1.5g"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

// A volume's snapshot holds the data as of the snapshot, whatever is
// written after it, and its archive brings exactly that into a new volume.
func TestVolumeSnapshotArchive(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("volumes need root")
	}
	if err := VolumesSupported(); err != nil {
		t.Skip(err)
	}
	name := fmt.Sprintf("lsvoltest-%d", os.Getpid())
	v, err := CreateVolume(name, "64m")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := v.Remove(); err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(filepath.Join(VolumeRoot, name)); !os.IsNotExist(err) {
			t.Errorf("volume directory left: %v", err)
		}
	}()
	before := bytes.Repeat([]byte("before "), 100000)
	file := filepath.Join(v.Data(), "sub", "f")
	if err := os.MkdirAll(filepath.Dir(file), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, before, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	snap, err := v.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot in %v", time.Since(t0))
	if err := os.WriteFile(file, []byte("after"), 0o640); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(t.TempDir(), VolumeArchive)
	if err := ArchiveDir(snap, archive); err != nil {
		t.Fatal(err)
	}
	if err := v.DeleteSnapshot(snap); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(snap); !os.IsNotExist(err) {
		t.Errorf("snapshot still there: %v", err)
	}
	if err := v.DeleteSnapshot(v.Data()); err == nil {
		t.Error("DeleteSnapshot accepted the data subvolume")
	}

	w, err := CreateVolume(name+"-b", "64m")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Remove()
	if err := ExtractArchive(archive, w.Data()); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(w.Data(), "sub", "f"))
	if err != nil || !bytes.Equal(got, before) {
		t.Fatalf("restored file: %d bytes, %v; want the %d bytes before the snapshot", len(got), err, len(before))
	}
	if fi, err := os.Stat(filepath.Join(w.Data(), "sub", "f")); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("restored file mode: %v, %v", fi.Mode(), err)
	}
	if v.BoundAt(os.Getpid(), "/nonexistent") {
		t.Error("BoundAt found a mount that is not there")
	}
	// A bind of the data directory, as a container has it.
	bind := t.TempDir()
	if err := unix.Mount(v.Data(), bind, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(bind, unix.MNT_DETACH)
	if !v.BoundAt(os.Getpid(), bind) {
		t.Error("BoundAt does not see the bound data directory")
	}
	if w.BoundAt(os.Getpid(), bind) {
		t.Error("BoundAt takes another volume's data for its own")
	}
}
