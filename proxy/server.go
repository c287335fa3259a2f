package proxy

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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"lockstep/container"
)

// Server is one running copy of the replicated server, as the proxy sees
// it. container.StartServer's servers satisfy it through a small adapter.
type Server interface {
	// Addr is where the feeder connects (host:port).
	Addr() string
	// Stop ends the server and waits for it.
	Stop() error
	// Exited is closed when the server has exited, for whatever reason.
	Exited() <-chan struct{}
}

// StartServerFunc starts the replica's copy of the server, from clean data,
// and returns once it accepts connections.
type StartServerFunc func(ctx context.Context) (Server, error)

// ExecOptions run a server as a plain process: the stand-in until servers
// run in containers.
type ExecOptions struct {
	Args []string
	Dir  string
	Env  []string // added to the environment
	// Addr is where the server listens.
	Addr string
	// HealthHTTP, if set, is a path that must answer an HTTP GET; else a
	// TCP connect is enough.
	HealthHTTP string
	// HealthListen: ready once a socket listens on Addr (under
	// joint_sched, which keeps a check's connection; container.Listening).
	HealthListen  bool
	HealthTimeout time.Duration // default 10s
	StopSignal    syscall.Signal
	// PIDFile, if set, records the process group so that a restarted
	// replica can kill a server its previous incarnation left behind
	// (KillLeftover).
	PIDFile string
	Stdout  io.Writer
	Stderr  io.Writer
}

// ExecServer is a server run by StartExec.
type ExecServer struct {
	o      ExecOptions
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
	once   sync.Once
	serr   error
}

// StartExec starts the server in its own process group and waits until it
// is healthy.
func StartExec(ctx context.Context, o ExecOptions) (*ExecServer, error) {
	if len(o.Args) == 0 {
		return nil, errors.New("proxy: no server command")
	}
	if o.HealthTimeout <= 0 {
		o.HealthTimeout = 10 * time.Second
	}
	if o.StopSignal == 0 {
		o.StopSignal = syscall.SIGTERM
	}
	cmd := exec.Command(o.Args[0], o.Args[1:]...)
	cmd.Dir = o.Dir
	cmd.Env = append(os.Environ(), o.Env...)
	cmd.Stdout, cmd.Stderr = o.Stdout, o.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("proxy: starting server: %w", err)
	}
	s := &ExecServer{o: o, cmd: cmd, exited: make(chan struct{})}
	if o.PIDFile != "" {
		_ = os.WriteFile(o.PIDFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"+o.Args[0]+"\n"), 0o644)
	}
	go func() {
		s.err = cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitHealthy(ctx); err != nil {
		_ = s.Stop()
		return nil, err
	}
	return s, nil
}

// probeReady checks once whether the server at addr is ready: it listens
// (listenOnly: no connection is made, for a server under joint_sched,
// whose runtime would keep it), answers GET path with a status below 500,
// or, with no path, takes a TCP connection.
func probeReady(ctx context.Context, client *http.Client, addr, path string, listenOnly bool) error {
	switch {
	case listenOnly:
		ok, err := container.Listening(addr)
		if err == nil && !ok {
			err = errors.New("not listening")
		}
		return err
	case path != "":
		req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	default:
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}
}

func (s *ExecServer) waitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.o.HealthTimeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	for {
		err := probeReady(ctx, client, s.o.Addr, s.o.HealthHTTP, s.o.HealthListen)
		if err == nil {
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("proxy: server %s exited before it was healthy: %v", s.o.Args[0], s.err)
		case <-ctx.Done():
			return fmt.Errorf("proxy: server %s not healthy at %s: %v", s.o.Args[0], s.o.Addr, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Addr implements Server.
func (s *ExecServer) Addr() string { return s.o.Addr }

// Exited implements Server.
func (s *ExecServer) Exited() <-chan struct{} { return s.exited }

// Pid is the server's process (and process group) id.
func (s *ExecServer) Pid() int { return s.cmd.Process.Pid }

// Stop implements Server: the stop signal to the process group, then
// SIGKILL after 10s.
func (s *ExecServer) Stop() error {
	s.once.Do(func() {
		pid := s.cmd.Process.Pid
		_ = syscall.Kill(-pid, s.o.StopSignal)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-s.exited
		}
		// Whatever of the group is left (a daemon's children).
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if s.o.PIDFile != "" {
			_ = os.Remove(s.o.PIDFile)
		}
	})
	return s.serr
}

// KillLeftover kills the process group recorded in pidFile by an earlier
// StartExec, if it still runs the same program, and removes the file.
func KillLeftover(pidFile string) error {
	raw, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	lines := strings.SplitN(strings.TrimSpace(string(raw)), "\n", 2)
	pid, err := strconv.Atoi(strings.TrimSpace(lines[0]))
	if err != nil || pid <= 1 {
		return os.Remove(pidFile)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err == nil && len(lines) == 2 {
		arg0, _, _ := bytes.Cut(cmdline, []byte{0})
		if filepath.Base(string(arg0)) == filepath.Base(strings.TrimSpace(lines[1])) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	return os.Remove(pidFile)
}
