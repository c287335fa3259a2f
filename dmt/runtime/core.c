/*
 * core.c: initialisation, shared-memory statistics and the turn scheduler.
 */
#include "dmt.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/futex.h>

struct real_fns R;
struct dmt_global G;
int dmt_ready;
__thread dmt_thread *dmt_self __attribute__((tls_model("initial-exec")));
static __thread char tls_marker __attribute__((tls_model("initial-exec")));
static __thread int tls_in_init __attribute__((tls_model("initial-exec")));
/* last value of each clock this thread read, for absolute timeouts */
static __thread struct timespec tls_now[2] __attribute__((tls_model("initial-exec")));

static struct dmt_slot private_slot;
static struct dmt_shm_header *shm_hdr;
static pid_t G_pid;
static int tid_off; /* offset of glibc's struct pthread.tid, 0 if unknown */

/* ---------------------------------------------------------------- syscalls */

static inline long raw_syscall6(long n, long a, long b, long c, long d, long e,
				long f)
{
#if defined(__x86_64__)
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
#else
	int e0 = errno;
	long r = R.syscall(n, a, b, c, d, e, f);
	if (r == -1)
		r = -errno;
	errno = e0;
	return r;
#endif
}

static long futex_wait(_Atomic uint32_t *w, uint32_t val, const struct timespec *rel)
{
	return raw_syscall6(SYS_futex, (long)w, FUTEX_WAIT_PRIVATE, val, (long)rel, 0, 0);
}

static void futex_wake(_Atomic uint32_t *w, int n)
{
	raw_syscall6(SYS_futex, (long)w, FUTEX_WAKE_PRIVATE, n, 0, 0, 0);
}

/* shared futexes: the channel's words, waited on by another process */
static long futex_wait_shared(void *w, uint32_t val, const struct timespec *rel)
{
	return raw_syscall6(SYS_futex, (long)w, FUTEX_WAIT, val, (long)rel, 0, 0);
}

