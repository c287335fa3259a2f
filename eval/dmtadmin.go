package eval

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"lockstep/dmt"
)

// serveDMT serves the runtime's statistics file as Prometheus metrics
// (lockstep_dmt_*) at addr/metrics, from this process. xtern_only runs
// the server without a replica process, whose admin serves them in
// joint_sched. As a replica's admin, it is localhost unless addr says
// otherwise.
func (d *Deployment) serveDMT(addr, shm string) error {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	reg := prometheus.NewRegistry()
	if err := reg.Register(dmt.NewCollector(shm)); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("eval: dmt metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	d.dmtSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	d.dmtAddr, d.dmtShm = ln.Addr().String(), shm
	go func() {
		if err := d.dmtSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.WithError(err).Warn("eval: serving dmt metrics")
		}
	}()
	return nil
}

// DMTMetrics is the URL of the runtime's metrics in xtern_only, "" in the
// other modes (joint_sched's replicas serve them on their admin address).
func (d *Deployment) DMTMetrics() string {
	if d.dmtAddr == "" {
		return ""
	}
	return "http://" + d.dmtAddr + "/metrics"
}

// DMTStats reads the runtime's statistics in xtern_only.
func (d *Deployment) DMTStats() (dmt.Stats, error) {
	if d.dmtShm == "" {
		return dmt.Stats{}, errors.New("eval: no deterministic runtime in mode " + d.opts.Mode)
	}
	return dmt.ReadStats(d.dmtShm)
}

// closeDMT stops serving the metrics.
func (d *Deployment) closeDMT() {
	if d.dmtSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = d.dmtSrv.Shutdown(ctx)
	}
}

// dmtRound is what the runtime did during one round: the counters'
// growth between two readings.
func dmtRound(before, after dmt.Stats) map[string]float64 {
	a, b := after.Total, before.Total // sums over every process, gone ones too: never decrease
	return map[string]float64{
		"turns":  float64(a.Turns - b.Turns),
		"waits":  float64(a.Waits - b.Waits),
		"wait_s": float64(a.WaitNS-b.WaitNS) / 1e9,
		"steals": float64(a.Steals - b.Steals),
	}
}
