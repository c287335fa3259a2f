package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"lockstep/configs"
)

func need(t *testing.T, bins ...string) {
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s is not installed", b)
		}
	}
}

// execCluster runs a real server per replica through StartExec.
type execCluster struct {
	*testCluster
	mu    sync.Mutex
	addrs map[uint64]string // each copy's own address
	dirs  map[uint64]string
}

func newExecCluster(t *testing.T, opts func(*Options), setup func(id uint64, dir, addr string) ExecOptions) *execCluster {
	ec := &execCluster{addrs: map[uint64]string{}, dirs: map[uint64]string{}}
	ec.testCluster = newTestCluster(t, 3, func(id uint64) StartServerFunc {
		return func(ctx context.Context) (Server, error) {
			dir, addr := t.TempDir(), freePort(t)
			o := setup(id, dir, addr)
			o.Dir, o.Addr = dir, addr
			ec.mu.Lock()
			ec.addrs[id], ec.dirs[id] = addr, dir
			ec.mu.Unlock()
			return StartExec(ctx, o)
		}
	}, opts)
	return ec
}

func TestRedis(t *testing.T) {
	need(t, "redis-server", "redis-cli")
	c := newExecCluster(t, nil, func(id uint64, dir, addr string) ExecOptions {
		_, port, _ := net.SplitHostPort(addr)
		return ExecOptions{Args: []string{"redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
			"--appendonly", "no", "--dir", dir, "--daemonize", "no", "--logfile", filepath.Join(dir, "redis.log")}}
	})
	cli := func(addr string, args ...string) string {
		t.Helper()
		host, port, _ := net.SplitHostPort(addr)
		out, err := exec.Command("redis-cli", append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("redis-cli %v: %v: %s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	b := c.backups()
	if got := cli(b[0].ClientAddr(), "SET", "greeting", "hello from a backup"); got != "OK" {
		t.Fatalf("SET through replica %d: %q", b[0].o.ID, got)
	}
	if got := cli(b[1].ClientAddr(), "GET", "greeting"); got != "hello from a backup" {
		t.Fatalf("GET through replica %d: %q", b[1].o.ID, got)
	}
	if got := cli(c.leader().ClientAddr(), "INCRBY", "counter", "5"); got != "5" {
		t.Fatalf("INCRBY through the leader: %q", got)
	}
	c.settle(t)
	for id, addr := range c.addrs {
		if got := cli(addr, "GET", "greeting"); got != "hello from a backup" {
			t.Errorf("copy of replica %d holds %q", id, got)
		}
		if got := cli(addr, "GET", "counter"); got != "5" {
			t.Errorf("copy of replica %d counts %q", id, got)
		}
	}
	eventually(t, 5*time.Second, "digests compared", func() bool { return c.leader().Status().DigestsCompared >= 3 })
	c.noDivergence(t)
}

const apacheConf = `ServerRoot "{{dir}}"
PidFile {{dir}}/httpd.pid
ErrorLog {{dir}}/error.log
Listen {{addr}}
ServerName localhost
LoadModule mpm_worker_module /usr/lib/apache2/modules/mod_mpm_worker.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
StartServers 1
ServerLimit 2
ThreadsPerChild 16
MaxRequestWorkers 32
DocumentRoot {{dir}}/htdocs
DirectoryIndex index.html
TypesConfig /etc/mime.types
LogFormat "%h %l %u %t \"%r\" %>s %b" common
CustomLog {{dir}}/access.log common
`

const indexHTML = "<html><body><h1>lockstep</h1><p>the same page on every replica</p></body></html>\n"

var pageTime = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func TestApache(t *testing.T) {
	need(t, "/usr/sbin/apache2", "ab")
	mask := configs.Mask{Pattern: `^Date: [^\r\n]*`, Replace: "Date: *"}
	mask.Re = regexp.MustCompile(mask.Pattern)
	c := newExecCluster(t, func(o *Options) { o.Masks = []configs.Mask{mask} }, func(id uint64, dir, addr string) ExecOptions {
		conf := strings.NewReplacer("{{dir}}", dir, "{{addr}}", addr).Replace(apacheConf)
		if err := os.WriteFile(filepath.Join(dir, "apache2.conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		writePage(t, dir, indexHTML)
		return ExecOptions{Args: []string{"/usr/sbin/apache2", "-f", filepath.Join(dir, "apache2.conf"), "-DFOREGROUND"},
			StopSignal: syscall.SIGTERM}
	})

	b := c.backups()[0]
	out, err := exec.Command("ab", "-n", "300", "-c", "8", "http://"+b.ClientAddr()+"/index.html").CombinedOutput()
	if err != nil {
		t.Fatalf("ab: %v\n%s", err, out)
	}
	if !regexp.MustCompile(`Complete requests:\s+300\n`).Match(out) || !regexp.MustCompile(`Failed requests:\s+0\n`).Match(out) {
		t.Fatalf("ab through replica %d:\n%s", b.o.ID, out)
	}
	if m := regexp.MustCompile(`Requests per second:\s+(\S+)`).FindSubmatch(out); m != nil {
		t.Logf("ab -n 300 -c 8 through replica %d (a backup): %s requests/s", b.o.ID, m[1])
	}
	// Then distinct requests, one at a time, through every replica: their
	// order is the log's. Without the deterministic scheduler (joint_sched)
	// a multithreaded Apache may log two requests that overlap in time in
	// either order, and a backup behind the leader can receive request n+1
	// while it still serves n; so each request waits until every replica's
	// server has finished the previous one (its final output digest is in
	// the log from all three).
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	get := func(via *Replica, path string) string {
		t.Helper()
		resp, err := hc.Get("http://" + via.ClientAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	eventually(t, 10*time.Second, "ab's responses compared", func() bool { return c.leader().Status().DigestsCompared >= 300 })
	compared := c.leader().Status().DigestsCompared
	for i := 0; i < 20; i++ {
		if body := get(c.live()[i%3], fmt.Sprintf("/index.html?n=%d", i)); body != indexHTML {
			t.Fatalf("request %d: %q", i, body)
		}
		eventually(t, 10*time.Second, "every replica served the request", func() bool {
			return c.leader().Status().DigestsCompared > compared
		})
		compared++
	}
	c.settle(t)
	var ref []string
	for id, dir := range c.dirs {
		lines := accessLog(t, dir)
		if len(lines) != 320 {
			t.Fatalf("copy of replica %d logged %d requests, want 320", id, len(lines))
		}
		if ref == nil {
			ref = lines
		} else if strings.Join(lines, "\n") != strings.Join(ref, "\n") {
			t.Fatalf("access logs differ:\n%s\nvs\n%s", strings.Join(lines[300:], "\n"), strings.Join(ref[300:], "\n"))
		}
	}
	eventually(t, 10*time.Second, "every response compared", func() bool { return c.leader().Status().DigestsCompared >= 320 })
	c.noDivergence(t)

	// One copy serves another page: its replica is found diverging.
	odd := c.backups()[1].o.ID
	writePage(t, c.dirs[odd], strings.Replace(indexHTML, "same", "SAME", 1))
	for i := 0; i < 3; i++ {
		get(c.leader(), "/index.html?odd")
	}
	eventually(t, 10*time.Second, "the divergence is found", func() bool {
		for _, r := range c.live() {
			st := r.Status()
			if st.Divergences == 0 {
				return false
			}
			for _, d := range st.DivergenceList {
				if d.Replica != odd || len(d.Agree) != 2 {
					t.Fatalf("replica %d reports %+v; the odd one is %d", r.o.ID, d, odd)
				}
			}
		}
		return true
	})
	d := c.leader().Status().DivergenceList[0]
	t.Logf("divergence found: conn %x checkpoint %d at index %d: replica %d (agreeing: %v)", d.Conn, d.Seq, d.Index, d.Replica, d.Agree)
}

func writePage(t *testing.T, dir, body string) {
	t.Helper()
	page := filepath.Join(dir, "htdocs", "index.html")
	if err := os.MkdirAll(filepath.Dir(page), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(page, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	// The same mtime everywhere: it is in Last-Modified and the ETag.
	if err := os.Chtimes(page, pageTime, pageTime); err != nil {
		t.Fatal(err)
	}
}

var logTime = regexp.MustCompile(`\[[^\]]*\]`)

// accessLog reads a copy's access log, timestamps normalized.
func accessLog(t *testing.T, dir string) []string {
	raw, err := os.ReadFile(filepath.Join(dir, "access.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		out = append(out, logTime.ReplaceAllString(l, "[T]"))
	}
	return out
}
