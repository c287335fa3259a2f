package dmt

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// apacheConf is a private Apache: its own ServerRoot, pid file, logs and
// port, one child with 8 threads, nothing read from /etc/apache2.
const apacheConf = `ServerRoot "{{dir}}"
ServerName lockstep
Listen 127.0.0.1:{{port}}
Listen 127.0.0.1:{{port2}}
PidFile "{{dir}}/httpd.pid"
DefaultRuntimeDir "{{dir}}"
Mutex file:{{dir}} default
ErrorLog "{{dir}}/error.log"
LogLevel warn
User www-data
Group www-data
LoadModule mpm_{{mpm}}_module /usr/lib/apache2/modules/mod_mpm_{{mpm}}.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
ServerLimit 1
StartServers 1
ThreadLimit 8
ThreadsPerChild 8
MaxRequestWorkers 8
MinSpareThreads 1
MaxSpareThreads 16
MaxConnectionsPerChild 0
KeepAlive On
AcceptFilter http none
EnableSendfile Off
CustomLog "{{dir}}/access.log" common
DocumentRoot "{{dir}}/htdocs"
DirectoryIndex index.html
<Directory "{{dir}}/htdocs">
    Require all granted
</Directory>
`

// apacheUnderDMT serves a page from Apache with the given MPM under the
// runtime, loads it with ab -c 8 for each set of ab flags, and checks that
// no request failed and that the statistics show both processes at work.
func apacheUnderDMT(t *testing.T, mpm string, abFlags ...[]string) {
	for _, bin := range []string{"apache2", "ab"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (scripts/setup.sh installs it): %v", bin, err)
		}
	}
	if _, err := os.Stat("/usr/lib/apache2/modules/mod_mpm_" + mpm + ".so"); err != nil {
		t.Skipf("no %s MPM: %v", mpm, err)
	}
	lib, _ := build(t)
	dir := t.TempDir()
	// the child runs as www-data: it must reach the documents
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "htdocs"), 0o755); err != nil {
		t.Fatal(err)
	}
	page := strings.Repeat("lockstep dmt\n", 100)
	if err := os.WriteFile(filepath.Join(dir, "htdocs", "index.html"), []byte(page), 0o644); err != nil {
		t.Fatal(err)
	}
	port, port2 := freePort(t), freePort(t)
	conf := strings.NewReplacer("{{dir}}", dir, "{{port}}", fmt.Sprint(port), "{{port2}}", fmt.Sprint(port2),
		"{{mpm}}", mpm).Replace(apacheConf)
	if err := os.WriteFile(filepath.Join(dir, "apache2.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	shm := filepath.Join(dir, "dmt.shm")
	env, err := Env(Options{Library: lib, Shm: shm})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("apache2", "-f", filepath.Join(dir, "apache2.conf"), "-DFOREGROUND")
	cmd.Env = MergeEnv(os.Environ(), env)
	out, err := os.Create(filepath.Join(dir, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		t0 := time.Now()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		defer func() { t.Logf("%s: stopped in %v", mpm, time.Since(t0).Round(time.Millisecond)) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("apache2 (%s) did not stop within 15s of SIGTERM", mpm)
		}
	}
	defer stop()
	logs := func() string {
		var b strings.Builder
		for _, f := range []string{"stdout.log", "error.log"} {
			data, _ := os.ReadFile(filepath.Join(dir, f))
			fmt.Fprintf(&b, "--- %s:\n%s", f, data)
		}
		return b.String()
	}

	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	t0 := time.Now()
	waitHTTP(t, url, page, done, logs)
	t.Logf("%s: serving after %v", mpm, time.Since(t0).Round(time.Millisecond))
	for _, flags := range abFlags {
		args := append([]string{"-q", "-c", "8", "-n", "500", "-s", "30"}, flags...)
		res, err := exec.Command("ab", append(args, url)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ab %v: %v\n%s\n%s", flags, err, res, logs())
		}
		complete, failed := abField(res, "Complete requests"), abField(res, "Failed requests")
		if complete != "500" || failed != "0" || strings.Contains(string(res), "Non-2xx") {
			t.Fatalf("ab %v: complete %s, failed %s\n%s\n%s", flags, complete, failed, res, logs())
		}
		t.Logf("%s, ab -c 8 -n 500 %v: 0 failed, %s req/s", mpm, flags, abField(res, "Requests per second"))
	}
	// A second listening socket, loaded together with the first: the
	// listener thread polls both under the runtime.
	url2 := fmt.Sprintf("http://127.0.0.1:%d/", port2)
	type abResult struct {
		out []byte
		err error
	}
	both := make(chan abResult, 2)
	for _, u := range []string{url, url2} {
		go func(u string) {
			out, err := exec.Command("ab", "-q", "-c", "4", "-n", "200", "-s", "30", u).CombinedOutput()
			both <- abResult{out, err}
		}(u)
	}
	for i := 0; i < 2; i++ {
		r := <-both
		if r.err != nil || abField(r.out, "Complete requests") != "200" || abField(r.out, "Failed requests") != "0" {
			t.Fatalf("two listening sockets: %v\n%s\n%s", r.err, r.out, logs())
		}
	}

	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s stats: %d processes (%d live), turns=%d waits=%d wait=%v threads=%d ops=%v", mpm,
		len(st.Processes), st.LiveProcesses, st.Total.Turns, st.Total.Waits,
		time.Duration(st.Total.WaitNS), st.Total.Threads, st.Total.Ops)
	if st.LiveProcesses < 2 || st.Total.Forks == 0 {
		t.Errorf("want Apache's parent and child under the runtime, got %d live processes, %d forks",
			st.LiveProcesses, st.Total.Forks)
	}
	wait := "poll"
	if mpm == "event" {
		wait = "epoll_wait"
	}
	for _, op := range []string{"accept", "recv", "send", "mutex_lock", "cond_wait", wait} {
		if st.Total.Ops[op] == 0 {
			t.Errorf("no %s counted: %v", op, st.Total.Ops)
		}
	}
	stop()
	if bad := regexp.MustCompile(`(?i)segmentation|core dumped|exit signal|deadlock`).FindString(logs()); bad != "" {
		t.Errorf("server log mentions %q:\n%s", bad, logs())
	}
}

func TestApacheWorkerXtern(t *testing.T) {
	apacheUnderDMT(t, "worker", nil)
}

func TestApacheEventXtern(t *testing.T) {
	apacheUnderDMT(t, "event", nil, []string{"-k"})
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitHTTP waits until url serves body, failing if the server exits.
func waitHTTP(t *testing.T, url, body string, exited <-chan error, logs func() string) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			b := make([]byte, len(body)+1)
			n, _ := ioReadFull(resp, b)
			resp.Body.Close()
			if resp.StatusCode == 200 && string(b[:n]) == body {
				return
			}
			t.Fatalf("GET %s: %s, %q\n%s", url, resp.Status, b[:n], logs())
		}
		select {
		case werr := <-exited:
			t.Fatalf("server exited before serving: %v\n%s", werr, logs())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v\n%s", url, err, logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ioReadFull(resp *http.Response, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := resp.Body.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

var abRe = map[string]*regexp.Regexp{}

// abField returns the value of one "Name: value" line of ab's report.
func abField(out []byte, name string) string {
	re := abRe[name]
	if re == nil {
		re = regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `:\s+(\S+)`)
		abRe[name] = re
	}
	m := re.FindSubmatch(out)
	if m == nil {
		return ""
	}
	return string(m[1])
}
