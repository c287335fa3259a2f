/*
 * sync.c: pthread synchronisation, threads and sleeps on top of the turn.
 *
 * Locks keep their state in the real object and are only ever taken with
 * the real try-lock while holding the turn; a thread that finds one busy
 * waits in the waitq on the object's address, and the releaser moves the
 * first such waiter back to the runq. The kernel never picks a winner.
 * Condition variables, barriers and once-controls live entirely in the
 * runtime. Process-shared objects, which other processes may release, are
 * waited on in the kernel outside both queues.
 */
#include "dmt.h"

#include <string.h>
#include <unistd.h>

static inline int mutex_pshared(pthread_mutex_t *m) { return m->__data.__kind & 128; }
static inline int cond_pshared(pthread_cond_t *c) { return c->__data.__wrefs & 1; }
static inline clockid_t cond_clock(pthread_cond_t *c)
{
	return (c->__data.__wrefs & 2) ? CLOCK_MONOTONIC : CLOCK_REALTIME;
}
static inline int sem_pshared(sem_t *sm) { return ((int *)sm)[2] != 0; }
static inline int bad_ts(const struct timespec *ts)
{
	return !ts || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000;
}

/* ---------------------------------------------------------------- bias */

/*
 * Thread-private mutexes. The first thread to lock a mutex under the turn
 * becomes its owner; the owner's later lock/unlock skip the turn. Another
 * thread's first use (under the turn) revokes the bias at a fixed point of
 * the order: at once if the owner is parked in the runtime, else at the
 * owner's next turn (the other thread waits for it). Until then only the
 * owner touches the mutex, so its state is a function of the owner's own
 * program order; afterwards every operation on it is ordered as usual.
 * The owner is kept in the mutex's __list.__next, which glibc uses only
 * for robust and priority-inheritance mutexes (never biased) and which
 * pthread_mutex_init and PTHREAD_MUTEX_INITIALIZER zero.
 */
#define BIAS_SHARED ((void *)1)
#define BIAS_FREE ((void *)2)  /* given up by its owner: the next taker owns it */
#define BIAS_MOVES 8           /* owners a mutex may have before it is shared */

static inline int biasable(pthread_mutex_t *m)
{
	/* plain types only: not robust (16), PI (32), PP (64), pshared (128) */
	return (m->__data.__kind & 0xf0) == 0;
}
static inline void **bias_slot(pthread_mutex_t *m) { return (void **)&m->__data.__list.__next; }
static inline void *bias_get(pthread_mutex_t *m)
{
	return __atomic_load_n(bias_slot(m), __ATOMIC_ACQUIRE);
}
static inline void bias_set(pthread_mutex_t *m, void *v)
{
	__atomic_store_n(bias_slot(m), v, __ATOMIC_RELEASE);
}
/* how many times the bias moved, kept in __list.__prev (unused as well) */
static inline uintptr_t *bias_moves(pthread_mutex_t *m) { return (uintptr_t *)&m->__data.__list.__prev; }

/* Holding the turn: make s the owner of an unowned or given-up m, if it is
 * unlocked and has not changed owners too often; else make it shared. */
static int bias_take(dmt_thread *s, pthread_mutex_t *m)
{
	if (m->__data.__lock == 0 && *bias_moves(m) < BIAS_MOVES) {
		(*bias_moves(m))++;
		bias_set(m, s);
		return 1;
	}
	bias_set(m, BIAS_SHARED);
	return 0;
}

/* Holding the turn, before an ordered operation on m by s: claim an
 * unowned mutex, or have another owner give it up. Returns 1 if s owns m
 * (private) afterwards. */
