package dmt

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// entryAt decodes the ring's entry for sequence number i (head or tail).
func (c *Chan) entryAt(i uint64) ChanEntry {
	b := c.mem[chanOff+chanHdrSize+int(i%chanCap)*chanEntSize:][:chanEntSize]
	le := binary.LittleEndian
	return ChanEntry{Seq: le.Uint64(b[0:]), LTime: le.Uint64(b[8:]), Kind: le.Uint32(b[16:]),
		Conn: le.Uint32(b[20:]), Len: le.Uint32(b[24:])}
}

// take is one step of the consumer as the runtime's ingest thread does it
// (runtime/core.c): read the entry at the tail, publish the tail past it,
// and wake the producer if it sleeps on a full ring.
func take(c *Chan) ChanEntry {
	tail := atomic.LoadUint64(c.u64(chTail))
	e := c.entryAt(tail)
	atomic.StoreUint64(c.u64(chTail), tail+1)
	if atomic.LoadUint32(c.u32(chProdSleep)) != 0 {
		atomic.StoreUint32(c.u32(chProdSleep), 0)
		futex(c.u32(chProdSleep), futexWake, 1<<30, 0)
	}
	return e
}

// A full ring makes Push wait, asleep and without error, until the
// consumer takes an entry; then the entry goes in after the others
// (backpressure: nothing is dropped, nothing exits). Close releases a
// waiting Push with ErrChanClosed.
func TestChanBackpressure(t *testing.T) {
	shm := filepath.Join(t.TempDir(), "dmt.shm")
	if err := CreateChan(shm); err != nil {
		t.Fatal(err)
	}
	c, err := OpenChan(shm)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Unmap()
	ent := func(i int) ChanEntry { return ChanEntry{Seq: uint64(i), Kind: EvData, Conn: 1, Len: uint32(i)} }
	n := 0
	for n <= chanCap && c.TryPush(ent(n+1)) {
		n++
	}
	if n != chanCap {
		t.Fatalf("TryPush took %d entries, want the ring's %d", n, chanCap)
	}

	done := make(chan error, 1)
	go func() { done <- c.Push(ent(n + 1)) }()
	// Longer than Push's 100 ms futex timeout: it has looked again.
	select {
	case err := <-done:
		t.Fatalf("Push on a full ring returned (%v) instead of waiting", err)
	case <-time.After(300 * time.Millisecond):
	}
	if atomic.LoadUint32(c.u32(chProdSleep)) != 1 {
		t.Fatal("the waiting producer did not set its sleep word; the consumer would never wake it")
	}
	t.Logf("ring full at %d entries; Push waits", n)

	if e := take(c); e != ent(1) {
		t.Fatalf("consumer took %+v, want the first entry %+v", e, ent(1))
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Push after the consumer took an entry: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Push still waits after the consumer took an entry")
	}
	if c.Pushed() != chanCap+1 || c.Admitted() != 1 {
		t.Fatalf("head %d tail %d, want %d and 1", c.Pushed(), c.Admitted(), chanCap+1)
	}
	for i := uint64(1); i <= chanCap; i++ {
		if e := c.entryAt(i); e != ent(int(i)+1) {
			t.Fatalf("entry %d is %+v, want %+v", i, e, ent(int(i)+1))
		}
	}
	t.Logf("Push returned once the consumer took entry 1; entries 2..%d in order", chanCap+1)

	go func() { done <- c.Push(ent(0)) }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrChanClosed) {
			t.Fatalf("Push on a full ring after Close: %v, want ErrChanClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not release a waiting Push")
	}
}
