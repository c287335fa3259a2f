package proxy

import (
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"

	"lockstep/dmt"
)

// joint_sched in a container: the in-container feeder (feedproc.go,
// -dmt-chan) makes the runtime's shared-memory file in the container's
// data directory, so that every image carries the channel with the
// runtime, and announces every event in it (a chanFeeder, whose
// connection ids are then part of the image too). The replica keeps the
// leader's half, the bubbler, which watches the channel through the
// container's root (/proc/<init>/root), mapped anew for each container.
type lxcJoint struct {
	bubbler atomic.Pointer[bubbler]
	started sync.Once
	inputs  atomic.Uint64 // inputs (not bubbles) fed

	// ch maps the current container's channel (nil: none yet). Readers
	// hold chmu shared; a new container unmaps it holding chmu: the
	// mapping pins the container's whole data tmpfs.
	chmu sync.RWMutex
	ch   *dmt.Chan
}

// jointOptions completes o for joint_sched: the runtime's library in a
// stable place, its environment and channel file.
func jointOptions(o *LXCServerOptions) error {
	lib := o.DMT.Library
	if lib == "" {
		var err error
		if lib, err = dmt.Library(); err != nil {
			return err
		}
	}
	var err error
	if o.DMT.Library, err = stableCopy(lib, o.LXCPath, "dmt-", ".so"); err != nil {
		return err
	}
	o.DMT.Shm = filepath.Join(o.DataDir, "dmt.shm")
	o.DMT.Joint = true
	env, err := dmt.Env(o.DMT)
	if err != nil {
		return err
	}
	o.Env = dmt.MergeEnv(o.Env, env)
	// A request of an HTTP health check would never be admitted (it is
	// not in the log): a TCP connect is all the server can be asked.
	o.HealthHTTP = ""
	return nil
}

// ShmPath is where the replica reads the runtime's statistics file of the
// current container ("" while there is none, or without joint_sched).
func (s *LXCServer) ShmPath() string {
	pid := s.InitPid()
	if pid <= 0 || s.o.DMT.Shm == "" {
		return ""
	}
	return fmt.Sprintf("/proc/%d/root%s", pid, s.o.DMT.Shm)
}

func (s *LXCServer) feedJoint(c Committed) {
	j := &s.joint
	j.started.Do(func() {
		// The apply loop runs after the replica's log started: the
		// bubbler may use it from now on.
		if r, ok := s.out.(*Replica); ok {
			j.bubbler.Store(startBubbler(r, s, s.o.Bubbles))
		}
	})
	switch c.Type {
	case Connect, Data, Shutdown, Close, ServerClose:
		j.inputs.Add(1)
	}
	if c.Type != Bubble {
		s.feed(c)
		return
	}
	var seen uint32
	s.withChan(func(ch *dmt.Chan) { seen = ch.StarveCount() })
	s.feed(c)
	if b := j.bubbler.Load(); b != nil {
		b.fed(seen)
	}
}

func (s *LXCServer) inputsFed() uint64 { return s.joint.inputs.Load() }

// withChan calls fn with the current container's channel, mapping it
// first if needed; false if there is none (no container attached yet).
func (s *LXCServer) withChan(fn func(*dmt.Chan)) bool {
	j := &s.joint
	j.chmu.RLock()
	if j.ch == nil {
		j.chmu.RUnlock()
		s.mapChan()
		j.chmu.RLock()
	}
	defer j.chmu.RUnlock()
	if j.ch == nil {
		return false
	}
	fn(j.ch)
	return true
}

func (s *LXCServer) mapChan() {
	s.mu.Lock()
	attached := s.conn != nil && s.lxc != nil
	s.mu.Unlock()
	if !s.o.Joint || !attached {
		return
	}
	path := s.ShmPath()
	j := &s.joint
	j.chmu.Lock()
	defer j.chmu.Unlock()
	if j.ch != nil || path == "" {
		return
	}
	ch, err := dmt.OpenChan(path)
	if err != nil {
		s.log.WithError(err).Debug("proxy: the runtime's channel")
		return
	}
	j.ch = ch
}

// dropChan unmaps the channel of a container that goes away.
func (s *LXCServer) dropChan() {
	j := &s.joint
	j.chmu.Lock()
	defer j.chmu.Unlock()
	if j.ch != nil {
		_ = j.ch.Unmap()
		j.ch = nil
	}
}

func (s *LXCServer) stopJoint() {
	if b := s.joint.bubbler.Load(); b != nil {
		b.stop()
	}
	s.dropChan()
}
