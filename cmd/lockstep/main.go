// Command lockstep replicates an unmodified server: see `lockstep --help`.
package main

import (
	"errors"
	"os"

	"github.com/sirupsen/logrus"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		logrus.Error(err)
		os.Exit(1)
	}
}