static int bias_ordered(dmt_thread *s, pthread_mutex_t *m)
{
	if (!biasable(m))
		return 0;
	for (;;) {
		void *b = bias_get(m);
		if (b == s)
			return 1;
		if (b == BIAS_SHARED)
			return 0;
		if (b == 0 || b == BIAS_FREE)
			return bias_take(s, m);
		dmt_thread *owner = b;
		stat_op(DMT_OP_REVOKE);
		int now = dmt_request_revoke(owner, m);
		if (now == 2) {
			bias_set(m, BIAS_SHARED);
			return 0;
		}
		if (now)
			return bias_take(s, m);
		uint32_t gen = owner->revoke_gen;
		while (bias_get(m) == owner && owner->revoke_gen == gen)
			turn_wait(s, &owner->revoke_gen, 0);
	}
}

/* At s's turn: give up the biases other threads asked for. */
void dmt_revoke_at_turn(dmt_thread *s)
{
	dmt_lock();
	for (int i = 0; i < s->nrevoke; i++) {
		pthread_mutex_t *m = s->revoke[i];
		if (bias_get(m) == s)
			bias_set(m, BIAS_FREE);
	}
	s->nrevoke = 0;
	atomic_store(&s->revoke_pending, 0);
	s->revoke_gen++;
	dmt_unlock();
	turn_signal(&s->revoke_gen, 1);
}

/* Under the queue lock, as h is stolen: the biases others asked it for
 * become shared now (see dmt_request_revoke), and the askers retry. */
void dmt_revoke_stolen(dmt_thread *h)
{
	for (int i = 0; i < h->nrevoke; i++) {
		pthread_mutex_t *m = h->revoke[i];
		if (bias_get(m) == h)
			bias_set(m, BIAS_SHARED);
	}
	h->revoked_stolen = 1;
	h->revoke_gen++;
	atomic_store(&h->revoke_pending, 0);
}

/* A mutex is private to the thread that initialises it: nobody else may
 * use it before pthread_mutex_init returns. */
EXPORT int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *a)
{
	dmt_thread *s = dmt_enter();
	int r = R.mutex_init(m, a);
	if (r == 0 && s && biasable(m))
		bias_set(m, s);
	return r;
}

/* ---------------------------------------------------------------- mutex */

/* Acquire m while holding the turn (s->depth >= 1). */
static int mutex_acquire(dmt_thread *s, pthread_mutex_t *m, uint64_t dl)
{
	int r;
	if (bias_ordered(s, m))
		return R.mutex_lock(m); /* private: nobody else can hold it */
	for (;;) {
		r = R.mutex_trylock(m);
		if (r != EBUSY)
			return r;
		if ((m->__data.__kind & 3) == PTHREAD_MUTEX_ERRORCHECK_NP &&
		    m->__data.__owner == s->ktid)
			return EDEADLK;
		if (mutex_pshared(m)) {
			/* another process may hold it: wait in the kernel */
			int b = turn_block(s);
			r = R.mutex_lock(m);
			if (b) {
				/* back into the runq, and into this operation */
				turn_unblock(s, 1);
				turn_get(s);
			}
			return r;
		}
		if (turn_wait(s, m, dl))
			return R.mutex_trylock(m) == 0 ? 0 : ETIMEDOUT;
	}
}

EXPORT int pthread_mutex_lock(pthread_mutex_t *m)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.mutex_lock(m);
	if (bias_get(m) == s && biasable(m)) {
		stat_op(DMT_OP_MUTEX_LOCK_PRIVATE);
		return R.mutex_lock(m);
	}
	turn_get(s);
	stat_op(DMT_OP_MUTEX_LOCK);
	int r = mutex_acquire(s, m, 0);
	turn_put(s);
	return r;
}

EXPORT int pthread_mutex_trylock(pthread_mutex_t *m)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.mutex_trylock(m);
	if (bias_get(m) == s && biasable(m)) {
		stat_op(DMT_OP_MUTEX_LOCK_PRIVATE);
		return R.mutex_trylock(m);
	}
	turn_get(s);
	stat_op(DMT_OP_MUTEX_LOCK);
	bias_ordered(s, m);
	int r = R.mutex_trylock(m);
	turn_put(s);
	return r;
}

