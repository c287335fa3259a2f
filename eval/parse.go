// Package eval measures replicated servers: it runs a client benchmark
// (ab, sysbench) against each mode (orig, xtern_only, proxy_only,
// joint_sched) for several rounds and writes a CSV, a PNG chart and a
// markdown table. It is the counterpart of Crane's eval scripts and keeps
// their new-run.sh interface.
package eval

import (
	"bufio"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// Measurement is what one benchmark run reports.
type Measurement struct {
	Throughput float64 // requests (ab) or transactions (sysbench) per second
	MeanMS     float64 // mean latency per request
	P50MS      float64
	P99MS      float64
	Complete   int
	Failed     int // failed requests (ab) or errors (sysbench)
}

var (
	abRPS      = regexp.MustCompile(`(?m)^Requests per second:\s+([0-9.]+)`)
	abMean     = regexp.MustCompile(`(?m)^Time per request:\s+([0-9.]+) \[ms\] \(mean\)$`)
	abComplete = regexp.MustCompile(`(?m)^Complete requests:\s+(\d+)`)
	abFailed   = regexp.MustCompile(`(?m)^Failed requests:\s+(\d+)`)
	abNon2xx   = regexp.MustCompile(`(?m)^Non-2xx responses:\s+(\d+)`)
	abPct      = regexp.MustCompile(`(?m)^\s+(50|99)%\s+(\d+)`)
)

// ParseAB reads ab's report. ab prints percentiles in whole milliseconds;
// when its -e CSV is given (percentCSV non-nil) the percentiles come from
// there, with microsecond resolution.
func ParseAB(out string, percentCSV io.Reader) (Measurement, error) {
	var m Measurement
	get := func(re *regexp.Regexp, what string) (string, error) {
		sm := re.FindStringSubmatch(out)
		if sm == nil {
			return "", fmt.Errorf("eval: ab output has no %s line", what)
		}
		return sm[1], nil
	}
	s, err := get(abRPS, "Requests per second")
	if err != nil {
		return m, withTail(err, out)
	}
	m.Throughput, _ = strconv.ParseFloat(s, 64)
	if s, err = get(abMean, "Time per request"); err != nil {
		return m, err
	}
	m.MeanMS, _ = strconv.ParseFloat(s, 64)
	if s, err = get(abComplete, "Complete requests"); err != nil {
		return m, err
	}
	m.Complete, _ = strconv.Atoi(s)
	if s, err = get(abFailed, "Failed requests"); err != nil {
		return m, err
	}
	m.Failed, _ = strconv.Atoi(s)
	// A server error is a failure too, although ab counts it apart.
	if sm := abNon2xx.FindStringSubmatch(out); sm != nil {
		n, _ := strconv.Atoi(sm[1])
		m.Failed += n
	}
	for _, sm := range abPct.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(sm[2], 64)
		if sm[1] == "50" {
			m.P50MS = v
		} else {
			m.P99MS = v
		}
	}
	if percentCSV != nil {
		p, err := parseABPercentiles(percentCSV)
		if err != nil {
			return m, err
		}
		// ab fills the CSV's top rows from past the end of its samples
		// when there are fewer than 100 requests: use it only if sane.
		if monotonic(p) {
			m.P50MS, m.P99MS = p[50], p[99]
		}
	}
	return m, nil
}

func monotonic(p map[int]float64) bool {
	prev := -1.0
	for i := 0; i <= 100; i++ {
		v, ok := p[i]
		if !ok || v < prev {
			return false
		}
		prev = v
	}
	return true
}

func parseABPercentiles(r io.Reader) (map[int]float64, error) {
	rows, err := csv.NewReader(r).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("eval: ab percentile CSV: %w", err)
	}
	p := map[int]float64{}
	for _, row := range rows {
		if len(row) != 2 {
			continue
		}
		pct, err1 := strconv.Atoi(row[0])
		ms, err2 := strconv.ParseFloat(row[1], 64)
		if err1 == nil && err2 == nil {
			p[pct] = ms
		}
	}
	if _, ok := p[50]; !ok {
		return nil, errors.New("eval: ab percentile CSV has no 50% row")
	}
	return p, nil
}

var (
	sbTPS     = regexp.MustCompile(`transactions:\s+(\d+)\s+\(([0-9.]+) per sec\.\)`)
	sbErrors  = regexp.MustCompile(`ignored errors:\s+(\d+)`)
	sbAvg     = regexp.MustCompile(`(?m)^\s+avg:\s+([0-9.]+)`)
	sbPct     = regexp.MustCompile(`(?m)^\s+(\d+)th percentile:\s+([0-9.]+)`)
	sbFatalRe = regexp.MustCompile(`(?m)^FATAL: .*$`)
)

// ParseSysbench reads sysbench's report. sysbench prints one latency
// percentile, the one --percentile asks for (default 95): run it with
// --percentile=99 for the p99 column; a median it never prints.
func ParseSysbench(out string) (Measurement, error) {
	var m Measurement
	if f := sbFatalRe.FindString(out); f != "" {
		return m, fmt.Errorf("eval: sysbench: %s", f)
	}
	sm := sbTPS.FindStringSubmatch(out)
	if sm == nil {
		return m, withTail(errors.New("eval: sysbench output has no transactions line"), out)
	}
	m.Complete, _ = strconv.Atoi(sm[1])
	m.Throughput, _ = strconv.ParseFloat(sm[2], 64)
	if sm := sbErrors.FindStringSubmatch(out); sm != nil {
		m.Failed, _ = strconv.Atoi(sm[1])
	}
	if sm := sbAvg.FindStringSubmatch(out); sm != nil {
		m.MeanMS, _ = strconv.ParseFloat(sm[1], 64)
	}
	// Only the percentile asked for is printed (95 unless --percentile=N):
	// it fills its own column or none, never another's.
	if sm := sbPct.FindStringSubmatch(out); sm != nil {
		v, _ := strconv.ParseFloat(sm[2], 64)
		switch sm[1] {
		case "50":
			m.P50MS = v
		case "99":
			m.P99MS = v
		}
	}
	return m, nil
}

func withTail(err error, out string) error {
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return fmt.Errorf("%w; output ends:\n%s", err, strings.Join(lines, "\n"))
}
