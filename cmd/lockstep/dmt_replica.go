package main

import (
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"lockstep/configs"
	"lockstep/dmt"
	"lockstep/proxy"
)

// jointSched prepares a replica for joint_sched (`lockstep replica
// --dmt`): the runtime's shared-memory file with its input channel (made
// before the server starts, which maps it), the feeder that fills the
// channel from the log, and the environment that puts the server under
// the runtime. It returns that environment, for the server.
func jointSched(cfg *configs.Config, opts *proxy.Options, dataDir string) ([]string, error) {
	shm := filepath.Join(dataDir, "dmt.shm")
	if err := dmt.CreateChan(shm); err != nil {
		return nil, err
	}
	env, err := dmt.Env(dmt.Options{Shm: shm, Joint: true})
	if err != nil {
		return nil, err
	}
	ch, err := dmt.OpenChan(shm)
	if err != nil {
		return nil, err
	}
	opts.NewFeeder = proxy.NewDMTFeeder(proxy.DMTFeederOptions{Chan: ch})
	// The runtime's counters (turns, wait time, operations by kind) are
	// served with the replica's metrics.
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	if err := opts.Registry.Register(dmt.NewCollector(shm)); err != nil {
		return nil, err
	}
	return env, nil
}
