package eval

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/procfs"
	"github.com/sirupsen/logrus"

	"lockstep/configs"
)

// Options of `lockstep eval`.
type Options struct {
	Config   *configs.Config
	Modes    []string
	Rounds   int
	Replicas int
	CPUQuota float64 // negative: the config's
	// Client overrides the config's client command.
	Client []string
	// OutDir receives results.csv, results.md and results.png.
	OutDir   string
	WorkDir  string
	Bin      string
	Progress io.Writer // nil: none
	Logger   logrus.FieldLogger
}

// Result is what an evaluation produced.
type Result struct {
	Rounds    []Round
	Summaries []Summary
	Markdown  string
	Files     []string
}

// Run measures every mode for the given rounds: each mode gets a fresh
// deployment, then the client runs Rounds times from the client namespace.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Rounds < 1 {
		return nil, fmt.Errorf("eval: rounds must be at least 1")
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	client := o.Client
	if len(client) == 0 {
		client = o.Config.Client.Command
	}
	if len(client) == 0 {
		return nil, fmt.Errorf("eval: %s has no [client] command and none was given", o.Config.Name)
	}
	for _, m := range o.Modes {
		if !validMode(m) {
			return nil, fmt.Errorf("eval: unknown mode %q (want one of %s)", m, strings.Join(configs.Modes, ", "))
		}
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}
	bar := newProgress(o.Progress, len(o.Modes)*o.Rounds)
	res := &Result{}
	for _, mode := range o.Modes {
		bar.label(mode, "starting")
		d, err := Deploy(ctx, DeployOptions{Config: o.Config, Mode: mode, Replicas: o.Replicas, CPUQuota: o.CPUQuota,
			Bin: o.Bin, WorkDir: filepath.Join(o.WorkDir, mode), Run: o.Config.Name, Logger: o.Logger})
		if err != nil {
			return res, fmt.Errorf("eval: mode %s: %w", mode, err)
		}
		if prep := o.Config.Client.Prepare; len(prep) > 0 {
			bar.label(mode, "preparing")
			if err := runPrepare(ctx, d, prep, filepath.Join(o.WorkDir, mode)); err != nil {
				d.Close()
				return res, fmt.Errorf("eval: mode %s: %w", mode, err)
			}
		}
		for r := 1; r <= o.Rounds; r++ {
			bar.label(mode, fmt.Sprintf("round %d/%d", r, o.Rounds))
			b0, t0 := d.appliedBubbles(ctx), time.Now()
			s0, serr := d.DMTStats()
			steal0, cpu0, cok := hostCPU()
			m, err := runClient(ctx, d, o.Config.Client.Parser, client, filepath.Join(o.WorkDir, mode), r)
			if err != nil {
				d.Close()
				return res, fmt.Errorf("eval: mode %s round %d: %w", mode, r, err)
			}
			var extra map[string]float64
			if b1 := d.appliedBubbles(ctx); b0 >= 0 && b1 >= b0 {
				extra = map[string]float64{"bubbles/s": (b1 - b0) / time.Since(t0).Seconds()}
			}
			// xtern_only: what the runtime did in the round
			if s1, err := d.DMTStats(); serr == nil && err == nil {
				extra = dmtRound(s0, s1)
				bar.note(fmt.Sprintf("%s round %d: %.0f turns, %.0f waits, %.3f s waiting, %.0f steals",
					mode, r, extra["turns"], extra["waits"], extra["wait_s"], extra["steals"]))
			}
			if steal1, cpu1, ok := hostCPU(); cok && ok && cpu1 > cpu0 {
				if extra == nil {
					extra = map[string]float64{}
				}
				pct := 100 * (steal1 - steal0) / (cpu1 - cpu0)
				extra["steal %"] = pct
				if pct >= stealWarn {
					bar.note(fmt.Sprintf("%s round %d: the hypervisor took %.0f%% of this machine's CPU time; its figures say more about the host than about %s",
						mode, r, pct, mode))
				}
			}
			res.Rounds = append(res.Rounds, Round{Mode: mode, Round: r, Measurement: m, Extra: extra})
			bar.step()
		}
		if err := d.Close(); err != nil {
			o.Logger.WithError(err).Warn("eval: tearing down")
		}
	}
	bar.finish()
	res.Summaries = Summarize(res.Rounds)
	unit := "req/s"
	if o.Config.Client.Parser == "sysbench" {
		unit = "tx/s"
	}
	title := fmt.Sprintf("%s: %s, %d rounds, %s", o.Config.Name, strings.Join(client, " "), o.Rounds, time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	res.Markdown = Markdown(title, unit, res.Summaries)
	csvPath := filepath.Join(o.OutDir, o.Config.Name+".csv")
	mdPath := filepath.Join(o.OutDir, o.Config.Name+".md")
	pngPath := filepath.Join(o.OutDir, o.Config.Name+".png")
	var csvBuf bytes.Buffer
	if err := WriteCSV(&csvBuf, res.Rounds); err != nil {
		return res, err
	}
	if err := os.WriteFile(csvPath, csvBuf.Bytes(), 0o644); err != nil {
		return res, err
	}
	if err := os.WriteFile(mdPath, []byte(res.Markdown), 0o644); err != nil {
		return res, err
	}
	if err := WritePNG(pngPath, o.Config.Name, unit, res.Rounds); err != nil {
		return res, err
	}
	res.Files = []string{csvPath, mdPath, pngPath}
	return res, nil
}