static void futex_wake_shared(void *w, int n)
{
	raw_syscall6(SYS_futex, (long)w, FUTEX_WAKE, n, 0, 0, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	R.clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

void dmt_log(const char *fmt, ...)
{
	char buf[512];
	int n = snprintf(buf, sizeof buf, "lockstep-dmt[%d]: ", (int)G_pid);
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	raw_syscall6(SYS_write, 2, (long)buf, n, 0, 0, 0);
}

/* ---------------------------------------------------------------- trace */

/*
 * LOCKSTEP_DMT_TRACE=prefix writes prefix.<pid>: one 24-byte record per
 * scheduling event {u64 wall ns, u64 clock, u16 thread, u8 event, u8 op,
 * u32 key}. For debugging and for comparing schedules between runs.
 */
enum { TR_OP = 1, TR_WAIT, TR_BLOCK, TR_UNBLOCK, TR_REAP, TR_STEAL };
struct trace_rec {
	uint64_t ns, clock;
	uint16_t thread;
	uint8_t ev, op;
	uint32_t key;
};
static struct trace_rec *trace_buf;
static uint64_t trace_cap, trace_len;
static char trace_prefix[200];

static void trace_open(void)
{
	if (!trace_prefix[0])
		return;
	char path[256];
	snprintf(path, sizeof path, "%s.%d", trace_prefix, (int)G_pid);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	trace_buf = 0;
	if (fd < 0)
		return;
	trace_cap = (64u << 20) / sizeof(struct trace_rec);
	if (ftruncate(fd, trace_cap * sizeof(struct trace_rec)) == 0) {
		void *p = mmap(0, trace_cap * sizeof(struct trace_rec), PROT_READ | PROT_WRITE,
			       MAP_SHARED, fd, 0);
		if (p != MAP_FAILED)
			trace_buf = p;
	}
	close(fd);
	trace_len = 0;
}

static void trace(int ev, dmt_thread *t); /* under the lock */

/* ---------------------------------------------------------------- state */

static struct {
	_Atomic uint32_t lkw; /* internal lock: 0 free, 1 held, 2 contended */
	void *lk_owner;
	int lk_count;
	dmt_thread *_Atomic head; /* == rq_first: holds the turn */
	dmt_thread *rq_first, *rq_last;
	int rq_len;
	dmt_thread *wq_first, *wq_last;
	int wq_len;
	uint64_t clock;  /* logical time: turns */
	uint64_t vtime; /* key of the last operation performed */
	uint64_t next_deadline;
	uint32_t next_id;
	dmt_thread *all;
	/* joint_sched: the schedule stands still (no head) until the ingest
	 * thread admits the next entry of the channel; it must at clock
	 * horizon, and when nobody can run */
	_Atomic uint32_t need_input;
	uint64_t horizon;
	/* deterministic time: wall_base (from the log) at clock wall_clock */
	uint64_t wall_base, wall_clock;
} S;

static void trace(int ev, dmt_thread *t)
{
	if (!trace_buf || trace_len >= trace_cap)
		return;
	struct trace_rec *r = &trace_buf[trace_len++];
	r->ns = now_ns();
	r->clock = S.clock;
	r->thread = (uint16_t)t->id;
	r->ev = (uint8_t)ev;
	r->op = (uint8_t)t->op;
	r->key = (uint32_t)t->key;
}

/* Recursive (per thread) futex lock guarding the queues. Held only for a
 * few list operations, never across a wait. */
static void ilock(void)
{
	void *me = &tls_marker;
	if (S.lk_owner == me) {
		S.lk_count++;
		return;
	}
	uint32_t c = 0;
	if (!atomic_compare_exchange_strong(&S.lkw, &c, 1)) {
		for (int i = 0; i < 200; i++) {
			cpu_relax();
			c = 0;
			if (atomic_load_explicit(&S.lkw, memory_order_relaxed) == 0 &&
			    atomic_compare_exchange_strong(&S.lkw, &c, 1))
				goto got;
		}
		if (c != 2)
			c = atomic_exchange(&S.lkw, 2);
		while (c != 0) {
			futex_wait(&S.lkw, 2, 0);
			c = atomic_exchange(&S.lkw, 2);
		}
	}
got:
	S.lk_owner = me;
	S.lk_count = 1;
}

static void iunlock(void)
{
	if (--S.lk_count > 0)
		return;
	S.lk_owner = 0;
	if (atomic_exchange(&S.lkw, 0) == 2)
		futex_wake(&S.lkw, 1);
}

#define Q_APPEND(F, L, t)                                                     \
	do {                                                                  \
		(t)->next = 0;                                                \
		(t)->prev = (L);                                              \
		if (L)                                                        \
			(L)->next = (t);                                      \
		else                                                          \
			(F) = (t);                                            \
		(L) = (t);                                                    \
	} while (0)
#define Q_REMOVE(F, L, t)                                                     \
	do {                                                                  \
		if ((t)->prev)                                                \
			(t)->prev->next = (t)->next;                          \
		else                                                          \
			(F) = (t)->next;                                      \
		if ((t)->next)                                                \
			(t)->next->prev = (t)->prev;                          \
		else                                                          \
			(L) = (t)->prev;                                      \
		(t)->next = (t)->prev = 0;                                    \
	} while (0)

static inline int watched(dmt_thread *t) { return t->foreign || t->exiting; }

/* Insert t in the runq after every thread whose key is not above its own
 * (ties keep arrival order). Keys only grow, so this scans from the tail. */
static void rq_insert(dmt_thread *t)
{
	dmt_thread *p = S.rq_last;
	while (p && p->key > t->key)
		p = p->prev;
	t->prev = p;
	t->next = p ? p->next : S.rq_first;
	if (t->next)
		t->next->prev = t;
	else
		S.rq_last = t;
	if (p)
		p->next = t;
	else
		S.rq_first = t;
}

/* A thread (re-)entering the runq comes after every thread now in it
 * that has not performed an operation since the last one performed. */
static void rq_add(dmt_thread *t)
{
	t->key = S.vtime + 1;
	rq_insert(t);
	S.rq_len++;
	atomic_store(&t->state, T_RUN);
	/* joint_sched: a thread back from the kernel while the schedule waits
	 * on an empty channel makes a bubble useful (see ingest) */
	if (unlikely(S.need_input) && G.chan &&
	    __atomic_load_n(&G.chan->starving, __ATOMIC_RELAXED) == 2) {
		__atomic_store_n(&G.chan->starving, 1, __ATOMIC_SEQ_CST);
		__atomic_fetch_add(&G.chan->starve, 1, __ATOMIC_SEQ_CST);
		futex_wake_shared(&G.chan->starve, INT_MAX);
	}
}

static void rq_del(dmt_thread *t)
{
	Q_REMOVE(S.rq_first, S.rq_last, t);
	S.rq_len--;
}

static void recompute_deadline(void)
{
	uint64_t m = UINT64_MAX;
	for (dmt_thread *t = S.wq_first; t; t = t->next)
		if (t->deadline && t->deadline < m)
			m = t->deadline;
	S.next_deadline = m;
}

/* Move waiters whose logical deadline has come to the runq, in waitq order. */
static void expire_locked(void)
{
	if (S.clock < S.next_deadline)
		return;
	dmt_thread *t, *nx;
	for (t = S.wq_first; t; t = nx) {
		nx = t->next;
		if (t->deadline && t->deadline <= S.clock) {
			Q_REMOVE(S.wq_first, S.wq_last, t);
			S.wq_len--;
			t->timed_out = 1;
			t->deadline = 0;
			rq_add(t);
			stat_add(&G.slot->timeouts, 1);
		}
	}
	recompute_deadline();
}

static void tick_locked(void)
{
	S.clock++;
	G.slot->turns++; /* only ever written under the lock */
	G.slot->clock = S.clock;
	expire_locked();
}

static int signal_locked(const void *obj, int all)
{
	int n = 0;
	dmt_thread *t, *nx;
	for (t = S.wq_first; t; t = nx) {
		nx = t->next;
		if (t->wait_obj != obj)
			continue;
		Q_REMOVE(S.wq_first, S.wq_last, t);
		S.wq_len--;
		t->timed_out = 0;
		rq_add(t);
		n++;
		if (!all)
			break;
	}
	return n;
}

static int dead(dmt_thread *t)
{
	if (t->main) {
		if (!tid_off)
			return 0;
		return __atomic_load_n((pid_t *)((char *)t->pt + tid_off), __ATOMIC_ACQUIRE) == 0;
	}
	if (!t->ktid)
		return 0;
	return raw_syscall6(SYS_tgkill, G_pid, t->ktid, 0, 0, 0, 0) == -ESRCH;
}

static void reap_locked(dmt_thread *t)
{
	trace(TR_REAP, t);
	rq_del(t);
	atomic_store(&t->state, T_GONE);
	S.clock++;
	G.slot->turns++;
	signal_locked(t, 1); /* joiners */
	/* a dead thread takes no more turns: answer its revocation requests */
	if (t->revoke_pending) {
		t->nrevoke = 0;
		t->revoke_pending = 0;
		t->revoke_gen++;
	}
	signal_locked(&t->revoke_gen, 1);
	stat_add(&G.slot->live_threads, (uint64_t)-1);
	if (t->detached || t->foreign)
		t->in_use = 0;
}

/* Wake everybody asleep in the runtime so they re-check what to watch. */
static void kick_all_locked(void)
{
	for (dmt_thread *t = S.all; t; t = t->all_next) {
		if (t->in_use && atomic_load(&t->grant) == 2) {
			atomic_store(&t->grant, 1);
			futex_wake(&t->grant, 1);
		}
	}
}

/*
 * Make the first runq thread the turn holder. Returns the thread to wake
 * with futex_wake after the lock is dropped (NULL: none asleep). Reaps
 * dead exiting threads found at the head: a thread past its start routine
 * stays in the runq until it is gone, so that its last operations
 * (destructors) keep their place and its death is observed at a fixed
 * point of the order: when the turn reaches it.
 */
static dmt_thread *pick_head_locked(void)
{
	for (;;) {
		dmt_thread *t = S.rq_first;
		if (t && watched(t) && dead(t)) {
			reap_locked(t);
			expire_locked();
			continue;
		}
		if (atomic_load_explicit(&G.joint_on, memory_order_relaxed)) {
			if (!S.need_input && (!t || S.clock >= S.horizon)) {
				atomic_store(&S.need_input, 1);
				futex_wake((_Atomic uint32_t *)&S.need_input, 1);
			}
			if (S.need_input) {
				atomic_store_explicit(&S.head, (dmt_thread *)0, memory_order_release);
				return 0;
			}
		}
		atomic_store_explicit(&S.head, t, memory_order_release);
		if (!t) {
			/* nobody can run: let the earliest timed waiter pace
			 * the logical clock in real time (idle) */
			if (S.next_deadline != UINT64_MAX) {
				dmt_thread *e = 0;
				for (dmt_thread *w = S.wq_first; w; w = w->next)
					if (w->deadline == S.next_deadline) {
						e = w;
						break;
					}
				if (e && atomic_exchange(&e->grant, 1) == 2)
					return e;
			}
			return 0;
		}
		if (watched(t))
			kick_all_locked();
		if (atomic_exchange(&t->grant, 1) == 2)
			return t;
		return 0;
	}
}

static void try_reap_head(void)
{
	ilock();
	dmt_thread *w = 0, *h = S.head;
	if (h && watched(h) && dead(h))
		w = pick_head_locked();
	iunlock();
	if (w)
		futex_wake(&w->grant, 1);
}

static void idle_advance(void)
{
	ilock();
	dmt_thread *w = 0;
	if (!S.head && S.next_deadline != UINT64_MAX) {
		if (S.clock < S.next_deadline) {
			S.clock = S.next_deadline;
			G.slot->clock = S.clock;
			stat_add(&G.slot->idle_advances, 1);
		}
		expire_locked();
		w = pick_head_locked();
	}
	iunlock();
	if (w)
		futex_wake(&w->grant, 1);
}

/* State letter of one of this process's threads, from /proc. */
static char task_state(pid_t tid)
{
	char path[64], buf[512];
	snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
	long fd = raw_syscall6(SYS_openat, AT_FDCWD, (long)path, O_RDONLY | O_CLOEXEC, 0, 0, 0);
	if (fd < 0)
		return 0;
	long n = raw_syscall6(SYS_read, fd, (long)buf, sizeof buf - 1, 0, 0, 0);
	raw_syscall6(SYS_close, fd, 0, 0, 0, 0, 0);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	return p && p[1] == ' ' ? p[2] : 0;
}

/*
 * Safety net: the head has not taken its turn for steal_ns while the
 * clock stood still, others need it to move, and it sleeps in the kernel
 * outside any operation: it is blocked in a call the runtime does not
 * interpose (a raw system call), maybe waiting for one of the others.
 * Take it out of the runq as if it had blocked through the runtime; it
 * re-enters at its next operation. This trades determinism for liveness
 * and is counted (slot.steals).
 */
static void maybe_steal(dmt_thread *h, uint64_t clock)
{
	/* someone must need the schedule to move: another thread in the
	 * runq, a revocation the head owes, or a timed waiter */
	if (S.rq_len < 2 && !h->revoke_pending && S.next_deadline == UINT64_MAX)
		return;
	/* 'S' only: an interruptible sleep may wait for another thread (a
	 * futex, a pipe); an uninterruptible one ('D': disk I/O) ends alone */
	if (task_state(h->ktid) != 'S')
		return;
	dmt_thread *w = 0;
	int stolen = 0;
	ilock();
	if (S.head == h && S.clock == clock && atomic_load(&h->state) == T_RUN && !watched(h)) {
		__atomic_store_n(&h->stolen, 1, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&h->depth, __ATOMIC_SEQ_CST) != 0) {
			h->stolen = 0; /* it is starting an operation after all */
		} else {
			trace(TR_STEAL, h);
			rq_del(h);
			atomic_store(&h->state, T_BLOCKED);
			G.slot->blocked++;
			G.slot->steals++;
			stolen = 1;
			if (h->revoke_pending) {
				dmt_revoke_stolen(h);
				signal_locked(&h->revoke_gen, 1);
			}
			tick_locked();
			w = pick_head_locked();
		}
	}
	iunlock();
	if (w)
		futex_wake(&w->grant, 1);
	if (stolen && G.debug)
		dmt_log("thread %u (tid %d) blocked in an unknown call: taken out of the run queue",
			h->id, h->ktid);
}

/* A signal handler ran during an interruptible wait (a sleep): leave the
 * waitq now, as the real call would return EINTR. */
static void interrupt_wait(dmt_thread *s)
{
	ilock();
	dmt_thread *w = 0;
	if (atomic_load(&s->state) == T_WAIT) {
		Q_REMOVE(S.wq_first, S.wq_last, s);
		S.wq_len--;
		s->deadline = 0;
		s->interrupted = 1;
		rq_add(s);
		recompute_deadline();
		w = S.head ? 0 : pick_head_locked();
	}
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
}

/*
 * The watchdog: one internal thread per process, outside the scheduler
 * (it never calls an interposed function), that applies maybe_steal when
 * the head has not moved and the clock has stood still for steal_ns. It is
 * started by the first thread that has to wait for the turn.
 */
static pid_t watchdog_pid;

static void *watchdog(void *arg)
{
	dmt_thread *obs_head = 0;
	uint64_t obs_clock = 0, obs_t = 0;
	pid_t pid = (pid_t)(intptr_t)arg;
	struct timespec ts = {0, (long)(G.steal_ns / 4)};
	while (pid == G_pid) {
		raw_syscall6(SYS_nanosleep, (long)&ts, 0, 0, 0, 0, 0);
		dmt_thread *h = atomic_load(&S.head);
		uint64_t c = __atomic_load_n(&S.clock, __ATOMIC_RELAXED);
		uint64_t t = now_ns();
		if (!h || h != obs_head || c != obs_clock) {
			obs_head = h;
			obs_clock = c;
			obs_t = t;
		} else if (t - obs_t >= G.steal_ns && !watched(h)) {
			maybe_steal(h, c);
			obs_t = t;
		}
	}
	return 0;
}

static void start_watchdog(void)
{
	static _Atomic pid_t starting;
	pid_t me = G_pid, old = atomic_load(&starting);
	if (old == me || !atomic_compare_exchange_strong(&starting, &old, me))
		return;
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&a, 64 << 10);
	pthread_t t;
	if (R.create(&t, &a, watchdog, (void *)(intptr_t)me) == 0)
		watchdog_pid = me;
	pthread_attr_destroy(&a);
}

