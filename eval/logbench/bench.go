package logbench

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Result of one load run.
type Result struct {
	System   string
	Clients  int
	Ops      int
	Errors   int
	Duration time.Duration
	P50, P99 time.Duration
}

// OpsPerSec is the throughput of successful operations.
func (r Result) OpsPerSec() float64 { return float64(r.Ops) / r.Duration.Seconds() }

// opFunc performs one operation for one client.
type opFunc func(seq int) error

// runLoad runs clients goroutines, each doing ops one at a time for d.
func runLoad(system string, clients int, d time.Duration, newOp func(client int) (opFunc, func(), error)) (Result, error) {
	ops := make([]opFunc, clients)
	for i := range ops {
		op, closeFn, err := newOp(i)
		if err != nil {
			return Result{}, fmt.Errorf("%s client %d: %w", system, i, err)
		}
		defer closeFn()
		ops[i] = op
	}
	var (
		mu   sync.Mutex
		lats []time.Duration
		errs int
		wg   sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	for i := range ops {
		wg.Add(1)
		go func(op opFunc) {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			for seq := 0; time.Now().Before(end); seq++ {
				t := time.Now()
				if err := op(seq); err != nil {
					bad++
					continue
				}
				mine = append(mine, time.Since(t))
			}
			mu.Lock()
			lats = append(lats, mine...)
			errs += bad
			mu.Unlock()
		}(ops[i])
	}
	wg.Wait()
	r := Result{System: system, Clients: clients, Ops: len(lats), Errors: errs, Duration: time.Since(start)}
	if len(lats) > 0 {
		sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
		r.P50 = lats[len(lats)/2]
		r.P99 = lats[len(lats)*99/100]
	}
	return r, nil
}

// etcdConns is how many gRPC connections etcd's clients share.
const etcdConns = 8

// Options of `lockstep bench log`.
type Options struct {
	Bin      string // the lockstep binary, for the node processes
	Dir      string
	Replicas int
	Payload  int
	Clients  []int
	Duration time.Duration
	NoSync   bool
	// Etcd is the etcd server binary; empty skips the comparison.
	Etcd string
	Out  io.Writer
}

// Run benchmarks lockstep's log, then etcd with the same load, and prints
// a table with the ratios.
func Run(ctx context.Context, o Options) ([]Result, error) {
	payload := make([]byte, o.Payload)
	for i := range payload {
		payload[i] = byte('a' + i%26)
	}
	var results []Result

	c, err := StartCluster(o.Bin, filepath.Join(o.Dir, "lockstep"), o.Replicas, o.NoSync, 100000)
	if err != nil {
		return nil, err
	}
	li, err := c.Leader(15 * time.Second)
	if err != nil {
		c.Close()
		return nil, err
	}
	for _, n := range o.Clients {
		r, err := runLoad("lockstep", n, o.Duration, func(int) (opFunc, func(), error) {
			cl, err := Dial(c.Nodes[li].Client, time.Second)
			if err != nil {
				return nil, nil, err
			}
			return func(int) error { _, err := cl.Propose(payload, 10*time.Second); return err },
				func() { cl.Close() }, nil
		})
		if err != nil {
			c.Close()
			return nil, err
		}
		results = append(results, r)
		fmt.Fprintln(o.Out, formatResult(r))
	}
	c.Close()

	if o.Etcd != "" {
		ec, err := startEtcd(ctx, o.Etcd, filepath.Join(o.Dir, "etcd"), o.Replicas, o.NoSync)
		if err != nil {
			return results, err
		}
		defer ec.close()
		leader, err := ec.leader(ctx)
		if err != nil {
			return results, err
		}
		// etcd's clients share a pool of gRPC connections, as its own
		// benchmark tool runs them (--conns < --clients): its best case.
		pool := make([]*clientv3.Client, etcdConns)
		for i := range pool {
			if pool[i], err = clientv3.New(clientv3.Config{Endpoints: []string{leader},
				DialTimeout: 5 * time.Second, Logger: zap.NewNop()}); err != nil {
				return results, err
			}
			defer pool[i].Close()
		}
		for _, n := range o.Clients {
			r, err := runLoad("etcd", n, o.Duration, func(i int) (opFunc, func(), error) {
				cli := pool[i%len(pool)]
				val := string(payload)
				return func(seq int) error {
					cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
					defer cancel()
					_, err := cli.Put(cctx, fmt.Sprintf("bench/%d/%d", i, seq%1024), val)
					return err
				}, func() {}, nil
			})
			if err != nil {
				return results, err
			}
			results = append(results, r)
			fmt.Fprintln(o.Out, formatResult(r))
		}
	}
	fmt.Fprintln(o.Out)
	fmt.Fprint(o.Out, Table(results))
	return results, nil
}

func formatResult(r Result) string {
	return fmt.Sprintf("%-8s clients=%-3d ops/s=%-9.0f p50=%-9s p99=%-9s errors=%d",
		r.System, r.Clients, r.OpsPerSec(), r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
}

// Table renders results as markdown, with lockstep/etcd ratios per client
// count when both were measured.
func Table(rs []Result) string {
	var b strings.Builder
	b.WriteString("| system | clients | ops/s | p50 | p99 | errors |\n|---|---|---|---|---|---|\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s | %d | %.0f | %s | %s | %d |\n", r.System, r.Clients, r.OpsPerSec(),
			r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
	}
	byKey := map[string]Result{}
	for _, r := range rs {
		byKey[fmt.Sprintf("%s/%d", r.System, r.Clients)] = r
	}
	first := true
	for _, r := range rs {
		if r.System != "lockstep" {
			continue
		}
		e, ok := byKey[fmt.Sprintf("etcd/%d", r.Clients)]
		if !ok || e.Ops == 0 {
			continue
		}
		if first {
			b.WriteString("\n| clients | throughput lockstep/etcd | p50 lockstep/etcd | p99 lockstep/etcd |\n|---|---|---|---|\n")
			first = false
		}
		fmt.Fprintf(&b, "| %d | %.2fx | %.2f | %.2f |\n", r.Clients, r.OpsPerSec()/e.OpsPerSec(),
			float64(r.P50)/float64(e.P50), float64(r.P99)/float64(e.P99))
	}
	return b.String()
}

// etcdCluster is N etcd members on loopback.
type etcdCluster struct {
	cmds    []*exec.Cmd
	clients []string
}

func startEtcd(ctx context.Context, bin, dir string, n int, noSync bool) (*etcdCluster, error) {
	ec := &etcdCluster{}
	var peers, initial []string
	for i := 0; i < n; i++ {
		p, err := freeAddr()
		if err != nil {
			return nil, err
		}
		cl, err := freeAddr()
		if err != nil {
			return nil, err
		}
		peers = append(peers, "http://"+p)
		ec.clients = append(ec.clients, "http://"+cl)
		initial = append(initial, fmt.Sprintf("e%d=http://%s", i, p))
	}
	for i := 0; i < n; i++ {
		d := filepath.Join(dir, fmt.Sprintf("e%d", i))
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
		args := []string{"--name", fmt.Sprintf("e%d", i), "--data-dir", d,
			"--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
			"--listen-client-urls", ec.clients[i], "--advertise-client-urls", ec.clients[i],
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "lockstep-bench", "--log-level", "error"}
		if noSync {
			args = append(args, "--unsafe-no-fsync")
		}
		cmd := exec.CommandContext(ctx, bin, args...)
		logf, err := os.Create(d + ".log")
		if err != nil {
			return nil, err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			ec.close()
			return nil, fmt.Errorf("logbench: starting etcd: %w", err)
		}
		ec.cmds = append(ec.cmds, cmd)
	}
	return ec, nil
}

// leader returns the client URL of the etcd leader.
func (ec *etcdCluster) leader(ctx context.Context) (string, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: ec.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return "", err
	}
	defer cli.Close()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, ep := range ec.clients {
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			st, err := cli.Status(sctx, ep)
			cancel()
			if err == nil && st.Leader != 0 && st.Leader == st.Header.MemberId {
				return ep, nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "", fmt.Errorf("logbench: etcd elected no leader in time")
}

func (ec *etcdCluster) close() {
	for _, c := range ec.cmds {
		if c.Process != nil {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}
}
