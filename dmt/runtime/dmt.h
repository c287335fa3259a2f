/*
 * dmt.h: internals of liblockstep_dmt.so, the deterministic multithreading
 * runtime preloaded into an unmodified server. See dmt/doc.go for the model.
 *
 * Scheduler in one paragraph: every thread of the process is in exactly one
 * of the run queue (runq), the wait queue (waitq, threads waiting on a sync
 * object or a logical deadline), or outside both (blocked in the kernel,
 * gone). The first thread of the runq holds the turn. A thread performs a
 * synchronisation operation only while holding the turn and then passes
 * it: the runq is kept in the order of a key per thread (+1 per operation,
 * +input weight for a receive that returned data), which without input is
 * Parrot's round robin. A thread that must wait moves itself to the waitq
 * and passes the turn; whoever releases the object moves the first waiter
 * (FIFO) back to the runq. The logical clock counts turns; timed waits and
 * sleeps expire when it reaches their deadline. A blocking system call is
 * made outside both queues, so a thread in the kernel never holds up the
 * turn. Mutexes private to one thread (biased) skip the turn until another
 * thread uses them. The order of all operations is therefore a function of
 * the order in which blocked threads come back, which is the input.
 * dmt/doc.go has the full model.
 */
#ifndef LOCKSTEP_DMT_H
#define LOCKSTEP_DMT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "shm.h"

#define EXPORT __attribute__((visibility("default")))
#define HIDDEN __attribute__((visibility("hidden")))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

enum tstate {
	T_RUN = 1,  /* in the runq (exiting threads stay there until dead) */
	T_WAIT,     /* in the waitq */
	T_BLOCKED,  /* in a system call, in no queue */
	T_GONE,     /* reaped */
};

typedef struct dmt_thread dmt_thread;
struct dmt_thread {
	dmt_thread *next, *prev; /* runq or waitq */
	dmt_thread *all_next;    /* every descriptor ever made (pool) */
	uint32_t id;             /* deterministic: order of creation */
	_Atomic int state;
	_Atomic uint32_t grant;  /* futex: 0 idle, 1 granted, 2 sleeping */
	int depth;               /* nesting of operations holding the turn */
	int busy;                /* inside the runtime and not holding it */
	const void *wait_obj;
	uint64_t deadline;       /* logical; 0 when none */
	uint64_t key;            /* runq order: lowest goes next */
	uint64_t weight;         /* added to key by the current operation */
	int op;                  /* kind of the current operation (trace) */
	/* biased mutexes other threads asked this one to give up, handled at
	 * its next turn (see sync.c) */
	_Atomic int revoke_pending;
	int nrevoke;
	void *revoke[16];
	uint32_t revoke_gen;
	int revoked_stolen; /* revoke[] were made shared while stolen */
	int timed_out;
	int interruptible;       /* a signal handler ends this wait (sleeps) */
	int interrupted;
	unsigned sig_seen;       /* dmt_sig_gen() when the wait began */
	int detached, joined, foreign, main, exiting, tramp;
	int stolen; /* taken out of the runq while blocked in an unknown call */
	int in_use;
	pthread_t pt;
	pid_t ktid;
	void *(*start)(void *);
	void *arg;
	/* per-thread memo of the last absolute timeout converted, so that a
	 * loop re-waiting on one absolute deadline keeps one logical one */
	struct timespec last_abs;
	int last_abs_clk;
	uint64_t last_abs_deadline;
};