/* Wait until s is the turn holder. s is in the runq or the waitq. */
static void wait_head(dmt_thread *s)
{
	if (atomic_load_explicit(&S.head, memory_order_acquire) == s)
		return;
	uint64_t t0 = now_ns();
	for (int i = 0; i < G.spin; i++) {
		if (atomic_load_explicit(&S.head, memory_order_acquire) == s)
			goto done;
		cpu_relax();
	}
	if (unlikely(watchdog_pid != G_pid) && G.steal_ns)
		start_watchdog();
	for (;;) {
		atomic_store(&s->grant, 0);
		dmt_thread *h = atomic_load(&S.head);
		if (h == s)
			break;
		struct timespec ts, *tp = 0;
		int why = 0;
		uint64_t c = __atomic_load_n(&S.clock, __ATOMIC_RELAXED);
		if (h && watched(h)) {
			ts.tv_sec = 0;
			ts.tv_nsec = 200000;
			tp = &ts;
			why = 1;
		} else if (!h && atomic_load(&s->state) == T_WAIT && s->deadline &&
			   !atomic_load(&G.joint_on)) {
			uint64_t rel = s->deadline > c ? (s->deadline - c) * G.ns_per_turn : 0;
			if (rel == 0) {
				idle_advance();
				continue;
			}
			ts.tv_sec = rel / 1000000000ull;
			ts.tv_nsec = rel % 1000000000ull;
			tp = &ts;
			why = 2;
		}
		if (!tp && s->interruptible) {
			/* only a timed futex wait reports a signal handler (EINTR) */
			ts.tv_sec = 1;
			ts.tv_nsec = 0;
			tp = &ts;
		}
		uint32_t z = 0;
		if (atomic_compare_exchange_strong(&s->grant, &z, 2)) {
			long r = futex_wait(&s->grant, 2, tp);
			/* only if a handler ran (signal.c): CRIU's dumps and
			 * restores make timed waits return EINTR without one */
			if (r == -EINTR && s->interruptible && dmt_sig_gen() != s->sig_seen)
				interrupt_wait(s);
			if (r == -ETIMEDOUT) {
				if (why == 1)
					try_reap_head();
				else if (why == 2)
					idle_advance();
			}
		}
	}
done:
	stat_add(&G.slot->waits, 1);
	stat_add(&G.slot->wait_ns, now_ns() - t0);
}

