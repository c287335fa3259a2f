package proxy

import (
	"bytes"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"testing"
)

func sampleEvents() []Event {
	var sum [16]byte
	copy(sum[:], "0123456789abcdef")
	return []Event{
		{Type: Connect, Conn: 1<<48 | 7<<32 | 1, Term: 7},
		{Type: Data, Conn: 3, Off: 1 << 40, Data: []byte("GET / HTTP/1.0\r\n\r\n")},
		{Type: Data, Conn: 3, Off: 0},
		{Type: Shutdown, Conn: 3, Off: 18},
		{Type: Close, Conn: 3},
		{Type: Close, Conn: 3, Abort: true},
		{Type: ServerClose, Conn: 3, Abort: true},
		{Type: Epoch, Leader: 2, Term: 9, Addr: "127.0.0.1:7001"},
		{Type: Digest, Replica: 3, Reports: []DigestReport{{Conn: 3, Seq: 1, Len: 100, Sum: sum}, {Conn: 4, Seq: 2, Len: 0, Final: true}}},
		{Type: Bubble, Ticks: 5},
		{Type: Checkpoint, Replica: 2, CkptIndex: 1200, CkptID: "0a1b2c", CkptDigest: "ff00", Addr: "http://127.0.0.1:7102/checkpoints"},
	}
}

func TestEventRoundTrip(t *testing.T) {
	for _, e := range sampleEvents() {
		b := EncodeEvent(e)
		got, err := DecodeEvent(b)
		if err != nil {
			t.Fatalf("%v: %v", e, err)
		}
		if len(e.Data) == 0 {
			e.Data = nil
		}
		if len(got.Data) == 0 {
			got.Data = nil
		}
		if !reflect.DeepEqual(got, e) {
			t.Fatalf("round trip of %v gave %v", e, got)
		}
		// Every strict prefix of a fixed-size event is refused.
		if e.Type != Data {
			for i := 0; i < len(b); i++ {
				if _, err := DecodeEvent(b[:i]); err == nil {
					t.Fatalf("%v: prefix of %d bytes decoded", e, i)
				}
			}
			if _, err := DecodeEvent(append(b[:len(b):len(b)], 0)); err == nil {
				t.Fatalf("%v: trailing byte accepted", e)
			}
		}
	}
	if _, err := DecodeEvent([]byte{2, byte(Connect), 1, 1}); err == nil {
		t.Fatal("unknown version accepted")
	}
	if _, err := DecodeEvent([]byte{EventVersion, 99}); err == nil {
		t.Fatal("unknown type accepted")
	}
	// A report count far beyond the bytes is refused before allocating.
	if _, err := DecodeEvent([]byte{EventVersion, byte(Digest), 1, 0xff, 0xff, 0xff, 0xff, 0x0f}); err == nil {
		t.Fatal("huge report count accepted")
	}
}

func FuzzDecodeEvent(f *testing.F) {
	for _, e := range sampleEvents() {
		f.Add(EncodeEvent(e))
	}
	f.Add([]byte{})
	f.Add([]byte{EventVersion})
	f.Add([]byte{EventVersion, byte(Epoch), 1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEvent(b)
		if err != nil {
			return
		}
		// What decodes re-encodes to something that decodes the same.
		again, err := DecodeEvent(EncodeEvent(e))
		if err != nil {
			t.Fatalf("re-encoding of %v does not decode: %v", e, err)
		}
		if len(e.Data) == 0 {
			e.Data = nil
		}
		if len(again.Data) == 0 {
			again.Data = nil
		}
		if !reflect.DeepEqual(e, again) {
			t.Fatalf("%v re-decodes as %v", e, again)
		}
	})
}

// collectDigests digests output fed in the given chunks.
func collectDigests(masks []MaskRule, chunks ...[]byte) []DigestReport {
	var out []DigestReport
	d := newDigester(1, masks, nil, func(r DigestReport) { out = append(out, r) })
	for _, c := range chunks {
		d.Write(c)
	}
	d.EOF()
	return out
}

