package eval

import (
	"encoding/csv"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// Round is one benchmark run of one mode.
type Round struct {
	Mode  string
	Round int
	Measurement
	// Extra holds mode-specific counters (e.g. bubbles/s, divergences).
	Extra map[string]float64
}

// Summary is a mode's rounds reduced to medians.
type Summary struct {
	Mode   string
	Rounds int
	Measurement
	Extra map[string]float64
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Summarize takes the median of every figure per mode, keeping the order in
// which modes first appear. Failed requests are summed, not reduced: one
// failure in any round must show.
func Summarize(rounds []Round) []Summary {
	var order []string
	by := map[string][]Round{}
	for _, r := range rounds {
		if _, ok := by[r.Mode]; !ok {
			order = append(order, r.Mode)
		}
		by[r.Mode] = append(by[r.Mode], r)
	}
	var out []Summary
	for _, mode := range order {
		rs := by[mode]
		col := func(f func(Round) float64) float64 {
			var xs []float64
			for _, r := range rs {
				xs = append(xs, f(r))
			}
			return median(xs)
		}
		s := Summary{Mode: mode, Rounds: len(rs), Extra: map[string]float64{}}
		s.Throughput = col(func(r Round) float64 { return r.Throughput })
		s.MeanMS = col(func(r Round) float64 { return r.MeanMS })
		s.P50MS = col(func(r Round) float64 { return r.P50MS })
		s.P99MS = col(func(r Round) float64 { return r.P99MS })
		for _, r := range rs {
			s.Complete += r.Complete
			s.Failed += r.Failed
			for k := range r.Extra {
				s.Extra[k] = 0
			}
		}
		for k := range s.Extra {
			s.Extra[k] = col(func(r Round) float64 { return r.Extra[k] })
		}
		out = append(out, s)
	}
	return out
}

// WriteCSV writes every round, one row each.
func WriteCSV(w io.Writer, rounds []Round) error {
	extras := extraKeys(rounds)
	cw := csv.NewWriter(w)
	head := append([]string{"mode", "round", "throughput", "mean_ms", "p50_ms", "p99_ms", "complete", "failed"}, extras...)
	if err := cw.Write(head); err != nil {
		return err
	}
	f := func(x float64) string { return strconv.FormatFloat(x, 'f', 3, 64) }
	for _, r := range rounds {
		row := []string{r.Mode, strconv.Itoa(r.Round), f(r.Throughput), f(r.MeanMS), f(r.P50MS), f(r.P99MS),
			strconv.Itoa(r.Complete), strconv.Itoa(r.Failed)}
		for _, k := range extras {
			row = append(row, f(r.Extra[k]))
		}
		if err := cw.Write(row); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

func extraKeys(rounds []Round) []string {
	set := map[string]bool{}
	for _, r := range rounds {
		for k := range r.Extra {
			set[k] = true
		}
	}
	var keys []string
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Markdown renders the summaries as a table; the first mode (orig, when
// measured) is the baseline of the ratio column.
func Markdown(title, unit string, sums []Summary) string {
	var b strings.Builder
	if title != "" {
		fmt.Fprintf(&b, "%s\n\n", title)
	}
	var extras []string
	set := map[string]bool{}
	for _, s := range sums {
		for k := range s.Extra {
			if !set[k] {
				set[k] = true
				extras = append(extras, k)
			}
		}
	}
	sort.Strings(extras)
	fmt.Fprintf(&b, "| mode | rounds | %s (median) | vs %s | mean ms | p50 ms | p99 ms | failed |", unit, baseName(sums))
	for _, k := range extras {
		fmt.Fprintf(&b, " %s |", k)
	}
	b.WriteString("\n|---|---|---|---|---|---|---|---|")
	for range extras {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, s := range sums {
		ratio := "-"
		if len(sums) > 0 && sums[0].Throughput > 0 {
			ratio = fmt.Sprintf("%.1f%%", 100*s.Throughput/sums[0].Throughput)
		}
		fmt.Fprintf(&b, "| %s | %d | %.1f | %s | %s | %s | %s | %d |", s.Mode, s.Rounds, s.Throughput, ratio,
			ms(s.MeanMS), ms(s.P50MS), ms(s.P99MS), s.Failed)
		for _, k := range extras {
			if v, ok := s.Extra[k]; ok {
				fmt.Fprintf(&b, " %.1f |", v)
			} else {
				b.WriteString(" - |") // not measured in this mode
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func baseName(sums []Summary) string {
	if len(sums) == 0 {
		return "base"
	}
	return sums[0].Mode
}

// WritePNG draws throughput per mode: a bar per mode at the median, with
// every round's value as a point.
func WritePNG(path, title, unit string, rounds []Round) error {
	sums := Summarize(rounds)
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = unit
	vals := make(plotter.Values, len(sums))
	names := make([]string, len(sums))
	for i, s := range sums {
		vals[i] = s.Throughput
		names[i] = s.Mode
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(40))
	if err != nil {
		return fmt.Errorf("eval: chart: %w", err)
	}
	p.Add(bars)
	var pts plotter.XYs
	idx := map[string]int{}
	for i, s := range sums {
		idx[s.Mode] = i
	}
	for _, r := range rounds {
		pts = append(pts, plotter.XY{X: float64(idx[r.Mode]), Y: r.Throughput})
	}
	if len(pts) > 0 {
		sc, err := plotter.NewScatter(pts)
		if err != nil {
			return fmt.Errorf("eval: chart: %w", err)
		}
		p.Add(sc)
	}
	p.NominalX(names...)
	p.Y.Min = 0
	return p.Save(6*vg.Inch, 4*vg.Inch, path)
}

// ms formats a latency; 0 is one the client did not report (sysbench has
// no median), shown as "-" rather than as a time.
func ms(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f", v)
}
