package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"lockstep/configs"
	"lockstep/container"
	"lockstep/proxy"
)

func newReplicaCmd() *cobra.Command {
	var (
		cfgPath string
		id      uint64
		dataDir string
		listen  string
		dmt     bool
		join    bool
	)
	cmd := &cobra.Command{
		Use:   "replica",
		Short: "Run one replica of a deployment: its log, its server copy and its client listener",
		Long: `Runs replica --id of the config's [[cluster.replica]] list: its share of the
replicated log (peers from the list), its own copy of the server (apps/<app>
rendered into <data-dir>/server and started with server.start), a client
listener (clients of a backup are relayed to the leader) and an admin
endpoint with /metrics and /status.

The data directory (default <cluster.data_dir>/<id>) holds the log in log/
and the server's files in server/. Until checkpoints exist, a replica that
restarts kills any server its previous run left behind, starts its server
from clean data and replays the whole log into it; the log is never
compacted. SIGINT or SIGTERM stop the replica: clients connected to it are
reset, the log is closed cleanly and the server stopped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cfgPath == "" {
				return errors.New("--config is required")
			}
			if id == 0 {
				return errors.New("--id is required")
			}
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			if _, err := cfg.ReplicaByID(id); err != nil {
				return err
			}
			if listen != "" {
				if _, _, err := net.SplitHostPort(listen); err != nil {
					return fmt.Errorf("--server-listen: %w", err)
				}
				cfg.Server.Listen = listen
			}
			if dataDir == "" {
				dataDir = filepath.Join(cfg.Cluster.DataDir, strconv.FormatUint(id, 10))
			}
			return runReplica(cfg, id, dataDir, join, dmt)
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "", "the application's config (configs/<app>.toml)")
	cmd.Flags().Uint64Var(&id, "id", 0, "this replica's id in [[cluster.replica]]")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "the replica's data directory (default <cluster.data_dir>/<id>)")
	cmd.Flags().BoolVar(&dmt, "dmt", false, "run the server under the deterministic scheduler fed by the log (joint_sched)")
	cmd.Flags().BoolVar(&join, "join", false, "join a running cluster: start empty and wait to be added (lockstep join), then catch up from a checkpoint")
	cmd.Flags().StringVar(&listen, "server-listen", "", "where this replica's server listens, instead of server.listen (several replicas on one host)")
	return cmd
}

func runReplica(cfg *configs.Config, id uint64, dataDir string, join, useDMT bool) error {
	slowSysmonInBackground(logrus.StandardLogger())
	if cfg.Checkpoint.Enabled || cfg.Checkpoint.UseContainer() {
		return runContainerReplica(cfg, id, dataDir, join, useDMT)
	}
	if join {
		return errors.New("--join needs checkpoints ([checkpoint] enabled = true)")
	}
	log := logrus.WithFields(logrus.Fields{"app": cfg.Name})
	dataDir, err := filepath.Abs(dataDir)
	if err != nil {
		return err
	}
	// World-searchable: a server that drops privileges (Apache's children
	// run as www-data) must reach its files.
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return err
	}
	pidFile := filepath.Join(dataDir, "server.pid")
	if err := proxy.KillLeftover(pidFile); err != nil {
		return fmt.Errorf("killing the server a previous run left: %w", err)
	}
	serverDir := filepath.Join(dataDir, "server")
	// Clean data: the server's state is rebuilt by replaying the log.
	if err := os.RemoveAll(serverDir); err != nil {
		return err
	}

	opts := proxy.FromConfig(cfg, id)
	opts.DataDir = filepath.Join(dataDir, "log")
	opts.Logger = log
	var dmtEnv []string
	if useDMT {
		if dmtEnv, err = jointSched(cfg, &opts, dataDir); err != nil {
			return err
		}
	}
	opts.StartServer = func(ctx context.Context) (proxy.Server, error) {
		s, err := container.StartServer(ctx, container.ServerOptions{
			Config: cfg.Server, AppDir: cfg.AppDir(), Dir: serverDir, Env: dmtEnv, HealthListen: useDMT,
			Name: fmt.Sprintf("%s-%d", cfg.Name, id), Logger: log,
		})
		if err != nil {
			return nil, err
		}
		recordPid(pidFile, s.Pid())
		return &pidServer{Server: s, pidFile: pidFile}, nil
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	r, err := proxy.Start(ctx, opts)
	if err != nil {
		return err
	}
	_, err = serveReplica(ctx, r, id, log)
	return err
}

// serveReplica announces a started replica and runs it until ctx ends (it
// is stopped: interrupted true) or it stops by itself (its error).
func serveReplica(ctx context.Context, r *proxy.Replica, id uint64, log logrus.FieldLogger) (interrupted bool, err error) {
	log.Infof("replica %d: clients at %s, admin at http://%s/status", id, r.ClientAddr(), r.AdminAddr())
	select {
	case <-ctx.Done():
		log.Info("stopping")
		r.Stop()
		return true, nil
	case <-r.Done():
		return false, r.Err()
	}
}

// recordPid writes the server's pid and program (as KillLeftover reads
// them), so that a restarted replica can kill a server left behind.
func recordPid(pidFile string, pid int) {
	prog := ""
	if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		prog, _, _ = strings.Cut(string(raw), "\x00")
	}
	_ = os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n%s\n", pid, prog)), 0o644)
}

// pidServer removes the pid file once the server is stopped.
type pidServer struct {
	*container.Server
	pidFile string
}

func (s *pidServer) Stop() error {
	err := s.Server.Stop()
	_ = os.Remove(s.pidFile)
	return err
}