/* ---------------------------------------------------------------- turn API */

static void rejoin(dmt_thread *s)
{
	ilock();
	dmt_thread *w = 0;
	if (s->stolen) {
		s->stolen = 0;
		G.slot->blocked--;
		rq_add(s);
		if (s->revoked_stolen) {
			/* its biases were made shared while it ran unseen: wake
			 * whoever waits on them, in case a private unlock raced */
			for (int i = 0; i < s->nrevoke; i++)
				signal_locked(s->revoke[i], 1);
			s->nrevoke = 0;
			s->revoked_stolen = 0;
			atomic_store(&s->revoke_pending, 0);
		}
		w = S.head ? 0 : pick_head_locked();
	}
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
}

void turn_get(dmt_thread *s)
{
	if (s->depth > 0) {
		s->depth++;
		return;
	}
	/* handshake with maybe_steal: depth first, then stolen (seq_cst) */
	__atomic_store_n(&s->depth, 1, __ATOMIC_SEQ_CST);
	if (unlikely(__atomic_load_n(&s->stolen, __ATOMIC_SEQ_CST)))
		rejoin(s);
	if (likely(atomic_load_explicit(&S.head, memory_order_acquire) == s)) {
		if (unlikely(atomic_load_explicit(&s->revoke_pending, memory_order_acquire)))
			dmt_revoke_at_turn(s);
		return;
	}
	s->busy = 1;
	wait_head(s);
	s->busy = 0;
	if (unlikely(atomic_load_explicit(&s->revoke_pending, memory_order_acquire)))
		dmt_revoke_at_turn(s);
}

void dmt_lock(void) { ilock(); }
void dmt_unlock(void) { iunlock(); }

/*
 * Ask owner to give up its bias on obj. Returns 1 if that is done at once
 * (the owner is parked in the runtime: in the waitq, in the kernel, or
 * gone, so it has run no code since its last turn), 0 if the owner is
 * running and will do it at its next turn. Called holding the turn.
 */
int dmt_request_revoke(dmt_thread *owner, void *obj)
{
	int now;
	ilock();
	int st = atomic_load(&owner->state);
	now = !owner->in_use || st == T_WAIT || st == T_GONE || (st == T_BLOCKED && !owner->stolen);
	if (!now && owner->stolen) {
		/* in application code, blocked in an unknown call: it may hold
		 * the mutex, and its next turn may depend on the caller. Make
		 * the mutex shared (never transfer it); its waiters are woken
		 * when the owner comes back (rejoin). */
		int dup = 0;
		for (int i = 0; i < owner->nrevoke; i++)
			dup |= owner->revoke[i] == obj;
		if (!dup && owner->nrevoke < (int)(sizeof owner->revoke / sizeof owner->revoke[0]))
			owner->revoke[owner->nrevoke++] = obj;
		owner->revoked_stolen = 1;
		iunlock();
		return 2;
	}
	if (!now) {
		int dup = 0;
		for (int i = 0; i < owner->nrevoke; i++)
			dup |= owner->revoke[i] == obj;
		/* a full list: wait for the owner's next turn and ask again */
		if (!dup && owner->nrevoke < (int)(sizeof owner->revoke / sizeof owner->revoke[0]))
			owner->revoke[owner->nrevoke++] = obj;
		atomic_store(&owner->revoke_pending, 1);
	}
	iunlock();
	return now;
}

void turn_put(dmt_thread *s)
{
	if (--s->depth > 0)
		return;
	ilock();
	if (s->key > S.vtime)
		S.vtime = s->key;
	trace(TR_OP, s);
	s->key += s->weight;
	s->weight = 1;
	/* back in key order (threads that entered meanwhile with a lower key
	 * may stand before it: the head keeps its grant until it passes it) */
	if (S.rq_len > 1) {
		Q_REMOVE(S.rq_first, S.rq_last, s);
		rq_insert(s);
	}
	tick_locked();
	dmt_thread *w = pick_head_locked();
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
}

int turn_wait(dmt_thread *s, const void *obj, uint64_t deadline)
{
	ilock();
	if (s->key > S.vtime)
		S.vtime = s->key;
	s->weight = 1;
	trace(TR_WAIT, s);
	rq_del(s);
	s->wait_obj = obj;
	s->deadline = deadline;
	s->timed_out = 0;
	atomic_store(&s->state, T_WAIT);
	Q_APPEND(S.wq_first, S.wq_last, s);
	S.wq_len++;
	if (deadline && deadline < S.next_deadline)
		S.next_deadline = deadline;
	tick_locked();
	dmt_thread *w = pick_head_locked();
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
	s->busy = 1;
	wait_head(s);
	s->busy = 0;
	s->wait_obj = 0;
	/* any turn is the owner's next turn for the bias protocol */
	if (unlikely(atomic_load_explicit(&s->revoke_pending, memory_order_acquire)))
		dmt_revoke_at_turn(s);
	return s->timed_out;
}

int turn_signal(const void *obj, int all)
{
	if (!__atomic_load_n(&S.wq_len, __ATOMIC_RELAXED))
		return 0;
	ilock();
	int n = signal_locked(obj, all);
	dmt_thread *w = S.head ? 0 : pick_head_locked();
	iunlock();
	if (w)
		futex_wake(&w->grant, 1);
	return n;
}

