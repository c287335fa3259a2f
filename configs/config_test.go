package configs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const valid = `
name = "web"

[cluster]
cpu_quota = 1.0

[[cluster.replica]]
id = 1
peer = "10.0.0.1:7000"
listen = "10.0.0.1:8080"

[[cluster.replica]]
id = 2
peer = "10.0.0.2:7000"
listen = "10.0.0.2:8080"

[server]
app = "apache"
start = ["/usr/sbin/apache2", "-f", "{{.Dir}}/apache2.conf", "-DFOREGROUND"]
listen = "127.0.0.1:8081"

[server.health]
http = "/index.html"

[[output.mask]]
pattern = "Date: [^\r]*"
replace = "Date: -"

[client]
command = ["ab", "-c", "8", "-n", "100", "http://{{.Addr}}/"]
parser = "ab"
`

func TestParseValid(t *testing.T) {
	c, err := Parse("web.toml", []byte(valid))
	if err != nil {
		t.Fatal(err)
	}
	if c.Log.TickMS != 100 || c.Server.StopSignal != "TERM" || c.Cluster.MaxConnections != 1024 {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.Output.Mask[0].Re == nil || c.Output.Mask[0].Re.ReplaceAllString("Date: Mon", "x") != "x" {
		t.Fatal("mask pattern not compiled")
	}
	if r, err := c.ReplicaByID(2); err != nil || r.Listen != "10.0.0.2:8080" {
		t.Fatalf("replica 2: %+v %v", r, err)
	}
	if _, err := c.ReplicaByID(9); err == nil {
		t.Fatal("replica 9 found")
	}
}

func TestParseErrorsNameFieldAndLine(t *testing.T) {
	cases := []struct {
		name, edit, from, want string
	}{
		{"syntax", `cpu_quota = 1.0`, `cpu_quota = = 1.0`, "web.toml:5:"},
		{"unknown field", `cpu_quota = 1.0`, "cpu_quota = 1.0\ncpu_qouta = 2", "web.toml:6: cluster.cpu_qouta: unknown field"},
		{"bad quota", `cpu_quota = 1.0`, `cpu_quota = -3`, "web.toml:5: cluster.cpu_quota: must be between"},
		{"bad listen", `listen = "127.0.0.1:8081"`, `listen = "nowhere"`, "web.toml:20: server.listen:"},
		// Errors in a repeated [[table]] name the line in the right block.
		{"bad peer in 2nd replica", `peer = "10.0.0.2:7000"`, `peer = "nowhere"`, `web.toml:14: cluster.replica.peer: replica 2: "nowhere" is not host:port`},
		{"bad listen in 3rd replica", `listen = "10.0.0.2:8080"`, "listen = \"10.0.0.2:8080\"\n\n[[cluster.replica]]\nid = 3\npeer = \"10.0.0.3:7000\"\nlisten = \"10.0.0.3\"",
			`web.toml:20: cluster.replica.listen: replica 3: "10.0.0.3" is not host:port`},
		{"duplicate id", "id = 2", "id = 1", "web.toml:13: cluster.replica.id: 1 appears twice"},
		{"bad regexp", `pattern = "Date: [^\r]*"`, `pattern = "Date: [^"`, "web.toml:26: output.mask.pattern:"},
		{"bad regexp in 2nd mask", `replace = "Date: -"`, "replace = \"Date: -\"\n\n[[output.mask]]\npattern = \"Server: (\"",
			"web.toml:30: output.mask.pattern: error parsing regexp: missing closing ): `Server: (`"},
		{"no pattern in 2nd mask", `replace = "Date: -"`, "replace = \"Date: -\"\n\n[[output.mask]]\nreplace = \"x\"",
			"web.toml:29: output.mask.pattern: a mask needs a pattern or a byte range"},
		{"pattern and range", `replace = "Date: -"`, "replace = \"Date: -\"\noffset = 3\nlength = 4", "web.toml:29: output.mask.length: a mask is either a pattern or a byte range"},
		{"range without length", `pattern = "Date: [^\r]*"
replace = "Date: -"`, `offset = 9`, "web.toml:25: output.mask.length: a byte range needs a length"},
		{"unknown table", `[server.health]`, `[server.healthx]`, "web.toml:22: server.healthx: unknown field"},
		{"wrong type", `cpu_quota = 1.0`, "cpu_quota = 1.0\n\n[log]\ntick_ms = \"x\"",
			"web.toml:8: log.tick_ms: incompatible types: TOML value has type string; destination has type integer"},
		{"wrong type in 2nd of 3 replicas", "id = 2\n", "id = \"two\"\npeer = \"10.0.0.2:7000\"\nlisten = \"10.0.0.2:8080\"\n\n[[cluster.replica]]\nid = 3\n",
			"web.toml:13: cluster.replica.id: incompatible types: TOML value has type string; destination has type integer"},
		{"bad parser", `parser = "ab"`, `parser = "wrk2"`, "web.toml:31: client.parser:"},
		{"no start", `start = ["/usr/sbin/apache2", "-f", "{{.Dir}}/apache2.conf", "-DFOREGROUND"]`, ``, "server.start: a command line"},
		{"bad name", `name = "web"`, `name = "Web Server"`, "web.toml:2: name:"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := strings.Replace(valid, tc.edit, tc.from, 1)
			if src == valid {
				t.Fatalf("edit %q did not apply", tc.edit)
			}
			_, err := Parse("web.toml", []byte(src))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestShippedConfigsLoad(t *testing.T) {
	files, _ := filepath.Glob("*.toml")
	for _, f := range files {
		if _, err := Load(f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.toml")); err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("missing file: %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}