func TestDigestMaskAcrossChunks(t *testing.T) {
	masks := []MaskRule{{Re: regexp.MustCompile(`(?m)^Date: [^\r\n]*`), Replace: []byte("Date: *")}}
	a := []byte("HTTP/1.1 200 OK\r\nDate: Sun, 22 Nov 2026 06:26:22 GMT\r\nServer: x\r\n\r\nhello\n")
	b := []byte("HTTP/1.1 200 OK\r\nDate: Mon, 23 Nov 2026 16:00:01 GMT\r\nServer: x\r\n\r\nhello\n")
	ref := collectDigests(masks, a)
	// The Date line cut at every possible place still digests the same.
	for i := 0; i <= len(b); i++ {
		got := collectDigests(masks, b[:i], b[i:])
		if !reflect.DeepEqual(got, ref) {
			t.Fatalf("cut at %d: %v, want %v", i, got, ref)
		}
	}
	// Without the mask the two differ.
	if reflect.DeepEqual(collectDigests(nil, a), collectDigests(nil, b)) {
		t.Fatal("unmasked outputs digest alike")
	}
	// Other differences are seen.
	c := bytes.Replace(b, []byte("hello"), []byte("hullo"), 1)
	if reflect.DeepEqual(collectDigests(masks, c), ref) {
		t.Fatal("a different body digests alike")
	}
}

func TestDigestCheckpointsArePrefixes(t *testing.T) {
	var big []byte
	for i := 0; len(big) < 3*MaxRecord; i++ {
		big = append(big, []byte("line of output, fairly long, number ")...)
		big = append(big, byte('0'+i%10), '\n')
	}
	big = append(big, bytes.Repeat([]byte("x"), 2*MaxRecord+5)...) // no newline
	full := collectDigests(nil, big)
	if len(full) < 4 {
		t.Fatalf("only %d checkpoints", len(full))
	}
	// In odd chunks, identical.
	var chunks [][]byte
	for rest := big; len(rest) > 0; {
		k := min(len(rest), 7919)
		chunks = append(chunks, rest[:k])
		rest = rest[k:]
	}
	if got := collectDigests(nil, chunks...); !reflect.DeepEqual(got, full) {
		t.Fatal("chunking changes the checkpoints")
	}
	// A stream cut short has a prefix of the checkpoints (but the last).
	var out []DigestReport
	d := newDigester(1, nil, nil, func(r DigestReport) { out = append(out, r) })
	d.Write(big[:len(big)/2])
	if len(out) == 0 || !reflect.DeepEqual(out, full[:len(out)]) {
		t.Fatal("a truncated stream's checkpoints are not a prefix")
	}
}

func TestComparator(t *testing.T) {
	c := newComparator(3)
	good := DigestReport{Conn: 5, Seq: 1, Len: 10, Final: true}
	bad := good
	bad.Sum[0] = 1
	if d := c.report(10, 1, good); d != nil {
		t.Fatal(d)
	}
	if d := c.report(11, 3, bad); d != nil {
		t.Fatalf("flagged before a majority: %v", d)
	}
	d := c.report(12, 2, good)
	if len(d) != 1 || d[0].Replica != 3 || d[0].Index != 12 || !reflect.DeepEqual(d[0].Agree, []uint64{1, 2}) {
		t.Fatalf("divergence %+v", d)
	}
	if len(c.m) != 0 || c.total != 1 {
		t.Fatalf("state %d entries, %d divergences", len(c.m), c.total)
	}
	for id := uint64(1); id <= 3; id++ {
		c.report(20, id, DigestReport{Conn: 6, Seq: 1, Len: 3})
	}
	if c.compared != 1 || c.total != 1 {
		t.Fatalf("compared %d, total %d", c.compared, c.total)
	}
}

// A replica configured to join later counts only once it reported: until
// then the others' reports complete a comparison.
func TestComparatorJoiner(t *testing.T) {
	c := newComparator(4, 4)
	r := DigestReport{Conn: 5, Seq: 1, Len: 10, Final: true}
	for id := uint64(1); id <= 3; id++ {
		c.report(10, id, r)
	}
	if c.compared != 1 || len(c.m) != 0 {
		t.Fatalf("without the joiner: compared %d, %d open", c.compared, len(c.m))
	}
	r.Conn = 6
	c.report(20, 4, r) // the joiner's first report
	for id := uint64(1); id <= 3; id++ {
		c.report(21, id, r)
	}
	if c.compared != 2 || len(c.m) != 0 {
		t.Fatalf("with the joiner: compared %d, %d open", c.compared, len(c.m))
	}
	r.Conn = 7
	for id := uint64(1); id <= 3; id++ {
		c.report(30, id, r)
	}
	if c.compared != 2 || len(c.m) != 1 {
		t.Fatalf("a comparison completed without the joiner, now a member: compared %d, %d open", c.compared, len(c.m))
	}
}

