package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netns"

	"lockstep/checkpoint"
	"lockstep/container"
	"lockstep/dmt"
)

// LXCServerOptions describe a server run in an LXC container under the
// in-container feeder (feedproc.go).
type LXCServerOptions struct {
	// Name of the container (LXC name, cgroup lxc.payload.<Name>).
	Name    string
	LXCPath string
	// Command is the server's command line inside the container.
	Command []string
	// Env is the server's environment (KEY=VALUE).
	Env []string
	// SeedDir (on the host) is copied into DataDir (a tmpfs inside the
	// container, in every image) at a fresh start.
	SeedDir  string
	DataDir  string
	DataSize string
	// Addr is where the server listens inside the container's own network
	// namespace (loopback).
	Addr          string
	HealthHTTP    string
	HealthTimeout time.Duration
	StopSignal    syscall.Signal
	// Console receives the container's stdout and stderr. It must exist
	// at the same path wherever an image is restored (default
	// <LXCPath>/console.log).
	Console string
	// Feeder is the binary run as the container's feeder (default: this
	// process's executable, which links this package).
	Feeder string
	// Joint runs the server under the deterministic runtime fed by the
	// log (joint_sched, lxcjoint.go); DMT tunes the runtime (its Shm and
	// Joint are set here) and Bubbles the leader's time bubbles.
	Joint   bool
	DMT     dmt.Options
	Bubbles BubbleOptions
	Logger  logrus.FieldLogger
}

// LXCServer is a server in an LXC container with its own network
// namespace, fed through the in-container feeder. It is both the
// replica's Server and its Feeder. Its container can be checkpointed
// (Checkpoint) and replaced by a restored image (Restore) while the
// replica runs.
type LXCServer struct {
	o   LXCServerOptions
	log logrus.FieldLogger
	out Output

	mu        sync.Mutex
	lxc       *container.LXC
	conn      *net.UnixConn
	w         *frameWriter
	detaching bool
	detachAck chan struct{}
	orderOff  bool // OrderConnects off in the feeder (the replica leads)
	closed    bool
	lastFed   uint64
	feederAt  uint64 // the feeder's applied index at the last attach
	qnext     uint64
	qwait     map[uint64]chan string

	exited   chan struct{}
	exitOnce sync.Once

	joint lxcJoint // joint_sched (lxcjoint.go)
}

// NewLXCServer makes the server; nothing runs until Start or Restore.
func NewLXCServer(o LXCServerOptions) (*LXCServer, error) {
	if o.LXCPath == "" {
		o.LXCPath = container.DefaultLXCPath
	}
	if o.Console == "" {
		o.Console = filepath.Join(o.LXCPath, "console.log")
	}
	if o.HealthTimeout <= 0 {
		o.HealthTimeout = 30 * time.Second
	}
	if o.StopSignal == 0 {
		o.StopSignal = syscall.SIGTERM
	}
	if o.DataSize == "" {
		o.DataSize = "512m"
	}
	if o.Feeder == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		if o.Feeder, err = stableCopy(self, o.LXCPath, "feeder-", ""); err != nil {
			return nil, err
		}
	}
	if o.Joint {
		if err := jointOptions(&o); err != nil {
			return nil, err
		}
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	if len(o.Command) == 0 || o.DataDir == "" || o.Addr == "" {
		return nil, errors.New("proxy: an LXC server needs a command, a data directory and an address")
	}
	return &LXCServer{o: o, log: o.Logger.WithField("container", o.Name), exited: make(chan struct{}),
		qwait: map[uint64]chan string{}}, nil
}

// SetOutput sets where the server's output goes (the replica).
func (s *LXCServer) SetOutput(out Output) { s.out = out }

// Addr implements Server: the server's address inside its container.
func (s *LXCServer) Addr() string { return s.o.Addr }

// Exited implements Server: the container died (not by Stop, Checkpoint
// or Restore).
func (s *LXCServer) Exited() <-chan struct{} { return s.exited }

// InitPid is the container's init (the root of the image).
func (s *LXCServer) InitPid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lxc == nil {
		return 0
	}
	return s.lxc.InitPid()
}

// FeederIndex is the last index the feeder had been fed when the replica
// last attached to it (after a restore: the image's).
func (s *LXCServer) FeederIndex() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.feederAt
}

func (s *LXCServer) dead(why string) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return
	}
	s.exitOnce.Do(func() {
		s.log.Errorf("proxy: the server's container is gone: %s", why)
		close(s.exited)
	})
}

