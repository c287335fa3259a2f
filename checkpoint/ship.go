package checkpoint

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Headers of a checkpoint's tar stream, so that a receiver can decide
// before reading the body.
const (
	HeaderIndex  = "X-Lockstep-Checkpoint-Index"
	HeaderID     = "X-Lockstep-Checkpoint-Id"
	HeaderDigest = "X-Lockstep-Checkpoint-Sha256"
)

// maxManifest bounds the manifest a peer may send.
const maxManifest = 16 << 20

// Handler serves the store to peers:
//
//	GET /         the manifests, JSON, oldest first
//	GET /newest   the newest checkpoint as a tar stream
//	GET /ID       the checkpoint ID (or INDEX-ID) as a tar stream
//
// Mount it under a prefix with http.StripPrefix. The tar holds
// manifest.json first, then the manifest's files in its order.
func (s *Store) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := strings.Trim(r.URL.Path, "/")
		if name == "" {
			l, err := s.List()
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			ms := make([]Manifest, 0, len(l))
			for _, c := range l {
				ms = append(ms, c.Manifest)
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(ms)
			return
		}
		var c Checkpoint
		var err error
		if name == "newest" {
			c, err = s.Newest()
		} else {
			if _, id, ok := strings.Cut(name, "-"); ok {
				name = id
			}
			c, err = s.Get(name)
		}
		if errors.Is(err, ErrNotFound) {
			http.Error(w, "no such checkpoint", http.StatusNotFound)
			return
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/x-tar")
		w.Header().Set(HeaderIndex, strconv.FormatUint(c.Index, 10))
		w.Header().Set(HeaderID, c.ID)
		w.Header().Set(HeaderDigest, c.SHA256)
		if r.Method == http.MethodHead {
			return
		}
		// An error in the middle cannot change the status any more: the
		// stream is cut short and the receiver's checks fail.
		_ = WriteTar(w, c)
	})
}

// WriteTar writes a checkpoint as a tar stream: manifest.json first, then
// its files in manifest order.
func WriteTar(w io.Writer, c Checkpoint) error {
	tw := tar.NewWriter(w)
	mb, err := json.Marshal(c.Manifest)
	if err != nil {
		return err
	}
	hdr := &tar.Header{Name: ManifestName, Mode: 0o600, Size: int64(len(mb)), ModTime: c.Created, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if _, err := tw.Write(mb); err != nil {
		return err
	}
	for _, f := range c.Files {
		hdr := &tar.Header{Name: f.Name, Mode: 0o600, Size: f.Size, ModTime: c.Created, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		fh, err := os.Open(filepath.Join(c.Dir, filepath.FromSlash(f.Name)))
		if err != nil {
			return err
		}
		_, err = io.CopyN(tw, fh, f.Size)
		fh.Close()
		if err != nil {
			return fmt.Errorf("checkpoint: sending %s: %w", f.Name, err)
		}
	}
	return tw.Close()
}

// Fetch downloads a checkpoint from a peer's Handler (url names it, e.g.
// http://peer/checkpoints/newest), checks every file's size and SHA-256
// against the manifest and the manifest against its digest, and renames it
// into the store at root. A checkpoint the store already has is not
// downloaded again.
func Fetch(ctx context.Context, url, root string) (Checkpoint, error) {
	return FetchDigest(ctx, url, root, "")
}

// FetchDigest is Fetch that also requires the checkpoint's digest
// (Manifest.SHA256) to be digest, e.g. the one recorded in a raft
// snapshot, so that a peer cannot hand over another checkpoint.
func FetchDigest(ctx context.Context, url, root, digest string) (Checkpoint, error) {
	s, err := OpenStore(root)
	if err != nil {
		return Checkpoint{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: fetch: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: fetch: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return Checkpoint{}, fmt.Errorf("checkpoint: fetch %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	return s.Receive(resp.Body, digest)
}

// Receive reads a checkpoint's tar stream (as WriteTar writes it) into the
// store, verified; digest, if not empty, is the Manifest.SHA256 it must
// have.
func (s *Store) Receive(r io.Reader, digest string) (Checkpoint, error) {
	tr := tar.NewReader(r)
	hdr, err := tr.Next()
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: %w", err)
	}
	if hdr.Name != ManifestName || hdr.Typeflag != tar.TypeReg || hdr.Size > maxManifest {
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: stream starts with %q, not the manifest", hdr.Name)
	}
	var m Manifest
	if err := json.NewDecoder(io.LimitReader(tr, maxManifest)).Decode(&m); err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: manifest: %w", err)
	}
	if err := m.validate(); err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: %w", err)
	}
	if digest != "" && m.SHA256 != digest {
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: got checkpoint %s (digest %s), want digest %s", m.DirName(), m.SHA256, digest)
	}
	if have, err := readManifest(filepath.Join(s.root, m.DirName())); err == nil && have.SHA256 == m.SHA256 {
		return Checkpoint{Manifest: *have, Dir: filepath.Join(s.root, m.DirName())}, nil
	}

	tmp, err := os.MkdirTemp(s.root, ".tmp-fetch-")
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	for _, want := range m.Files {
		hdr, err := tr.Next()
		if err != nil {
			return Checkpoint{}, fmt.Errorf("checkpoint: receive: before %s: %w", want.Name, err)
		}
		if hdr.Name != want.Name || hdr.Typeflag != tar.TypeReg || hdr.Size != want.Size {
			return Checkpoint{}, fmt.Errorf("checkpoint: receive: got %q (%d bytes), want %q (%d bytes)", hdr.Name, hdr.Size, want.Name, want.Size)
		}
		if err := receiveFile(tr, filepath.Join(tmp, filepath.FromSlash(want.Name)), want); err != nil {
			return Checkpoint{}, err
		}
	}
	if hdr, err := tr.Next(); err != io.EOF {
		if err == nil {
			err = fmt.Errorf("unexpected %q after the listed files", hdr.Name)
		}
		return Checkpoint{}, fmt.Errorf("checkpoint: receive: %w", err)
	}
	if err := writeManifest(tmp, &m); err != nil {
		return Checkpoint{}, err
	}
	final := filepath.Join(s.root, m.DirName())
	if _, err := os.Stat(final); err == nil {
		// A damaged copy of the same checkpoint: replace it.
		gone := filepath.Join(s.root, fmt.Sprintf(".tmp-gone-%s-%d", m.DirName(), time.Now().UnixNano()))
		if err := os.Rename(final, gone); err != nil {
			return Checkpoint{}, fmt.Errorf("checkpoint: %w", err)
		}
		defer os.RemoveAll(gone)
	}
	c, err := s.install(tmp, &m)
	if err != nil {
		return Checkpoint{}, err
	}
	ok = true
	return c, nil
}

func receiveFile(r io.Reader, path string, want File) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("checkpoint: receive %s: %w", want.Name, err)
	}
	if n != want.Size {
		return fmt.Errorf("checkpoint: receive %s: %d bytes, want %d", want.Name, n, want.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want.SHA256 {
		return fmt.Errorf("checkpoint: receive %s: sha256 %s, want %s", want.Name, got, want.SHA256)
	}
	return nil
}
