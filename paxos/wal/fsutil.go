package wal

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// syncDir makes renames, creations and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir for sync: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// mkdirAll creates dir if it does not exist and, when it did not, syncs
// its parent so that the new directory entry survives a crash.
func mkdirAll(dir string, sync bool) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s: not a directory", dir)
		}
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	if !sync {
		return nil
	}
	return syncDir(filepath.Dir(filepath.Clean(dir)))
}

// writeFileSync writes data to path via a temporary file that is synced and
// then renamed into place, and syncs the directory, so that path either does
// not exist or holds all of data after a crash. It returns the open file
// (positioned after data) when keepOpen is set. renamed reports whether
// path was created, even if a later step (the directory sync) failed.
// prepare, if set, runs on the file after the write and before the sync.
func writeFileSync(path string, data []byte, sync, keepOpen bool, prepare func(*os.File), onSync func(*os.File) error) (f *os.File, renamed bool, err error) {
	tmp := path + tmpSuffix
	f, err = os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return nil, false, err
	}
	fail := func(err error) (*os.File, bool, error) {
		_ = f.Close()
		_ = os.Remove(tmp)
		return nil, false, err
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if prepare != nil {
		prepare(f)
	}
	if sync {
		if err := onSync(f); err != nil {
			return fail(err)
		}
	}
	if !keepOpen {
		if err := f.Close(); err != nil {
			_ = os.Remove(tmp)
			return nil, false, err
		}
		f = nil
	}
	if err := os.Rename(tmp, path); err != nil {
		if f != nil {
			return fail(err)
		}
		_ = os.Remove(tmp)
		return nil, false, err
	}
	if sync {
		if err := syncDir(filepath.Dir(path)); err != nil {
			return f, true, err
		}
	}
	return f, true, nil
}

const tmpSuffix = ".tmp"