static int mutex_timed(pthread_mutex_t *m, clockid_t clk, const struct timespec *abs)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.mutex_clocklock(m, clk, abs);
	if (bad_ts(abs))
		return EINVAL;
	turn_get(s);
	stat_op(DMT_OP_MUTEX_LOCK);
	int r;
	if (mutex_pshared(m)) {
		r = R.mutex_trylock(m);
		if (r == EBUSY) {
			int b = turn_block(s);
			r = R.mutex_clocklock(m, clk, abs);
			turn_unblock(s, b);
			return r;
		}
	} else {
		if (bias_get(m) == s && biasable(m)) {
			turn_put(s);
			return R.mutex_lock(m);
		}
		r = mutex_acquire(s, m, dmt_deadline_abs(s, clk, abs));
	}
	turn_put(s);
	return r;
}

EXPORT int pthread_mutex_timedlock(pthread_mutex_t *m, const struct timespec *abs)
{
	return mutex_timed(m, CLOCK_REALTIME, abs);
}

EXPORT int pthread_mutex_clocklock(pthread_mutex_t *m, clockid_t clk, const struct timespec *abs)
{
	return mutex_timed(m, clk, abs);
}

EXPORT int pthread_mutex_unlock(pthread_mutex_t *m)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.mutex_unlock(m);
	if (bias_get(m) == s && biasable(m)) {
		stat_op(DMT_OP_MUTEX_UNLOCK_PRIVATE);
		return R.mutex_unlock(m);
	}
	turn_get(s);
	stat_op(DMT_OP_MUTEX_UNLOCK);
	int r = R.mutex_unlock(m);
	if (r == 0 && !mutex_pshared(m) && bias_get(m) != s)
		turn_signal(m, 0);
	turn_put(s);
	return r;
}

/* ---------------------------------------------------------------- cond */

static int cond_wait_common(pthread_cond_t *c, pthread_mutex_t *m, int timed, clockid_t clk,
			    const struct timespec *abs)
{
	dmt_thread *s = dmt_enter();
	if (!s) {
		if (!timed)
			return R.cond_wait(c, m);
		return R.cond_clockwait(c, m, clk, abs);
	}
	if (timed && bad_ts(abs))
		return EINVAL;
	if (cond_pshared(c)) {
		/* another process may signal it: wait in the kernel */
		turn_get(s);
		stat_op(DMT_OP_COND_WAIT);
		if (!mutex_pshared(m))
			turn_signal(m, 1);
		int b = turn_block(s);
		int r = timed ? R.cond_clockwait(c, m, clk, abs) : R.cond_wait(c, m);
		turn_unblock(s, b);
		return r;
	}
	turn_get(s);
	stat_op(DMT_OP_COND_WAIT);
	uint64_t dl = timed ? dmt_deadline_abs(s, clk, abs) : 0;
	int r = R.mutex_unlock(m);
	if (r) {
		turn_put(s);
		return r;
	}
	if (!mutex_pshared(m) && bias_get(m) != s)
		turn_signal(m, 0);
	int to = turn_wait(s, c, dl);
	r = mutex_acquire(s, m, 0);
	turn_put(s);
	if (r)
		return r;
	return to ? ETIMEDOUT : 0;
}

EXPORT int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
	return cond_wait_common(c, m, 0, CLOCK_REALTIME, 0);
}

EXPORT int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const struct timespec *abs)
{
	return cond_wait_common(c, m, 1, cond_clock(c), abs);
}

EXPORT int pthread_cond_clockwait(pthread_cond_t *c, pthread_mutex_t *m, clockid_t clk,
				  const struct timespec *abs)
{
	return cond_wait_common(c, m, 1, clk, abs);
}

static int cond_wake(pthread_cond_t *c, int all)
{
	dmt_thread *s = dmt_enter();
	if (!s || cond_pshared(c)) {
		if (s) {
			turn_get(s);
			stat_op(all ? DMT_OP_COND_BROADCAST : DMT_OP_COND_SIGNAL);
		}
		int r = all ? R.cond_broadcast(c) : R.cond_signal(c);
		if (s)
			turn_put(s);
		return r;
	}
	turn_get(s);
	stat_op(all ? DMT_OP_COND_BROADCAST : DMT_OP_COND_SIGNAL);
	turn_signal(c, all);
	turn_put(s);
	return 0;
}

