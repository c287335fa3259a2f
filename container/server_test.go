package container

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"lockstep/configs"
)

const luaBody = "loop=15000000 sum=112500007500000\n"

func loadConfig(t *testing.T, name string) *configs.Config {
	t.Helper()
	cfg, err := configs.Load(filepath.Join("..", "configs", name+".toml"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func startApache(t *testing.T, cfg *configs.Config, o ServerOptions) *Server {
	t.Helper()
	o.Config = cfg.Server
	o.AppDir = cfg.AppDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := StartServer(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

func TestApache(t *testing.T) {
	requireRoot(t)
	cfg := loadConfig(t, "apache")
	index, err := os.ReadFile(filepath.Join(cfg.AppDir(), "htdocs", "index.html"))
	if err != nil {
		t.Fatal(err)
	}
	dir := worldDir(t, "ls-apache-")
	s := startApache(t, cfg, ServerOptions{Dir: dir, Host: "127.0.0.1", Port: freePort(t)})
	base := "http://" + s.Addr()

	if code, body := httpGet(t, nil, base+"/index.html"); code != 200 || body != string(index) {
		t.Fatalf("GET /index.html: %d, %d bytes", code, len(body))
	}
	if code, body := httpGet(t, nil, base+"/cpu.lua"); code != 200 || body != luaBody {
		t.Fatalf("GET /cpu.lua: %d %q", code, body)
	}
	if code, _ := httpGet(t, nil, base+"/apache2.conf"); code != 404 && code != 403 {
		t.Errorf("GET /apache2.conf: %d, want 403/404", code)
	}

	// A second copy beside it, with the event MPM.
	dir2 := worldDir(t, "ls-apache-")
	s2 := startApache(t, cfg, ServerOptions{Dir: dir2, Host: "127.0.0.1", Port: freePort(t), Env: []string{"APACHE_MPM=event", "APACHE_KEEPALIVE=On"}})
	if code, body := httpGet(t, nil, "http://"+s2.Addr()+"/cpu.lua?n=1000"); code != 200 || body != "loop=1000 sum=500500\n" {
		t.Fatalf("second copy GET /cpu.lua?n=1000: %d %q", code, body)
	}
	conf2, _ := os.ReadFile(filepath.Join(dir2, "apache2.conf"))
	if !strings.Contains(string(conf2), "mod_mpm_event.so") || !strings.Contains(string(conf2), "\nKeepAlive On\n") {
		t.Error("APACHE_MPM=event APACHE_KEEPALIVE=On did not select the event MPM with keep-alive")
	}

	out, err := exec.Command("ab", "-q", "-n", "200", "-c", "8", base+"/index.html").CombinedOutput()
	if err != nil {
		t.Fatalf("ab: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Complete requests:      200") || !strings.Contains(string(out), "Failed requests:        0") {
		t.Fatalf("ab:\n%s", out)
	}
	if n := countLines(t, filepath.Join(dir, "access.log")); n < 202 {
		t.Errorf("access.log has %d lines, want 202 or more", n)
	}

	conf := filepath.Join(dir, "apache2.conf")
	if len(pidsWithCmdline(conf)) < 2 {
		t.Errorf("want a parent and a child apache2 for %s, have %v", conf, pidsWithCmdline(conf))
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Exited():
	default:
		t.Error("Exited not closed after Stop")
	}
	if left := pidsWithCmdline(conf); len(left) > 0 {
		t.Errorf("apache2 processes left after Stop: %v", left)
	}
	// The other copy is untouched.
	if code, _ := httpGet(t, nil, "http://"+s2.Addr()+"/index.html"); code != 200 {
		t.Errorf("second copy after the first stopped: %d", code)
	}
}

func countLines(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n++
	}
	return n
}

func TestApacheBadConfig(t *testing.T) {
	requireRoot(t)
	cfg := loadConfig(t, "apache")
	cfg.Server.Health.TimeoutMS = 5000
	_, err := StartServer(context.Background(), ServerOptions{
		Config: cfg.Server, AppDir: cfg.AppDir(), Dir: worldDir(t, "ls-apache-"),
		Port: freePort(t), Env: []string{"APACHE_MPM=bogus"},
	})
	if err == nil {
		t.Fatal("apache with a missing MPM module started")
	}
	if !strings.Contains(err.Error(), "mod_mpm_bogus.so") || !strings.Contains(err.Error(), "tail of") {
		t.Errorf("error lacks the log tail: %v", err)
	}
}

func TestApacheInCluster(t *testing.T) {
	requireRoot(t)
	cfg := loadConfig(t, "apache")
	c, err := NewCluster(ClusterOptions{Name: "ct-apache", Hosts: []string{"r1", "client"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	o := ServerOptions{Dir: worldDir(t, "ls-apache-"), Name: "r1", Host: c.Addr("r1")}
	if err := c.Place("r1", &o); err != nil {
		t.Fatal(err)
	}
	s := startApache(t, cfg, o)
	if s.Addr() != c.Addr("r1")+":8080" {
		t.Errorf("Addr %s", s.Addr())
	}
	if !sameNetns(s.Pid(), c.NetnsPath("r1")) || !inCgroup(t, c.CgroupDir("r1"), s.Pid()) {
		t.Error("apache is not in r1's namespace and cgroup")
	}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		return c.DialContext(ctx, "client", network, addr)
	}
	if code, body := httpGet(t, dial, "http://"+s.Addr()+"/cpu.lua"); code != 200 || body != luaBody {
		t.Fatalf("client -> r1 GET /cpu.lua: %d %q", code, body)
	}
	out, err := c.Exec("client", "ab", "-q", "-n", "200", "-c", "8", "http://"+s.Addr()+"/index.html").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Failed requests:        0") {
		t.Fatalf("ab in the client namespace: %v\n%s", err, out)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if left := pidsWithCmdline(filepath.Join(o.Dir, "apache2.conf")); len(left) > 0 {
		t.Errorf("apache2 processes left after Stop: %v", left)
	}
}

// TestRedis needs no root: it runs on loopback.
func TestRedis(t *testing.T) {
	cfg := loadConfig(t, "redis")
	dir := worldDir(t, "ls-redis-")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := StartServer(ctx, ServerOptions{Config: cfg.Server, AppDir: cfg.AppDir(), Dir: dir, Port: freePort(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	conn, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	resp := func(args ...string) string {
		t.Helper()
		fmt.Fprintf(conn, "*%d\r\n", len(args))
		for _, a := range args {
			fmt.Fprintf(conn, "$%d\r\n%s\r\n", len(a), a)
		}
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "$") && line != "$-1\r\n" {
			var n int
			fmt.Sscanf(line, "$%d", &n)
			buf := make([]byte, n+2)
			if _, err := io.ReadFull(r, buf); err != nil {
				t.Fatal(err)
			}
			line += string(buf)
		}
		return line
	}
	if got := resp("SET", "greeting", "hello lockstep"); got != "+OK\r\n" {
		t.Fatalf("SET: %q", got)
	}
	if got := resp("GET", "greeting"); got != "$14\r\nhello lockstep\r\n" {
		t.Fatalf("GET: %q", got)
	}
	if got := resp("CONFIG", "GET", "appendonly"); !strings.HasPrefix(got, "*2") {
		t.Logf("CONFIG GET: %q", got) // an array; only its header is read
	}
	conn.Close()
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"dump.rdb", "appendonly.aof", "appendonlydir"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("redis left %s behind: persistence is not off", f)
		}
	}
}

// TestStopEscalates: a server that ignores its stop signal is killed after
// the grace period (no root needed: it runs on loopback).
func TestStopEscalates(t *testing.T) {
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	s, err := StartServer(context.Background(), ServerOptions{
		Config: configs.Server{Start: []string{testBinary(t)}, Listen: addr, Health: configs.Health{TimeoutMS: 5000}},
		Dir:    t.TempDir(),
		Env:    []string{helperEnv + "=listen", "LSTEST_ADDR=" + addr, "LSTEST_IGNORE_TERM=1"},

		StopTimeout: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	pid := s.Pid()
	start := time.Now()
	if err := s.Stop(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Stop: %v, want a 'killed' error", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Stop took %v", d)
	}
	if alive(pid) {
		t.Error("server survived Stop")
	}
	if err := s.Stop(); err == nil {
		t.Error("second Stop forgot the first one's result")
	}
}

// TestServerFailsHealth: a server that dies at once is reported with its
// output, an unexpected exit is visible on Exited.
func TestServerFailsHealth(t *testing.T) {
	_, err := StartServer(context.Background(), ServerOptions{
		Config: configs.Server{Start: []string{"sh", "-c", "echo starting {{.Name}}; echo boom >&2; exit 3"}, Listen: "127.0.0.1:1"},
		Dir:    t.TempDir(), Name: "bad",
	})
	if err == nil || !strings.Contains(err.Error(), "starting bad\nboom") || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("got %v", err)
	}

	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	s, err := StartServer(context.Background(), ServerOptions{
		Config: configs.Server{Start: []string{testBinary(t)}, Listen: addr, StopSignal: "INT"},
		Dir:    t.TempDir(),
		Env:    []string{helperEnv + "=listen", "LSTEST_ADDR=" + addr},
	})
	if err != nil {
		t.Fatal(err)
	}
	syscall.Kill(s.Pid(), syscall.SIGKILL)
	select {
	case <-s.Exited():
	case <-time.After(5 * time.Second):
		t.Fatal("Exited not closed after the server died")
	}
	if err := s.Wait(); err == nil {
		t.Error("Wait reports no error for a killed server")
	}
	if err := s.Stop(); err == nil || !strings.Contains(err.Error(), "already exited") {
		t.Errorf("Stop after a crash: %v", err)
	}
}

func TestRender(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	os.MkdirAll(filepath.Join(src, "sub"), 0o755)
	os.WriteFile(filepath.Join(src, "a.conf"), []byte(`listen {{.Listen}} dir {{.Dir}} name {{.Name}} mpm {{env "LSTEST_MPM" "worker"}} x {{env "LSTEST_X" "dx"}}`), 0o640)
	bin := []byte{0xff, 0x00, '{', '{', 0x01}
	os.WriteFile(filepath.Join(src, "sub", "blob"), bin, 0o755)
	old := time.Date(2015, 10, 4, 12, 0, 0, 0, time.UTC)
	os.Chtimes(filepath.Join(src, "a.conf"), old, old)

	o := ServerOptions{Config: configs.Server{Env: map[string]string{"LSTEST_MPM": "event", "LSTEST_X": "cfg"}}, Env: []string{"LSTEST_X=opt"}}
	_, lookup := serverEnv(o)
	data := newTemplateData(dst, "r1", "", 8080)
	if err := renderDir(src, dst, data, templateFuncs(lookup)); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dst, "a.conf"))
	if want := "listen 8080 dir " + dst + " name r1 mpm event x opt"; string(got) != want {
		t.Errorf("rendered %q, want %q", got, want)
	}
	fi, _ := os.Stat(filepath.Join(dst, "a.conf"))
	if fi.Mode().Perm() != 0o640 || !fi.ModTime().Equal(old) {
		t.Errorf("mode %v mtime %v", fi.Mode(), fi.ModTime())
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "sub", "blob")); string(b) != string(bin) {
		t.Errorf("binary file changed: %q", b)
	}
	if data.Addr != "127.0.0.1:8080" {
		t.Errorf("Addr %s", data.Addr)
	}
	if d := newTemplateData(dst, "r1", "::1", 80); d.Listen != "[::1]:80" {
		t.Errorf("Listen %s", d.Listen)
	}

	os.WriteFile(filepath.Join(src, "bad"), []byte("{{.Nope}}"), 0o644)
	if err := renderDir(src, dst, data, templateFuncs(lookup)); err == nil {
		t.Error("unknown template field rendered")
	}
}

func TestServerOptionErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for name, o := range map[string]ServerOptions{
		"no start":     {Dir: dir, Config: configs.Server{Listen: "127.0.0.1:1"}},
		"no dir":       {Config: configs.Server{Start: []string{"true"}, Listen: "127.0.0.1:1"}},
		"bad listen":   {Dir: dir, Config: configs.Server{Start: []string{"true"}, Listen: "nope"}},
		"no port":      {Dir: dir, Config: configs.Server{Start: []string{"true"}}},
		"bad signal":   {Dir: dir, Config: configs.Server{Start: []string{"true"}, Listen: "127.0.0.1:1", StopSignal: "SIGNOPE"}},
		"bad app dir":  {Dir: dir, AppDir: filepath.Join(dir, "missing"), Config: configs.Server{Start: []string{"true"}, Listen: "127.0.0.1:1"}},
		"bad command":  {Dir: dir, Config: configs.Server{Start: []string{"/nonexistent/server"}, Listen: "127.0.0.1:1"}},
		"bad template": {Dir: dir, Config: configs.Server{Start: []string{"{{.Nope"}, Listen: "127.0.0.1:1"}},
	} {
		if s, err := StartServer(ctx, o); err == nil {
			s.Stop()
			t.Errorf("%s: started", name)
		}
	}
	for in, want := range map[string]syscall.Signal{"": syscall.SIGTERM, "TERM": syscall.SIGTERM, "sigint": syscall.SIGINT, "WINCH": syscall.SIGWINCH, "9": syscall.SIGKILL} {
		if got, err := parseSignal(in); err != nil || got != want {
			t.Errorf("parseSignal(%q) = %v, %v", in, got, err)
		}
	}
}
