package dmt

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Collector exposes a runtime's statistics file as Prometheus series
// prefixed lockstep_dmt_, read at each scrape. Register it with the
// replica's registry: reg.MustRegister(dmt.NewCollector(opts.Shm)).
type Collector struct {
	path func() string
	descs
}

type descs struct {
	turns, waitSec, waits, ops, timeouts, idle, created, forks, steals *prometheus.Desc
	procs, threads, blocked, up                                        *prometheus.Desc
}

// NewCollector returns a Collector for the statistics file at path.
func NewCollector(path string) *Collector {
	return NewCollectorFunc(func() string { return path })
}

// NewCollectorFunc returns a Collector for the statistics file at path(),
// asked at each scrape (a server in a container that is replaced by a
// restored image moves; "" while there is none).
func NewCollectorFunc(path func() string) *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName("lockstep", "dmt", name), help, labels, nil)
	}
	return &Collector{path: path, descs: descs{
		turns:    d("turns_total", "Turns passed (logical clock ticks), all processes of the server."),
		waitSec:  d("turn_wait_seconds_total", "Time threads spent waiting for the turn."),
		waits:    d("turn_waits_total", "Times a thread had to wait for the turn."),
		ops:      d("ops_total", "Operations performed under the runtime, by kind.", "op"),
		timeouts: d("timeouts_total", "Timed waits and sleeps that expired in logical time."),
		idle:     d("idle_advances_total", "Logical clock jumps while no thread could run."),
		created:  d("threads_created_total", "Threads registered with the runtime."),
		forks:    d("forks_total", "fork() calls under the runtime."),
		steals: d("steals_total", "Threads taken out of the run queue by the safety net while blocked "+
			"in a call the runtime cannot see: each is a point where determinism was lost."),
		procs:   d("processes", "Live processes of the server under the runtime."),
		threads: d("threads", "Live threads of the server under the runtime."),
		blocked: d("blocked_threads", "Threads now blocked in the kernel (outside the turn)."),
		up:      d("up", "1 if the statistics file could be read."),
	}}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.turns, c.waitSec, c.waits, c.ops, c.timeouts, c.idle,
		c.created, c.forks, c.steals, c.procs, c.threads, c.blocked, c.up} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st, err := ReadStats(c.path())
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	t := st.Total
	counter(c.turns, t.Turns)
	ch <- prometheus.MustNewConstMetric(c.waitSec, prometheus.CounterValue, float64(t.WaitNS)/1e9)
	counter(c.waits, t.Waits)
	counter(c.timeouts, t.Timeouts)
	counter(c.idle, t.IdleAdvances)
	counter(c.created, t.Threads)
	counter(c.forks, t.Forks)
	counter(c.steals, t.Steals)
	for _, op := range OpNames {
		counter(c.ops, t.Ops[op], op)
	}
	gauge(c.procs, uint64(st.LiveProcesses))
	gauge(c.threads, st.LiveThreads)
	gauge(c.blocked, st.Blocked)
}