/* real (next) definitions of everything interposed */
struct real_fns {
	int (*mutex_init)(pthread_mutex_t *, const pthread_mutexattr_t *);
	int (*mutex_lock)(pthread_mutex_t *);
	int (*mutex_trylock)(pthread_mutex_t *);
	int (*mutex_unlock)(pthread_mutex_t *);
	int (*mutex_timedlock)(pthread_mutex_t *, const struct timespec *);
	int (*mutex_clocklock)(pthread_mutex_t *, clockid_t, const struct timespec *);
	int (*cond_init)(pthread_cond_t *, const pthread_condattr_t *);
	int (*cond_wait)(pthread_cond_t *, pthread_mutex_t *);
	int (*cond_timedwait)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
	int (*cond_clockwait)(pthread_cond_t *, pthread_mutex_t *, clockid_t, const struct timespec *);
	int (*cond_signal)(pthread_cond_t *);
	int (*cond_broadcast)(pthread_cond_t *);
	int (*rw_rdlock)(pthread_rwlock_t *);
	int (*rw_wrlock)(pthread_rwlock_t *);
	int (*rw_tryrdlock)(pthread_rwlock_t *);
	int (*rw_trywrlock)(pthread_rwlock_t *);
	int (*rw_unlock)(pthread_rwlock_t *);
	int (*rw_clockrdlock)(pthread_rwlock_t *, clockid_t, const struct timespec *);
	int (*rw_clockwrlock)(pthread_rwlock_t *, clockid_t, const struct timespec *);
	int (*sem_clockwait)(sem_t *, clockid_t, const struct timespec *);
	int (*sem_wait)(sem_t *);
	int (*sem_trywait)(sem_t *);
	int (*sem_timedwait)(sem_t *, const struct timespec *);
	int (*sem_post)(sem_t *);
	int (*barrier_init)(pthread_barrier_t *, const pthread_barrierattr_t *, unsigned);
	int (*barrier_wait)(pthread_barrier_t *);
	int (*barrier_destroy)(pthread_barrier_t *);
	int (*spin_trylock)(pthread_spinlock_t *);
	int (*spin_unlock)(pthread_spinlock_t *);
	int (*create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
	int (*join)(pthread_t, void **);
	int (*detach)(pthread_t);
	void (*exit)(void *) __attribute__((noreturn));
	int (*once)(pthread_once_t *, void (*)(void));
	int (*sched_yield)(void);
	pid_t (*fork)(void);
	int (*nanosleep)(const struct timespec *, struct timespec *);
	int (*clock_nanosleep)(clockid_t, int, const struct timespec *, struct timespec *);
	int (*usleep)(useconds_t);
	unsigned (*sleep)(unsigned);
	int (*clock_gettime)(clockid_t, struct timespec *);
	int (*gettimeofday)(void *, void *);
	time_t (*time)(time_t *);
	long (*syscall)(long, ...);
	int (*execve)(const char *, char *const[], char *const[]);
};

extern struct real_fns R HIDDEN;

struct dmt_global {
	int enabled;
	uint64_t ns_per_turn;
	int spin;
	int debug;
	uint64_t steal_ns; /* 0: never take a kernel-blocked head out */
	uint64_t input_weight; /* key cost of a receive that returned data */
	struct dmt_slot *slot; /* this process's counters */
	/* joint_sched (LOCKSTEP_DMT_JOINT=1): input gated by the channel */
	int joint_env;          /* asked for */
	_Atomic int joint_on;   /* this process consumes the channel */
	uint64_t quantum;       /* turns between forced admissions */
	struct dmt_chan *chan;  /* mapped channel, NULL without a shm file */
};
extern struct dmt_global G HIDDEN;

/* core.c */
HIDDEN dmt_thread *dmt_enter_slow(void);
HIDDEN void dmt_init(void);
HIDDEN unsigned dmt_sig_gen(void);
HIDDEN void turn_get(dmt_thread *s);
HIDDEN void turn_put(dmt_thread *s);
HIDDEN int turn_wait(dmt_thread *s, const void *obj, uint64_t deadline);
HIDDEN int turn_signal(const void *obj, int all);
HIDDEN int turn_block(dmt_thread *s);
HIDDEN void turn_unblock(dmt_thread *s, int blocked);
HIDDEN void dmt_input_arrived(dmt_thread *s);
HIDDEN void dmt_revoke_at_turn(dmt_thread *s);
HIDDEN int dmt_request_revoke(dmt_thread *owner, void *obj);
HIDDEN void dmt_revoke_stolen(dmt_thread *h);
HIDDEN void dmt_lock(void);
HIDDEN void dmt_unlock(void);
HIDDEN uint64_t dmt_deadline_rel(uint64_t rel_ns);
HIDDEN uint64_t dmt_deadline_abs(dmt_thread *s, clockid_t clk, const struct timespec *abs);
HIDDEN dmt_thread *dmt_thread_new(void);
HIDDEN void dmt_thread_start(dmt_thread *t);
HIDDEN void dmt_thread_exit(dmt_thread *s);
HIDDEN dmt_thread *dmt_thread_find(pthread_t pt);
HIDDEN void dmt_thread_release(dmt_thread *t);
HIDDEN int dmt_thread_add(dmt_thread *t);
HIDDEN void dmt_thread_abort(dmt_thread *t);
HIDDEN void dmt_log(const char *fmt, ...);
/* joint_sched (core.c): claim the channel (holding the turn); signal under
 * the internal lock; time from the log */
HIDDEN int dmt_joint_claim(void);
HIDDEN int dmt_signal_locked(const void *obj, int all);
HIDDEN void dmt_joint_time(struct timespec *ts, int mono);
/* io.c: apply one admitted input entry (under the internal lock, while no
 * thread holds the turn) */
HIDDEN void dmt_joint_admit_locked(const struct dmt_chan_ent *e);

extern __thread dmt_thread *dmt_self HIDDEN __attribute__((tls_model("initial-exec")));
extern int dmt_ready HIDDEN;

static inline void stat_op(int op)
{
	__atomic_fetch_add(&G.slot->ops[op], 1, __ATOMIC_RELAXED);
	if (dmt_self)
		dmt_self->op = op;
}
static inline void stat_add(uint64_t *p, uint64_t v)
{
	__atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/*
 * dmt_enter: the runtime's view of the calling thread, or NULL when the
 * call must go straight to the real function (runtime disabled, or a
 * signal handler running while this thread is inside the runtime or in a
 * blocking system call).
 */
static inline dmt_thread *dmt_enter(void)
{
	if (unlikely(!dmt_ready))
		dmt_init();
	if (unlikely(!G.enabled))
		return 0;
	dmt_thread *s = dmt_self;
	if (unlikely(!s))
		return dmt_enter_slow();
	if (unlikely(s->busy ||
		     atomic_load_explicit(&s->state, memory_order_relaxed) >= T_BLOCKED))
		return s->stolen && !s->busy ? s : 0;
	return s;
}

/* Run a call that may block in the kernel outside both queues. */
#define DMT_BLOCKING(s, op, call)                                             \
	({                                                                    \
		turn_get(s);                                                  \
		stat_op(op);                                                  \
		int _blk = turn_block(s);                                     \
		__typeof__(call) _r = (call);                                 \
		int _e = errno;                                               \
		turn_unblock(s, _blk);                                        \
		errno = _e;                                                   \
		_r;                                                           \
	})

#endif
