/*
 * aio.c: asynchronous I/O libraries that wait in the kernel through their
 * own system calls (MariaDB's InnoDB uses liburing, or libaio). Their
 * exported waiting functions are interposed like any blocking call: the
 * thread leaves the run queue while it waits for completions. They are
 * resolved on first use, so a server that does not load them is unaffected.
 */
#include "dmt.h"

#include <dlfcn.h>
#include <signal.h>

#define NEXT(name, type)                                                      \
	static __typeof__(type) real_;                                        \
	if (unlikely(!real_))                                                 \
		real_ = (__typeof__(type))dlsym(RTLD_NEXT, name)

/* ---------------------------------------------------------------- liburing */

struct io_uring;
struct io_uring_cqe;
struct __kernel_timespec;

EXPORT int __io_uring_get_cqe(struct io_uring *ring, struct io_uring_cqe **cqe, unsigned submit,
			      unsigned wait_nr, sigset_t *mask)
{
	NEXT("__io_uring_get_cqe", int (*)(struct io_uring *, struct io_uring_cqe **, unsigned,
					    unsigned, sigset_t *));
	dmt_thread *s = wait_nr ? dmt_enter() : 0;
	if (!s)
		return real_(ring, cqe, submit, wait_nr, mask);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring, cqe, submit, wait_nr, mask));
}

EXPORT int io_uring_wait_cqes(struct io_uring *ring, struct io_uring_cqe **cqe, unsigned wait_nr,
			      struct __kernel_timespec *ts, sigset_t *mask)
{
	NEXT("io_uring_wait_cqes", int (*)(struct io_uring *, struct io_uring_cqe **, unsigned,
					    struct __kernel_timespec *, sigset_t *));
	dmt_thread *s = dmt_enter();
	if (!s)
		return real_(ring, cqe, wait_nr, ts, mask);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring, cqe, wait_nr, ts, mask));
}

EXPORT int io_uring_wait_cqe_timeout(struct io_uring *ring, struct io_uring_cqe **cqe,
				     struct __kernel_timespec *ts)
{
	NEXT("io_uring_wait_cqe_timeout",
	     int (*)(struct io_uring *, struct io_uring_cqe **, struct __kernel_timespec *));
	dmt_thread *s = dmt_enter();
	if (!s)
		return real_(ring, cqe, ts);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring, cqe, ts));
}

EXPORT int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr)
{
	NEXT("io_uring_submit_and_wait", int (*)(struct io_uring *, unsigned));
	dmt_thread *s = wait_nr ? dmt_enter() : 0;
	if (!s)
		return real_(ring, wait_nr);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring, wait_nr));
}

EXPORT int io_uring_submit_and_wait_timeout(struct io_uring *ring, struct io_uring_cqe **cqe,
					    unsigned wait_nr, struct __kernel_timespec *ts,
					    sigset_t *mask)
{
	NEXT("io_uring_submit_and_wait_timeout",
	     int (*)(struct io_uring *, struct io_uring_cqe **, unsigned, struct __kernel_timespec *,
		     sigset_t *));
	dmt_thread *s = wait_nr ? dmt_enter() : 0;
	if (!s)
		return real_(ring, cqe, wait_nr, ts, mask);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring, cqe, wait_nr, ts, mask));
}

EXPORT int __io_uring_sqring_wait(struct io_uring *ring)
{
	NEXT("__io_uring_sqring_wait", int (*)(struct io_uring *));
	dmt_thread *s = dmt_enter();
	if (!s)
		return real_(ring);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ring));
}

EXPORT int io_uring_enter(unsigned fd, unsigned to_submit, unsigned min_complete, unsigned flags,
			  sigset_t *mask)
{
	NEXT("io_uring_enter", int (*)(unsigned, unsigned, unsigned, unsigned, sigset_t *));
	dmt_thread *s = (flags & 1u /* IORING_ENTER_GETEVENTS */) && min_complete ? dmt_enter() : 0;
	if (!s)
		return real_(fd, to_submit, min_complete, flags, mask);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(fd, to_submit, min_complete, flags, mask));
}

EXPORT int io_uring_enter2(unsigned fd, unsigned to_submit, unsigned min_complete, unsigned flags,
			   sigset_t *mask, size_t sz)
{
	NEXT("io_uring_enter2", int (*)(unsigned, unsigned, unsigned, unsigned, sigset_t *, size_t));
	dmt_thread *s = (flags & 1u) && min_complete ? dmt_enter() : 0;
	if (!s)
		return real_(fd, to_submit, min_complete, flags, mask, sz);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING,
			    real_(fd, to_submit, min_complete, flags, mask, sz));
}

/* ---------------------------------------------------------------- libaio */

typedef struct io_context *io_context_t;
struct io_event;

EXPORT int io_getevents(io_context_t ctx, long min_nr, long nr, struct io_event *ev,
			struct timespec *ts)
{
	NEXT("io_getevents", int (*)(io_context_t, long, long, struct io_event *, struct timespec *));
	dmt_thread *s = min_nr > 0 ? dmt_enter() : 0;
	if (!s)
		return real_(ctx, min_nr, nr, ev, ts);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ctx, min_nr, nr, ev, ts));
}

struct io_sigset;
EXPORT int io_pgetevents(io_context_t ctx, long min_nr, long nr, struct io_event *ev,
			 struct timespec *ts, struct io_sigset *sig)
{
	NEXT("io_pgetevents", int (*)(io_context_t, long, long, struct io_event *, struct timespec *,
				      struct io_sigset *));
	dmt_thread *s = min_nr > 0 ? dmt_enter() : 0;
	if (!s)
		return real_(ctx, min_nr, nr, ev, ts, sig);
	return DMT_BLOCKING(s, DMT_OP_OTHER_BLOCKING, real_(ctx, min_nr, nr, ev, ts, sig));
}
