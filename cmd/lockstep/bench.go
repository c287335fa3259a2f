package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"lockstep/eval/logbench"
	"lockstep/paxos"
)

func newBenchCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Benchmarks of lockstep's parts",
	}
	cmd.AddCommand(newBenchLogCmd(), newLogNodeCmd())
	return cmd
}

func newBenchLogCmd() *cobra.Command {
	var (
		o        logbench.Options
		clients  string
		etcd     string
		noEtcd   bool
		duration time.Duration
	)
	cmd := &cobra.Command{
		Use:   "log",
		Short: "Benchmark the replicated log against etcd with the same load",
		Long: `Starts a cluster of lockstep log nodes (one process each, fsync on) on this
machine and measures proposals of --payload bytes from each client count, one
request at a time per client over its own TCP connection; then does the same
against an etcd cluster of the same size (Debian's etcd-server) with Puts of the
same size, and prints ops/s, p50 and p99 commit latency and the ratios.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, s := range strings.Split(clients, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil || n < 1 {
					return fmt.Errorf("--clients: %q is not a positive number", s)
				}
				o.Clients = append(o.Clients, n)
			}
			if o.Replicas < 1 {
				return fmt.Errorf("--replicas must be at least 1")
			}
			bin, err := os.Executable()
			if err != nil {
				return err
			}
			o.Bin = bin
			o.Duration = duration
			o.Out = cmd.OutOrStdout()
			if !noEtcd {
				if o.Etcd, err = exec.LookPath(etcd); err != nil {
					return fmt.Errorf("etcd server %q not found (install etcd-server, or pass --no-etcd): %w", etcd, err)
				}
			}
			if o.Dir == "" {
				d, err := os.MkdirTemp("", "lockstep-bench-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(d)
				o.Dir = d
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			_, err = logbench.Run(ctx, o)
			return err
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Replicas, "replicas", 3, "cluster size")
	f.IntVar(&o.Payload, "payload", 256, "bytes per entry")
	f.StringVar(&clients, "clients", "1,64", "comma-separated concurrent client counts")
	f.DurationVar(&duration, "duration", 10*time.Second, "load duration per client count")
	f.BoolVar(&o.NoSync, "no-sync", false, "turn fsync off in both systems (never for published numbers)")
	f.StringVar(&etcd, "etcd", "etcd", "etcd server binary")
	f.BoolVar(&noEtcd, "no-etcd", false, "skip the etcd comparison")
	f.StringVar(&o.Dir, "dir", "", "working directory (default: a temporary one, removed afterwards)")
	return cmd
}

// newLogNodeCmd is one log node process of `bench log` and of the crash
// tests; it is not meant to be run by hand.
func newLogNodeCmd() *cobra.Command {
	var (
		o     logbench.NodeOptions
		id    uint64
		peers string
		dir   string
		join  bool
		sync  bool
	)
	cmd := &cobra.Command{
		Use:    "log-node",
		Short:  "Run one node of the replicated log that serves benchmark clients",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			pm, err := parsePeers(peers)
			if err != nil {
				return err
			}
			o.Paxos = paxos.Config{ID: id, ClusterID: 1, Peers: pm, DataDir: dir, Join: join, NoSync: sync,
				Logger: logrus.StandardLogger()}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			slowSysmonInBackground(logrus.StandardLogger())
			return logbench.RunNode(ctx, o)
		},
	}
	f := cmd.Flags()
	f.Uint64Var(&id, "id", 0, "raft id of this node")
	f.StringVar(&peers, "peers", "", "initial members: id=host:port,...")
	f.StringVar(&dir, "data-dir", "", "WAL and snapshot directory")
	f.BoolVar(&join, "join", false, "join an existing cluster")
	f.BoolVar(&sync, "no-sync", false, "skip fsync (benchmarks that say so only)")
	f.StringVar(&o.Client, "client", "127.0.0.1:0", "client address")
	f.StringVar(&o.Admin, "admin", "", "metrics and status address")
	f.BoolVar(&o.Record, "record", false, "keep every applied entry for comparison")
	f.Uint64Var(&o.SnapshotEvery, "snapshot-every", 0, "compact the log every N entries (0: never)")
	_ = cmd.MarkFlagRequired("id")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}

// parsePeers reads "1=host:port,2=host:port".
func parsePeers(s string) (map[uint64]string, error) {
	m := map[uint64]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		id, err := strconv.ParseUint(k, 10, 64)
		if !ok || err != nil || id == 0 || v == "" {
			return nil, fmt.Errorf("--peers: %q is not id=host:port", kv)
		}
		m[id] = v
	}
	return m, nil
}
