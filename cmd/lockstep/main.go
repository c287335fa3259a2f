// Command lockstep replicates an unmodified server: see `lockstep --help`.
package main

import (
	"os"

	"github.com/sirupsen/logrus"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		logrus.Error(err)
		os.Exit(1)
	}
}
