package eval

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseAB(t *testing.T) {
	out, err := os.ReadFile("testdata/ab.txt")
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseAB(string(out), nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Complete != 100 || m.Failed != 41 || m.Throughput != 397.17 || m.P50MS != 1 || m.P99MS != 22 {
		t.Fatalf("parsed %+v", m)
	}
	f, err := os.Open("testdata/ab.csv")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err = ParseAB(string(out), f)
	if err != nil {
		t.Fatal(err)
	}
	if m.P50MS != 0.872 {
		t.Fatalf("p50 from CSV: %v", m.P50MS)
	}
	// ab's CSV is garbage at the top for fewer than 100 requests: the
	// whole-millisecond table is used instead.
	var bad strings.Builder
	bad.WriteString("Percentage served,Time in ms\n")
	for i := 0; i <= 100; i++ {
		v := 1.5
		if i == 98 || i == 99 {
			v = 0.257
		}
		fmt.Fprintf(&bad, "%d,%g\n", i, v)
	}
	m, err = ParseAB(string(out), strings.NewReader(bad.String()))
	if err != nil || m.P99MS != 22 {
		t.Fatalf("insane CSV used: p99 %v, %v", m.P99MS, err)
	}
	if _, err := ParseAB("apr_socket_recv: Connection refused (111)", nil); err == nil ||
		!strings.Contains(err.Error(), "Connection refused") {
		t.Fatalf("a failed ab run must be an error that shows its output: %v", err)
	}
}

func TestParseSysbench(t *testing.T) {
	out, err := os.ReadFile("testdata/sysbench.txt")
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseSysbench(string(out))
	if err != nil {
		t.Fatal(err)
	}
	if m.Complete != 10003 || m.Throughput != 166.63 || m.Failed != 2 || m.MeanMS != 47.99 || m.P99MS != 132.49 {
		t.Fatalf("parsed %+v", m)
	}
	// Run without --percentile=99, sysbench prints the 95th: no column.
	m, err = ParseSysbench(strings.Replace(string(out), "99th percentile", "95th percentile", 1))
	if err != nil || m.P99MS != 0 || m.P50MS != 0 {
		t.Fatalf("95th percentile parsed as %+v (%v)", m, err)
	}
	if _, err := ParseSysbench("FATAL: unable to connect to MySQL server"); err == nil {
		t.Fatal("FATAL accepted")
	}
}

func TestReport(t *testing.T) {
	rounds := []Round{
		{Mode: "orig", Round: 1, Measurement: Measurement{Throughput: 100, P50MS: 1}},
		{Mode: "orig", Round: 2, Measurement: Measurement{Throughput: 120, P50MS: 1}},
		{Mode: "orig", Round: 3, Measurement: Measurement{Throughput: 110, P50MS: 1}},
		{Mode: "proxy_only", Round: 1, Measurement: Measurement{Throughput: 99, Failed: 1}, Extra: map[string]float64{"divergences": 0}},
	}
	sums := Summarize(rounds)
	if len(sums) != 2 || sums[0].Throughput != 110 || sums[1].Failed != 1 {
		t.Fatalf("summaries %+v", sums)
	}
	md := Markdown("", "req/s", sums)
	if !strings.Contains(md, "| proxy_only | 1 | 99.0 | 90.0% |") || !strings.Contains(md, "| 0 | - |") {
		t.Fatalf("markdown:\n%s", md)
	}
	var buf bytes.Buffer
	if err := WriteCSV(&buf, rounds); err != nil {
		t.Fatal(err)
	}
	if lines := strings.Count(buf.String(), "\n"); lines != 5 {
		t.Fatalf("csv has %d lines:\n%s", lines, buf.String())
	}
	png := filepath.Join(t.TempDir(), "c.png")
	if err := WritePNG(png, "test", "req/s", rounds); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(png); err != nil || st.Size() < 1000 {
		t.Fatalf("png: %v", err)
	}
}

// The machine's CPU times are readable, and steal is a part of the whole.
func TestHostCPU(t *testing.T) {
	steal, total, ok := hostCPU()
	if !ok || total <= 0 || steal < 0 || steal > total {
		t.Fatalf("hostCPU() = %v, %v, %v", steal, total, ok)
	}
}
