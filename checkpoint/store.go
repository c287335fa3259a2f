package checkpoint

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ManifestName is the manifest's file in a checkpoint directory.
const ManifestName = "manifest.json"

// ErrNotFound says that the store has no such checkpoint.
var ErrNotFound = errors.New("checkpoint: not found")

var (
	idRe  = regexp.MustCompile(`^[0-9a-f]{8,64}$`)
	dirRe = regexp.MustCompile(`^([0-9]{1,20})-([0-9a-f]{8,64})$`)
)

// Manifest describes one checkpoint.
type Manifest struct {
	// Index is the log index the checkpoint was taken at: restoring it and
	// replaying the log after Index gives back the replica.
	Index uint64 `json:"index"`
	// ID tells apart checkpoints of the same index (random hex).
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	// Size is the total size of Files.
	Size int64 `json:"size"`
	// App is the server it is an image of (apps/<app>).
	App string `json:"app"`
	// Files are the checkpoint's files, sorted by name.
	Files []File `json:"files"`
	// SHA256 is the digest of the file list (see Manifest.Digest); it
	// names the whole checkpoint's content.
	SHA256 string `json:"sha256"`
	// Meta is free for the caller (e.g. the raft term, the replica).
	Meta map[string]string `json:"meta,omitempty"`
}

