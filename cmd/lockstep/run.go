package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"lockstep/configs"
	"lockstep/eval"
)

// exitError carries a client command's exit status out of `lockstep run`.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("command exited with status %d", e.code) }

func newRunCmd() *cobra.Command {
	var (
		cfgPath, mode, workDir, admin string
		replicas                      int
		quota                         float64
	)
	cmd := &cobra.Command{
		Use:   "run --config F --mode MODE [--replicas N] [-- COMMAND ARGS...]",
		Short: "Run a whole cluster on this machine, each replica and the client in its own network namespace",
		Long: `Starts one mode of the application on this machine: namespaces r1..rN and
client joined by a bridge in a namespace of their own, each replica with its own
server copy and data directory and, optionally, a CPU quota per namespace.

Without a command it prints where clients connect and keeps the cluster up
until interrupted. With -- COMMAND ARGS it runs the command in the client
namespace with LOCKSTEP_ADDR=host:port of the leader in its environment, tears
the cluster down when it exits and exits with its status. Each run is a new
cluster: leftovers of a crashed earlier run and the work directory of the last
run (its logs, replica logs and server copies, kept until then for a look) are
removed first. In xtern_only the deterministic runtime's statistics
(lockstep_dmt_*) are served at http://<--admin>/metrics, as printed.

Modes: ` + strings.Join(configs.Modes, ", "),
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			if workDir == "" {
				workDir = filepath.Join(cfg.Cluster.DataDir, "run-"+mode)
			}
			// A run is a new cluster: the last run's log would otherwise be
			// replayed into the fresh server copies, competing with the
			// client for the whole run.
			if err := freshWorkDir(workDir); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			d, err := eval.Deploy(ctx, eval.DeployOptions{Config: cfg, Mode: mode, Replicas: replicas,
				CPUQuota: quota, WorkDir: workDir, Admin: admin, Logger: logrus.StandardLogger()})
			if err != nil {
				return err
			}
			defer func() {
				if err := d.Close(); err != nil {
					logrus.WithError(err).Warn("tearing the cluster down")
				}
			}()
			if u := d.DMTMetrics(); u != "" {
				// on stderr: with a command, stdout is the command's
				fmt.Fprintf(cmd.ErrOrStderr(), "deterministic runtime's metrics (lockstep_dmt_*): %s\n", u)
			}
			if len(args) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "%s in mode %s; clients connect from namespace ls-%s-client to:\n",
					cfg.Name, mode, cfg.Name)
				for i, a := range d.Addrs() {
					fmt.Fprintf(cmd.OutOrStdout(), "  replica %d: %s\n", i+1, a)
				}
				for i, a := range d.Admins() {
					fmt.Fprintf(cmd.OutOrStdout(), "  admin %d:   %s (inside ls-%s-r%d)\n", i+1, a, cfg.Name, i+1)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "e.g. ip netns exec ls-%s-client curl http://%s/\nCtrl-C tears it down.\n",
					cfg.Name, d.Addrs()[0])
				<-ctx.Done()
				return nil
			}
			leader, err := d.Leader(ctx)
			if err != nil {
				return err
			}
			c, err := d.ClientCommand(ctx, args, leader)
			if err != nil {
				return err
			}
			c.Stdin, c.Stdout, c.Stderr = os.Stdin, cmd.OutOrStdout(), cmd.ErrOrStderr()
			if err := c.Run(); err != nil {
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					return exitError{code: ee.ExitCode()}
				}
				return err
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgPath, "config", "", "application config (configs/*.toml)")
	f.StringVar(&mode, "mode", configs.ModeProxyOnly, "orig, xtern_only, proxy_only or joint_sched")
	f.IntVar(&replicas, "replicas", 3, "replicas in the modes with consensus")
	f.Float64Var(&quota, "cpu-quota", -1, "cores per namespace (default: the config's cluster.cpu_quota; 0: none)")
	f.StringVar(&workDir, "work-dir", "", "where replicas keep their data (default: <data_dir>/run-<mode>)")
	f.StringVar(&admin, "admin", "127.0.0.1:0", "xtern_only: where the runtime's /metrics are served (localhost unless set)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

func newEvalCmd() *cobra.Command {
	var (
		cfgPath, modes, outDir, workDir string
		rounds, replicas                int
		quota                           float64
	)
	cmd := &cobra.Command{
		Use:   "eval --config F --modes orig,proxy_only --rounds 3",
		Short: "Benchmark modes side by side with the config's client; write CSV, PNG and markdown",
		Long: `For each mode, starts a fresh cluster on this machine (as lockstep run does),
runs the config's client benchmark (e.g. ab -c 8) from the client namespace for
--rounds rounds, and writes <out>/<app>.csv (every round), <app>.md (medians,
with each mode's throughput relative to the first mode) and <app>.png.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := configs.Load(cfgPath)
			if err != nil {
				return err
			}
			if workDir == "" {
				workDir = filepath.Join(cfg.Cluster.DataDir, "eval")
			}
			if err := freshWorkDir(workDir); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			res, err := eval.Run(ctx, eval.Options{Config: cfg, Modes: strings.Split(modes, ","), Rounds: rounds,
				Replicas: replicas, CPUQuota: quota, OutDir: outDir, WorkDir: workDir, Progress: cmd.ErrOrStderr(),
				Client: args, Logger: logrus.StandardLogger()})
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), res.Markdown)
			fmt.Fprintf(cmd.OutOrStdout(), "written: %s\n", strings.Join(res.Files, ", "))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgPath, "config", "", "application config (configs/*.toml)")
	f.StringVar(&modes, "modes", "orig,proxy_only", "comma-separated modes, the first is the baseline")
	f.IntVar(&rounds, "rounds", 3, "client runs per mode")
	f.IntVar(&replicas, "replicas", 3, "replicas in the modes with consensus")
	f.Float64Var(&quota, "cpu-quota", -1, "cores per namespace (default: the config's cluster.cpu_quota; 0: none)")
	f.StringVar(&outDir, "out", "eval/results", "where results go")
	f.StringVar(&workDir, "work-dir", "", "scratch space (default: <data_dir>/eval)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

// workDirMark marks a directory as a lockstep run's or eval's scratch space,
// which the next run may wipe.
const workDirMark = ".lockstep-workdir"

// freshWorkDir empties dir for a new cluster. It refuses a directory that
// has files but is not marked as ours, so that a mistyped --work-dir never
// deletes someone's data.
func freshWorkDir(dir string) error {
	ents, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return err
	case len(ents) > 0:
		if !isWorkDir(dir) {
			return fmt.Errorf("%s is not empty and not a lockstep work directory (no %s); refusing to wipe it", dir, workDirMark)
		}
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	// Servers run as other users (www-data) under it: world-searchable.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, workDirMark), []byte("scratch space of lockstep run/eval; wiped by the next one\n"), 0o644)
}

// isWorkDir: dir has our mark, or the layout a run (cluster.toml) or an
// eval (a folder per mode) left before there was a mark.
func isWorkDir(dir string) bool {
	for _, name := range append([]string{workDirMark, "cluster.toml"}, configs.Modes...) {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return true
		}
	}
	return false
}