// Start starts a fresh container (killing one an earlier run left under
// the same name) and attaches to its feeder once the server is ready.
func (s *LXCServer) Start(ctx context.Context) error {
	if err := s.stopContainer(); err != nil {
		return err
	}
	_ = container.StopLXCByName(s.o.Name, s.o.LXCPath)
	if err := s.prepareHost(); err != nil {
		return err
	}
	args := []string{s.o.Feeder,
		"-socket", FeederSocket, "-server-addr", s.o.Addr, "-health-http", s.o.HealthHTTP,
		"-health-timeout", s.o.HealthTimeout.String(), "-stop-signal", strconv.Itoa(int(s.o.StopSignal)),
		"-server-log", filepath.Join(s.o.DataDir, "server.log"), "-log", s.o.Console}
	if s.o.Joint {
		args = append(args, "-dmt-chan", s.o.DMT.Shm, "-health-listen")
	}
	args = append(args, "--")
	args = append(args, s.o.Command...)
	env := append([]string{FeederProcessEnv + "=1", "GODEBUG=multipathtcp=0",
		// The deterministic runtime's shared memory (statistics and the
		// input channel) lives in the data directory, so that every image
		// carries it.
		"LOCKSTEP_DMT_SHM=" + filepath.Join(s.o.DataDir, "dmt.shm")}, s.o.Env...)
	if !slices.ContainsFunc(s.o.Env, func(e string) bool { return strings.HasPrefix(e, "TMPDIR=") }) {
		// Temporary files go to the data directory too (the feeder makes
		// it): they are the server's state, which every image must carry,
		// and a /tmp shared with the host and the other replicas'
		// containers, whose processes have the same pids in their own pid
		// namespaces, mixes up files named after a pid (mariadb-install-db
		// of replicas started together fails on them).
		env = append(env, "TMPDIR="+filepath.Join(s.o.DataDir, "tmp"))
	}
	l, err := container.StartLXC(ctx, container.LXCOptions{
		Name: s.o.Name, LXCPath: s.o.LXCPath, Command: args, Env: env,
		DataDir: s.o.DataDir, SeedDir: s.o.SeedDir, DataSize: s.o.DataSize, Output: s.o.Console,
	})
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.lxc = l
	s.mu.Unlock()
	actx, cancel := context.WithTimeout(ctx, s.o.HealthTimeout+10*time.Second)
	defer cancel()
	if err := s.attach(actx); err != nil {
		_ = s.stopContainer()
		return fmt.Errorf("proxy: container %s: %w (see %s)", s.o.Name, err, s.o.Console)
	}
	s.log.Infof("proxy: server ready in container %s (init %d)", s.o.Name, l.InitPid())
	return nil
}

