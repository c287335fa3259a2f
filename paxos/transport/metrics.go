package transport

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Reasons a message is dropped (label "reason" of
// lockstep_transport_messages_dropped_total).
const (
	dropQueueFull    = "queue_full"    // the peer's queue was full
	dropDisconnected = "disconnected"  // no stream to the peer
	dropUnknownPeer  = "unknown_peer"  // m.To is not a known peer
	dropWriteError   = "write_error"   // the stream broke while writing it
	dropTooLarge     = "too_large"     // encodes to more than MaxFrameSize
	dropEncodeError  = "encode_error"  // could not be marshalled
	dropClosed       = "closed"        // queued when the peer was removed or the transport closed
	rejectHandshake  = "bad_handshake" // label "reason" of ..._rejected_streams_total
	rejectCluster    = "wrong_cluster"
	rejectVersion    = "bad_version"
	rejectRecipient  = "wrong_recipient"
	rejectSender     = "bad_sender"
)

type metrics struct {
	sent          *prometheus.CounterVec
	received      *prometheus.CounterVec
	dropped       *prometheus.CounterVec
	bytesSent     *prometheus.CounterVec
	bytesReceived *prometheus.CounterVec
	connected     *prometheus.GaugeVec
	rejected      *prometheus.CounterVec
	badFrames     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	const ns, sub = "lockstep", "transport"
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
	}
	m := &metrics{
		sent:          counter("messages_sent_total", "Raft messages written to a peer's stream.", "peer"),
		received:      counter("messages_received_total", "Raft messages received from a peer.", "peer"),
		dropped:       counter("messages_dropped_total", "Raft messages to a peer dropped instead of sent, by reason.", "peer", "reason"),
		bytesSent:     counter("bytes_sent_total", "Frame bytes written to a peer's stream.", "peer"),
		bytesReceived: counter("bytes_received_total", "Frame bytes received from a peer.", "peer"),
		connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "peer_connected",
			Help: "1 while the outbound stream to a peer is up."}, []string{"peer"}),
		rejected:  counter("rejected_streams_total", "Inbound streams refused at handshake, by reason.", "reason"),
		badFrames: counter("bad_frames_total", "Inbound streams closed on an undecodable or oversize frame.", "peer"),
	}
	if reg == nil {
		return m, nil
	}
	all := []prometheus.Collector{m.sent, m.received, m.dropped, m.bytesSent, m.bytesReceived, m.connected, m.rejected, m.badFrames}
	for i, c := range all {
		if err := reg.Register(c); err != nil {
			for _, done := range all[:i] {
				reg.Unregister(done) // all or nothing, so that a retry can succeed
			}
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("register transport metrics (one registry per transport, or wrap it with a const label): %w", err)
			}
			return nil, fmt.Errorf("register transport metrics: %w", err)
		}
	}
	return m, nil
}

func peerLabel(id uint64) string { return strconv.FormatUint(id, 10) }

// peerMetrics caches a peer's outbound counters so that the hot path does
// not hash label values per message.
type peerMetrics struct {
	sent, bytesSent prometheus.Counter
	connected       prometheus.Gauge
	dropped         map[string]prometheus.Counter
}

func (m *metrics) forPeer(id uint64) peerMetrics {
	l := peerLabel(id)
	pm := peerMetrics{
		sent:      m.sent.WithLabelValues(l),
		bytesSent: m.bytesSent.WithLabelValues(l),
		connected: m.connected.WithLabelValues(l),
		dropped:   map[string]prometheus.Counter{},
	}
	for _, r := range []string{dropQueueFull, dropDisconnected, dropWriteError, dropTooLarge, dropEncodeError, dropClosed} {
		pm.dropped[r] = m.dropped.WithLabelValues(l, r)
	}
	return pm
}

// forget removes a removed peer's outbound series, so that membership churn
// does not accumulate dead series.
func (m *metrics) forget(id uint64) {
	l := peerLabel(id)
	m.sent.DeleteLabelValues(l)
	m.bytesSent.DeleteLabelValues(l)
	m.connected.DeleteLabelValues(l)
	m.dropped.DeletePartialMatch(prometheus.Labels{"peer": l})
}
