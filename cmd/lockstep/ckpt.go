package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"lockstep/configs"
	"lockstep/container"
	"lockstep/dmt"
	"lockstep/proxy"
)

// rebuildMarker in a replica's data directory makes its next start fetch
// its checkpoint from a peer (lockstep rebuild).
const rebuildMarker = "rebuild"

// runContainerReplica runs a replica whose server lives in an LXC
// container, with checkpoints and recovery when the config enables them.
// A replica stopped with proxy.ErrRebuild starts again, fetching from a
// peer.
func runContainerReplica(cfg *configs.Config, id uint64, dataDir string, join, useDMT bool) error {
	log := logrus.WithFields(logrus.Fields{"app": cfg.Name})
	dataDir, err := filepath.Abs(dataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	for {
		fromPeers := false
		marker := filepath.Join(dataDir, rebuildMarker)
		if _, err := os.Stat(marker); err == nil {
			fromPeers = true
			if err := os.RemoveAll(filepath.Join(dataDir, "checkpoints")); err != nil {
				return err
			}
			_ = os.Remove(marker)
			log.Warn("rebuilding: this replica's checkpoints are wiped; its snapshot's checkpoint comes from a peer")
		}
		r, err := startContainerReplica(ctx, cfg, id, dataDir, join, fromPeers, useDMT, log)
		if err != nil {
			return err
		}
		interrupted, err := serveReplica(ctx, r, id, log)
		if interrupted {
			return nil
		}
		if !errors.Is(err, proxy.ErrRebuild) {
			return err
		}
		if err := os.WriteFile(marker, nil, 0o644); err != nil {
			return err
		}
		join = false // a member by now (or added again by the operator)
	}
}

func startContainerReplica(ctx context.Context, cfg *configs.Config, id uint64, dataDir string, join, fromPeers, useDMT bool, log logrus.FieldLogger) (*proxy.Replica, error) {
	name := fmt.Sprintf("ls-%s-%d", cfg.Name, id)
	seed := filepath.Join(dataDir, "seed")
	if err := os.RemoveAll(seed); err != nil {
		return nil, err
	}
	// Clean up after a previous run: its server (a plain process) and its
	// container.
	_ = proxy.KillLeftover(filepath.Join(dataDir, "server.pid"))
	_ = container.StopLXCByName(name, container.DefaultLXCPath)
	prep, err := container.PrepareServer(container.ServerOptions{
		Config: cfg.Server, AppDir: cfg.AppDir(), Dir: seed, Name: name, Logger: log,
	}, cfg.Checkpoint.DataDir)
	if err != nil {
		return nil, err
	}
	srv, err := proxy.NewLXCServer(proxy.LXCServerOptions{
		Name: name, LXCPath: container.DefaultLXCPath, Command: prep.Args, Env: prep.Env,
		SeedDir: seed, DataDir: cfg.Checkpoint.DataDir, DataSize: cfg.Checkpoint.DataSize,
		Addr: prep.Addr, HealthHTTP: cfg.Server.Health.HTTP, HealthTimeout: cfg.Server.Health.Timeout(),
		StopSignal: prep.StopSignal, Console: filepath.Join(container.DefaultLXCPath, "console-"+cfg.Name+".log"),
		Joint: useDMT, Logger: log,
	})
	if err != nil {
		return nil, err
	}
	opts := proxy.FromConfig(cfg, id)
	opts.DataDir = filepath.Join(dataDir, "log")
	opts.Logger = log
	opts.Join = join
	opts.KeepEntries = cfg.Checkpoint.KeepEntries
	every := cfg.Checkpoint.EveryEntries
	if !cfg.Checkpoint.Enabled {
		every = 0
	}
	if useDMT {
		// The runtime's counters, read from the current container.
		opts.Registry = prometheus.NewRegistry()
		if err := opts.Registry.Register(dmt.NewCollectorFunc(srv.ShmPath)); err != nil {
			return nil, err
		}
	}
	opts.Checkpoints = &proxy.CheckpointOptions{
		Server: srv, StoreDir: filepath.Join(dataDir, "checkpoints"), App: cfg.Name,
		Every: every, Keep: cfg.Checkpoint.Keep, AutoRebuild: cfg.Checkpoint.AutoRebuild, FromPeers: fromPeers,
	}
	return proxy.Start(ctx, opts)
}

// adminOf is replica id's admin address from the config.
func adminOf(cfg *configs.Config, id uint64) (string, error) {
	r, err := cfg.ReplicaByID(id)
	if err != nil {
		return "", err
	}
	if strings.HasSuffix(r.Admin, ":0") {
		return "", fmt.Errorf("replica %d has no fixed admin address in the config", id)
	}
	return r.Admin, nil
}

func post(url string, timeout time.Duration) (string, error) {
	client := &http.Client{Timeout: timeout}
	resp, err := client.Post(url, "", nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return "", fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return string(body), nil
}

func newCheckpointCmd() *cobra.Command {
	var (
		cfgPath string
		id      uint64
		force   bool
	)
	cmd := &cobra.Command{
		Use:   "checkpoint --config F --id N",
		Short: "Take a checkpoint of replica N's server now (through its admin endpoint)",
		Long: `Asks replica N to checkpoint its server at its current log index: it stops
applying the log, lets its feeder deliver everything, dumps its container with
CRIU (left running), stores the image and announces it through the log, after
which every replica fetches it and compacts its log below it. The leader
refuses unless --force (its clients would wait during the dump).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			admin, err := adminOf(cfg, id)
			if err != nil {
				return err
			}
			q := ""
			if force {
				q = "?force=1"
			}
			out, err := post("http://"+admin+"/checkpoint"+q, 5*time.Minute)
			if err != nil {
				return err
			}
			fmt.Fprint(cmd.OutOrStdout(), out)
			return nil
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "", "the application's config")
	cmd.Flags().Uint64Var(&id, "id", 0, "the replica to checkpoint")
	cmd.Flags().BoolVar(&force, "force", false, "checkpoint even the leader")
	_ = cmd.MarkFlagRequired("config")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

func newRebuildCmd() *cobra.Command {
	var (
		cfgPath, dataDir string
		id               uint64
	)
	cmd := &cobra.Command{
		Use:   "rebuild --config F --id N",
		Short: "Rebuild replica N from a peer's checkpoint and the log after it",
		Long: `Marks replica N for a rebuild: its own checkpoints are wiped and the
checkpoint its log was compacted at is fetched from a peer, restored, and the
log after it replayed. A running replica (reached through its admin address)
restarts itself at once; a stopped one is rebuilt at its next start.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			if _, err := cfg.ReplicaByID(id); err != nil {
				return err
			}
			if admin, err := adminOf(cfg, id); err == nil {
				if _, err := post("http://"+admin+"/rebuild", 10*time.Second); err == nil {
					fmt.Fprintf(cmd.OutOrStdout(), "replica %d is rebuilding\n", id)
					return nil
				}
			}
			if dataDir == "" {
				dataDir = filepath.Join(cfg.Cluster.DataDir, strconv.FormatUint(id, 10))
			}
			if err := os.WriteFile(filepath.Join(dataDir, rebuildMarker), nil, 0o644); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "replica %d is not running; it is rebuilt at its next start\n", id)
			return nil
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "", "the application's config")
	cmd.Flags().Uint64Var(&id, "id", 0, "the replica to rebuild")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "its data directory (default <cluster.data_dir>/<id>)")
	_ = cmd.MarkFlagRequired("config")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

func newJoinCmd() *cobra.Command {
	var (
		cfgPath, peer string
		id, via       uint64
	)
	cmd := &cobra.Command{
		Use:   "join --config F --id N [--via M]",
		Short: "Add replica N (started with lockstep replica --join) to the running cluster as a learner",
		Long: `Asks the leader to add replica N as a learner. N then receives the log (a
snapshot first when the log is compacted: it fetches and restores that
checkpoint from a peer) and asks to be promoted to a voter once it has caught
up. --via names the replica to ask; the leader is found through it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			if peer == "" {
				r, err := cfg.ReplicaByID(id)
				if err != nil {
					return err
				}
				peer = r.Peer
			}
			var errs []error
			for _, r := range cfg.Cluster.Replicas {
				if via != 0 && r.ID != via || r.ID == id {
					continue
				}
				admin, err := adminOf(cfg, r.ID)
				if err != nil {
					continue
				}
				if _, err := post(fmt.Sprintf("http://%s/join?id=%d&peer=%s", admin, id, peer), time.Minute); err != nil {
					errs = append(errs, err)
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "replica %d added as a learner (through replica %d)\n", id, r.ID)
				return nil
			}
			return fmt.Errorf("no replica added %d: %w", id, errors.Join(errs...))
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "", "the application's config")
	cmd.Flags().Uint64Var(&id, "id", 0, "the joining replica")
	cmd.Flags().Uint64Var(&via, "via", 0, "the replica to ask (default: try each)")
	cmd.Flags().StringVar(&peer, "peer", "", "its peer address (default: from the config)")
	_ = cmd.MarkFlagRequired("config")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

func newFeederCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "feeder [flags] -- SERVER ARGS...",
		Short:              "The in-container feeder (run by a replica inside its server's container)",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			// With cobra's flag parsing off, --help and -h reach the
			// feeder's flag set, which prints the usage and returns
			// flag.ErrHelp: a help asked for, not a failure.
			err := proxy.RunFeederProcess(args)
			if errors.Is(err, flag.ErrHelp) {
				return nil
			}
			return err
		},
	}
}
