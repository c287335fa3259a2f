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
		cfgPath, mode, workDir string
		replicas               int
		quota                  float64
	)
	cmd := &cobra.Command{
		Use:   "run --config F --mode MODE [--replicas N] [-- COMMAND ARGS...]",
		Short: "Run a whole cluster on this machine, each replica and the client in its own network namespace",
		Long: `Starts one mode of the application on this machine: namespaces r1..rN and
client joined by a bridge in a namespace of their own, each replica with its own
server copy and data directory and, optionally, a CPU quota per namespace.

Without a command it prints where clients connect and keeps the cluster up
until interrupted. With -- COMMAND ARGS it runs the command in the client
namespace with LOCKSTEP_ADDR=host:port of replica 1 in its environment, tears
the cluster down when it exits and exits with its status. Leftovers of a
crashed earlier run are removed first.

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
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			d, err := eval.Deploy(ctx, eval.DeployOptions{Config: cfg, Mode: mode, Replicas: replicas,
				CPUQuota: quota, WorkDir: workDir, Logger: logrus.StandardLogger()})
			if err != nil {
				return err
			}
			defer func() {
				if err := d.Close(); err != nil {
					logrus.WithError(err).Warn("tearing the cluster down")
				}
			}()
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
			c, err := d.ClientCommand(ctx, args, 0)
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
			if err := os.RemoveAll(workDir); err != nil {
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
