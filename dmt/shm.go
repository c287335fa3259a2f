package dmt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
)

// Layout of the shared-memory file; mirrors runtime/shm.h (a test compiles
// that header and compares).
const (
	shmMagic    = 0x31544d444b534c4b
	shmVersion  = 1
	shmHdrSize  = 4096
	shmNSlots   = 256
	shmSlotSize = 1024
	shmNOps     = 64

	slotPID          = 0
	slotState        = 4
	slotPPID         = 8
	slotTurns        = 16
	slotWaitNS       = 24
	slotWaits        = 32
	slotClock        = 40
	slotThreads      = 48
	slotLiveThreads  = 56
	slotBlocked      = 64
	slotTimeouts     = 72
	slotIdleAdvances = 80
	slotForks        = 88
	slotSteals       = 96
	slotOps          = 136
)

// OpNames names the operation kinds the runtime counts, in the order of
// enum dmt_op in runtime/shm.h.
var OpNames = []string{
	"mutex_lock", "mutex_unlock", "cond_wait", "cond_signal", "cond_broadcast",
	"rwlock_rdlock", "rwlock_wrlock", "rwlock_unlock", "sem_wait", "sem_post",
	"barrier_wait", "spin", "once", "thread_create", "thread_join", "thread_exit",
	"sleep", "yield", "fork", "accept", "connect", "recv", "send", "close",
	"shutdown", "poll", "select", "epoll_wait", "pipe_io", "futex", "proc_wait",
	"signal_wait", "file_lock", "other_blocking", "mutex_lock_private", "mutex_unlock_private",
	"bias_revoke",
}

// Counters are what the runtime counts, per process or summed.
type Counters struct {
	Turns        uint64            // turns passed: the logical clock's ticks
	WaitNS       uint64            // nanoseconds threads spent waiting for the turn
	Waits        uint64            // times a thread had to wait for the turn
	Threads      uint64            // threads registered (initial + created)
	Timeouts     uint64            // timed waits and sleeps that expired
	IdleAdvances uint64            // logical clock jumps while no thread could run
	Forks        uint64            // fork() calls
	Steals       uint64            // heads taken out of the run queue while blocked in an unknown call
	Ops          map[string]uint64 // operations by kind (OpNames); zero kinds omitted
}

// ProcessStats is one process of the server.
type ProcessStats struct {
	PID, PPID   int
	Live        bool   // running (not exited, not replaced by exec)
	Clock       uint64 // its logical clock
	LiveThreads uint64 // threads not yet gone
	Blocked     uint64 // threads now blocked in the kernel
	Counters
}

// Stats is the content of a runtime's shared-memory file.
type Stats struct {
	NsPerTurn uint64
	Processes []ProcessStats // in the order they claimed a slot
	// Total sums every process's counters, those that have exited too.
	Total Counters
	// LiveProcesses, LiveThreads and Blocked count live processes only.
	LiveProcesses int
	LiveThreads   uint64
	Blocked       uint64
}

// ErrNoStats means the file holds no runtime statistics (yet): no process
// under the runtime has mapped it.
var ErrNoStats = errors.New("dmt: no runtime statistics in file")

// ReadStats reads the statistics file of Options.Shm.
func ReadStats(path string) (Stats, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Stats{}, err
	}
	return parseStats(b)
}

func parseStats(b []byte) (Stats, error) {
	le := binary.LittleEndian
	if len(b) < shmHdrSize || le.Uint64(b) != shmMagic {
		return Stats{}, ErrNoStats
	}
	if v := le.Uint32(b[8:]); v != shmVersion {
		return Stats{}, fmt.Errorf("dmt: statistics file version %d, want %d", v, shmVersion)
	}
	nslots, size, nops := int(le.Uint32(b[12:])), int(le.Uint32(b[16:])), int(le.Uint32(b[20:]))
	if size < slotOps+8*nops || len(b) < shmHdrSize+nslots*size {
		return Stats{}, fmt.Errorf("dmt: statistics file truncated or malformed")
	}
	st := Stats{NsPerTurn: le.Uint64(b[40:]), Total: Counters{Ops: map[string]uint64{}}}
	for i := 0; i < nslots; i++ {
		s := b[shmHdrSize+i*size : shmHdrSize+(i+1)*size]
		pid := int(int32(le.Uint32(s[slotPID:])))
		if pid == 0 {
			continue
		}
		p := ProcessStats{
			PID:         pid,
			PPID:        int(int32(le.Uint32(s[slotPPID:]))),
			Clock:       le.Uint64(s[slotClock:]),
			LiveThreads: le.Uint64(s[slotLiveThreads:]),
			Blocked:     le.Uint64(s[slotBlocked:]),
			Counters: Counters{
				Turns:        le.Uint64(s[slotTurns:]),
				WaitNS:       le.Uint64(s[slotWaitNS:]),
				Waits:        le.Uint64(s[slotWaits:]),
				Threads:      le.Uint64(s[slotThreads:]),
				Timeouts:     le.Uint64(s[slotTimeouts:]),
				IdleAdvances: le.Uint64(s[slotIdleAdvances:]),
				Forks:        le.Uint64(s[slotForks:]),
				Steals:       le.Uint64(s[slotSteals:]),
				Ops:          map[string]uint64{},
			},
		}
		p.Live = le.Uint32(s[slotState:]) == 1 && alive(pid)
		for k := 0; k < nops && k < len(OpNames); k++ {
			if n := le.Uint64(s[slotOps+8*k:]); n != 0 {
				p.Ops[OpNames[k]] = n
				st.Total.Ops[OpNames[k]] += n
			}
		}
		st.Total.Turns += p.Turns
		st.Total.WaitNS += p.WaitNS
		st.Total.Waits += p.Waits
		st.Total.Threads += p.Threads
		st.Total.Timeouts += p.Timeouts
		st.Total.IdleAdvances += p.IdleAdvances
		st.Total.Forks += p.Forks
		st.Total.Steals += p.Steals
		if p.Live {
			st.LiveProcesses++
			st.LiveThreads += p.LiveThreads
			st.Blocked += p.Blocked
		}
		st.Processes = append(st.Processes, p)
	}
	return st, nil
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || err == syscall.EPERM
}