func (s *LXCServer) prepareHost() error {
	if err := os.MkdirAll(s.o.LXCPath, 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(s.o.DataDir, 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(s.o.Console, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// attach connects to the feeder (retrying until ctx ends) and reads its
// hello.
func (s *LXCServer) attach(ctx context.Context) error {
	pid := s.InitPid()
	var c *net.UnixConn
	var err error
	for {
		c, err = dialInNetns(fmt.Sprintf("/proc/%d/ns/net", pid), FeederSocket)
		if err == nil {
			break
		}
		if _, perr := os.Stat(fmt.Sprintf("/proc/%d", pid)); perr != nil {
			return fmt.Errorf("the container's init %d is gone", pid)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no feeder in the container: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	r := bufio.NewReaderSize(c, 256<<10)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	kind, p, buf, err := readFrame(r, nil)
	_ = c.SetReadDeadline(time.Time{})
	if err == nil && kind != frameHello {
		err = fmt.Errorf("first frame %q, want hello", kind)
	}
	var applied uint64
	if err == nil {
		applied, _, err = frameU64(p)
	}
	if err != nil {
		c.Close()
		return fmt.Errorf("feeder hello: %w", err)
	}
	s.mu.Lock()
	s.conn, s.w, s.detaching = c, newFrameWriter(c), false
	s.feederAt = applied
	if s.orderOff {
		// A feeder (a restored image) starts with its own setting.
		_ = s.w.write(orderFrame(false))
	}
	s.mu.Unlock()
	go s.reader(c, r, buf)
	return nil
}

func orderFrame(on bool) []byte {
	b := byte(0)
	if on {
		b = 1
	}
	return appendFrame(nil, frameOrder, []byte{b})
}

// SetOrderConnects switches the in-container feeder's OrderConnects (the
// replica turns it off while it leads). It takes its place among the
// events fed, and is said again to a feeder attached later.
func (s *LXCServer) SetOrderConnects(on bool) {
	s.mu.Lock()
	s.orderOff = !on
	w := s.w
	s.mu.Unlock()
	if w != nil {
		_ = w.write(orderFrame(on))
	}
}

// dialInNetns connects to an abstract unix socket in another network
// namespace.
func dialInNetns(nsPath, name string) (*net.UnixConn, error) {
	type result struct {
		c   *net.UnixConn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- result{err: err}
			return // the thread ends with the goroutine
		}
		defer orig.Close()
		ns, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: "@" + name, Net: "unix"})
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func (s *LXCServer) reader(c *net.UnixConn, r *bufio.Reader, buf []byte) {
	for {
		kind, p, nb, err := readFrame(r, buf)
		buf = nb
		if err != nil {
			s.mu.Lock()
			expected := s.conn != c || s.detaching || s.closed
			if s.conn == c {
				s.w.shut()
				s.conn, s.w = nil, nil
			}
			for t, ch := range s.qwait {
				ch <- "the feeder connection closed"
				delete(s.qwait, t)
			}
			s.mu.Unlock()
			c.Close()
			if !expected {
				s.dead(fmt.Sprintf("feeder connection: %v", err))
			}
			return
		}
		switch kind {
		case frameOutput:
			if conn, rest, err := frameU64(p); err == nil && s.out != nil {
				s.out.ServerData(conn, rest)
			}
		case frameEOF:
			conn, rest, err := frameU64(p)
			if err != nil || len(rest) < 1 || s.out == nil {
				continue
			}
			var e error
			switch rest[0] {
			case 1:
				e = ErrAborted
			case 2:
				e = errors.New(string(rest[1:]))
			}
			s.out.ServerEOF(conn, e)
		case frameDeliver:
			conn, rest, err1 := frameU64(p)
			n, _, err2 := frameU64(rest)
			if err1 == nil && err2 == nil && s.out != nil {
				s.out.Delivered(conn, int(n))
			}
		case frameQuiesced:
			token, rest, err := frameU64(p)
			if err != nil {
				continue
			}
			s.mu.Lock()
			if ch := s.qwait[token]; ch != nil {
				ch <- string(rest)
				delete(s.qwait, token)
			}
			s.mu.Unlock()
		case frameDetached:
			s.mu.Lock()
			if s.detachAck != nil {
				close(s.detachAck)
				s.detachAck = nil
			}
			s.mu.Unlock()
		}
	}
}

// write sends a frame to the feeder (the caller holds s.mu).
func (s *LXCServer) writeLocked(frame []byte) error {
	if s.conn == nil {
		return errors.New("proxy: not attached to the feeder")
	}
	return s.w.write(frame)
}

// Feed implements Feeder.
func (s *LXCServer) Feed(c Committed) {
	if s.o.Joint {
		s.feedJoint(c)
		return
	}
	s.feed(c)
}

func (s *LXCServer) feed(c Committed) {
	frame := appendFrame(make([]byte, 0, 32+len(c.Data)), frameEvent, u64(c.Index), EncodeEvent(c.Event))
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	if c.Index > s.lastFed {
		s.lastFed = c.Index
	}
	w := s.w
	s.mu.Unlock()
	err := errors.New("proxy: not attached to the feeder")
	if w != nil {
		// Memory bound: the feeder holds up to its own budget; beyond,
		// the apply loop waits here (never holding a lock).
		err = w.writeMax(frame, feedQueueMax)
	}
	if err != nil {
		s.log.WithError(err).Errorf("proxy: feeding index %d", c.Index)
		go s.dead(err.Error())
	}
}

// feedQueueMax bounds the bytes queued toward the in-container feeder.
const feedQueueMax = 64 << 20

// Quiesce implements Feeder.
func (s *LXCServer) Quiesce(ctx context.Context, index uint64) error {
	s.mu.Lock()
	if s.lastFed > index {
		s.mu.Unlock()
		return fmt.Errorf("proxy: feeder already fed index %d, beyond %d", s.lastFed, index)
	}
	s.qnext++
	token := s.qnext
	ch := make(chan string, 1)
	s.qwait[token] = ch
	err := s.writeLocked(appendFrame(nil, frameQuiesce, u64(token), u64(index)))
	if err != nil {
		delete(s.qwait, token)
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case msg := <-ch:
		if msg != "" {
			return errors.New(msg)
		}
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.qwait, token)
		s.mu.Unlock()
		return ctx.Err()
	}
}

// detach closes the connection to the feeder cleanly: no socket between
// the replica and the container is left for a dump.
func (s *LXCServer) detach(ctx context.Context) error {
	s.mu.Lock()
	if s.conn == nil {
		s.mu.Unlock()
		return nil
	}
	ack := make(chan struct{})
	s.detachAck, s.detaching = ack, true
	c := s.conn
	err := s.writeLocked(appendFrame(nil, frameDetach))
	s.mu.Unlock()
	if err == nil {
		select {
		case <-ack:
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(10 * time.Second):
			err = errors.New("proxy: the feeder did not detach")
		}
	}
	s.mu.Lock()
	if s.conn == c {
		s.w.shut()
		s.conn, s.w = nil, nil
	}
	s.mu.Unlock()
	c.Close()
	return err
}

// CheckpointStats describe one checkpoint of the container.
type CheckpointStats struct {
	checkpoint.Stats
	// Detach is the time to detach from the feeder; Attach to reconnect
	// after the dump. The server itself is paused for Stats.Pause only.
	Detach, Attach time.Duration
}

// Checkpoint dumps the running container into imagesDir and lets it run
// on. The caller has quiesced the replica (nothing is fed meanwhile).
func (s *LXCServer) Checkpoint(ctx context.Context, imagesDir string) (CheckpointStats, error) {
	var st CheckpointStats
	t0 := time.Now()
	if err := s.detach(ctx); err != nil {
		return st, err
	}
	st.Detach = time.Since(t0)
	pid := s.InitPid()
	ds, derr := dumpContainer(ctx, s, pid, imagesDir)
	st.Stats = ds
	t1 := time.Now()
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.attach(actx); err != nil {
		s.dead(fmt.Sprintf("reattaching after the dump: %v", err))
		return st, errors.Join(derr, err)
	}
	st.Attach = time.Since(t1)
	return st, derr
}

// Restore replaces the container by the image in imagesDir and attaches
// to the restored feeder. The replica must not feed meanwhile.
func (s *LXCServer) Restore(ctx context.Context, imagesDir string) (checkpoint.Stats, error) {
	if err := s.stopContainer(); err != nil {
		return checkpoint.Stats{}, err
	}
	_ = container.StopLXCByName(s.o.Name, s.o.LXCPath)
	if err := s.prepareHost(); err != nil {
		return checkpoint.Stats{}, err
	}
	st, err := restoreContainer(ctx, s, imagesDir)
	if err != nil {
		return st, err
	}
	l, err := container.AdoptRestoredLXC(s.o.Name, s.o.LXCPath, st.Pid)
	if err != nil {
		return st, err
	}
	s.mu.Lock()
	s.lxc = l
	s.lastFed = 0
	s.mu.Unlock()
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.attach(actx); err != nil {
		_ = s.stopContainer()
		return st, fmt.Errorf("proxy: restored container: %w", err)
	}
	return st, nil
}

// stopContainer stops the current container, if any, without reporting
// it as an exit.
func (s *LXCServer) stopContainer() error {
	s.dropChan()
	s.mu.Lock()
	l := s.lxc
	c := s.conn
	if s.w != nil {
		s.w.shut()
	}
	s.lxc, s.conn, s.w = nil, nil, nil
	s.detaching = true
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
	if l == nil {
		return nil
	}
	return l.Stop(15 * time.Second)
}

// Close implements Feeder: the connection to the feeder is dropped.
func (s *LXCServer) Close() error {
	s.stopJoint()
	s.mu.Lock()
	s.closed = true
	c := s.conn
	if s.w != nil {
		s.w.shut()
	}
	s.conn, s.w = nil, nil
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
	return nil
}

// Stop implements Server: the container is killed.
func (s *LXCServer) Stop() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return s.stopContainer()
}

// stableCopy copies a file the container runs (the feeder's binary, the
// runtime's library) to a path named after its content (<dir>/<prefix>
// <sha256 prefix><suffix>): an image refers to it by path, so the file
// must neither change under a running container (CRIU cannot dump a
// process whose executable or mapped library was replaced) nor differ
// where the image is restored (the same file gets the same path on every
// replica).
func stableCopy(path, dir, prefix, suffix string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, prefix+hex.EncodeToString(h.Sum(nil))[:16]+suffix)
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, "."+prefix+"*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		tmp.Close()
		return "", err
	}
	if _, err := io.Copy(tmp, f); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	return dst, os.Rename(tmp.Name(), dst)
}