int turn_block(dmt_thread *s)
{
	if (s->depth != 1)
		return 0; /* nested in another operation: keep the turn */
	ilock();
	if (s->key > S.vtime)
		S.vtime = s->key;
	s->weight = 1;
	trace(TR_BLOCK, s);
	rq_del(s);
	atomic_store(&s->state, T_BLOCKED);
	G.slot->blocked++;
	tick_locked();
	dmt_thread *w = pick_head_locked();
	iunlock();
	s->depth = 0;
	if (w)
		futex_wake(&w->grant, 1);
	return 1;
}

void turn_unblock(dmt_thread *s, int blocked)
{
	if (!blocked) {
		turn_put(s);
		return;
	}
	/* Re-enter at the tail of the runq. In joint_sched this is where the
	 * input channel decides the logical time of re-entry. */
	ilock();
	G.slot->blocked--;
	rq_add(s);
	trace(TR_UNBLOCK, s);
	dmt_thread *w = S.head ? 0 : pick_head_locked();
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
}

/* s has just come back from a blocking receive with data: it is likely to
 * compute before its next operation, so it takes the input weight too. */
void dmt_input_arrived(dmt_thread *s)
{
	ilock();
	dmt_thread *w = 0;
	if (atomic_load(&s->state) == T_RUN && G.input_weight > 1) {
		dmt_thread *h = S.rq_first;
		Q_REMOVE(S.rq_first, S.rq_last, s);
		s->key += G.input_weight - 1;
		rq_insert(s);
		if (S.rq_first != h)
			w = pick_head_locked();
	}
	iunlock();
	if (w && w != s)
		futex_wake(&w->grant, 1);
}

uint64_t dmt_deadline_rel(uint64_t rel_ns)
{
	uint64_t turns = (rel_ns + G.ns_per_turn - 1) / G.ns_per_turn;
	if (turns == 0)
		turns = 1;
	if (turns > (UINT64_MAX >> 2))
		turns = UINT64_MAX >> 2;
	return S.clock + turns;
}

/*
 * Logical deadline of an absolute timeout on clock clk. The interval is
 * measured from the last time this thread read that clock (the usual
 * "now + timeout" idiom then gives exactly "timeout", whatever the real
 * time of the wait), and one absolute deadline waited on again maps to the
 * same logical deadline.
 */
uint64_t dmt_deadline_abs(dmt_thread *s, clockid_t clk, const struct timespec *abs)
{
	if (clk != CLOCK_MONOTONIC)
		clk = CLOCK_REALTIME;
	if (s->last_abs_deadline && s->last_abs_clk == clk &&
	    s->last_abs.tv_sec == abs->tv_sec && s->last_abs.tv_nsec == abs->tv_nsec)
		return s->last_abs_deadline > S.clock ? s->last_abs_deadline : S.clock + 1;
	struct timespec base = tls_now[clk];
	if (base.tv_sec == 0 && base.tv_nsec == 0)
		R.clock_gettime(clk, &base);
	int64_t rel = (int64_t)(abs->tv_sec - base.tv_sec) * 1000000000ll +
		      (abs->tv_nsec - base.tv_nsec);
	uint64_t d = dmt_deadline_rel(rel > 0 ? (uint64_t)rel : 0);
	s->last_abs = *abs;
	s->last_abs_clk = clk;
	s->last_abs_deadline = d;
	return d;
}

/* ---------------------------------------------------------------- threads */

dmt_thread *dmt_thread_new(void)
{
	ilock();
	dmt_thread *t;
	for (t = S.all; t; t = t->all_next)
		if (!t->in_use)
			break;
	if (!t) {
		t = calloc(1, sizeof *t);
		t->all_next = S.all;
		S.all = t;
	} else {
		dmt_thread *keep = t->all_next;
		memset(t, 0, sizeof *t);
		t->all_next = keep;
	}
	t->in_use = 1;
	t->weight = 1;
	t->id = S.next_id++;
	atomic_store(&t->state, T_BLOCKED); /* in no queue yet */
	iunlock();
	return t;
}

int dmt_thread_add(dmt_thread *t)
{
	ilock();
	rq_add(t);
	dmt_thread *w = S.head ? 0 : pick_head_locked();
	iunlock();
	stat_add(&G.slot->threads, 1);
	stat_add(&G.slot->live_threads, 1);
	if (w)
		futex_wake(&w->grant, 1);
	return 0;
}

void dmt_thread_abort(dmt_thread *t)
{
	ilock();
	rq_del(t);
	atomic_store(&t->state, T_GONE);
	t->in_use = 0;
	iunlock();
	stat_add(&G.slot->live_threads, (uint64_t)-1);
}

void dmt_thread_start(dmt_thread *t)
{
	dmt_self = t;
	t->ktid = (pid_t)raw_syscall6(SYS_gettid, 0, 0, 0, 0, 0, 0);
	t->pt = pthread_self();
}

/* A thread past its start routine (or in pthread_exit). It keeps its place
 * in the runq until it is dead; see pick_head_locked. */
void dmt_thread_exit(dmt_thread *s)
{
	turn_get(s);
	stat_op(DMT_OP_EXIT);
	ilock();
	s->exiting = 1;
	if (s->main && !tid_off) {
		/* cannot observe its death: leave now */
		rq_del(s);
		atomic_store(&s->state, T_GONE);
		signal_locked(s, 1);
	}
	iunlock();
	if (atomic_load(&s->state) == T_GONE) {
		s->depth = 0;
		ilock();
		tick_locked();
		dmt_thread *w = pick_head_locked();
		iunlock();
		if (w)
			futex_wake(&w->grant, 1);
		return;
	}
	turn_put(s);
}

dmt_thread *dmt_thread_find(pthread_t pt)
{
	dmt_thread *t, *found = 0;
	ilock();
	for (t = S.all; t; t = t->all_next)
		if (t->in_use && !t->joined && !t->foreign && pthread_equal(t->pt, pt)) {
			found = t;
			if (!t->detached)
				break;
		}
	iunlock();
	return found;
}

void dmt_thread_release(dmt_thread *t)
{
	ilock();
	t->joined = 1;
	t->in_use = 0;
	iunlock();
}

dmt_thread *dmt_enter_slow(void)
{
	if (tls_in_init)
		return 0;
	/* a thread the runtime did not create: join the runq now */
	dmt_thread *t = dmt_thread_new();
	t->foreign = 1;
	dmt_thread_start(t);
	dmt_thread_add(t);
	if (G.debug)
		dmt_log("foreign thread %d registered as %u", t->ktid, t->id);
	return t;
}

/* ---------------------------------------------------------------- shm */

