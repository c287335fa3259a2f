package proxy

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"

	"lockstep/container"
	"lockstep/dmt"
)

// The in-container feeder: the process that runs inside a server's
// container as the parent of the server (init.lxc -> feeder -> server). It
// holds the feeder's end of every server connection (a TCPFeeder), so
// that a CRIU image of the container carries both ends of every
// connection, and the index of the last event it was fed. The replica
// talks to it over an abstract unix socket in the container's network
// namespace (feedwire.go); the replica closes that connection before a
// dump and reconnects after it, or after a restore anywhere.

// FeederProcessEnv, set to 1 in a process's environment, makes any binary
// that links this package (lockstep, or a test binary) run the in-container
// feeder with its arguments instead of its main.
const FeederProcessEnv = "LOCKSTEP_FEEDER_PROCESS"

// FeederSocket is the default abstract unix socket name of the feeder.
const FeederSocket = "lockstep-feeder"

func init() {
	if os.Getenv(FeederProcessEnv) == "1" {
		if err := RunFeederProcess(os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "lockstep feeder: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// RunFeederProcess is the in-container feeder's main: flags, then "--"
// and the server's command line.
func RunFeederProcess(args []string) error {
	fs := flag.NewFlagSet("feeder", flag.ContinueOnError)
	sock := fs.String("socket", FeederSocket, "abstract unix socket to serve the replica on")
	addr := fs.String("server-addr", "127.0.0.1:8080", "where the server listens")
	health := fs.String("health-http", "", "HTTP path the server must answer (else a TCP connect)")
	timeout := fs.Duration("health-timeout", 30*time.Second, "how long the server may take to be ready")
	stopSig := fs.Int("stop-signal", int(syscall.SIGTERM), "signal that stops the server")
	logPath := fs.String("server-log", "", "file for the server's stdout and stderr (default: ours)")
	// A backup may run far behind the log (after a checkpoint, a restore):
	// a client's close reaches its feeder long before its server has read
	// the data before it, and a reset then would drop that data (and make
	// the copy diverge). The grace is counted from the close.
	// The same holds for the data queued before a client's reset.
	grace := fs.Duration("close-grace", 5*time.Minute, "how long a closed client's connection waits for the server to end its output before it is reset, and a reset one for its queued data to be written")
	ownLog := fs.String("log", "", "file (on the host, the same path on every replica) for the feeder's own messages")
	listenOnly := fs.Bool("health-listen", false, "the server is ready once it listens (no connection is made: joint_sched)")
	dmtChan := fs.String("dmt-chan", "", "joint_sched: make the deterministic runtime's shared-memory file here before the server starts, and announce every event in its input channel")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ownLog != "" {
		// LXC gives a daemonized container's init /dev/null.
		if f, err := os.OpenFile(*ownLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644); err == nil {
			_ = syscall.Dup3(int(f.Fd()), 2, 0)
			f.Close()
		}
	}
	argv := fs.Args()
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return errors.New("no server command after --")
	}
	// A container with a network namespace of its own starts with its
	// loopback down.
	if lo, err := netlink.LinkByName("lo"); err == nil && lo.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("setting the loopback up: %w", err)
		}
	}
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)

	if d := os.Getenv("TMPDIR"); d != "" {
		// The server's temporary files (LXCServer puts them in its data
		// directory).
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o1777); err != nil {
			return err
		}
	}
	env := make([]string, 0, len(os.Environ()))
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, FeederProcessEnv+"=") {
			env = append(env, e)
		}
	}
	var ch *dmt.Chan
	if *dmtChan != "" {
		// The server maps the file at its start.
		if err := dmt.CreateChan(*dmtChan); err != nil {
			return err
		}
		var err error
		if ch, err = dmt.OpenChan(*dmtChan); err != nil {
			return err
		}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		cmd.Stdout, cmd.Stderr = f, f
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the server: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fp := &feedProc{log: log, addr: *addr}
	fp.tcp = NewTCPFeeder(TCPFeederOptions{Addr: func() string { return *addr }, Output: fp, Logger: log,
		CloseGrace: *grace, AbortGrace: *grace,
		// Under joint_sched the runtime admits connections in log order
		// itself.
		OrderConnects: ch == nil})
	if ch != nil {
		fp.cf = newChanFeeder(fp.tcp, ch, log)
	}
	stop := func() {
		if fp.cf != nil {
			fp.cf.release() // the server stops without waiting for the log
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.Signal(*stopSig))
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err := waitReady(*addr, *health, *listenOnly, *timeout, exited); err != nil {
		stop()
		if *logPath != "" {
			// The server's own logs beside it (its data directory, a
			// tmpfs gone with the container) tell why it did not start.
			paths := []string{*logPath}
			logs, _ := filepath.Glob(filepath.Join(filepath.Dir(*logPath), "*.log"))
			for _, p := range logs {
				if p != *logPath {
					paths = append(paths, p)
				}
			}
			for _, p := range paths {
				if b, rerr := os.ReadFile(p); rerr == nil && (p == *logPath || len(b) > 0) {
					if len(b) > 4096 {
						b = b[len(b)-4096:]
					}
					err = fmt.Errorf("%w\n--- tail of %s:\n%s", err, p, b)
				}
			}
		}
		return err
	}

	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: "@" + *sock, Net: "unix"})
	if err != nil {
		stop()
		return err
	}
	go fp.acceptLoop(ln)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-exited:
		return fmt.Errorf("the server exited: %v", err)
	case <-sigs:
		stop()
		return nil
	}
}

