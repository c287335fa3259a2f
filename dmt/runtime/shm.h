/*
 * shm.h: the layout of the shared-memory file between the dmt runtime
 * (liblockstep_dmt.so, inside the server) and its Go controller (package
 * lockstep/dmt). The Go side mirrors this file in dmt/shm.go; a test there
 * parses this header and fails when the two disagree, so change both.
 *
 * File layout (all little-endian, naturally aligned):
 *
 *   [0, 4096)                       header
 *   [4096, 4096 + NSLOTS*SLOT_SIZE) one slot per process of the server
 *   [chan_off, chan_off + chan_size) the input channel (see below)
 *
 * Every process of the server (Apache's parent and children, MariaDB's
 * helpers) claims one slot on start (after exec and in a fork child) by a
 * compare-and-swap of slot.pid from 0; counters in a slot are only ever
 * added to, with atomic adds, so a reader needs no lock.
 */
#ifndef LOCKSTEP_DMT_SHM_H
#define LOCKSTEP_DMT_SHM_H

#include <stdint.h>

#define DMT_SHM_MAGIC 0x31544d444b534c4bULL /* "KLSKDMT1" read as LE bytes */
#define DMT_SHM_VERSION 1
#define DMT_SHM_HDR_SIZE 4096
#define DMT_SHM_NSLOTS 256
#define DMT_SHM_SLOT_SIZE 1024
#define DMT_SHM_NOPS 64

/* Operation kinds counted per slot (slot.ops[kind]). Append only.
 * mutex_*_private count operations on a thread-private (biased) mutex,
 * done without the turn; bias_revoke counts mutexes turned shared. */
#define DMT_OPS(X)                                                            \
	X(0, MUTEX_LOCK, "mutex_lock")                                        \
	X(1, MUTEX_UNLOCK, "mutex_unlock")                                    \
	X(2, COND_WAIT, "cond_wait")                                          \
	X(3, COND_SIGNAL, "cond_signal")                                      \
	X(4, COND_BROADCAST, "cond_broadcast")                                \
	X(5, RWLOCK_RD, "rwlock_rdlock")                                      \
	X(6, RWLOCK_WR, "rwlock_wrlock")                                      \
	X(7, RWLOCK_UNLOCK, "rwlock_unlock")                                  \
	X(8, SEM_WAIT, "sem_wait")                                            \
	X(9, SEM_POST, "sem_post")                                            \
	X(10, BARRIER, "barrier_wait")                                        \
	X(11, SPIN, "spin")                                                   \
	X(12, ONCE, "once")                                                   \
	X(13, CREATE, "thread_create")                                        \
	X(14, JOIN, "thread_join")                                            \
	X(15, EXIT, "thread_exit")                                            \
	X(16, SLEEP, "sleep")                                                 \
	X(17, YIELD, "yield")                                                 \
	X(18, FORK, "fork")                                                   \
	X(19, ACCEPT, "accept")                                               \
	X(20, CONNECT, "connect")                                             \
	X(21, RECV, "recv")                                                   \
	X(22, SEND, "send")                                                   \
	X(23, CLOSE, "close")                                                 \
	X(24, SHUTDOWN, "shutdown")                                           \
	X(25, POLL, "poll")                                                   \
	X(26, SELECT, "select")                                               \
	X(27, EPOLL_WAIT, "epoll_wait")                                       \
	X(28, PIPE_IO, "pipe_io")                                             \
	X(29, FUTEX, "futex")                                                 \
	X(30, PROC_WAIT, "proc_wait")                                         \
	X(31, SIGNAL_WAIT, "signal_wait")                                     \
	X(32, FILE_LOCK, "file_lock")                                         \
	X(33, OTHER_BLOCKING, "other_blocking")                               \
	X(34, MUTEX_LOCK_PRIVATE, "mutex_lock_private")                       \
	X(35, MUTEX_UNLOCK_PRIVATE, "mutex_unlock_private")                   \
	X(36, REVOKE, "bias_revoke")

enum dmt_op {
#define DMT_OP_ENUM(n, id, name) DMT_OP_##id = n,
	DMT_OPS(DMT_OP_ENUM)
#undef DMT_OP_ENUM
	DMT_OP_COUNT
};

struct dmt_shm_header {
	uint64_t magic;
	uint32_t version;
	uint32_t nslots;
	uint32_t slot_size;
	uint32_t nops;
	uint64_t chan_off;  /* offset of struct dmt_chan, 0 when absent */
	uint64_t chan_size; /* bytes from chan_off */
	uint64_t ns_per_turn; /* written by the first process, informative */
};

