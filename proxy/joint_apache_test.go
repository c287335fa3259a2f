package proxy

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"lockstep/dmt"
)

// jointApacheConf: one child process (the one that consumes the input
// channel), its own files, nothing from /etc/apache2.
const jointApacheConf = `ServerRoot "{{dir}}"
ServerName lockstep
Listen {{addr}}
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
DocumentRoot "{{dir}}/htdocs"
DirectoryIndex index.html
<Directory "{{dir}}/htdocs">
    Require all granted
</Directory>
`

// Apache under joint_sched on 3 replicas: ab -c 8 through a backup with
// no failed request, and every replica's output digests agree with no
// mask at all (the Date header comes from the log's time).
func jointApache(t *testing.T, mpm string) {
	need(t, "/usr/sbin/apache2", "ab")
	if _, err := os.Stat("/usr/lib/apache2/modules/mod_mpm_" + mpm + ".so"); err != nil {
		t.Skipf("no %s MPM: %v", mpm, err)
	}
	lib, _ := buildRacy(t)
	dirOf := replicaDirs(t)
	server := func(id uint64) StartServerFunc {
		return func(ctx context.Context) (Server, error) {
			dir, addr := dirOf(id), freePort(t)
			for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
				_ = os.Chmod(d, 0o755)
			}
			conf := strings.NewReplacer("{{dir}}", dir, "{{addr}}", addr, "{{mpm}}", mpm).Replace(jointApacheConf)
			if err := os.WriteFile(filepath.Join(dir, "apache2.conf"), []byte(conf), 0o644); err != nil {
				return nil, err
			}
			writePage(t, dir, strings.Repeat("lockstep joint_sched\n", 100))
			shm := filepath.Join(dir, "dmt.shm")
			if err := dmt.CreateChan(shm); err != nil {
				return nil, err
			}
			env, err := dmt.Env(dmt.Options{Library: lib, Shm: shm, Joint: true})
			if err != nil {
				return nil, err
			}
			return StartExec(ctx, ExecOptions{Args: []string{"/usr/sbin/apache2", "-f", filepath.Join(dir, "apache2.conf"), "-DFOREGROUND"},
				Dir: dir, Addr: addr, Env: env, StopSignal: syscall.SIGTERM, HealthListen: true})
		}
	}
	opts := func(o *Options) {
		o.NewFeeder = jointFeeder(t, dirOf(o.ID), nil)
	}
	c := newTestCluster(t, 3, server, opts)
	b := c.backups()[0]
	n := envInt("LOCKSTEP_AB_REQS", 2000)
	start := time.Now()
	out, err := exec.Command("ab", "-n", fmt.Sprint(n), "-c", "8", "-s", "30", "http://"+b.ClientAddr()+"/index.html").CombinedOutput()
	if err != nil {
		t.Fatalf("ab: %v\n%s", err, out)
	}
	if !regexp.MustCompile(fmt.Sprintf(`Complete requests:\s+%d\n`, n)).Match(out) || !regexp.MustCompile(`Failed requests:\s+0\n`).Match(out) {
		t.Fatalf("ab through replica %d:\n%s", b.o.ID, out)
	}
	rps := ""
	if m := regexp.MustCompile(`Requests per second:\s+(\S+)`).FindSubmatch(out); m != nil {
		rps = string(m[1])
	}
	c.settle(t)
	deadline := time.Now().Add(20 * time.Second)
	for c.leader().Status().DigestsCompared < uint64(n)/2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if st := c.leader().Status(); st.DigestsCompared < uint64(n)/2 {
		for _, r := range c.live() {
			t.Logf("replica %d: %+v", r.o.ID, r.Status())
		}
		t.Fatalf("only %d digest checkpoints compared", st.DigestsCompared)
	}
	c.noDivergence(t)
	st := c.leader().Status()
	t.Logf("%s: ab -n %d -c 8 through a backup: %s requests/s, 0 failed; %d digest checkpoints compared, 0 divergences (no mask); %d bubbles in %v",
		mpm, n, rps, st.DigestsCompared, BubblesProposed(), time.Since(start).Round(time.Millisecond))
}

func TestApacheJointSchedWorker(t *testing.T) { jointApache(t, "worker") }
func TestApacheJointSchedEvent(t *testing.T)  { jointApache(t, "event") }