EXPORT int pthread_cond_signal(pthread_cond_t *c) { return cond_wake(c, 0); }
EXPORT int pthread_cond_broadcast(pthread_cond_t *c) { return cond_wake(c, 1); }

/* ---------------------------------------------------------------- rwlock */

static int rw_common(pthread_rwlock_t *rw, int wr, int try, clockid_t clk,
		     const struct timespec *abs)
{
	dmt_thread *s = dmt_enter();
	int (*tryf)(pthread_rwlock_t *) = wr ? R.rw_trywrlock : R.rw_tryrdlock;
	if (!s) {
		if (try)
			return tryf(rw);
		if (abs)
			return wr ? R.rw_clockwrlock(rw, clk, abs)
				  : R.rw_clockrdlock(rw, clk, abs);
		return wr ? R.rw_wrlock(rw) : R.rw_rdlock(rw);
	}
	if (abs && bad_ts(abs))
		return EINVAL;
	turn_get(s);
	stat_op(wr ? DMT_OP_RWLOCK_WR : DMT_OP_RWLOCK_RD);
	int r = tryf(rw);
	if (r == EBUSY && !try && rw->__data.__cur_writer == s->ktid)
		r = EDEADLK;
	if (r == EBUSY && !try) {
		if (rw->__data.__shared) {
			int b = turn_block(s);
			if (abs)
				r = wr ? R.rw_clockwrlock(rw, clk, abs)
				       : R.rw_clockrdlock(rw, clk, abs);
			else
				r = wr ? R.rw_wrlock(rw) : R.rw_rdlock(rw);
			turn_unblock(s, b);
			return r;
		}
		uint64_t dl = abs ? dmt_deadline_abs(s, clk, abs) : 0;
		while ((r = tryf(rw)) == EBUSY) {
			if (turn_wait(s, rw, dl)) {
				r = tryf(rw);
				if (r == EBUSY)
					r = ETIMEDOUT;
				break;
			}
		}
	}
	turn_put(s);
	return r;
}

EXPORT int pthread_rwlock_rdlock(pthread_rwlock_t *rw) { return rw_common(rw, 0, 0, 0, 0); }
EXPORT int pthread_rwlock_wrlock(pthread_rwlock_t *rw) { return rw_common(rw, 1, 0, 0, 0); }
EXPORT int pthread_rwlock_tryrdlock(pthread_rwlock_t *rw) { return rw_common(rw, 0, 1, 0, 0); }
EXPORT int pthread_rwlock_trywrlock(pthread_rwlock_t *rw) { return rw_common(rw, 1, 1, 0, 0); }
EXPORT int pthread_rwlock_timedrdlock(pthread_rwlock_t *rw, const struct timespec *abs)
{
	return rw_common(rw, 0, 0, CLOCK_REALTIME, abs);
}
EXPORT int pthread_rwlock_timedwrlock(pthread_rwlock_t *rw, const struct timespec *abs)
{
	return rw_common(rw, 1, 0, CLOCK_REALTIME, abs);
}

EXPORT int pthread_rwlock_clockrdlock(pthread_rwlock_t *rw, clockid_t clk,
				      const struct timespec *abs)
{
	return rw_common(rw, 0, 0, clk, abs);
}
EXPORT int pthread_rwlock_clockwrlock(pthread_rwlock_t *rw, clockid_t clk,
				      const struct timespec *abs)
{
	return rw_common(rw, 1, 0, clk, abs);
}

EXPORT int pthread_rwlock_unlock(pthread_rwlock_t *rw)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.rw_unlock(rw);
	turn_get(s);
	stat_op(DMT_OP_RWLOCK_UNLOCK);
	int r = R.rw_unlock(rw);
	if (r == 0 && !rw->__data.__shared)
		turn_signal(rw, 1);
	turn_put(s);
	return r;
}