func TestRequiredLiteral(t *testing.T) {
	for pat, want := range map[string]string{
		`(?m)^Date: [^\r\n]*`:          "Date: ",
		`(?m)^Last-Modified: [^\r\n]*`: "Last-Modified: ",
		`ETag: "[0-9a-f-]+"`:           `ETag: "`,
		`(?i)date: .*`:                 "",
		`[0-9]+`:                       "",
		`a|b`:                          "",
	} {
		got := string(requiredLiteral(regexp.MustCompile(pat)))
		if got != want {
			t.Errorf("requiredLiteral(%q) = %q, want %q", pat, got, want)
		}
	}
	// The shortcut never changes what is masked.
	m := NewMaskRule(regexp.MustCompile(`(?m)^Date: [^\r\n]*`), []byte("Date: -"))
	var a, b []DigestReport
	da := newDigester(1, []MaskRule{m}, nil, func(r DigestReport) { a = append(a, r) })
	db := newDigester(1, []MaskRule{{Re: m.Re, Replace: m.Replace}}, nil, func(r DigestReport) { b = append(b, r) })
	for _, d := range []*digester{da, db} {
		d.Write([]byte("HTTP/1.1 200 OK\r\nDate: Sun, 22 Nov 2026 08:00:00 GMT\r\nServer: x\r\n\r\nbody"))
		d.EOF()
	}
	if len(a) == 0 || fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("digests differ with the shortcut: %v vs %v", a, b)
	}
}

// Byte-range masks blank the same stream offsets whatever the chunking,
// also when the random bytes hold a newline (which must not move the
// records' cuts); bytes outside the ranges still count.
func TestDigestByteRanges(t *testing.T) {
	ranges := []ByteRange{{Off: 9, Len: 8}, {Off: 30, Len: 4}}
	digests := func(stream []byte, chunk int) []DigestReport {
		var out []DigestReport
		d := newDigester(1, nil, ranges, func(r DigestReport) { out = append(out, r) })
		orig := append([]byte(nil), stream...)
		for rest := stream; len(rest) > 0; {
			k := min(len(rest), chunk)
			d.Write(rest[:k])
			rest = rest[k:]
		}
		d.EOF()
		if !bytes.Equal(orig, stream) {
			t.Fatal("the digester changed its caller's bytes")
		}
		return out
	}
	base := []byte("greeting:ABCDEFGH;tail\nmore:     WXYZ and the rest\n")
	other := append([]byte(nil), base...)
	copy(other[9:17], "12\n45678")
	copy(other[30:34], "\n\n\n\n")
	want := digests(base, len(base))
	for _, chunk := range []int{1, 3, 10, len(other)} {
		if got := digests(other, chunk); !reflect.DeepEqual(got, want) {
			t.Fatalf("chunks of %d: masked streams differ", chunk)
		}
	}
	changed := append([]byte(nil), base...)
	changed[17] = '!'
	if reflect.DeepEqual(digests(changed, 5), want) {
		t.Fatal("a byte outside the ranges was masked")
	}
}

// BenchmarkDigestPage digests the demo's static page as Apache sends it,
// with the demo's masks.
func BenchmarkDigestPage(b *testing.B) {
	page, err := os.ReadFile("../apps/apache/htdocs/index.html")
	if err != nil {
		b.Fatal(err)
	}
	resp := append([]byte("HTTP/1.1 200 OK\r\nDate: Sun, 22 Nov 2026 06:26:22 GMT\r\nServer: Apache\r\n"+
		"Last-Modified: Sun, 22 Nov 2026 06:00:00 GMT\r\nETag: \"119e-5f1\"\r\nAccept-Ranges: bytes\r\n"+
		"Content-Length: 4510\r\nConnection: close\r\nContent-Type: text/html\r\n\r\n"), page...)
	var masks []MaskRule
	for _, p := range []string{`(?m)^Date: [^\r\n]*`, `(?m)^Last-Modified: [^\r\n]*`, `(?m)^ETag: [^\r\n]*`} {
		masks = append(masks, NewMaskRule(regexp.MustCompile(p), []byte("-")))
	}
	b.SetBytes(int64(len(resp)))
	b.ReportAllocs()
	for b.Loop() {
		d := newDigester(1, masks, nil, func(DigestReport) {})
		d.Write(resp)
		d.EOF()
	}
}
