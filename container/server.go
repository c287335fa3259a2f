package container

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"lockstep/configs"
)

// ServerLog is the file, in the server's directory, that receives its
// stdout and stderr.
const ServerLog = "server.log"

// DefaultStopTimeout is how long Stop waits after the stop signal before
// it kills the server's process group.
const DefaultStopTimeout = 10 * time.Second

// ServerOptions says how to run one copy of an unmodified server.
type ServerOptions struct {
	// Config is the [server] section of the app's TOML.
	Config configs.Server
	// AppDir holds the files to render (apps/<app>); empty renders nothing.
	AppDir string
	// Dir is this copy's own directory (created if missing). Servers that
	// drop privileges (Apache's children run as www-data) need it and its
	// parents to be world-searchable.
	Dir string
	// Name of this copy, {{.Name}} in templates (default: base of Dir).
	Name string
	// Host and Port override Config.Listen.
	Host string
	Port int
	// Env is added (KEY=VALUE) after the process's environment and
	// Config.Env; later entries win.
	Env []string
	// Command makes the command (default exec.Command); Cluster.Place sets
	// it to run inside a cluster host. The command gets Dir, Env, output
	// and its own process group from StartServer.
	Command func(name string, args ...string) *exec.Cmd
	// Dial reaches the server for health checks (default: from here).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// HealthListen: the server is ready once a socket of this network
	// namespace listens on its address (Listening), whatever Config.Health
	// says; for a server under joint_sched, which must not be connected
	// to outside the log.
	HealthListen bool
	// StopTimeout is the grace period of Stop (default DefaultStopTimeout).
	StopTimeout time.Duration
	Logger      logrus.FieldLogger
}

// Server is one running copy.
type Server struct {
	name, dir, addr string
	log             logrus.FieldLogger
	cmd             *exec.Cmd
	logFile         *os.File
	logStart        int64
	stopSig         syscall.Signal
	grace           time.Duration

	exited   chan struct{}
	exitErr  error // valid once exited is closed
	ready    atomic.Bool
	stopping atomic.Bool
	stopOnce sync.Once
	stopErr  error
}

