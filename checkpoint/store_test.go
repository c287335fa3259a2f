package checkpoint

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// commit makes a checkpoint of index with the given files.
func commit(t *testing.T, s *Store, index uint64, files map[string]string) Checkpoint {
	t.Helper()
	p, err := s.Create(index, "apache")
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		path := filepath.Join(p.Dir(), filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p.SetMeta("term", "3")
	c, err := p.Commit()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestStoreListNewestPrune(t *testing.T) {
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Newest(); err != ErrNotFound {
		t.Fatalf("Newest of an empty store: %v", err)
	}
	c7 := commit(t, s, 7, map[string]string{"pages-1.img": "abc", "core-1.img": "x"})
	c12 := commit(t, s, 12, map[string]string{"pages-1.img": "defg"})
	c9 := commit(t, s, 9, map[string]string{"sub/dir/file": "hello"})
	// An aborted and a half-written checkpoint are not listed.
	p, _ := s.Create(20, "apache")
	os.WriteFile(filepath.Join(p.Dir(), "x"), []byte("y"), 0o600)
	p2, _ := s.Create(21, "apache")
	p2.Abort()

	if filepath.Base(c7.Dir) != "7-"+c7.ID || c7.Size != 4 || c7.App != "apache" || c7.Meta["term"] != "3" {
		t.Errorf("checkpoint 7: %+v", c7)
	}
	l, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	var idx []uint64
	for _, c := range l {
		idx = append(idx, c.Index)
	}
	if len(idx) != 3 || idx[0] != 7 || idx[1] != 9 || idx[2] != 12 {
		t.Fatalf("List indexes %v, want [7 9 12]", idx)
	}
	n, err := s.Newest()
	if err != nil || n.ID != c12.ID {
		t.Fatalf("Newest = %v, %v; want %s", n.ID, err, c12.ID)
	}
	if g, err := s.Get(c9.ID); err != nil || g.Index != 9 {
		t.Fatalf("Get = %+v, %v", g, err)
	}
	if err := c9.Verify(); err != nil {
		t.Fatal(err)
	}
	// Files written after the commit (a restore's log) do not matter;
	// changed ones do.
	os.WriteFile(filepath.Join(c9.Dir, "restore.log"), []byte("log"), 0o600)
	if err := c9.Verify(); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(c9.Dir, "sub/dir/file"), []byte("HELLO"), 0o600)
	if err := c9.Verify(); err == nil {
		t.Fatal("Verify accepted a changed file")
	}

	removed, err := s.Prune(2)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0].ID != c7.ID {
		t.Fatalf("Prune removed %+v, want checkpoint 7", removed)
	}
	if _, err := os.Stat(c7.Dir); !os.IsNotExist(err) {
		t.Fatalf("%s still there: %v", c7.Dir, err)
	}
	if l, _ := s.List(); len(l) != 2 {
		t.Fatalf("%d checkpoints after Prune(2)", len(l))
	}
	if _, err := s.Prune(0); err != nil {
		t.Fatal(err)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Fatalf("%d checkpoints after Prune(0)", len(l))
	}
}

func TestShipFetch(t *testing.T) {
	src, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	c1 := commit(t, src, 5, map[string]string{"pages-1.img": big, "inventory.img": "inv", "tmpfs/dev.tar": "t"})
	c2 := commit(t, src, 8, map[string]string{"pages-1.img": "small"})

	mux := http.NewServeMux()
	mux.Handle("/checkpoints/", http.StripPrefix("/checkpoints", src.Handler()))
	// A peer whose stream is damaged in transit: one byte of file data
	// flipped.
	mux.HandleFunc("/broken/", func(w http.ResponseWriter, r *http.Request) {
		var buf bytes.Buffer
		if err := WriteTar(&buf, c1); err != nil {
			t.Error(err)
		}
		b := buf.Bytes()
		i := bytes.Index(b, []byte("0123456789abcdef"))
		b[i+100] ^= 1
		w.Write(b)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	ctx := context.Background()

	// The list.
	resp, err := http.Get(srv.URL + "/checkpoints/")
	if err != nil {
		t.Fatal(err)
	}
	var ms []Manifest
	json.NewDecoder(resp.Body).Decode(&ms)
	resp.Body.Close()
	if len(ms) != 2 || ms[0].ID != c1.ID || ms[1].ID != c2.ID {
		t.Fatalf("list = %+v", ms)
	}

	dstRoot := t.TempDir()
	got, err := Fetch(ctx, srv.URL+"/checkpoints/newest", dstRoot)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != c2.ID || got.SHA256 != c2.SHA256 || got.Dir != filepath.Join(dstRoot, c2.DirName()) {
		t.Fatalf("fetched %+v, want %s", got.Manifest, c2.DirName())
	}
	got, err = FetchDigest(ctx, srv.URL+"/checkpoints/"+c1.ID, dstRoot, c1.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := got.Verify(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(got.Dir, "pages-1.img")); string(b) != big {
		t.Fatal("pages-1.img differs after the fetch")
	}
	// Again: already there, nothing to do.
	if again, err := Fetch(ctx, srv.URL+"/checkpoints/"+c1.DirName(), dstRoot); err != nil || again.Dir != got.Dir {
		t.Fatalf("second fetch: %+v, %v", again, err)
	}
	dst, _ := OpenStore(dstRoot)
	if l, _ := dst.List(); len(l) != 2 {
		t.Fatalf("%d checkpoints fetched, want 2", len(l))
	}

	// Failures leave nothing behind.
	other := t.TempDir()
	if _, err := Fetch(ctx, srv.URL+"/broken/", other); err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("damaged stream: %v", err)
	}
	if _, err := FetchDigest(ctx, srv.URL+"/checkpoints/newest", other, c1.SHA256); err == nil {
		t.Fatal("FetchDigest accepted another checkpoint")
	}
	if _, err := Fetch(ctx, srv.URL+"/checkpoints/ffffffffffff", other); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("missing checkpoint: %v", err)
	}
	if ents, _ := os.ReadDir(other); len(ents) != 0 {
		t.Fatalf("failed fetches left %v", ents)
	}
}

// A stream must not write outside the store, whatever its names say.
func TestReceiveRejectsBadNames(t *testing.T) {
	s, _ := OpenStore(t.TempDir())
	for _, name := range []string{"../evil", "/etc/evil", "a/../../evil", "manifest.json"} {
		m := Manifest{Index: 1, ID: "0123456789ab", Files: []File{{Name: name, Size: 1, SHA256: strings.Repeat("0", 64)}}, Size: 1}
		m.SHA256 = m.Digest()
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		mb, _ := json.Marshal(m)
		tw.WriteHeader(&tar.Header{Name: ManifestName, Size: int64(len(mb)), Mode: 0o600, Typeflag: tar.TypeReg})
		tw.Write(mb)
		tw.WriteHeader(&tar.Header{Name: name, Size: 1, Mode: 0o600, Typeflag: tar.TypeReg})
		tw.Write([]byte("x"))
		tw.Close()
		if _, err := s.Receive(&buf, ""); err == nil || !strings.Contains(err.Error(), "bad file name") {
			t.Errorf("name %q: %v", name, err)
		}
	}
	if _, err := s.Receive(io.LimitReader(strings.NewReader("garbage"), 7), ""); err == nil {
		t.Error("garbage accepted")
	}
}