/* ---------------------------------------------------------------- sem */

static int sem_common(sem_t *sm, int try, clockid_t clk, const struct timespec *abs)
{
	dmt_thread *s = dmt_enter();
	if (!s) {
		if (try)
			return R.sem_trywait(sm);
		if (abs)
			return R.sem_clockwait(sm, clk, abs);
		return R.sem_wait(sm);
	}
	if (abs && bad_ts(abs)) {
		errno = EINVAL;
		return -1;
	}
	turn_get(s);
	stat_op(DMT_OP_SEM_WAIT);
	int r = R.sem_trywait(sm), e = errno;
	if (r != 0 && e == EAGAIN && !try) {
		if (sem_pshared(sm)) {
			int b = turn_block(s);
			r = abs ? R.sem_clockwait(sm, clk, abs) : R.sem_wait(sm);
			e = errno;
			turn_unblock(s, b);
			errno = e;
			return r;
		}
		uint64_t dl = abs ? dmt_deadline_abs(s, clk, abs) : 0;
		for (;;) {
			int to = turn_wait(s, sm, dl);
			r = R.sem_trywait(sm);
			e = errno;
			if (r == 0 || e != EAGAIN)
				break;
			if (to) {
				e = ETIMEDOUT;
				break;
			}
		}
	}
	turn_put(s);
	errno = e;
	return r;
}

EXPORT int sem_wait(sem_t *sm) { return sem_common(sm, 0, 0, 0); }
EXPORT int sem_trywait(sem_t *sm) { return sem_common(sm, 1, 0, 0); }
EXPORT int sem_timedwait(sem_t *sm, const struct timespec *abs)
{
	return sem_common(sm, 0, CLOCK_REALTIME, abs);
}

EXPORT int sem_clockwait(sem_t *sm, clockid_t clk, const struct timespec *abs)
{
	return sem_common(sm, 0, clk, abs);
}

EXPORT int sem_post(sem_t *sm)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.sem_post(sm);
	turn_get(s);
	stat_op(DMT_OP_SEM_POST);
	int r = R.sem_post(sm), e = errno;
	if (r == 0 && !sem_pshared(sm))
		turn_signal(sm, 0);
	turn_put(s);
	errno = e;
	return r;
}

/* ---------------------------------------------------------------- barrier */

#define BAR_MAGIC 0x4c4b4252u
struct dbar {
	uint32_t magic, count, arrived, gen;
};

EXPORT int pthread_barrier_init(pthread_barrier_t *b, const pthread_barrierattr_t *a, unsigned n)
{
	dmt_thread *s = dmt_enter();
	int ps = 0;
	if (a)
		pthread_barrierattr_getpshared(a, &ps);
	if (!s || ps == PTHREAD_PROCESS_SHARED)
		return R.barrier_init(b, a, n);
	if (n == 0)
		return EINVAL;
	struct dbar *d = (struct dbar *)b;
	memset(b, 0, sizeof *b);
	d->count = n;
	d->magic = BAR_MAGIC;
	return 0;
}

EXPORT int pthread_barrier_wait(pthread_barrier_t *b)
{
	dmt_thread *s = dmt_enter();
	struct dbar *d = (struct dbar *)b;
	if (d->magic != BAR_MAGIC) {
		if (!s)
			return R.barrier_wait(b);
		return DMT_BLOCKING(s, DMT_OP_BARRIER, R.barrier_wait(b));
	}
	if (!s)
		return EINVAL; /* cannot happen: made under the runtime */
	turn_get(s);
	stat_op(DMT_OP_BARRIER);
	int r = 0;
	if (++d->arrived == d->count) {
		d->arrived = 0;
		d->gen++;
		turn_signal(b, 1);
		r = PTHREAD_BARRIER_SERIAL_THREAD;
	} else {
		uint32_t g = d->gen;
		while (d->gen == g)
			turn_wait(s, b, 0);
	}
	turn_put(s);
	return r;
}

