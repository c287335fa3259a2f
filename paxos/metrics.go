package paxos

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the node's Prometheus series, prefixed lockstep_log_.
type metrics struct {
	commit    prometheus.Gauge
	applied   prometheus.Gauge
	term      prometheus.Gauge
	leader    prometheus.Gauge
	isLeader  prometheus.Gauge
	proposals prometheus.Counter
	failed    prometheus.Counter
	fsync     prometheus.Histogram
	batch     prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "lockstep", Subsystem: "log", Name: name, Help: help})
	}
	m := &metrics{
		commit:   g("commit_index", "Highest log index known committed."),
		applied:  g("applied_index", "Highest log index the application has applied."),
		term:     g("term", "Current raft term."),
		leader:   g("leader", "Raft id of the known leader (0: none)."),
		isLeader: g("is_leader", "1 if this node leads."),
		proposals: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "lockstep", Subsystem: "log",
			Name: "proposals_total", Help: "Proposals committed through this node (rate() gives proposals/s)."}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "lockstep", Subsystem: "log",
			Name: "proposals_failed_total", Help: "Proposals that failed or whose outcome is unknown."}),
		fsync: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "lockstep", Subsystem: "log",
			Name: "fsync_seconds", Help: "Latency of WAL fsyncs.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16)}),
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "lockstep", Subsystem: "log",
			Name: "ready_entries", Help: "Entries persisted per raft Ready (group commit size).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14)}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.commit, m.applied, m.term, m.leader, m.isLeader, m.proposals, m.failed, m.fsync, m.batch} {
			// A second node in one process (tests) may register again; keep the first.
			_ = reg.Register(c)
		}
	}
	return m
}

func (m *metrics) observeSync(d time.Duration) { m.fsync.Observe(d.Seconds()) }
