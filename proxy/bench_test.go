package proxy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"lockstep/configs"
)

// TestApacheOverhead (LOCKSTEP_BENCH=1) compares ab against one copy of
// Apache directly and through the leader: median latency at concurrency 1
// and throughput at 8. LOCKSTEP_BENCH_SYNC=1 turns fsync on.
func TestApacheOverhead(t *testing.T) {
	if os.Getenv("LOCKSTEP_BENCH") == "" {
		t.Skip("set LOCKSTEP_BENCH=1")
	}
	need(t, "/usr/sbin/apache2", "ab")
	mask := configs.Mask{Pattern: `^Date: [^\r\n]*`, Replace: "Date: *"}
	mask.Re = regexp.MustCompile(mask.Pattern)
	c := newExecCluster(t, func(o *Options) {
		o.Masks = []configs.Mask{mask}
		o.Log.NoSync = os.Getenv("LOCKSTEP_BENCH_SYNC") == ""
	}, func(id uint64, dir, addr string) ExecOptions {
		conf := strings.NewReplacer("{{dir}}", dir, "{{addr}}", addr).Replace(apacheConf)
		if err := os.WriteFile(filepath.Join(dir, "apache2.conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		writePage(t, dir, indexHTML)
		return ExecOptions{Args: []string{"/usr/sbin/apache2", "-f", filepath.Join(dir, "apache2.conf"), "-DFOREGROUND"}, StopSignal: syscall.SIGTERM}
	})
	l := c.leader()
	direct := c.addrs[l.o.ID]
	ab := func(addr string, n, conc string) (rps, p50 string) {
		out, err := exec.Command("ab", "-n", n, "-c", conc, "http://"+addr+"/index.html").CombinedOutput()
		if err != nil {
			t.Fatalf("ab: %v\n%s", err, out)
		}
		if m := regexp.MustCompile(`Failed requests:\s+(\d+)`).FindSubmatch(out); m == nil || string(m[1]) != "0" {
			t.Fatalf("ab:\n%s", out)
		}
		rps = string(regexp.MustCompile(`Requests per second:\s+(\S+)`).FindSubmatch(out)[1])
		p50 = string(regexp.MustCompile(`\n\s+50%\s+(\S+)`).FindSubmatch(out)[1])
		return
	}
	for _, conc := range []string{"1", "8"} {
		n := "2000"
		if conc == "8" {
			n = "5000"
		}
		ab(direct, "200", conc)
		ab(l.ClientAddr(), "200", conc)
		r1, m1 := ab(direct, n, conc)
		r2, m2 := ab(l.ClientAddr(), n, conc)
		t.Logf("c=%s direct: %s req/s, median %s ms; via the leader: %s req/s, median %s ms", conc, r1, m1, r2, m2)
	}
	c.settle(t)
	c.noDivergence(t)
}
