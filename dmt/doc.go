// Package dmt is lockstep's deterministic multithreading runtime (the
// successor of Crane's Parrot/xtern): the controller, in Go, of a small
// native library preloaded into an unmodified, dynamically linked pthread
// server (mode xtern_only, and later joint_sched).
//
// # Pieces
//
//   - runtime/: liblockstep_dmt.so, in C, built by `make -C dmt/runtime`
//     with the system compiler (Library finds or builds it). It interposes
//     pthread, sleep, socket, poll/select/epoll, liburing/libaio waits and
//     other blocking calls through LD_PRELOAD and dlsym(RTLD_NEXT). Nothing
//     else is native.
//   - Env and MergeEnv build the environment that puts a server under it.
//   - ReadStats and NewCollector (Prometheus, for the replica's metrics)
//     read the counters that every process of the server publishes in a
//     shared-memory file (layout: runtime/shm.h, mirrored in shm.go).
//   - runtime/shm.h also fixes the layout of the input channel that
//     joint_sched will feed (see "Input channel").
//
// # Model
//
// Per process, every thread is in exactly one of: the run queue (runq), the
// wait queue (waitq), or neither (blocked in the kernel, or gone). The first
// thread of the runq holds the turn. A synchronisation operation (mutex,
// condition variable, rwlock, semaphore, barrier, spin lock, once, thread
// create/join/exit, sched_yield, sleep, and each socket call) is performed
// only while holding the turn; the turn then passes to the next thread of
// the runq. Handing over is a futex on the next thread's own word after a
// short spin; nothing polls.
//
// The runq is ordered by a key per thread, lowest first (ties: arrival
// order). An operation adds 1 to its thread's key; a thread entering the
// runq (created, woken, back from the kernel) gets the key of the last
// operation performed plus one. With nothing else, that is Parrot's round
// robin. One exception: a receive that returned data adds the input weight
// (LOCKSTEP_DMT_INPUT_WEIGHT, default 1000), because input is usually
// followed by computation; the other threads then pass a thread that is
// computing on a request for that many operations before they have to wait
// for its next operation. Keys depend only on the order of operations, so
// the order stays a function of the input.
//
// Locks keep their state in the real pthread object, and are only taken
// with the real try-lock under the turn; a thread that finds one busy waits
// in the waitq on the object's address, and the releaser moves the first
// waiter (FIFO) back to the runq. Condition variables, barriers and
// once-controls live in the runtime. The kernel never picks a winner.
//
// Thread-private mutexes skip the turn. A mutex belongs to the thread that
// initialises it or first locks it under the turn; its owner's lock and
// unlock then skip the turn. Another thread's first use revokes the bias at
// a fixed point of the order: at once if the owner is parked in the runtime
// (waitq, kernel, gone), else at the owner's next turn, for which the other
// thread waits. An unlocked mutex then moves to the new thread (at most 8
// times); otherwise it becomes shared and is ordered like any other. Until
// the revocation only the owner touched the mutex, so its state is a
// function of the owner's program order. This is what lets a server's
// per-thread and per-request mutexes cost nothing.
//
// Logical time is the number of turns. A timed wait or a sleep of d
// nanoseconds expires after ceil(d/NsPerTurn) turns. An absolute timeout is
// measured from the last time the thread read that clock, so the usual
// now+timeout idiom gives exactly the timeout. When no thread can run and a
// timed waiter exists, the clock jumps to the earliest deadline after the
// corresponding real time (the idle case; joint_sched will replace this
// with BUBBLE events from the log). A handled signal ends a sleep early
// with EINTR, as it ends the real call.
//
// A call that may block in the kernel (recv, accept, connect, poll, epoll,
// select, waitpid, sigwait, futex waits through syscall(), io_uring and
// libaio waits, pipe and tty I/O, file locks, SysV semaphores) is never made
// while holding the turn. A socket call is first tried under the turn
// without blocking (MSG_DONTWAIT, zero timeout); only if it would block, and
// the caller asked to block, does the thread leave the runq, block in the
// kernel, and re-enter the runq when the call returns. Calls on regular
// files do not take the turn.
//
// A thread past its start routine stays in the runq until it has died, so
// that its destructors keep their place; it is reaped when the turn reaches
// it and it is dead, a fixed point of the order.
//
// fork: the child starts a fresh runtime whose only thread is the one that
// forked (which still holds the turn); the parent's state is untouched (the
// forking thread holds the turn across fork and the queue lock across the
// kernel's fork, taken by an atfork handler). Every process of the server
// (Apache's parent and child, MariaDB's helpers) has its own scheduler and
// its own statistics slot.
//
// Process-shared objects (another process may release them) are waited on
// in the kernel outside both queues.
//
// # Limits
//
// The order is deterministic for programs that synchronise through the
// interposed calls. A thread blocked in a call the runtime cannot see (a
// raw system call) while at the head of the runq would stall the others:
// after LOCKSTEP_DMT_STEAL_MS (default 50 ms) without progress, with that
// thread asleep in the kernel outside any operation, it is taken out of the
// runq as if it had blocked through the runtime and re-enters at its next
// operation. That keeps the process live at the cost of determinism, and is
// counted (Counters.Steals); biases it held become shared. Time calls
// return real time (the runtime only remembers the last reading for
// timeouts). In xtern_only, when a blocked thread comes back is up to the
// kernel: that is the input, which the log makes deterministic in
// joint_sched.
//
// # Knobs (environment of the server; Options sets all but the last two)
//
//	LOCKSTEP_DMT_SHM           statistics and input channel file
//	LOCKSTEP_DMT_NS_PER_TURN   logical nanoseconds per turn (1000)
//	LOCKSTEP_DMT_SPIN          checks for the turn before sleeping (100)
//	LOCKSTEP_DMT_INPUT_WEIGHT  key cost of a receive that returned data (1000)
//	LOCKSTEP_DMT_TRACE=prefix  write every scheduling event to prefix.<pid>
//	                           (24-byte records, see runtime/core.c)
//	LOCKSTEP_DMT_DEBUG=1       log to stderr
//	LOCKSTEP_DMT_STEAL_MS      safety net delay, 0 to disable (50)
//	LOCKSTEP_DMT_DISABLE=1     preloaded but pass-through
//
// # Input channel (joint_sched, next step)
//
// The shared-memory file holds, after the statistics slots, a
// single-producer ring (struct dmt_chan in runtime/shm.h) of events
// {seq, logical time, kind CONNECT/DATA/CLOSE/BUBBLE, conn, len}. The
// feeder writes entries and publishes its head with a release store; the
// runtime reads up to head and publishes its tail. Neither side makes a
// system call while the ring is neither empty nor full: a side that must
// wait sets its sleep word and futex-waits, and the other side wakes it only
// when it sees that word set. A full ring makes the feeder wait
// (backpressure); nothing is dropped and nothing exits. The runtime's hooks
// for it are the non-blocking attempt of each socket call under the turn
// (which will only see what the log has delivered by the current logical
// time), turn_unblock (where a returning thread's re-entry time will be the
// one the log gives), and the idle clock jump, which BUBBLE(ticks) replaces.
package dmt
