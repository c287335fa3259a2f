package dmt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// The input channel of joint_sched (struct dmt_chan in runtime/shm.h): a
// single-producer ring in the shared-memory file, written by the replica's
// feeder in log order and consumed by the runtime inside the server, which
// admits each entry at a fixed point of its schedule.
const (
	chanOff      = shmHdrSize + shmNSlots*shmSlotSize
	chanCap      = 4096
	chanEntSize  = 32
	chanHdrSize  = 256
	ShmSize      = chanOff + chanHdrSize + chanCap*chanEntSize // size of the shared-memory file
	chHead       = 0
	chTail       = 64
	chProdSleep  = 128
	chConsSleep  = 132
	chCap        = 136
	chEntSizeOff = 140
	chConsumer   = 144
	chStarve     = 148
	chStarving   = 152
	chClock      = 160
	chAdmitted   = 168
)

// Kinds of channel entries (DMT_EV_* in runtime/shm.h).
const (
	EvConnect = 1 // Len: the feeder's source port of the connection
	EvData    = 2 // Len: bytes now readable on Conn
	EvClose   = 3 // the client's input on Conn ended
	EvBubble  = 4 // Len: ticks of logical time
)

// EnvJoint turns on joint_sched in the runtime: the process that first
// accepts (or polls) on an inet listener consumes the input channel.
const EnvJoint = "LOCKSTEP_DMT_JOINT"

// EnvQuantum: turns the runtime may run without admitting input (2000).
const EnvQuantum = "LOCKSTEP_DMT_QUANTUM"

// ChanEntry is one input event for the runtime.
type ChanEntry struct {
	Seq   uint64 // log index
	LTime uint64 // the leader's wall clock in ns, stamped in the log; 0: none
	Kind  uint32
	Conn  uint32
	Len   uint32
}

// Chan is the producer's side of the input channel.
type Chan struct {
	f      *os.File
	mem    []byte
	closed atomic.Bool
}

// ErrChanClosed is returned by Push after Close.
var ErrChanClosed = errors.New("dmt: input channel closed")

// CreateChan creates (or empties) the shared-memory file at path, sized
// for the statistics and the channel. Call it before the server starts:
// the runtime maps the file at its start.
func CreateChan(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Truncate(ShmSize)
}

// OpenChan maps the shared-memory file at path (made by CreateChan) as
// the channel's producer.
func OpenChan(path string) (*Chan, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if st.Size() < ShmSize {
		if err := f.Truncate(ShmSize); err != nil {
			f.Close()
			return nil, err
		}
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, ShmSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("dmt: mapping %s: %w", path, err)
	}
	c := &Chan{f: f, mem: mem}
	if atomic.LoadUint32(c.u32(chCap)) == 0 {
		atomic.StoreUint32(c.u32(chEntSizeOff), chanEntSize)
		atomic.StoreUint32(c.u32(chCap), chanCap)
	}
	return c, nil
}

func (c *Chan) u32(off int) *uint32 { return (*uint32)(unsafe.Pointer(&c.mem[chanOff+off])) }
func (c *Chan) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&c.mem[chanOff+off])) }

func futex(addr *uint32, op uintptr, val uint32, timeout time.Duration) {
	var ts *syscall.Timespec
	if timeout > 0 {
		t := syscall.NsecToTimespec(int64(timeout))
		ts = &t
	}
	syscall.Syscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(addr)), op, uintptr(val), uintptr(unsafe.Pointer(ts)), 0, 0)
}

const (
	futexWait = 0
	futexWake = 1
)

// Push appends e, waiting while the ring is full (backpressure: nothing
// is dropped). It fails only once the channel is closed.
func (c *Chan) Push(e ChanEntry) error {
	for {
		if c.closed.Load() {
			return ErrChanClosed
		}
		head := atomic.LoadUint64(c.u64(chHead))
		tail := atomic.LoadUint64(c.u64(chTail))
		if head-tail < chanCap {
			b := c.mem[chanOff+chanHdrSize+int(head%chanCap)*chanEntSize:][:chanEntSize]
			le := binary.LittleEndian
			le.PutUint64(b[0:], e.Seq)
			le.PutUint64(b[8:], e.LTime)
			le.PutUint32(b[16:], e.Kind)
			le.PutUint32(b[20:], e.Conn)
			le.PutUint32(b[24:], e.Len)
			le.PutUint32(b[28:], 0)
			atomic.StoreUint64(c.u64(chHead), head+1)
			if atomic.LoadUint32(c.u32(chConsSleep)) != 0 {
				atomic.StoreUint32(c.u32(chConsSleep), 0)
				futex(c.u32(chConsSleep), futexWake, 1<<30, 0)
			}
			return nil
		}
		atomic.StoreUint32(c.u32(chProdSleep), 1)
		if atomic.LoadUint64(c.u64(chTail)) != tail {
			continue
		}
		futex(c.u32(chProdSleep), futexWait, 1, 100*time.Millisecond)
	}
}

// TryPush appends e if the ring has room, without waiting.
func (c *Chan) TryPush(e ChanEntry) bool {
	head := atomic.LoadUint64(c.u64(chHead))
	if c.closed.Load() || head-atomic.LoadUint64(c.u64(chTail)) >= chanCap {
		return false
	}
	return c.Push(e) == nil
}

// Starving tells whether the consumer waits on an empty ring and a bubble
// would let one of its threads run (one is runnable or waits with a
// timeout; if every thread waits for input only, a bubble would change
// nothing), and its logical clock then.
func (c *Chan) Starving() (bool, uint64) {
	if atomic.LoadUint32(c.u32(chStarving)) != 1 {
		return false, 0
	}
	if atomic.LoadUint64(c.u64(chHead)) != atomic.LoadUint64(c.u64(chTail)) {
		return false, 0
	}
	return true, atomic.LoadUint64(c.u64(chClock))
}

// StarveCount is how many times the consumer found the ring empty.
func (c *Chan) StarveCount() uint32 { return atomic.LoadUint32(c.u32(chStarve)) }

// WaitStarve returns once the consumer has found the ring empty more than
// seen times, or after max (0: no limit).
func (c *Chan) WaitStarve(seen uint32, max time.Duration) {
	if atomic.LoadUint32(c.u32(chStarve)) != seen || c.closed.Load() {
		return
	}
	futex(c.u32(chStarve), futexWait, seen, max)
}

// Consumer is the pid of the process consuming the channel, 0 if none yet.
func (c *Chan) Consumer() int { return int(int32(atomic.LoadUint32(c.u32(chConsumer)))) }

// Admitted is how many entries the runtime has admitted; Pushed how many
// were written.
func (c *Chan) Admitted() uint64 { return atomic.LoadUint64(c.u64(chTail)) }
func (c *Chan) Pushed() uint64   { return atomic.LoadUint64(c.u64(chHead)) }

// Unmap closes the channel and unmaps it, which lets the file (and the
// file system it lives on) go. No call may be in progress or follow.
func (c *Chan) Unmap() error {
	c.Close()
	return syscall.Munmap(c.mem)
}

// Close stops the producer: a Push waiting on a full ring returns. The
// mapping is kept (a few hundred KiB) so that a goroutine still inside a
// call never touches unmapped memory.
func (c *Chan) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	futex(c.u32(chStarve), futexWake, 1<<30, 0)
	return c.f.Close()
}
