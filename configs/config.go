// Package configs owns lockstep's configuration: the schema of the TOML
// files in this folder (one per replicated application) and their
// validation. An error always names the file, the field and, when the field
// is present in the file, its line.
package configs

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Modes, named as in Crane so that its users feel at home.
const (
	ModeOrig       = "orig"        // the server alone
	ModeXternOnly  = "xtern_only"  // one server under the deterministic runtime
	ModeProxyOnly  = "proxy_only"  // N replicas behind consensus
	ModeJointSched = "joint_sched" // consensus and the deterministic runtime fed by the log
)

// Modes lists every mode in the order eval runs them.
var Modes = []string{ModeOrig, ModeXternOnly, ModeProxyOnly, ModeJointSched}

// Config is one replicated application and how to run and measure it.
type Config struct {
	// Name of the application, used in namespace, cgroup and file names.
	Name string `toml:"name"`
	// Dir is the directory the config was loaded from; relative paths in
	// the config are relative to the repository root (its parent).
	Dir string `toml:"-"`

	Cluster Cluster `toml:"cluster"`
	Log     Log     `toml:"log"`
	Server  Server  `toml:"server"`
	Output  Output  `toml:"output"`
	Client  Client  `toml:"client"`
	// Checkpoint configures checkpoints and recovery.
	Checkpoint Checkpoint `toml:"checkpoint"`
}

// Checkpoint configures CRIU checkpoints of each replica's server and the
// recovery of replicas from them (proxy/ckpt.go).
type Checkpoint struct {
	// Enabled turns checkpoints on.
	Enabled bool `toml:"enabled"`
	// EveryEntries: one backup checkpoints every this many log entries
	// (0: only on demand, `lockstep checkpoint`).
	EveryEntries uint64 `toml:"every_entries"`
	// Keep is how many checkpoints each replica keeps (default 2).
	Keep int `toml:"keep"`
	// Container runs the server in an LXC container (required for
	// checkpoints; default true when enabled).
	Container *bool `toml:"container"`
	// AutoRebuild rebuilds a replica whose output diverges from the
	// majority from a peer's checkpoint.
	AutoRebuild bool `toml:"auto_rebuild"`
	// KeepEntries are kept in the log below a compaction (default 4096),
	// so that a replica slightly behind catches up from the log.
	KeepEntries uint64 `toml:"keep_entries"`
	// DataSize bounds the container's data tmpfs (default "1g").
	DataSize string `toml:"data_size"`
	// DataDir is the data directory's path inside the container (default
	// /run/lockstep-data/<name>); it is the same on every replica so that
	// an image restores anywhere.
	DataDir string `toml:"data_dir"`
}

// UseContainer says whether servers run in LXC containers.
func (c Checkpoint) UseContainer() bool {
	if c.Container != nil {
		return *c.Container
	}
	return c.Enabled
}

// Cluster describes the replicas.
type Cluster struct {
	// ID separates clusters: a peer of another cluster is refused.
	ID uint64 `toml:"id"`
	// Replicas of a real deployment (`lockstep replica --id N`). `lockstep
	// run` generates them in network namespaces instead.
	Replicas []Replica `toml:"replica"`
	// DataDir holds each replica's log and server data (<data_dir>/<id>).
	DataDir string `toml:"data_dir"`
	// MaxConnections bounds concurrent client connections per replica.
	MaxConnections int `toml:"max_connections"`
	// CPUQuota is the number of cores each namespace may use in `lockstep
	// run` (0: unlimited), so that one machine stands in for several.
	CPUQuota float64 `toml:"cpu_quota"`
}

// Replica is one member of a deployment.
type Replica struct {
	ID uint64 `toml:"id"`
	// Peer is where other replicas reach this one's log (host:port).
	Peer string `toml:"peer"`
	// Listen is where clients connect (host:port).
	Listen string `toml:"listen"`
	// Admin serves metrics and status; localhost unless set otherwise.
	Admin string `toml:"admin"`
	// Join: not an initial member; it joins a running cluster
	// (`lockstep replica --join`, then `lockstep join`).
	Join bool `toml:"join"`
}