// StartServer renders the app folder into Dir, starts Config.Start there
// in a process group of its own and waits until the health check passes.
// ctx bounds the start-up only: once StartServer has returned, the server
// runs until Stop.
func StartServer(ctx context.Context, o ServerOptions) (*Server, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if len(o.Config.Start) == 0 {
		return nil, errors.New("container: server has no start command")
	}
	if o.Dir == "" {
		return nil, errors.New("container: server needs a directory")
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	name := o.Name
	if name == "" {
		name = filepath.Base(dir)
	}
	host, port, err := listenAddr(o)
	if err != nil {
		return nil, err
	}
	sig, err := parseSignal(o.Config.StopSignal)
	if err != nil {
		return nil, fmt.Errorf("container: server.stop_signal: %w", err)
	}
	log := o.Logger
	if log == nil {
		log = logrus.StandardLogger()
	}
	log = log.WithFields(logrus.Fields{"server": name, "dir": dir})

	env, lookup := serverEnv(o)
	data := newTemplateData(dir, name, host, port)
	funcs := templateFuncs(lookup)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if o.AppDir != "" {
		if err := renderDir(o.AppDir, dir, data, funcs); err != nil {
			return nil, fmt.Errorf("container: %w", err)
		}
	}
	if blocked := notSearchable(dir); blocked != "" {
		log.Debugf("container: %s is not searchable by other users; a server that drops privileges cannot read its files", blocked)
	}
	args := make([]string, len(o.Config.Start))
	for i, a := range o.Config.Start {
		if args[i], err = renderString("start", a, data, funcs); err != nil {
			return nil, fmt.Errorf("container: server.start[%d]: %w", i, err)
		}
	}

	logPath := filepath.Join(dir, ServerLog)
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	fmt.Fprintf(lf, "--- lockstep %s: starting %q\n", time.Now().Format(time.RFC3339), args)
	start, _ := lf.Seek(0, io.SeekEnd)

	newCmd := o.Command
	if newCmd == nil {
		newCmd = exec.Command
	}
	cmd := newCmd(args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Env = env
	deferPreload(cmd)
	cmd.Stdin = nil
	cmd.Stdout = lf
	cmd.Stderr = lf
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Its own group, so that Stop reaches the children too (Apache's).
	cmd.SysProcAttr.Setpgid = true

	s := &Server{
		name: name, dir: dir, addr: data.Addr, log: log, cmd: cmd,
		logFile: lf, logStart: start, stopSig: sig, grace: o.StopTimeout,
		exited: make(chan struct{}),
	}
	if s.grace <= 0 {
		s.grace = o.Config.StopTimeout()
	}
	if s.grace <= 0 {
		s.grace = DefaultStopTimeout
	}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("container: starting %s: %w", name, err)
	}
	go s.wait()
	log.WithFields(logrus.Fields{"pid": cmd.Process.Pid, "addr": s.addr}).Debug("container: server started")

	dial := o.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	if err := s.waitHealthy(ctx, o.Config.Health, dial, o.HealthListen); err != nil {
		tail := s.LogTail()
		_ = s.Stop()
		return nil, fmt.Errorf("container: server %s (%s) failed its health check: %w\n--- tail of %s:\n%s", name, s.addr, err, logPath, tail)
	}
	s.ready.Store(true)
	log.WithField("addr", s.addr).Info("container: server ready")
	return s, nil
}

func listenAddr(o ServerOptions) (string, int, error) {
	host, port := o.Host, o.Port
	if o.Config.Listen != "" {
		h, p, err := net.SplitHostPort(o.Config.Listen)
		if err != nil {
			return "", 0, fmt.Errorf("container: server.listen: %w", err)
		}
		if host == "" {
			host = h
		}
		if port == 0 {
			if port, err = strconv.Atoi(p); err != nil {
				return "", 0, fmt.Errorf("container: server.listen: bad port %q", p)
			}
		}
	}
	if port <= 0 || port > 65535 {
		return "", 0, fmt.Errorf("container: server port %d out of range (set server.listen or ServerOptions.Port)", port)
	}
	return host, port, nil
}

// serverEnv is the process environment plus Config.Env (sorted, for a
// stable order) plus o.Env, and a lookup with the same precedence.
func serverEnv(o ServerOptions) ([]string, func(string) (string, bool)) {
	env := os.Environ()
	keys := make([]string, 0, len(o.Config.Env))
	for k := range o.Config.Env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		env = append(env, k+"="+o.Config.Env[k])
	}
	env = append(env, o.Env...)
	lookup := func(key string) (string, bool) {
		for i := len(o.Env) - 1; i >= 0; i-- {
			if k, v, ok := strings.Cut(o.Env[i], "="); ok && k == key {
				return v, true
			}
		}
		if v, ok := o.Config.Env[key]; ok {
			return v, true
		}
		return os.LookupEnv(key)
	}
	return env, lookup
}

// parseSignal accepts TERM, SIGTERM, term or a number.
func parseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return syscall.SIGTERM, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %d out of range", n)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

// notSearchable returns the first of dir and its parents that others may
// not enter, or "".
func notSearchable(dir string) string {
	for d := dir; ; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 {
			return d
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}

func (s *Server) wait() {
	err := s.cmd.Wait()
	s.exitErr = err
	close(s.exited)
	// An exit during start-up is StartServer's error to report.
	if s.ready.Load() && !s.stopping.Load() {
		s.log.WithError(err).WithField("log_tail", s.LogTail()).Error("container: server exited unexpectedly")
	}
}

func (s *Server) waitHealthy(ctx context.Context, h configs.Health, dial func(context.Context, string, string) (net.Conn, error), listenOnly bool) error {
	timeout := h.Timeout()
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var client *http.Client
	if h.HTTP != "" {
		client = &http.Client{
			// Proxy stays nil: an HTTP_PROXY in the environment must not
			// send the check elsewhere.
			Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
			// A redirect is an answer: the server is up.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		defer client.CloseIdleConnections()
	}
	for {
		err := s.check(ctx, h.HTTP, dial, client, listenOnly)
		if err == nil {
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("it exited during start-up (%v)", s.exitErr)
		case <-ctx.Done():
			return fmt.Errorf("not healthy within %v: %w", timeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (s *Server) check(ctx context.Context, path string, dial func(context.Context, string, string) (net.Conn, error), client *http.Client, listenOnly bool) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if listenOnly {
		// ServerOptions.HealthListen
		if ok, err := Listening(s.addr); err != nil || !ok {
			return fmt.Errorf("not listening at %s (%v)", s.addr, err)
		}
		return nil
	}
	if path == "" {
		conn, err := dial(ctx, "tcp", s.addr)
		if err != nil {
			return err
		}
		return conn.Close()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return nil
}

// Stop sends the stop signal to the server's process group, waits for the
// server to exit and kills the group after the grace period. A server that
// had already exited on its own is reported as an error.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		s.stopErr = s.stop()
		s.logFile.Close()
	})
	return s.stopErr
}

func (s *Server) stop() error {
	s.stopping.Store(true)
	pgid := s.cmd.Process.Pid
	select {
	case <-s.exited:
		s.killGroup(pgid)
		return fmt.Errorf("container: server %s had already exited: %v", s.name, s.exitErr)
	default:
	}
	if err := syscall.Kill(-pgid, s.stopSig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("container: signalling server %s: %w", s.name, err)
	}
	t := time.NewTimer(s.grace)
	defer t.Stop()
	killed := false
	select {
	case <-s.exited:
	case <-t.C:
		s.log.Warnf("container: server did not stop within %v after %v; killing it", s.grace, s.stopSig)
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-s.exited
		killed = true
	}
	// Children that outlive their parent would keep ports and files busy.
	s.killGroup(pgid)
	switch {
	case killed:
		return fmt.Errorf("container: server %s ignored %v for %v and was killed", s.name, s.stopSig, s.grace)
	case s.exitErr == nil:
		return nil
	}
	var ee *exec.ExitError
	if errors.As(s.exitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == s.stopSig {
			return nil
		}
	}
	return fmt.Errorf("container: server %s stopped with %w", s.name, s.exitErr)
}

// killGroup kills what is left of the group and waits for it to go.
func (s *Server) killGroup(pgid int) {
	deadline := time.Now().Add(2 * time.Second)
	for syscall.Kill(-pgid, syscall.SIGKILL) == nil {
		if time.Now().After(deadline) {
			s.log.Warnf("container: process group %d survives SIGKILL", pgid)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Wait blocks until the server exits and returns how it exited.
func (s *Server) Wait() error {
	<-s.exited
	return s.exitErr
}

// Exited is closed when the server's process has exited, expectedly (Stop)
// or not; Wait then tells how.
func (s *Server) Exited() <-chan struct{} { return s.exited }

// Pid is the server's main process (also its process group).
func (s *Server) Pid() int { return s.cmd.Process.Pid }

// Addr is where the server is reached (host:port).
func (s *Server) Addr() string { return s.addr }

// Dir is this copy's directory.
func (s *Server) Dir() string { return s.dir }

// Name is this copy's name.
func (s *Server) Name() string { return s.name }

// LogTail is the end (at most 20 lines) of what the server wrote to
// server.log since this start.
func (s *Server) LogTail() string {
	const maxBytes = 4096
	f, err := os.Open(filepath.Join(s.dir, ServerLog))
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	from := max(s.logStart, fi.Size()-maxBytes)
	if from >= fi.Size() {
		return "(empty)"
	}
	buf := make([]byte, fi.Size()-from)
	n, _ := f.ReadAt(buf, from)
	lines := strings.Split(strings.TrimRight(string(bytes.ToValidUTF8(buf[:n], []byte("?"))), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	out := strings.Join(lines, "\n")
	if out == "" {
		return "(empty)"
	}
	return out
}
