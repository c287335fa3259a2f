package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the proxy's Prometheus series, prefixed lockstep_proxy_.
type metrics struct {
	clientsOpen    prometheus.Gauge
	clientsTotal   *prometheus.CounterVec // kind: served, relayed
	rejected       prometheus.Counter
	resets         *prometheus.CounterVec // why
	connsOpen      prometheus.Gauge
	proposed       *prometheus.CounterVec // type
	proposeFailed  *prometheus.CounterVec // type
	applied        *prometheus.CounterVec // type
	ignored        *prometheus.CounterVec // type
	bytesProposed  prometheus.Counter
	bytesApplied   prometheus.Counter
	bytesOutput    prometheus.Counter
	bytesRelayed   prometheus.Counter
	malformed      prometheus.Counter
	gaps           prometheus.Counter
	digestReports  prometheus.Counter
	digestDropped  prometheus.Counter
	compared       prometheus.Counter
	divergences    *prometheus.CounterVec // replica
	appliedIndex   prometheus.Gauge
	feederBacklog  prometheus.GaugeFunc
	uncommittedNow prometheus.GaugeFunc
}

func newMetrics(reg prometheus.Registerer, backlog, uncommitted func() float64) *metrics {
	ns, sub := "lockstep", "proxy"
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	vec := func(name, help, label string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, []string{label})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	m := &metrics{
		clientsOpen:   gauge("client_connections", "Client connections open at this replica (served or relayed to the leader)."),
		clientsTotal:  vec("client_connections_total", "Client connections accepted, by kind (served: this replica leads; relayed: to the leader).", "kind"),
		rejected:      counter("client_connections_rejected_total", "Client connections refused by cluster.max_connections or for want of a leader."),
		resets:        vec("client_resets_total", "Client connections reset by the proxy, by reason.", "reason"),
		connsOpen:     gauge("open_connections", "Connections open in the replicated state (fed to the server)."),
		proposed:      vec("events_proposed_total", "Events proposed by this replica, by type.", "type"),
		proposeFailed: vec("events_propose_failed_total", "Proposals that failed or whose outcome is unknown, by type.", "type"),
		applied:       vec("events_applied_total", "Committed events applied, by type.", "type"),
		ignored:       vec("events_ignored_total", "Committed events dropped as stale (old epoch, unknown or closed connection), by type.", "type"),
		bytesProposed: counter("bytes_proposed_total", "Client bytes proposed by this replica."),
		bytesApplied:  counter("bytes_applied_total", "Client bytes applied (fed to the local server)."),
		bytesOutput:   counter("server_output_bytes_total", "Bytes the local server sent."),
		bytesRelayed:  counter("bytes_relayed_total", "Bytes relayed between clients and the leader."),
		malformed:     counter("malformed_entries_total", "Log entries that are not events (skipped by every replica)."),
		gaps:          counter("stream_gaps_total", "Connections aborted because an event of their stream was lost."),
		digestReports: counter("digest_reports_total", "Digest checkpoints this replica reported."),
		digestDropped: counter("digest_reports_dropped_total", "Digest checkpoints this replica could not report."),
		compared:      counter("digests_compared_total", "Digest checkpoints every replica reported alike."),
		divergences:   vec("divergences_total", "Output divergences found, by diverging replica.", "replica"),
		appliedIndex:  gauge("applied_index", "Last log index applied by the proxy."),
		feederBacklog: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "feeder_backlog_bytes",
			Help: "Bytes committed but not yet written to the local server."}, backlog),
		uncommittedNow: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "uncommitted_bytes",
			Help: "Client bytes proposed by this replica and not yet committed."}, uncommitted),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.clientsOpen, m.clientsTotal, m.rejected, m.resets, m.connsOpen,
			m.proposed, m.proposeFailed, m.applied, m.ignored, m.bytesProposed, m.bytesApplied, m.bytesOutput,
			m.bytesRelayed, m.malformed, m.gaps, m.digestReports, m.digestDropped, m.compared, m.divergences,
			m.appliedIndex, m.feederBacklog, m.uncommittedNow} {
			_ = reg.Register(c)
		}
	}
	return m
}