EXPORT int pthread_barrier_destroy(pthread_barrier_t *b)
{
	struct dbar *d = (struct dbar *)b;
	if (d->magic != BAR_MAGIC)
		return R.barrier_destroy(b);
	if (d->arrived)
		return EBUSY;
	d->magic = 0;
	return 0;
}

/* ---------------------------------------------------------------- spin, once */

EXPORT int pthread_spin_lock(pthread_spinlock_t *l)
{
	dmt_thread *s = dmt_enter();
	if (!s) {
		while (R.spin_trylock(l) == EBUSY)
			;
		return 0;
	}
	turn_get(s);
	stat_op(DMT_OP_SPIN);
	while (R.spin_trylock(l) == EBUSY)
		turn_wait(s, (const void *)l, 0);
	turn_put(s);
	return 0;
}

EXPORT int pthread_spin_trylock(pthread_spinlock_t *l)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.spin_trylock(l);
	turn_get(s);
	stat_op(DMT_OP_SPIN);
	int r = R.spin_trylock(l);
	turn_put(s);
	return r;
}

EXPORT int pthread_spin_unlock(pthread_spinlock_t *l)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.spin_unlock(l);
	turn_get(s);
	stat_op(DMT_OP_SPIN);
	R.spin_unlock(l);
	turn_signal((const void *)l, 0);
	turn_put(s);
	return 0;
}

/* glibc's states for pthread_once_t: 0 new, 1 running, 2 done. */
EXPORT int pthread_once(pthread_once_t *o, void (*fn)(void))
{
	if (__atomic_load_n(o, __ATOMIC_ACQUIRE) == 2)
		return 0;
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.once(o, fn);
	turn_get(s);
	stat_op(DMT_OP_ONCE);
	while (__atomic_load_n(o, __ATOMIC_ACQUIRE) == 1)
		turn_wait(s, o, 0);
	if (__atomic_load_n(o, __ATOMIC_ACQUIRE) == 2) {
		turn_put(s);
		return 0;
	}
	__atomic_store_n(o, 1, __ATOMIC_RELEASE);
	turn_put(s);
	fn();
	turn_get(s);
	__atomic_store_n(o, 2, __ATOMIC_RELEASE);
	turn_signal(o, 1);
	turn_put(s);
	return 0;
}

/* ---------------------------------------------------------------- threads */

static void tramp_cleanup(void *arg) { dmt_thread_exit((dmt_thread *)arg); }

static void *tramp(void *arg)
{
	dmt_thread *t = arg;
	dmt_thread_start(t);
	void *ret;
	pthread_cleanup_push(tramp_cleanup, t);
	ret = t->start(t->arg);
	pthread_cleanup_pop(1);
	return ret;
}

EXPORT int pthread_create(pthread_t *pt, const pthread_attr_t *attr, void *(*fn)(void *),
			  void *arg)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.create(pt, attr, fn, arg);
	turn_get(s);
	stat_op(DMT_OP_CREATE);
	dmt_thread *t = dmt_thread_new();
	t->start = fn;
	t->arg = arg;
	t->tramp = 1;
	int ds = PTHREAD_CREATE_JOINABLE;
	if (attr)
		pthread_attr_getdetachstate(attr, &ds);
	t->detached = ds == PTHREAD_CREATE_DETACHED;
	/* the child takes its place in the runq now, at a fixed point */
	dmt_thread_add(t);
	pthread_t child;
	int r = R.create(&child, attr, tramp, t);
	if (r)
		dmt_thread_abort(t);
	else {
		t->pt = child;
		*pt = child;
	}
	turn_put(s);
	return r;
}