// Log tunes the replicated log.
type Log struct {
	TickMS         int  `toml:"tick_ms"`
	ElectionTicks  int  `toml:"election_ticks"`
	HeartbeatTicks int  `toml:"heartbeat_ticks"`
	NoSync         bool `toml:"no_sync"`
	// SnapshotEntries: the log is compacted after this many applied entries.
	SnapshotEntries uint64 `toml:"snapshot_entries"`
}

// Tick is the raft tick as a duration.
func (l Log) Tick() time.Duration { return time.Duration(l.TickMS) * time.Millisecond }

// Server describes how to run one copy of the unmodified server.
type Server struct {
	// App is the folder under apps/ whose files are rendered into each
	// replica's server directory ({{.Dir}}, {{.Host}}, {{.Port}} expand).
	App string `toml:"app"`
	// Start is the command line, run in the server directory.
	Start []string `toml:"start"`
	// StopSignal ends the server (default TERM).
	StopSignal string `toml:"stop_signal"`
	// StopTimeoutMS is the grace period before SIGKILL (default 10000).
	StopTimeoutMS int `toml:"stop_timeout_ms"`
	// Listen is where the server listens, as seen from its replica.
	Listen string `toml:"listen"`
	// Env adds to the server's environment.
	Env map[string]string `toml:"env"`
	// Health says when the server is ready.
	Health Health `toml:"health"`
}

// Health is a readiness check.
type Health struct {
	// HTTP is a path to GET; empty means a TCP connect is enough.
	HTTP      string `toml:"http"`
	TimeoutMS int    `toml:"timeout_ms"`
}

// Timeout is the health timeout as a duration.
func (h Health) Timeout() time.Duration { return time.Duration(h.TimeoutMS) * time.Millisecond }

// Output says how replicas compare what their servers send.
type Output struct {
	// Mask rules replace known nondeterministic bytes before digesting.
	Mask []Mask `toml:"mask"`
}

// Mask is one of two kinds. A pattern mask replaces every match of
// Pattern (a Go regexp, applied to each line of the output) by Replace. A
// byte mask (Length > 0) blanks Length bytes from Offset, counted from the
// start of each connection's output: for binary protocols, whose random
// bytes sit at fixed places (MariaDB's login challenge) and which a
// regexp, working on UTF-8 text and cut at newlines, cannot pin down.
type Mask struct {
	Pattern string         `toml:"pattern"`
	Replace string         `toml:"replace"`
	Offset  int64          `toml:"offset"`
	Length  int64          `toml:"length"`
	Re      *regexp.Regexp `toml:"-"`
}

// Client is the benchmark eval runs from the client namespace.
type Client struct {
	// Command runs the benchmark; {{.Addr}} expands to host:port.
	Command []string `toml:"command"`
	// Parser names how to read its output: "ab" or "sysbench".
	Parser string `toml:"parser"`
	// Prepare runs once before the benchmark (e.g. sysbench prepare);
	// {{.Addr}}, {{.Host}} and {{.Port}} expand as in Command.
	Prepare []string `toml:"prepare"`
}

// Error is a validation error naming the field and, where known, the line.
type Error struct {
	File  string
	Line  int // 0 when the field is absent from the file
	Field string
	Msg   string
	// elem is, for a field of an array of tables ([[cluster.replica]],
	// [[output.mask]]), the 1-based number of the block it is in; 0 when
	// the field is in no such block or any block will do.
	elem int
}

func (e *Error) Error() string {
	where := e.File
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Field == "" {
		return fmt.Sprintf("%s: %s", where, e.Msg)
	}
	return fmt.Sprintf("%s: %s: %s", where, e.Field, e.Msg)
}

// Load reads, defaults and validates a config file.
func Load(path string) (*Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, raw)
}