// File is one file of a checkpoint. Names are slash-separated paths
// relative to the checkpoint directory.
type File struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Digest is the SHA-256 of "name size sha256\n" for every file, in order.
func (m *Manifest) Digest() string {
	h := sha256.New()
	for _, f := range m.Files {
		fmt.Fprintf(h, "%s %d %s\n", f.Name, f.Size, f.SHA256)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// DirName is the checkpoint's directory name in a store.
func (m *Manifest) DirName() string { return fmt.Sprintf("%d-%s", m.Index, m.ID) }

// validate checks what a manifest read from disk or a peer must satisfy.
func (m *Manifest) validate() error {
	if !idRe.MatchString(m.ID) {
		return fmt.Errorf("checkpoint: bad id %q", m.ID)
	}
	var size int64
	seen := map[string]bool{}
	for i, f := range m.Files {
		if err := checkName(f.Name); err != nil {
			return err
		}
		if seen[f.Name] {
			return fmt.Errorf("checkpoint: file %q listed twice", f.Name)
		}
		seen[f.Name] = true
		if i > 0 && m.Files[i-1].Name > f.Name {
			return errors.New("checkpoint: manifest files are not sorted")
		}
		if f.Size < 0 || len(f.SHA256) != 64 {
			return fmt.Errorf("checkpoint: bad size or digest for %q", f.Name)
		}
		size += f.Size
	}
	if size != m.Size {
		return fmt.Errorf("checkpoint: manifest size %d, files add up to %d", m.Size, size)
	}
	if d := m.Digest(); d != m.SHA256 {
		return fmt.Errorf("checkpoint: manifest digest %s, files give %s", m.SHA256, d)
	}
	return nil
}

// checkName accepts clean relative paths that stay inside the checkpoint.
func checkName(name string) error {
	if name == "" || name == ManifestName || strings.HasPrefix(name, "/") || filepath.Clean(name) != name ||
		name == "." || name == ".." || strings.HasPrefix(name, "../") || strings.Contains(name, "\x00") {
		return fmt.Errorf("checkpoint: bad file name %q", name)
	}
	return nil
}

// Checkpoint is a checkpoint in a store.
type Checkpoint struct {
	Manifest
	// Dir is its directory: the images directory to restore from.
	Dir string
}

// Store keeps checkpoints under Root, one directory <index>-<id> each.
// Directories being written or fetched are named .tmp-* and are not
// listed; a crash leaves them behind for Clean.
type Store struct {
	root string
	mu   sync.Mutex // orders commits and prunes of this Store value
}

// OpenStore opens (creating) a store directory.
func OpenStore(root string) (*Store, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return &Store{root: abs}, nil
}

// Root is the store's directory.
func (s *Store) Root() string { return s.root }

// Pending is a checkpoint being written: Dump into Dir, then Commit.
type Pending struct {
	s     *Store
	dir   string
	index uint64
	id    string
	app   string
	meta  map[string]string
	done  bool
}

// Create starts a checkpoint for log index index of app.
func (s *Store) Create(index uint64, app string) (*Pending, error) {
	id, err := newID()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(s.root, ".tmp-"+strconv.FormatUint(index, 10)+"-")
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return &Pending{s: s, dir: dir, index: index, id: id, app: app}, nil
}

// Dir is where the images go.
func (p *Pending) Dir() string { return p.dir }

// ID is the checkpoint's id.
func (p *Pending) ID() string { return p.id }

// SetMeta records a free-form value in the manifest.
func (p *Pending) SetMeta(key, value string) {
	if p.meta == nil {
		p.meta = map[string]string{}
	}
	p.meta[key] = value
}

// Commit hashes the files, writes the manifest and renames the directory
// into place, atomically.
func (p *Pending) Commit() (Checkpoint, error) {
	if p.done {
		return Checkpoint{}, errors.New("checkpoint: pending checkpoint already committed or aborted")
	}
	files, err := hashDir(p.dir)
	if err != nil {
		return Checkpoint{}, err
	}
	m := Manifest{Index: p.index, ID: p.id, Created: time.Now().UTC(), App: p.app, Files: files, Meta: p.meta}
	for _, f := range files {
		m.Size += f.Size
	}
	m.SHA256 = m.Digest()
	if err := writeManifest(p.dir, &m); err != nil {
		return Checkpoint{}, err
	}
	cp, err := p.s.install(p.dir, &m)
	if err != nil {
		return Checkpoint{}, err
	}
	p.done = true
	return cp, nil
}

// Abort removes the pending directory.
func (p *Pending) Abort() error {
	if p.done {
		return nil
	}
	p.done = true
	return os.RemoveAll(p.dir)
}

// install renames a complete directory (manifest written, synced) into
// place.
func (s *Store) install(tmp string, m *Manifest) (Checkpoint, error) {
	if err := syncDir(tmp); err != nil {
		return Checkpoint{}, err
	}
	final := filepath.Join(s.root, m.DirName())
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Rename(tmp, final); err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: %w", err)
	}
	if err := syncOne(s.root); err != nil {
		return Checkpoint{}, err
	}
	return Checkpoint{Manifest: *m, Dir: final}, nil
}

// List returns the store's checkpoints, oldest (lowest index) first.
// Directories without a valid manifest are skipped.
func (s *Store) List() ([]Checkpoint, error) {
	ents, err := os.ReadDir(s.root)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	var out []Checkpoint
	for _, e := range ents {
		mm := dirRe.FindStringSubmatch(e.Name())
		if !e.IsDir() || mm == nil {
			continue
		}
		dir := filepath.Join(s.root, e.Name())
		m, err := readManifest(dir)
		if err != nil || m.DirName() != e.Name() {
			continue
		}
		out = append(out, Checkpoint{Manifest: *m, Dir: dir})
	}
	slices.SortFunc(out, func(a, b Checkpoint) int {
		if a.Index != b.Index {
			if a.Index < b.Index {
				return -1
			}
			return 1
		}
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Newest is the checkpoint of the highest index (ErrNotFound if none).
func (s *Store) Newest() (Checkpoint, error) {
	l, err := s.List()
	if err != nil {
		return Checkpoint{}, err
	}
	if len(l) == 0 {
		return Checkpoint{}, ErrNotFound
	}
	return l[len(l)-1], nil
}

// Get finds a checkpoint by id.
func (s *Store) Get(id string) (Checkpoint, error) {
	l, err := s.List()
	if err != nil {
		return Checkpoint{}, err
	}
	for _, c := range l {
		if c.ID == id {
			return c, nil
		}
	}
	return Checkpoint{}, ErrNotFound
}

// Prune keeps the keep newest checkpoints and removes the others (and any
// leftover .tmp-* directory older than an hour). It returns what it
// removed.
func (s *Store) Prune(keep int) ([]Checkpoint, error) { return s.PruneExcept(keep) }

// PruneExcept is Prune that also keeps the checkpoints named by except
// (e.g. the one the log was compacted at, even when newer ones exist).
func (s *Store) PruneExcept(keep int, except ...string) ([]Checkpoint, error) {
	if keep < 0 {
		return nil, fmt.Errorf("checkpoint: cannot keep %d checkpoints", keep)
	}
	l, err := s.List()
	if err != nil {
		return nil, err
	}
	var removed []Checkpoint
	var errs []error
	if len(l) > keep {
		s.mu.Lock()
		for _, c := range l[:len(l)-keep] {
			if slices.Contains(except, c.ID) {
				continue
			}
			// Rename first, so that a half-removed checkpoint is never
			// listed or served.
			gone := filepath.Join(s.root, ".tmp-gone-"+filepath.Base(c.Dir))
			if err := os.Rename(c.Dir, gone); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := os.RemoveAll(gone); err != nil {
				errs = append(errs, err)
			}
			removed = append(removed, c)
		}
		s.mu.Unlock()
	}
	if err := s.Clean(time.Hour); err != nil {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// Clean removes temporary directories older than age (left by crashes).
func (s *Store) Clean(age time.Duration) error {
	ents, err := os.ReadDir(s.root)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	var errs []error
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		fi, err := e.Info()
		if err != nil || time.Since(fi.ModTime()) < age {
			continue
		}
		if err := os.RemoveAll(filepath.Join(s.root, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func newID() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// hashDir lists and hashes the regular files under dir (but the
// manifest), sorted by name.
func hashDir(dir string) ([]File, error) {
	var files []File
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return nil
		case !d.Type().IsRegular():
			return fmt.Errorf("checkpoint: %s is not a regular file", path)
		case rel == ManifestName:
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		n, err := io.Copy(h, f)
		if err != nil {
			return err
		}
		files = append(files, File{Name: filepath.ToSlash(rel), Size: n, SHA256: hex.EncodeToString(h.Sum(nil))})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: hashing %s: %w", dir, err)
	}
	slices.SortFunc(files, func(a, b File) int { return strings.Compare(a.Name, b.Name) })
	return files, nil
}

func writeManifest(dir string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ManifestName), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint: %w", err)
	}
	return f.Close()
}

// ReadManifest reads and checks the manifest of a checkpoint directory.
func ReadManifest(dir string) (*Manifest, error) { return readManifest(dir) }

func readManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("checkpoint: %s: %w", filepath.Join(dir, ManifestName), err)
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Verify re-hashes a checkpoint's files against its manifest.
func (c *Checkpoint) Verify() error {
	files, err := hashDir(c.Dir)
	if err != nil {
		return err
	}
	want := map[string]File{}
	for _, f := range c.Files {
		want[f.Name] = f
	}
	for _, f := range files {
		w, ok := want[f.Name]
		if !ok {
			// Extra files (restore.log, stats-restore written by a
			// restore) are not part of the checkpoint.
			continue
		}
		if w != f {
			return fmt.Errorf("checkpoint: %s/%s does not match its manifest", c.Dir, f.Name)
		}
		delete(want, f.Name)
	}
	for name := range want {
		return fmt.Errorf("checkpoint: %s/%s is missing", c.Dir, name)
	}
	return nil
}

// syncDir fsyncs the files under dir and dir itself, so that a rename that
// follows publishes complete data.
func syncDir(dir string) error {
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	})
	if err != nil {
		return fmt.Errorf("checkpoint: syncing %s: %w", dir, err)
	}
	return nil
}

// syncOne fsyncs one directory (after a rename in it).
func syncOne(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("checkpoint: syncing %s: %w", dir, err)
	}
	return nil
}
