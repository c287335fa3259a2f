package main

import (
	"fmt"
	"os"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
)

func newRootCmd() *cobra.Command {
	var level, format string
	root := &cobra.Command{
		Use:   "lockstep",
		Short: "Transparent state machine replication for unmodified servers",
		Long: `lockstep runs a copy of an unmodified server on every replica, agrees through
consensus (raft) on every socket-level event its clients cause, and feeds every
copy the same events in the same order.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			lv, err := logrus.ParseLevel(level)
			if err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			logrus.SetLevel(lv)
			logrus.SetOutput(os.Stderr)
			switch format {
			case "text":
				logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
			case "json":
				logrus.SetFormatter(&logrus.JSONFormatter{})
			default:
				return fmt.Errorf("--log-format: %q is not text or json", format)
			}
			return nil
		},
	}
	root.PersistentFlags().StringVar(&level, "log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().StringVar(&format, "log-format", "text", "log format: text or json")
	root.AddCommand(newBenchCmd(), newRunCmd(), newEvalCmd())
	root.AddCommand(newReplicaCmd(), newStatusCmd())
	root.AddCommand(newCheckpointCmd(), newRebuildCmd(), newJoinCmd(), newFeederCmd())
	return root
}