static void claim_slot(void)
{
	G.slot = &private_slot;
	memset(&private_slot, 0, sizeof private_slot);
	if (!shm_hdr)
		return;
	struct dmt_slot *slots = (struct dmt_slot *)((char *)shm_hdr + DMT_SHM_HDR_SIZE);
	/* a slot of this pid still live belongs to the image before exec */
	for (int i = 0; i < DMT_SHM_NSLOTS; i++) {
		struct dmt_slot *sl = (struct dmt_slot *)((char *)slots + (size_t)i * DMT_SHM_SLOT_SIZE);
		if (__atomic_load_n(&sl->pid, __ATOMIC_ACQUIRE) == G_pid &&
		    __atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) == 1)
			__atomic_store_n(&sl->state, 2, __ATOMIC_RELEASE);
	}
	for (int i = 0; i < DMT_SHM_NSLOTS; i++) {
		int32_t z = 0;
		struct dmt_slot *sl = (struct dmt_slot *)((char *)slots + (size_t)i * DMT_SHM_SLOT_SIZE);
		if (__atomic_compare_exchange_n(&sl->pid, &z, G_pid, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			sl->ppid = getppid();
			__atomic_store_n(&sl->state, 1, __ATOMIC_RELEASE);
			G.slot = sl;
			return;
		}
	}
	if (G.debug)
		dmt_log("no free statistics slot");
}