// Parse is Load for bytes already read; path is used in messages.
func Parse(path string, raw []byte) (*Config, error) {
	var c Config
	md, err := toml.Decode(string(raw), &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &Error{File: path, Line: pe.Position.Line, Msg: pe.Message}
		}
		if te := typeError(path, raw, err); te != nil {
			return nil, te
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	lay := scanLayout(raw)
	if und := md.Undecoded(); len(und) > 0 {
		// A key unknown in one block of an array of tables is unknown in
		// all: its first occurrence is the one to report.
		k := und[0]
		return nil, &Error{File: path, Line: lay.line(k, 0), Field: k.String(), Msg: "unknown field"}
	}
	if abs, err := filepath.Abs(path); err == nil {
		c.Dir = filepath.Dir(abs)
	}
	c.setDefaults()
	if err := c.validate(); err != nil {
		var ve *Error
		if errors.As(err, &ve) {
			ve.File = path
			ve.Line = lay.line(splitKey(ve.Field), ve.elem)
		}
		return nil, err
	}
	return &c, nil
}

// decodeErrRe takes apart the TOML library's decode errors (a value of the
// wrong type): plain errors whose text carries the position,
// `toml: line 28 (last key "log.tick_ms"): incompatible types: ...`.
var decodeErrRe = regexp.MustCompile(`^toml: (?:line (\d+) )?\(last key ("(?:[^"\\]|\\.)*")\): (.*)$`)

// valueTypeRe finds the type of the offending value in such an error.
var valueTypeRe = regexp.MustCompile(`TOML value has type (\S+);`)

// typeError turns a decode error of the TOML library into an *Error
// (file:line: field: message), or returns nil if err is not one.
func typeError(path string, raw []byte, err error) *Error {
	m := decodeErrRe.FindStringSubmatch(err.Error())
	if m == nil {
		return nil
	}
	field, uerr := strconv.Unquote(m[2])
	if uerr != nil {
		return nil
	}
	e := &Error{File: path, Field: field, Msg: m[3]}
	e.Line, _ = strconv.Atoi(m[1])
	lay := scanLayout(raw)
	key := splitKey(field)
	arr := lay.arrayOf(key)
	if e.Line == 0 || arr == nil {
		if e.Line == 0 {
			e.Line = lay.line(key, 0)
		}
		return e
	}
	// The library keeps one position per dotted key: for a key of an
	// array of tables, that in its last block. The decoder stops at the
	// first block whose value has an incompatible type, and every value of
	// the type it names is incompatible: the first block holding a value
	// of that type is the one.
	tm := valueTypeRe.FindStringSubmatch(m[3])
	var doc map[string]any
	if tm == nil {
		return e
	}
	if _, derr := toml.Decode(string(raw), &doc); derr != nil {
		return e
	}
	var v any = doc
	for _, k := range arr {
		t, _ := v.(map[string]any)
		v = t[k]
	}
	blocks, _ := v.([]map[string]any)
	for i, b := range blocks {
		var val any = b
		for _, k := range key[len(arr):] {
			t, _ := val.(map[string]any)
			val = t[k]
		}
		// The library names types as %T does, with "any" for interface {}.
		if val != nil && strings.ReplaceAll(fmt.Sprintf("%T", val), "interface {}", "any") == tm[1] {
			if l := lay.line(key, i+1); l > 0 {
				e.Line = l
			}
			break
		}
	}
	return e
}

func (c *Config) setDefaults() {
	if c.Cluster.ID == 0 {
		c.Cluster.ID = 1
	}
	if c.Cluster.DataDir == "" {
		c.Cluster.DataDir = filepath.Join(os.TempDir(), "lockstep", c.Name)
	}
	if c.Cluster.MaxConnections == 0 {
		c.Cluster.MaxConnections = 1024
	}
	if c.Log.TickMS == 0 {
		c.Log.TickMS = 100
	}
	if c.Log.ElectionTicks == 0 {
		c.Log.ElectionTicks = 10
	}
	if c.Log.HeartbeatTicks == 0 {
		c.Log.HeartbeatTicks = 1
	}
	if c.Log.SnapshotEntries == 0 {
		c.Log.SnapshotEntries = 100000
	}
	if c.Server.StopSignal == "" {
		c.Server.StopSignal = "TERM"
	}
	if c.Server.StopTimeoutMS == 0 {
		c.Server.StopTimeoutMS = 10000
	}
	if c.Server.Health.TimeoutMS == 0 {
		c.Server.Health.TimeoutMS = 10000
	}
	if c.Checkpoint.Keep == 0 {
		c.Checkpoint.Keep = 2
	}
	if c.Checkpoint.KeepEntries == 0 {
		c.Checkpoint.KeepEntries = 4096
	}
	if c.Checkpoint.DataSize == "" {
		c.Checkpoint.DataSize = "1g"
	}
	if c.Checkpoint.DataDir == "" {
		c.Checkpoint.DataDir = "/run/lockstep-data/" + c.Name
	}
	for i := range c.Cluster.Replicas {
		if c.Cluster.Replicas[i].Admin == "" {
			c.Cluster.Replicas[i].Admin = "127.0.0.1:0"
		}
	}
}

var sizeRe = regexp.MustCompile(`^[0-9]+[kmgKMG]?$`)

var nameRe = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,15}$`)

func (c *Config) validate() error {
	bad := func(field, format string, args ...any) error {
		return &Error{Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	// badIn is bad for a field of block i (0-based) of an array of tables.
	badIn := func(i int, field, format string, args ...any) error {
		return &Error{Field: field, Msg: fmt.Sprintf(format, args...), elem: i + 1}
	}
	if !nameRe.MatchString(c.Name) {
		return bad("name", "%q must be 1-16 lowercase letters, digits, - or _, starting with a letter", c.Name)
	}
	if c.Cluster.MaxConnections < 0 {
		return bad("cluster.max_connections", "must be positive, got %d", c.Cluster.MaxConnections)
	}
	if c.Cluster.CPUQuota < 0 || c.Cluster.CPUQuota > 1024 {
		return bad("cluster.cpu_quota", "must be between 0 and 1024 cores, got %v", c.Cluster.CPUQuota)
	}
	seen := map[uint64]bool{}
	for i, r := range c.Cluster.Replicas {
		if r.ID == 0 {
			return badIn(i, "cluster.replica.id", "must be 1 or more")
		}
		if seen[r.ID] {
			return badIn(i, "cluster.replica.id", "%d appears twice", r.ID)
		}
		seen[r.ID] = true
		for _, f := range []struct{ field, addr string }{{"peer", r.Peer}, {"listen", r.Listen}, {"admin", r.Admin}} {
			if err := checkHostPort(f.addr); err != nil {
				return badIn(i, "cluster.replica."+f.field, "replica %d: %v", r.ID, err)
			}
		}
	}
	if c.Log.TickMS < 1 {
		return bad("log.tick_ms", "must be at least 1, got %d", c.Log.TickMS)
	}
	if c.Log.HeartbeatTicks < 1 || c.Log.ElectionTicks <= c.Log.HeartbeatTicks {
		return bad("log.election_ticks", "must exceed heartbeat_ticks (%d), got %d", c.Log.HeartbeatTicks, c.Log.ElectionTicks)
	}
	if len(c.Server.Start) == 0 {
		return bad("server.start", "a command line to start the server is required")
	}
	if err := checkHostPort(c.Server.Listen); err != nil {
		return bad("server.listen", "%v", err)
	}
	if !stopSignals[c.Server.StopSignal] {
		return bad("server.stop_signal", "%q is not one of TERM, INT, QUIT, HUP, KILL, USR1, USR2, WINCH", c.Server.StopSignal)
	}
	if c.Server.StopTimeoutMS < 0 {
		return bad("server.stop_timeout_ms", "must be positive, got %d", c.Server.StopTimeoutMS)
	}
	if c.Server.Health.HTTP != "" && !strings.HasPrefix(c.Server.Health.HTTP, "/") {
		return bad("server.health.http", "%q must be a path starting with /", c.Server.Health.HTTP)
	}
	for i := range c.Output.Mask {
		m := &c.Output.Mask[i]
		switch {
		case m.Length < 0 || m.Offset < 0:
			return badIn(i, "output.mask.offset", "offset and length must not be negative, got %d and %d", m.Offset, m.Length)
		case m.Length > 0 && (m.Pattern != "" || m.Replace != ""):
			return badIn(i, "output.mask.length", "a mask is either a pattern or a byte range (offset, length), not both")
		case m.Length > 0:
			continue
		case m.Offset > 0:
			return badIn(i, "output.mask.length", "a byte range needs a length")
		case m.Pattern == "":
			return badIn(i, "output.mask.pattern", "a mask needs a pattern or a byte range (offset, length)")
		}
		re, err := regexp.Compile(m.Pattern)
		if err != nil {
			return badIn(i, "output.mask.pattern", "%v", err)
		}
		m.Re = re
	}
	if c.Checkpoint.Keep < 1 {
		return bad("checkpoint.keep", "must be at least 1, got %d", c.Checkpoint.Keep)
	}
	if c.Checkpoint.Enabled && !c.Checkpoint.UseContainer() {
		return bad("checkpoint.container", "checkpoints need the server in a container")
	}
	if c.Checkpoint.EveryEntries != 0 && c.Checkpoint.EveryEntries < 10 {
		return bad("checkpoint.every_entries", "must be 0 (on demand) or at least 10, got %d", c.Checkpoint.EveryEntries)
	}
	if !filepath.IsAbs(c.Checkpoint.DataDir) || filepath.Clean(c.Checkpoint.DataDir) == "/" {
		return bad("checkpoint.data_dir", "%q must be an absolute path below /", c.Checkpoint.DataDir)
	}
	if !sizeRe.MatchString(c.Checkpoint.DataSize) {
		return bad("checkpoint.data_size", "%q is not a tmpfs size such as 512m or 2g", c.Checkpoint.DataSize)
	}
	switch c.Client.Parser {
	case "", "ab", "sysbench", "exit":
	default:
		return bad("client.parser", "%q is not one of ab, sysbench, exit", c.Client.Parser)
	}
	return nil
}

var stopSignals = map[string]bool{"TERM": true, "INT": true, "QUIT": true, "HUP": true, "KILL": true,
	"USR1": true, "USR2": true, "WINCH": true}

func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("%q: port must be a number from 0 to 65535", addr)
	}
	return nil
}

// StopTimeout is the grace period as a duration.
func (s Server) StopTimeout() time.Duration { return time.Duration(s.StopTimeoutMS) * time.Millisecond }

// ReplicaByID finds a configured replica.
func (c *Config) ReplicaByID(id uint64) (Replica, error) {
	for _, r := range c.Cluster.Replicas {
		if r.ID == id {
			return r, nil
		}
	}
	return Replica{}, fmt.Errorf("config %s: no [[cluster.replica]] with id %d", c.Name, id)
}

// AppDir is the folder of the application's files (apps/<app>).
func (c *Config) AppDir() string {
	if c.Server.App == "" {
		return ""
	}
	if filepath.IsAbs(c.Server.App) {
		return c.Server.App
	}
	return filepath.Join(filepath.Dir(c.Dir), "apps", c.Server.App)
}

// The lines of keys come from a small scan of the file for table headers,
// not from the TOML library: BurntSushi/toml (v1.6.0) keeps key positions
// in an unexported map keyed by the dotted key without the block of an
// array of tables (a key repeated in [[x]] blocks keeps only the position
// of its last block), and gives them out only in the text of its errors.
// The scan is a best effort for messages: it knows [headers], [[headers]],
// key = value lines, dotted keys and multi-line strings, not keys set
// through inline tables.

// section is one table of a file: the top level, or a [header] or
// [[header]] and its key lines up to the next header.
type section struct {
	name   []string
	blocks map[string]int // block (1-based) of each array of tables that is it or encloses it
	header int            // line of the header (1-based; 0 for the top level)
	body   []int          // indices into lines of its key = value lines
}

type layout struct {
	lines    []string
	sections []section
	arrays   map[string]bool // dotted names of the arrays of tables
}

var headerRe = regexp.MustCompile(`^(\[\[?)\s*([^\[\]#]*?)\s*(\]\]?)\s*(#.*)?$`)

func scanLayout(raw []byte) *layout {
	lay := &layout{lines: strings.Split(string(raw), "\n"), arrays: map[string]bool{}}
	lay.sections = []section{{}}
	count := map[string]int{} // blocks seen so far of each array of tables
	inString := ""            // delimiter of the multi-line string being read
	for i, l := range lay.lines {
		t := strings.TrimSpace(l)
		if inString != "" {
			if strings.Count(t, inString)%2 == 1 {
				inString = ""
			}
			continue
		}
		if m := headerRe.FindStringSubmatch(t); m != nil && len(m[1]) == len(m[3]) {
			s := section{name: splitKey(m[2]), header: i + 1, blocks: map[string]int{}}
			if m[1] == "[[" {
				full := strings.Join(s.name, ".")
				lay.arrays[full] = true
				count[full]++
			}
			for n := 1; n <= len(s.name); n++ {
				if p := strings.Join(s.name[:n], "."); lay.arrays[p] {
					s.blocks[p] = count[p]
				}
			}
			lay.sections = append(lay.sections, s)
			continue
		}
		_, v, ok := strings.Cut(t, "=")
		if !ok || strings.HasPrefix(t, "#") {
			continue
		}
		cur := &lay.sections[len(lay.sections)-1]
		cur.body = append(cur.body, i)
		for _, d := range []string{`"""`, `'''`} {
			if strings.Count(v, d)%2 == 1 {
				inString = d
			}
		}
	}
	return lay
}

// splitKey splits a dotted key or table name into its parts, unquoted.
func splitKey(s string) []string {
	var parts []string
	var b strings.Builder
	quote := rune(0)
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			b.WriteRune(r)
		case r == '"' || r == '\'':
			quote = r
		case r == '.':
			parts = append(parts, b.String())
			b.Reset()
		case r != ' ' && r != '\t':
			b.WriteRune(r)
		}
	}
	return append(parts, b.String())
}

// arrayOf is the innermost array of tables in the file whose blocks hold
// key (a proper prefix of it), or nil.
func (lay *layout) arrayOf(key []string) []string {
	for n := len(key) - 1; n > 0; n-- {
		if lay.arrays[strings.Join(key[:n], ".")] {
			return key[:n]
		}
	}
	return nil
}

// line is the line where key is set or, for a table, its header. With
// elem > 0 the key is looked up only in block elem of the array of tables
// holding it, and that block's header is the answer when the key is
// absent from it. 0: not found.
func (lay *layout) line(key []string, elem int) int {
	arr := ""
	if a := lay.arrayOf(key); a != nil && elem > 0 {
		arr = strings.Join(a, ".")
	}
	for _, s := range lay.sections {
		if arr != "" && s.blocks[arr] != elem || !hasPrefix(key, s.name) {
			continue
		}
		if len(s.name) == len(key) {
			return s.header
		}
		rest := key[len(s.name):]
		for _, i := range s.body {
			k, _, _ := strings.Cut(strings.TrimSpace(lay.lines[i]), "=")
			if slices.Equal(splitKey(k), rest) {
				return i + 1
			}
		}
	}
	// Not set: the header of the block of the array of tables it belongs
	// in, or of a table defined only through its subtables.
	for _, s := range lay.sections {
		switch {
		case arr != "":
			if s.blocks[arr] == elem && strings.Join(s.name, ".") == arr {
				return s.header
			}
		case s.header > 0 && hasPrefix(s.name, key):
			return s.header
		}
	}
	return 0
}

func hasPrefix(key, prefix []string) bool {
	return len(prefix) <= len(key) && slices.Equal(key[:len(prefix)], prefix)
}