// stealWarn is the share of CPU time stolen in a round (percent) above
// which the progress output warns that the round measured the host.
const stealWarn = 10

// hostCPU returns this machine's CPU time so far, in seconds: the part
// the hypervisor gave to other guests (steal) and the whole. A round's
// share of steal tells how much the host's other tenants moved its
// figures, which on a shared VM can be more than any change measured.
func hostCPU() (steal, total float64, ok bool) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, 0, false
	}
	st, err := fs.Stat()
	if err != nil {
		return 0, 0, false
	}
	c := st.CPUTotal // guest time is part of user time already
	return c.Steal, c.User + c.Nice + c.System + c.Idle + c.Iowait + c.IRQ + c.SoftIRQ + c.Steal, true
}

func validMode(m string) bool {
	for _, x := range configs.Modes {
		if m == x {
			return true
		}
	}
	return false
}

// runPrepare runs the config's client.prepare once from the client
// namespace (e.g. sysbench prepare), keeping its output beside the rounds'.
func runPrepare(ctx context.Context, d *Deployment, argv []string, dir string) error {
	leader, err := d.Leader(ctx)
	if err != nil {
		return err
	}
	cmd, err := d.ClientCommand(ctx, argv, leader)
	if err != nil {
		return err
	}
	out, err := cmd.CombinedOutput()
	_ = os.WriteFile(filepath.Join(dir, "prepare.txt"), out, 0o644)
	if err != nil {
		return fmt.Errorf("client prepare %q: %w\n%s", strings.Join(argv, " "), err, tail(string(out), 8))
	}
	return nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// runClient runs the benchmark once from the client namespace and parses
// its report.
func runClient(ctx context.Context, d *Deployment, parser string, argv []string, dir string, round int) (Measurement, error) {
	argv = append([]string(nil), argv...)
	var csvPath string
	if parser == "ab" || parser == "" {
		// ab's own percentiles are whole milliseconds; its CSV is finer.
		csvPath = filepath.Join(dir, fmt.Sprintf("ab-%d.csv", round))
		argv = append([]string{argv[0], "-e", csvPath}, argv[1:]...)
	}
	leader, err := d.Leader(ctx)
	if err != nil {
		return Measurement{}, err
	}
	cmd, err := d.ClientCommand(ctx, argv, leader)
	if err != nil {
		return Measurement{}, err
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	text := out.String()
	if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("client-%d.txt", round)), out.Bytes(), 0o644); err != nil {
		return Measurement{}, err
	}
	switch parser {
	case "sysbench":
		m, err := ParseSysbench(text)
		if err == nil && runErr != nil {
			err = fmt.Errorf("sysbench: %w", runErr)
		}
		return m, err
	case "exit":
		if runErr != nil {
			return Measurement{Failed: 1}, fmt.Errorf("client: %w: %s", runErr, text)
		}
		return Measurement{Complete: 1}, nil
	default:
		var pct io.Reader
		if f, err := os.Open(csvPath); err == nil {
			defer f.Close()
			pct = f
		}
		m, err := ParseAB(text, pct)
		if err != nil && runErr != nil {
			err = fmt.Errorf("ab: %v: %w", runErr, err)
		}
		return m, err
	}
}

// progress is a one-line text progress bar (a library would add a
// dependency for twenty lines).
type progress struct {
	w           io.Writer
	total, done int
	start       time.Time
	text        string
}

func newProgress(w io.Writer, total int) *progress {
	return &progress{w: w, total: total, start: time.Now()}
}

func (p *progress) draw() {
	if p.w == nil {
		return
	}
	const width = 30
	filled := width * p.done / max(p.total, 1)
	fmt.Fprintf(p.w, "\r[%s%s] %d/%d %-32s %s", strings.Repeat("#", filled), strings.Repeat(".", width-filled),
		p.done, p.total, p.text, time.Since(p.start).Round(time.Second))
}

func (p *progress) label(mode, what string) { p.text = mode + " " + what; p.draw() }

// note prints a line above the bar.
func (p *progress) note(line string) {
	if p.w != nil {
		fmt.Fprintf(p.w, "\r\033[K%s\n", line)
		p.draw()
	}
}

func (p *progress) step() { p.done++; p.draw() }
func (p *progress) finish() {
	if p.w != nil {
		p.text = "done"
		p.draw()
		fmt.Fprintln(p.w)
	}
}