EXPORT int pthread_join(pthread_t pt, void **ret)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.join(pt, ret);
	dmt_thread *t = dmt_thread_find(pt);
	if (!t || t == s)
		return DMT_BLOCKING(s, DMT_OP_JOIN, R.join(pt, ret));
	turn_get(s);
	stat_op(DMT_OP_JOIN);
	while (atomic_load(&t->state) != T_GONE)
		turn_wait(s, t, 0);
	int r = R.join(pt, ret); /* the thread is dead: does not block */
	dmt_thread_release(t);
	turn_put(s);
	return r;
}

EXPORT int pthread_detach(pthread_t pt)
{
	dmt_thread *s = dmt_enter();
	if (s) {
		dmt_thread *t = dmt_thread_find(pt);
		if (t) {
			turn_get(s);
			t->detached = 1;
			if (atomic_load(&t->state) == T_GONE)
				dmt_thread_release(t);
			turn_put(s);
		}
	}
	return R.detach(pt);
}

EXPORT void pthread_exit(void *ret)
{
	dmt_thread *s = dmt_enter();
	/* threads started by tramp leave through its cleanup handler */
	if (s && !s->tramp)
		dmt_thread_exit(s);
	R.exit(ret);
}

/* ---------------------------------------------------------------- time */

EXPORT int sched_yield(void)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.sched_yield();
	turn_get(s);
	stat_op(DMT_OP_YIELD);
	turn_put(s);
	return 0;
}

/* Sleep in the waitq until a logical deadline. Returns -1 (EINTR) if a
 * signal handler ran meanwhile, like the real sleeps. */
static int sleep_until(dmt_thread *s, uint64_t deadline)
{
	s->interruptible = 1;
	s->interrupted = 0;
	s->sig_seen = dmt_sig_gen();
	turn_wait(s, &s->deadline, deadline);
	s->interruptible = 0;
	return s->interrupted ? -1 : 0;
}

/* Sleep for rel_ns of logical time (turns). */
static int logical_sleep(dmt_thread *s, uint64_t rel_ns)
{
	int r = 0;
	turn_get(s);
	stat_op(DMT_OP_SLEEP);
	if (rel_ns)
		r = sleep_until(s, dmt_deadline_rel(rel_ns));
	turn_put(s);
	if (r)
		errno = EINTR;
	return r;
}

HIDDEN int dmt_sleep_ns(dmt_thread *s, uint64_t rel_ns) { return logical_sleep(s, rel_ns); }

EXPORT int nanosleep(const struct timespec *req, struct timespec *rem)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.nanosleep(req, rem);
	if (bad_ts(req) || req->tv_sec < 0) {
		errno = EINVAL;
		return -1;
	}
	int r = logical_sleep(s, (uint64_t)req->tv_sec * 1000000000ull + req->tv_nsec);
	if (rem)
		rem->tv_sec = rem->tv_nsec = 0; /* the time left is not tracked */
	return r;
}

EXPORT int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req,
			   struct timespec *rem)
{
	dmt_thread *s = dmt_enter();
	if (!s || (clk != CLOCK_REALTIME && clk != CLOCK_MONOTONIC))
		return R.clock_nanosleep(clk, flags, req, rem);
	if (bad_ts(req))
		return EINVAL;
	int r;
	if (flags & TIMER_ABSTIME) {
		turn_get(s);
		stat_op(DMT_OP_SLEEP);
		r = sleep_until(s, dmt_deadline_abs(s, clk, req));
		turn_put(s);
		return r ? EINTR : 0;
	}
	int e = errno;
	r = logical_sleep(s, (uint64_t)req->tv_sec * 1000000000ull + req->tv_nsec);
	errno = e;
	if (rem)
		rem->tv_sec = rem->tv_nsec = 0;
	return r ? EINTR : 0;
}

EXPORT int usleep(useconds_t us)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.usleep(us);
	return logical_sleep(s, (uint64_t)us * 1000);
}

EXPORT unsigned sleep(unsigned sec)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.sleep(sec);
	/* interrupted: the real sleep returns the seconds left; say all */
	return logical_sleep(s, (uint64_t)sec * 1000000000ull) ? sec : 0;
}
