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
//     other blocking calls through LD_PRELOAD and dlsym(RTLD_NEXT), and the
//     entry points that -D_FORTIFY_SOURCE builds call instead (__poll_chk,
//     __ppoll_chk, __read_chk, __recv_chk, __recvfrom_chk: glibc's own reach
//     glibc's internal calls, which LD_PRELOAD cannot). Nothing else is
//     native.
//   - Env and MergeEnv build the environment that puts a server under it.
//   - ReadStats and NewCollector (Prometheus, for the replica's metrics)
//     read the counters that every process of the server publishes in a
//     shared-memory file (layout: runtime/shm.h, mirrored in shm.go). In
//     joint_sched the replica serves them; in xtern_only, which has no
//     replica, the deployment does (eval.Deployment.DMTMetrics, `lockstep
//     run --admin`).
//   - runtime/shm.h also fixes the layout of the input channel that
//     joint_sched feeds (chan.go; see "joint_sched").
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
// with EINTR, as it ends the real call. Only a handler of the server's
// own does (runtime/signal.c counts them behind a trampoline installed
// by the interposed sigaction and signal): CRIU, dumping or restoring
// the server, makes a timed wait return EINTR with no signal at all, and
// passing that on (a recv or accept failing with EINTR in a server
// without handlers, on the checkpointed replica only) broke both the
// server and the replicas' agreement.
//
// A call that may block in the kernel (recv, accept, connect, poll, epoll,
// select, waitpid, sigwait, futex waits through syscall(), io_uring and
// libaio waits, pipe and tty I/O, file locks, SysV semaphores) is never made
// while holding the turn. A socket call is first tried under the turn
// without blocking (MSG_DONTWAIT, zero timeout); only if it would block, and
// the caller asked to block, does the thread leave the runq, block in the
// kernel, and re-enter the runq when the call returns. recvmmsg and
// sendmmsg are done as the kernel does them, one recvmsg or sendmsg per
// message, each such a call. Calls on regular files do not take the turn.
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
// counted (Counters.Steals, lockstep_dmt_steals_total); biases it held
// become shared. In xtern_only,
// time calls return real time (the runtime only remembers the last
// reading for timeouts; joint_sched makes them deterministic), and when
// a blocked thread comes back is up to the kernel: that is the input,
// which the log makes deterministic in joint_sched.
//
// # Knobs (environment of the server; Options sets all but STEAL_MS and DISABLE)
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
//	LOCKSTEP_DMT_JOINT=1       joint_sched: input gated by the channel
//	LOCKSTEP_DMT_QUANTUM       turns between forced admissions (2000)
//
// # joint_sched: input from the log (LOCKSTEP_DMT_JOINT=1, Options.Joint)
//
// The shared-memory file holds, after the statistics slots, a
// single-producer ring (struct dmt_chan in runtime/shm.h; the producer is
// Chan in chan.go) of entries {log index, leader's time, kind
// CONNECT/DATA/CLOSE/BUBBLE, conn, len}. The replica's feeder
// (proxy.DMTFeeder) writes one entry per event it feeds, in log order,
// and publishes its head with a release store; the runtime reads and
// publishes its tail. Neither side makes a system call while the ring is
// neither empty nor full: a side that must wait sets its sleep word and
// futex-waits (shared futexes), and the other side wakes it only when it
// sees that word set. A full ring makes the feeder wait (backpressure);
// nothing is dropped and nothing exits.
//
// The consumer is one process: the first that accepts, polls or
// epoll-waits on an inet listening socket claims the ring (Apache's
// child, not its parent); it starts an internal ingest thread. From then
// on the schedule admits input only at fixed points of its order: an
// entry is admitted while no thread holds the turn, when no thread can
// run (every thread waits for input, a timeout or the kernel), or when
// the clock reaches the horizon (the clock at the last admission plus
// LOCKSTEP_DMT_QUANTUM turns, default 2000). At such a point the
// schedule stands still (no head) until the ingest thread has the next
// entry; then it applies it and the schedule goes on. Which input a
// thread sees, and at which logical time, is therefore a function of the
// log.
//
//   - CONNECT(conn, port): the feeder's connection with that source port
//     is the next one accept returns; accept takes connections from the
//     kernel holding the turn and sets aside those whose entry has not
//     been admitted yet (the port, seen as the peer's, maps the kernel's
//     socket to the log's connection).
//   - DATA(conn, n): n more bytes are readable. A receive returns exactly
//     min(asked, admitted and unread) bytes, waiting in the kernel holding
//     the turn if the bytes are still on their way; with none admitted it
//     waits in the waitq (or fails with EAGAIN when non-blocking).
//   - CLOSE(conn): the client's input ended; a receive of nothing left
//     returns 0 once the FIN arrives.
//   - BUBBLE(ticks): if nobody can run, the clock jumps ticks turns (timed
//     waits expire: the idle jump of xtern_only, now decided by the log);
//     otherwise the horizon moves ticks turns on.
//
// poll, ppoll and epoll_wait answer from the admitted input for the log's
// connections and the listeners (writable always), poll other descriptors
// without waiting, and wait in the waitq, woken by every admission (and
// by writes to non-blocking pipes and eventfds of the process, Apache's
// wakeup pipe) or by their logical timeout. epoll interest sets are
// tracked through epoll_ctl. Sends on the log's connections complete
// holding the turn (the feeder always reads the server's output).
//
// Time: in the consuming process time(), gettimeofday() and clock_gettime()
// (realtime, monotonic, boottime, coarse) return the leader's wall clock
// stamped in the last bubble admitted plus NsPerTurn per turn since, never
// going backwards: the same on every replica. Before the first stamp the
// base is 0.
//
// When the ingest thread finds the ring empty it counts a starvation
// (dmt_chan.starve, a futex the Go side waits on): the leader then
// proposes a bubble (proxy/bubble.go); backups only wait.
//
// Limits of joint_sched: one consuming process (a server that accepts in
// several processes is gated in the first only); select() is not gated
// (it is used for sleeps); descriptors other than the log's connections
// and listeners (pipes from other processes, files, unix sockets) keep
// their real timing; threads blocked in the kernel on other calls come
// back at the kernel's time (as in xtern_only; the safety net too); a
// connection's reset may overtake its last admitted bytes; EPOLLET is
// answered level-triggered. MariaDB runs (sysbench completes, every
// replica's tables checksum alike, and with the random login challenge
// masked by configs/mariadb.toml nearly every reply agrees), but its
// InnoDB threads wait for I/O in the kernel at the kernel's timing: now
// and then one replica answers a statement differently (a few digest
// checkpoints of one connection in a minute of sysbench, some runs).
// Input is admitted one entry per admission
// point, so a request whose bytes arrive while the server computes waits
// up to a quantum.
package dmt