/* Per-process counters. Slot state: 0 free, 1 live, 2 exited. */
struct dmt_slot {
	int32_t pid;
	uint32_t state;
	int32_t ppid;
	uint32_t pad0;
	uint64_t turns;          /* turns passed (logical clock ticks) */
	uint64_t wait_ns;        /* time threads spent waiting for the turn */
	uint64_t waits;          /* times a thread had to wait for the turn */
	uint64_t clock;          /* current logical clock of the process */
	uint64_t threads;        /* threads registered (main + created) */
	uint64_t live_threads;   /* threads not yet gone */
	uint64_t blocked;        /* threads now blocked in the kernel */
	uint64_t timeouts;       /* timed waits and sleeps that expired */
	uint64_t idle_advances;  /* logical clock jumps while nobody ran */
	uint64_t forks;          /* fork() calls */
	uint64_t steals;         /* heads taken out while blocked in an unknown call */
	uint64_t reserved[4];
	uint64_t ops[DMT_SHM_NOPS]; /* by enum dmt_op */
};

/*
 * The input channel (joint_sched, LOCKSTEP_DMT_JOINT=1). A single-producer ring written by the replica's feeder
 * and read by the runtime, at fixed offset chan_off:
 *
 *   struct dmt_chan {                   offset
 *     uint64_t head;    producer        0    next sequence number to write
 *     uint8_t  pad0[56];
 *     uint64_t tail;    consumer        64   next sequence number to read
 *     uint8_t  pad1[56];
 *     uint32_t prod_sleep;              128  futex: producer sleeps (full)
 *     uint32_t cons_sleep;              132  futex: consumer sleeps (empty)
 *     uint32_t cap;                     136  entries, a power of two
 *     uint32_t ent_size;                140  sizeof(struct dmt_chan_ent)
 *     int32_t  consumer;                144  pid of the consuming process
 *     uint32_t starve;                  148  futex: +1 when the consumer starves
 *     uint32_t starving;                152  while it waits on an empty ring:
 *                                             1 a bubble would let a thread
 *                                             run, 2 only input would
 *     uint32_t pad3;
 *     uint64_t clock;                   160  its logical clock then
 *     uint64_t admitted;                168  entries admitted
 *     uint8_t  pad2[80];
 *     struct dmt_chan_ent ent[cap];     256
 *   };
 *
 * The producer fills ent[head % cap] and then stores head+1 with release
 * order; the consumer reads entries up to head (acquire), then stores its
 * tail. Neither side makes a system call while the ring is neither empty
 * nor full: a side that must wait sets its *_sleep word and FUTEX_WAITs on
 * it after re-checking; the other side issues FUTEX_WAKE only when it sees
 * that word set. When the ring is full the producer waits (backpressure):
 * nothing is dropped and nobody exits.
 */
struct dmt_chan_ent {
	uint64_t seq;   /* log index of the event */
	uint64_t ltime; /* the leader's wall clock (ns) stamped in the log, 0: none */
	uint32_t kind;  /* DMT_EV_* */
	uint32_t conn;  /* connection id, 0 for BUBBLE */
	uint32_t len;   /* DATA: bytes now readable on conn; BUBBLE: ticks;
			   CONNECT: the feeder's source port (to match accept) */
	uint32_t flags;
};

#define DMT_EV_CONNECT 1
#define DMT_EV_DATA 2
#define DMT_EV_CLOSE 3
#define DMT_EV_BUBBLE 4

struct dmt_chan {
	uint64_t head;
	uint8_t pad0[56];
	uint64_t tail;
	uint8_t pad1[56];
	uint32_t prod_sleep;
	uint32_t cons_sleep;
	uint32_t cap;
	uint32_t ent_size;
	int32_t consumer;  /* 144: pid of the process that consumes (joint_sched) */
	uint32_t starve;   /* 148: futex, +1 each time the consumer waits on an empty ring */
	uint32_t starving; /* 152: consumer waits on an empty ring (1 bubble useful, 2 not) */
	uint32_t pad3;
	uint64_t clock;    /* 160: the consumer's logical clock when it last waited */
	uint64_t admitted; /* 168: entries admitted (== tail) */
	uint8_t pad2[80];
	struct dmt_chan_ent ent[];
};

#define DMT_CHAN_OFF (DMT_SHM_HDR_SIZE + DMT_SHM_NSLOTS * DMT_SHM_SLOT_SIZE)
#define DMT_CHAN_CAP 4096
#define DMT_SHM_SIZE                                                          \
	(DMT_CHAN_OFF + 256 + DMT_CHAN_CAP * sizeof(struct dmt_chan_ent))

#endif