static void map_shm(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		dmt_log("cannot open %s: %s", path, strerror(errno));
		return;
	}
	struct stat st;
	if (fstat(fd, &st) == 0 && st.st_size < (off_t)DMT_SHM_SIZE &&
	    ftruncate(fd, DMT_SHM_SIZE) != 0) {
		dmt_log("cannot size %s: %s", path, strerror(errno));
		close(fd);
		return;
	}
	void *p = mmap(0, DMT_SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		dmt_log("cannot map %s: %s", path, strerror(errno));
		return;
	}
	shm_hdr = p;
	/* every process writes the same constants: no creation race */
	shm_hdr->version = DMT_SHM_VERSION;
	shm_hdr->nslots = DMT_SHM_NSLOTS;
	shm_hdr->slot_size = DMT_SHM_SLOT_SIZE;
	shm_hdr->nops = DMT_SHM_NOPS;
	shm_hdr->chan_off = DMT_CHAN_OFF;
	shm_hdr->chan_size = DMT_SHM_SIZE - DMT_CHAN_OFF;
	shm_hdr->ns_per_turn = G.ns_per_turn;
	struct dmt_chan *ch = (struct dmt_chan *)((char *)p + DMT_CHAN_OFF);
	if (!ch->cap) {
		ch->ent_size = sizeof(struct dmt_chan_ent);
		ch->cap = DMT_CHAN_CAP;
	}
	G.chan = ch;
	__atomic_store_n(&shm_hdr->magic, DMT_SHM_MAGIC, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- fork */

static void atfork_prepare(void)
{
	if (G.enabled)
		ilock();
}

static void atfork_parent(void)
{
	if (G.enabled)
		iunlock();
}

/* The child starts over with the forking thread as its only thread, still
 * holding the turn (it is inside fork()). */
static void atfork_child(void)
{
	if (!G.enabled)
		return;
	G_pid = (pid_t)raw_syscall6(SYS_getpid, 0, 0, 0, 0, 0, 0);
	dmt_thread *s = dmt_self;
	atomic_store(&S.lkw, 0);
	S.lk_owner = 0;
	S.lk_count = 0;
	S.rq_first = S.rq_last = 0;
	S.rq_len = 0;
	S.wq_first = S.wq_last = 0;
	S.wq_len = 0;
	S.next_deadline = UINT64_MAX;
	/* the channel stays with the parent (a child may claim it if the
	 * parent never did) */
	atomic_store(&G.joint_on, 0);
	atomic_store(&S.need_input, 0);
	/* other threads' descriptors are unreachable now: keep only s */
	for (dmt_thread *t = S.all; t; t = t->all_next)
		if (t != s)
			t->in_use = 0;
	uint64_t clk = S.clock;
	claim_slot();
	trace_open();
	G.slot->clock = clk;
	G.slot->threads = 1;
	G.slot->live_threads = 1;
	if (s) {
		s->ktid = G_pid;
		s->exiting = 0;
		s->foreign = 0;
		s->main = 1; /* the child's initial thread */
		s->pt = pthread_self();
		s->busy = 0;
		rq_add(s);
		atomic_store(&S.head, s);
		atomic_store(&s->grant, 1);
	}
}

__attribute__((destructor)) static void dmt_fini(void)
{
	if (G.slot && G.slot != &private_slot)
		__atomic_store_n(&G.slot->state, 2, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- init */

static void *sym(const char *name)
{
	void *p = dlsym(RTLD_NEXT, name);
	if (!p)
		p = dlsym(RTLD_DEFAULT, name);
	return p;
}

static void *vsym(const char *name, const char *ver)
{
	void *p = dlvsym(RTLD_NEXT, name, ver);
	return p ? p : sym(name);
}

static void resolve(void)
{
#define S_(f, n) R.f = sym(n)
	S_(mutex_init, "pthread_mutex_init");
	S_(mutex_lock, "pthread_mutex_lock");
	S_(mutex_trylock, "pthread_mutex_trylock");
	S_(mutex_unlock, "pthread_mutex_unlock");
	S_(mutex_timedlock, "pthread_mutex_timedlock");
	S_(mutex_clocklock, "pthread_mutex_clocklock");
	R.cond_init = vsym("pthread_cond_init", "GLIBC_2.3.2");
	R.cond_wait = vsym("pthread_cond_wait", "GLIBC_2.3.2");
	R.cond_timedwait = vsym("pthread_cond_timedwait", "GLIBC_2.3.2");
	R.cond_signal = vsym("pthread_cond_signal", "GLIBC_2.3.2");
	R.cond_broadcast = vsym("pthread_cond_broadcast", "GLIBC_2.3.2");
	S_(cond_clockwait, "pthread_cond_clockwait");
	S_(rw_rdlock, "pthread_rwlock_rdlock");
	S_(rw_wrlock, "pthread_rwlock_wrlock");
	S_(rw_tryrdlock, "pthread_rwlock_tryrdlock");
	S_(rw_trywrlock, "pthread_rwlock_trywrlock");
	S_(rw_unlock, "pthread_rwlock_unlock");
	S_(rw_clockrdlock, "pthread_rwlock_clockrdlock");
	S_(rw_clockwrlock, "pthread_rwlock_clockwrlock");
	S_(sem_clockwait, "sem_clockwait");
	S_(sem_wait, "sem_wait");
	S_(sem_trywait, "sem_trywait");
	S_(sem_timedwait, "sem_timedwait");
	S_(sem_post, "sem_post");
	S_(barrier_init, "pthread_barrier_init");
	S_(barrier_wait, "pthread_barrier_wait");
	S_(barrier_destroy, "pthread_barrier_destroy");
	S_(spin_trylock, "pthread_spin_trylock");
	S_(spin_unlock, "pthread_spin_unlock");
	S_(create, "pthread_create");
	S_(join, "pthread_join");
	S_(detach, "pthread_detach");
	S_(exit, "pthread_exit");
	S_(once, "pthread_once");
	S_(sched_yield, "sched_yield");
	S_(fork, "fork");
	S_(nanosleep, "nanosleep");
	S_(clock_nanosleep, "clock_nanosleep");
	S_(usleep, "usleep");
	S_(sleep, "sleep");
	S_(clock_gettime, "clock_gettime");
	S_(gettimeofday, "gettimeofday");
	S_(time, "time");
	S_(syscall, "syscall");
	S_(execve, "execve");
#undef S_
}

HIDDEN void dmt_io_init(void);

static uint64_t env_u64(const char *name, uint64_t def)
{
	const char *v = getenv(name);
	if (!v || !*v)
		return def;
	char *end;
	unsigned long long x = strtoull(v, &end, 10);
	return *end ? def : (uint64_t)x;
}

void dmt_init(void)
{
	static _Atomic int st;
	if (tls_in_init)
		return;
	int z = 0;
	if (!atomic_compare_exchange_strong(&st, &z, 1)) {
		while (atomic_load(&st) != 2)
			cpu_relax();
		return;
	}
	tls_in_init = 1;
	resolve();
	dmt_io_init();
	G_pid = (pid_t)raw_syscall6(SYS_getpid, 0, 0, 0, 0, 0, 0);
	G.ns_per_turn = env_u64("LOCKSTEP_DMT_NS_PER_TURN", 1000);
	if (G.ns_per_turn == 0)
		G.ns_per_turn = 1;
	G.spin = (int)env_u64("LOCKSTEP_DMT_SPIN", 100);
	G.debug = (int)env_u64("LOCKSTEP_DMT_DEBUG", 0);
	G.steal_ns = env_u64("LOCKSTEP_DMT_STEAL_MS", 50) * 1000000ull;
	G.input_weight = env_u64("LOCKSTEP_DMT_INPUT_WEIGHT", 1000);
	G.joint_env = (int)env_u64("LOCKSTEP_DMT_JOINT", 0);
	G.quantum = env_u64("LOCKSTEP_DMT_QUANTUM", 2000);
	if (G.quantum == 0)
		G.quantum = 1;
	if (G.input_weight == 0)
		G.input_weight = 1;
	G.slot = &private_slot;
	S.next_deadline = UINT64_MAX;
	const char *dis = getenv("LOCKSTEP_DMT_DISABLE");
	if (dis && *dis && strcmp(dis, "0") != 0) {
		G.enabled = 0;
		goto out;
	}
	const char *tp = getenv("LOCKSTEP_DMT_TRACE");
	if (tp && *tp) {
		snprintf(trace_prefix, sizeof trace_prefix, "%s", tp);
		trace_open();
	}
	const char *path = getenv("LOCKSTEP_DMT_SHM");
	if (path && *path)
		map_shm(path);
	claim_slot();

	/* glibc keeps the kernel tid of a thread in struct pthread, cleared by
	 * the kernel when the thread dies; find it for the main thread */
	pid_t tid = (pid_t)raw_syscall6(SYS_gettid, 0, 0, 0, 0, 0, 0);
	char *pd = (char *)pthread_self();
	for (int off = 16; off < 1024; off += 4)
		if (*(pid_t *)(pd + off) == tid) {
			tid_off = off;
			break;
		}

	dmt_thread *m = dmt_thread_new();
	m->main = 1;
	dmt_thread_start(m);
	dmt_thread_add(m);
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
	G.enabled = 1;
	if (G.debug)
		dmt_log("ready: ns_per_turn=%llu input_weight=%llu spin=%d tid_off=%d shm=%s",
			(unsigned long long)G.ns_per_turn, (unsigned long long)G.input_weight, G.spin, tid_off,
			path ? path : "(none)");
out:
	tls_in_init = 0;
	dmt_ready = 1;
	atomic_store(&st, 2);
}

__attribute__((constructor)) static void dmt_ctor(void) { dmt_init(); }

/* time: remember the last reading per thread (see dmt_deadline_abs) */
EXPORT int clock_gettime(clockid_t clk, struct timespec *ts)
{
	if (unlikely(!R.clock_gettime))
		R.clock_gettime = sym("clock_gettime");
	if (atomic_load_explicit(&G.joint_on, memory_order_relaxed) &&
	    (clk == CLOCK_REALTIME || clk == CLOCK_MONOTONIC || clk == CLOCK_REALTIME_COARSE ||
	     clk == CLOCK_MONOTONIC_COARSE || clk == CLOCK_BOOTTIME)) {
		int mono = clk != CLOCK_REALTIME && clk != CLOCK_REALTIME_COARSE;
		dmt_joint_time(ts, mono);
		tls_now[mono ? CLOCK_MONOTONIC : CLOCK_REALTIME] = *ts;
		return 0;
	}
	int r = R.clock_gettime(clk, ts);
	if (r == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_MONOTONIC))
		tls_now[clk] = *ts;
	return r;
}

EXPORT int gettimeofday(struct timeval *tv, void *tz)
{
	if (unlikely(!R.gettimeofday))
		R.gettimeofday = sym("gettimeofday");
	if (atomic_load_explicit(&G.joint_on, memory_order_relaxed) && tv) {
		struct timespec ts;
		dmt_joint_time(&ts, 0);
		tls_now[CLOCK_REALTIME] = ts;
		tv->tv_sec = ts.tv_sec;
		tv->tv_usec = ts.tv_nsec / 1000;
		return 0;
	}
	int r = R.gettimeofday(tv, tz);
	if (r == 0 && tv) {
		tls_now[CLOCK_REALTIME].tv_sec = tv->tv_sec;
		tls_now[CLOCK_REALTIME].tv_nsec = tv->tv_usec * 1000;
	}
	return r;
}

EXPORT time_t time(time_t *tp)
{
	if (unlikely(!R.time))
		R.time = sym("time");
	if (atomic_load_explicit(&G.joint_on, memory_order_relaxed)) {
		struct timespec ts;
		dmt_joint_time(&ts, 0);
		tls_now[CLOCK_REALTIME] = ts;
		if (tp)
			*tp = ts.tv_sec;
		return ts.tv_sec;
	}
	time_t t = R.time(tp);
	tls_now[CLOCK_REALTIME].tv_sec = t;
	tls_now[CLOCK_REALTIME].tv_nsec = 0;
	return t;
}

/* ---------------------------------------------------------------- joint_sched */

int dmt_signal_locked(const void *obj, int all) { return signal_locked(obj, all); }

/*
 * Deterministic time: the wall clock the log last stamped (the leader's,
 * carried by the channel's entries) plus the turns since, never going
 * backwards. Monotonic clocks count the same way. Before any stamp the
 * base is 0 (1970) plus turns: identical everywhere, if odd.
 */
void dmt_joint_time(struct timespec *ts, int mono)
{
	(void)mono;
	uint64_t c = __atomic_load_n(&S.clock, __ATOMIC_RELAXED);
	uint64_t base = __atomic_load_n(&S.wall_base, __ATOMIC_ACQUIRE);
	uint64_t bc = __atomic_load_n(&S.wall_clock, __ATOMIC_RELAXED);
	uint64_t ns = base + (c > bc ? c - bc : 0) * G.ns_per_turn;
	ts->tv_sec = (time_t)(ns / 1000000000ull);
	ts->tv_nsec = (long)(ns % 1000000000ull);
}

HIDDEN extern int dmt_ext_waiters; /* io.c */

/* Admit one entry: input (io.c) or a bubble. Under the lock, with no head. */
static void admit_locked(const struct dmt_chan_ent *e)
{
	atomic_store(&S.need_input, 0);
	int idle = S.rq_first == 0;
	if (e->ltime) {
		/* time from the log: never backwards */
		uint64_t now = S.wall_base + (S.clock - S.wall_clock) * G.ns_per_turn;
		__atomic_store_n(&S.wall_base, e->ltime > now ? e->ltime : now, __ATOMIC_RELEASE);
		S.wall_clock = S.clock;
	}
	if (e->kind == DMT_EV_BUBBLE) {
		if (idle) {
			/* nobody can run: the clock jumps, timed waits expire */
			S.clock += e->len;
			G.slot->clock = S.clock;
			stat_add(&G.slot->idle_advances, 1);
			expire_locked();
			S.horizon = S.clock + G.quantum;
		} else {
			S.horizon = S.clock + (e->len ? e->len : 1);
		}
		/* pollers of descriptors outside the log look again */
		dmt_joint_admit_locked(e);
	} else {
		dmt_joint_admit_locked(e);
		S.horizon = S.clock + G.quantum;
	}
}

/* The ingest thread of the consuming process: outside the scheduler, it
 * waits until the schedule needs input, then for the channel's next entry,
 * and admits it. */
static void *ingest(void *arg)
{
	pid_t me = (pid_t)(intptr_t)arg;
	struct dmt_chan *ch = G.chan;
	uint32_t mask = ch->cap - 1;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, 0);
	while (me == G_pid) {
		if (!atomic_load(&S.need_input)) {
			futex_wait((_Atomic uint32_t *)&S.need_input, 0, 0);
			continue;
		}
		uint64_t tail = __atomic_load_n(&ch->tail, __ATOMIC_RELAXED);
		if (__atomic_load_n(&ch->head, __ATOMIC_ACQUIRE) == tail) {
			/* starving 1: a bubble would let something run (a thread
			 * is runnable, or one waits with a timeout); 2: only input
			 * would (rq_add turns it to 1) */
			ilock();
			int useful = S.rq_first != 0 || S.next_deadline != UINT64_MAX ||
				     dmt_ext_waiters > 0;
			__atomic_store_n(&ch->clock, S.clock, __ATOMIC_RELAXED);
			__atomic_store_n(&ch->starving, useful ? 1 : 2, __ATOMIC_SEQ_CST);
			iunlock();
			__atomic_fetch_add(&ch->starve, 1, __ATOMIC_SEQ_CST);
			futex_wake_shared(&ch->starve, INT_MAX);
			for (;;) {
				__atomic_store_n(&ch->cons_sleep, 1, __ATOMIC_SEQ_CST);
				if (__atomic_load_n(&ch->head, __ATOMIC_SEQ_CST) != tail)
					break;
				struct timespec ts = {1, 0}; /* re-check now and then */
				futex_wait_shared(&ch->cons_sleep, 1, &ts);
			}
			__atomic_store_n(&ch->cons_sleep, 0, __ATOMIC_SEQ_CST);
			__atomic_store_n(&ch->starving, 0, __ATOMIC_SEQ_CST);
		}
		struct dmt_chan_ent e = ch->ent[tail & mask];
		ilock();
		admit_locked(&e);
		dmt_thread *w = pick_head_locked();
		iunlock();
		__atomic_store_n(&ch->tail, tail + 1, __ATOMIC_SEQ_CST);
		__atomic_store_n(&ch->admitted, tail + 1, __ATOMIC_RELAXED);
		if (__atomic_load_n(&ch->prod_sleep, __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&ch->prod_sleep, 0, __ATOMIC_SEQ_CST);
			futex_wake_shared(&ch->prod_sleep, INT_MAX);
		}
		if (w)
			futex_wake(&w->grant, 1);
	}
	return 0;
}

/*
 * Become the process that consumes the channel (joint_sched). Called
 * holding the turn, at a server's first input call: a fixed point of its
 * order. Returns 1 if this process consumes it.
 */
int dmt_joint_claim(void)
{
	if (atomic_load_explicit(&G.joint_on, memory_order_relaxed))
		return 1;
	if (!G.joint_env || !G.chan)
		return 0;
	int32_t cur = __atomic_load_n(&G.chan->consumer, __ATOMIC_ACQUIRE);
	if (cur == G_pid)
		goto mine;
	if (cur != 0 && raw_syscall6(SYS_kill, cur, 0, 0, 0, 0, 0) != -ESRCH)
		return 0;
	if (!__atomic_compare_exchange_n(&G.chan->consumer, &cur, G_pid, 0, __ATOMIC_ACQ_REL,
					 __ATOMIC_RELAXED))
		return 0;
mine:
	ilock();
	S.horizon = S.clock + G.quantum;
	atomic_store(&G.joint_on, 1);
	iunlock();
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&a, 64 << 10);
	pthread_t t;
	int r = R.create(&t, &a, ingest, (void *)(intptr_t)G_pid);
	pthread_attr_destroy(&a);
	if (r != 0) {
		dmt_log("cannot start the input thread: joint_sched off");
		atomic_store(&G.joint_on, 0);
		return 0;
	}
	if (G.debug)
		dmt_log("consuming the input channel (quantum %llu turns)", (unsigned long long)G.quantum);
	return 1;
}