// acceptDrained waits until the server has taken every connection the
// feeder opened from its listener's accept queue: CRIU cannot image one
// still there. Under joint_sched a connection waits there until the
// runtime admits its CONNECT from the channel, which it does at its own
// pace after the feed stopped.
func acceptDrained(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		n, err := container.AcceptQueue(addr)
		if err != nil || n == 0 {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d connections still wait in the server's accept queue", n)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func waitReady(addr, path string, listenOnly bool, timeout time.Duration, exited <-chan error) error {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: time.Second}
	for {
		err := probeReady(context.Background(), client, addr, path, listenOnly)
		if err == nil {
			return nil
		}
		select {
		case e := <-exited:
			return fmt.Errorf("the server exited before it was ready: %v", e)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the server is not ready at %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// feedProc is the feeder process's state; it is the Output of its
// TCPFeeder and sends the server's output to the attached replica, or
// keeps it while none is attached (across a dump).
type feedProc struct {
	log     logrus.FieldLogger
	addr    string // the server's
	tcp     *TCPFeeder
	cf      *chanFeeder // joint_sched: the channel's side, over tcp
	applied atomic.Uint64

	mu      sync.Mutex
	conn    *net.UnixConn
	w       *frameWriter
	pending []byte // output frames while detached
}

func (fp *feedProc) send(frame []byte) {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	if fp.conn == nil {
		fp.pending = append(fp.pending, frame...)
		return
	}
	if err := fp.w.write(frame); err != nil {
		fp.log.WithError(err).Warn("feeder: writing to the replica")
	}
}

// ServerData implements Output.
func (fp *feedProc) ServerData(conn uint64, b []byte) {
	fp.send(appendFrame(nil, frameOutput, u64(conn), b))
}

// ServerEOF implements Output.
func (fp *feedProc) ServerEOF(conn uint64, err error) {
	kind, msg := byte(0), ""
	switch {
	case err == nil:
	case errors.Is(err, ErrAborted):
		kind = 1
	default:
		kind, msg = 2, err.Error()
	}
	fp.send(appendFrame(nil, frameEOF, u64(conn), []byte{kind}, []byte(msg)))
}

// Delivered implements Output.
func (fp *feedProc) Delivered(conn uint64, n int) {
	fp.send(appendFrame(nil, frameDeliver, u64(conn), u64(uint64(n))))
}

func (fp *feedProc) acceptLoop(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		fp.mu.Lock()
		if fp.conn != nil {
			fp.conn.Close() // a replica that went away without detaching
		}
		fp.conn, fp.w = c, newFrameWriter(c)
		_ = fp.w.write(appendFrame(nil, frameHello, u64(fp.applied.Load())))
		_ = fp.w.write(fp.pending)
		fp.pending = nil
		fp.mu.Unlock()
		go fp.serve(c)
	}
}

// detach drops the replica's connection (if it is still c).
func (fp *feedProc) detach(c *net.UnixConn, ack bool) {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	if fp.conn != c {
		return
	}
	if ack {
		_ = fp.w.write(appendFrame(nil, frameDetached))
	}
	// What is queued is written before the connection is closed.
	fp.w.close()
	fp.conn, fp.w = nil, nil
	c.Close()
}

func (fp *feedProc) serve(c *net.UnixConn) {
	r := bufio.NewReaderSize(c, 256<<10)
	var buf []byte
	for {
		kind, p, nb, err := readFrame(r, buf)
		buf = nb
		if err != nil {
			fp.detach(c, false)
			return
		}
		switch kind {
		case frameEvent:
			index, rest, err := frameU64(p)
			if err != nil {
				fp.detach(c, false)
				return
			}
			ev, err := DecodeEvent(rest)
			if err != nil {
				fp.log.WithError(err).Warnf("feeder: event at %d", index)
				continue
			}
			fp.applied.Store(index)
			if fp.cf != nil {
				fp.cf.feed(Committed{Index: index, Event: ev})
			} else {
				fp.tcp.Feed(Committed{Index: index, Event: ev})
			}
		case frameQuiesce:
			token, rest, err1 := frameU64(p)
			index, _, err2 := frameU64(rest)
			if err1 != nil || err2 != nil {
				fp.detach(c, false)
				return
			}
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				msg := ""
				if err := fp.tcp.Quiesce(ctx, index); err != nil {
					msg = err.Error()
				} else if err := acceptDrained(ctx, fp.addr); err != nil {
					msg = err.Error()
				}
				fp.send(appendFrame(nil, frameQuiesced, u64(token), []byte(msg)))
			}()
		case frameOrder:
			fp.tcp.SetOrderConnects(len(p) == 1 && p[0] == 1) // a no-op under joint_sched
		case frameDetach:
			fp.detach(c, true)
			return
		}
	}
}
