/*
 * io.c: socket calls, poll/select/epoll, other calls that can block in the
 * kernel, fork and syscall().
 *
 * Rule: a call that can block is never made while holding the turn. A
 * socket call first runs under the turn without blocking (MSG_DONTWAIT, or
 * a zero timeout); only if it would block and the caller asked to block
 * does the thread leave the runq, block in the kernel, and re-enter the
 * runq when the call returns. Calls on regular files do not take the turn.
 *
 * These are the hooks for the next step (joint_sched): the non-blocking
 * attempt under the turn is where the input channel (shm.h) decides what
 * the call may see at this logical time, and turn_unblock() is where a
 * returning thread's logical re-entry time will come from the log.
 */
#include "dmt.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/futex.h>

HIDDEN int dmt_sleep_ns(dmt_thread *s, uint64_t rel_ns);

static struct {
	int (*socket)(int, int, int);
	int (*socketpair)(int, int, int, int[2]);
	int (*accept)(int, struct sockaddr *, socklen_t *);
	int (*accept4)(int, struct sockaddr *, socklen_t *, int);
	int (*connect)(int, const struct sockaddr *, socklen_t);
	ssize_t (*read)(int, void *, size_t);
	ssize_t (*readv)(int, const struct iovec *, int);
	ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
	ssize_t (*recvmsg)(int, struct msghdr *, int);
	int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
	ssize_t (*write)(int, const void *, size_t);
	ssize_t (*writev)(int, const struct iovec *, int);
	ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
	ssize_t (*sendmsg)(int, const struct msghdr *, int);
	int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
	ssize_t (*sendfile)(int, int, off_t *, size_t);
	int (*close)(int);
	int (*shutdown)(int, int);
	int (*poll)(struct pollfd *, nfds_t, int);
	int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
	int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
	int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
	int (*epoll_wait)(int, struct epoll_event *, int, int);
	int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
	int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
	int (*pipe)(int[2]);
	int (*pipe2)(int[2], int);
	int (*dup)(int);
	int (*dup2)(int, int);
	int (*dup3)(int, int, int);
	int (*fcntl)(int, int, ...);
	int (*fcntl64)(int, int, ...);
	pid_t (*waitpid)(pid_t, int *, int);
	pid_t (*wait)(int *);
	pid_t (*wait3)(int *, int, struct rusage *);
	pid_t (*wait4)(pid_t, int *, int, struct rusage *);
	int (*waitid)(idtype_t, id_t, siginfo_t *, int);
	int (*pause)(void);
	int (*sigsuspend)(const sigset_t *);
	int (*sigwait)(const sigset_t *, int *);
	int (*sigwaitinfo)(const sigset_t *, siginfo_t *);
	int (*sigtimedwait)(const sigset_t *, siginfo_t *, const struct timespec *);
	int (*flock)(int, int);
	int (*lockf)(int, int, off_t);
	int (*semop)(int, struct sembuf *, size_t);
	int (*semtimedop)(int, struct sembuf *, size_t, const struct timespec *);
	ssize_t (*msgrcv)(int, void *, size_t, long, int);
	int (*msgsnd)(int, const void *, size_t, int);
} RI;

void dmt_io_init(void)
{
#define L(f) RI.f = dlsym(RTLD_NEXT, #f)
	L(socket); L(socketpair); L(accept); L(accept4); L(connect);
	L(read); L(readv); L(recvfrom); L(recvmsg); L(recvmmsg);
	L(write); L(writev); L(sendto); L(sendmsg); L(sendmmsg); L(sendfile);
	L(close); L(shutdown); L(poll); L(ppoll); L(select); L(pselect);
	L(epoll_wait); L(epoll_pwait); L(epoll_pwait2);
	L(pipe); L(pipe2); L(dup); L(dup2); L(dup3); L(fcntl); L(fcntl64);
	L(waitpid); L(wait); L(wait3); L(wait4); L(waitid);
	L(pause); L(sigsuspend); L(sigwait); L(sigwaitinfo); L(sigtimedwait);
	L(flock); L(lockf); L(semop); L(semtimedop); L(msgrcv); L(msgsnd);
#undef L
	if (!RI.fcntl64)
		RI.fcntl64 = RI.fcntl;
}

/* Before init (a constructor of another library calling in): resolve the
 * one function on the spot. */
#define REAL(f) (likely(RI.f) ? RI.f : (__typeof__(RI.f))dlsym(RTLD_NEXT, #f))

/* ---------------------------------------------------------------- fds */

enum { FC_UNKNOWN = 0, FC_SOCK, FC_PASS, FC_OTHER };
#define FD_TAB 65536
static uint8_t fdtab[FD_TAB];

static void fd_set_class(int fd, int c)
{
	if (fd >= 0 && fd < FD_TAB)
		__atomic_store_n(&fdtab[fd], (uint8_t)c, __ATOMIC_RELAXED);
}

static int fd_class(int fd)
{
	if (fd < 0)
		return FC_PASS;
	if (fd < FD_TAB) {
		int c = __atomic_load_n(&fdtab[fd], __ATOMIC_RELAXED);
		if (c)
			return c;
	}
	struct stat st;
	int e = errno, c;
	if (fstat(fd, &st) != 0) {
		errno = e;
		return FC_PASS; /* let the real call report it */
	}
	errno = e;
	if (S_ISSOCK(st.st_mode))
		c = FC_SOCK;
	else if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISBLK(st.st_mode))
		c = FC_PASS;
	else
		c = FC_OTHER; /* pipes, ttys, eventfd, ...: may block */
	fd_set_class(fd, c);
	return c;
}

static int fd_nonblock(int fd)
{
	int e = errno;
	int fl = REAL(fcntl)(fd, F_GETFL);
	errno = e;
	return fl >= 0 && (fl & O_NONBLOCK);
}

static inline int would_block(ssize_t r, int e) { return r < 0 && (e == EAGAIN || e == EWOULDBLOCK); }

/* joint_sched (below) */
struct jconn;
static struct jconn *jfd(int fd);
static ssize_t joint_in(dmt_thread *s, struct jconn *c, int k, int fd, void *buf, size_t n,
			int flags, void *a, void *b);
static ssize_t joint_out(int k, int fd, const void *buf, size_t n, int flags, const void *a,
			 socklen_t al, size_t want);

/* ---------------------------------------------------------------- in */

enum { K_READ, K_RECVFROM, K_READV, K_RECVMSG };

static ssize_t in_call(int k, int fd, void *buf, size_t n, int flags, void *a, void *b)
{
	switch (k) {
	case K_READ:
		return flags ? RI.recvfrom(fd, buf, n, flags, 0, 0) : RI.read(fd, buf, n);
	case K_RECVFROM:
		return RI.recvfrom(fd, buf, n, flags, a, b);
	case K_READV:
		if (flags) {
			struct msghdr m;
			memset(&m, 0, sizeof m);
			m.msg_iov = buf;
			m.msg_iovlen = n;
			return RI.recvmsg(fd, &m, flags);
		}
		return RI.readv(fd, buf, (int)n);
	default:
		return RI.recvmsg(fd, a, flags);
	}
}

/* -2 with errno ENOTSOCK: the descriptor is not a socket after all */
static ssize_t sock_in(dmt_thread *s, int k, int fd, void *buf, size_t n, int flags, void *a,
		       void *b)
{
	turn_get(s);
	stat_op(DMT_OP_RECV);
	ssize_t r;
	int e;
	struct jconn *jcn = jfd(fd);
	if (jcn) {
		r = joint_in(s, jcn, k, fd, buf, n, flags, a, b);
		e = errno;
		if (r > 0 && !(flags & MSG_PEEK))
			s->weight = G.input_weight;
		turn_put(s);
		errno = e;
		return r;
	}
	if (flags & MSG_WAITALL) {
		r = -1;
		e = EAGAIN;
	} else {
		r = in_call(k, fd, buf, n, flags | MSG_DONTWAIT, a, b);
		e = errno;
	}
	if (would_block(r, e) && !(flags & MSG_DONTWAIT) && !fd_nonblock(fd)) {
		int blk = turn_block(s);
		r = in_call(k, fd, buf, n, flags, a, b);
		e = errno;
		turn_unblock(s, blk);
		if (r > 0 && blk)
			dmt_input_arrived(s);
	} else {
		/* input usually precedes computation: let the others pass */
		if (r > 0)
			s->weight = G.input_weight;
		turn_put(s);
		if (r < 0 && e == ENOTSOCK && (k == K_READ || k == K_READV)) {
			fd_set_class(fd, FC_UNKNOWN);
			r = -2;
		}
	}
	errno = e;
	return r;
}

/* ---------------------------------------------------------------- out */

enum { K_WRITE, K_SENDTO, K_WRITEV, K_SENDMSG };

static ssize_t out_call(int k, int fd, const void *buf, size_t n, int flags, const void *a,
			socklen_t al)
{
	switch (k) {
	case K_WRITE:
		return flags ? RI.sendto(fd, buf, n, flags, 0, 0) : RI.write(fd, buf, n);
	case K_SENDTO:
		return RI.sendto(fd, buf, n, flags, a, al);
	case K_WRITEV:
		if (flags) {
			struct msghdr m;
			memset(&m, 0, sizeof m);
			m.msg_iov = (struct iovec *)buf;
			m.msg_iovlen = n;
			return RI.sendmsg(fd, &m, flags);
		}
		return RI.writev(fd, buf, (int)n);
	default:
		return RI.sendmsg(fd, a, flags);
	}
}

static size_t iov_total(const struct iovec *v, size_t n)
{
	size_t t = 0;
	for (size_t i = 0; i < n; i++)
		t += v[i].iov_len;
	return t;
}

/* Send what is left of a partially sent request, blocking. */
static ssize_t out_rest(int k, int fd, const void *buf, size_t n, int flags, const void *a,
			socklen_t al, size_t done)
{
	if (k == K_WRITE || k == K_SENDTO) {
		while (done < n) {
			ssize_t r = out_call(k, fd, (const char *)buf + done, n - done, flags, a, al);
			if (r < 0)
				return done ? (ssize_t)done : r;
			done += r;
		}
		return done;
	}
	const struct iovec *v0 = k == K_WRITEV ? buf : ((const struct msghdr *)a)->msg_iov;
	size_t cnt = k == K_WRITEV ? n : ((const struct msghdr *)a)->msg_iovlen;
	if (cnt > 1024)
		return done;
	struct iovec v[cnt ? cnt : 1];
	memcpy(v, v0, cnt * sizeof *v);
	size_t total = iov_total(v, cnt), i = 0, skip = done;
	while (done < total) {
		while (i < cnt && skip >= v[i].iov_len) {
			skip -= v[i].iov_len;
			i++;
		}
		v[i].iov_base = (char *)v[i].iov_base + skip;
		v[i].iov_len -= skip;
		skip = 0;
		ssize_t r;
		if (k == K_WRITEV) {
			r = out_call(K_WRITEV, fd, &v[i], cnt - i, flags, 0, 0);
		} else {
			struct msghdr m = *(const struct msghdr *)a;
			m.msg_iov = &v[i];
			m.msg_iovlen = cnt - i;
			r = RI.sendmsg(fd, &m, flags);
		}
		if (r < 0)
			return done ? (ssize_t)done : r;
		done += r;
		skip = r;
	}
	return done;
}

static ssize_t sock_out(dmt_thread *s, int k, int fd, const void *buf, size_t n, int flags,
			const void *a, socklen_t al)
{
	size_t want = k == K_WRITE || k == K_SENDTO ? n
		      : k == K_WRITEV		    ? iov_total(buf, n)
						    : iov_total(((const struct msghdr *)a)->msg_iov,
								((const struct msghdr *)a)->msg_iovlen);
	turn_get(s);
	stat_op(DMT_OP_SEND);
	if (jfd(fd)) {
		ssize_t jr = joint_out(k, fd, buf, n, flags, a, al, want);
		int je = errno;
		turn_put(s);
		errno = je;
		return jr;
	}
	ssize_t r = out_call(k, fd, buf, n, flags | MSG_DONTWAIT, a, al);
	int e = errno;
	int partial = r >= 0 && (size_t)r < want;
	if ((would_block(r, e) || partial) && !(flags & MSG_DONTWAIT) && !fd_nonblock(fd)) {
		int blk = turn_block(s);
		if (r < 0)
			r = out_call(k, fd, buf, n, flags, a, al);
		else
			r = out_rest(k, fd, buf, n, flags, a, al, (size_t)r);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
		if (r < 0 && e == ENOTSOCK && (k == K_WRITE || k == K_WRITEV)) {
			fd_set_class(fd, FC_UNKNOWN);
			r = -2;
		}
	}
	errno = e;
	return r;
}


/* ---------------------------------------------------------------- joint_sched */

/*
 * joint_sched (LOCKSTEP_DMT_JOINT=1, in the process that claimed the
 * channel): the server's input is what the log admitted, at the logical
 * time it was admitted (core.c admits an entry only while no thread holds
 * the turn: when nobody can run, or at the quantum horizon). Connections
 * the feeder opened are matched to the log's connection ids by the
 * feeder's source port (CONNECT carries it). A receive returns exactly
 * min(asked, admitted and unread) bytes, waiting for them in the kernel
 * while holding the turn if the bytes are still on their way; with
 * nothing admitted it waits in the waitq, woken by the admission.
 * poll/epoll compute readiness of these connections and of the listeners
 * from the admitted input; other descriptors are polled without waiting.
 * Sends on these connections complete holding the turn.
 */
struct jconn {
	uint32_t id;
	int used, fd, eof, appclosed;
	uint32_t port;
	uint64_t avail;
};
#define JC_N 4096
static struct jconn jc[JC_N];
static int32_t fdconn[FD_TAB]; /* conn id + 1 of a gated descriptor */
static uint8_t lsn[FD_TAB];    /* 0 unknown, 1 inet listener, 2 not */
#define PEND_N 1024
static uint32_t pend[PEND_N]; /* admitted connects not yet accepted */
static int pend_h, pend_n;
#define STASH_N 64
static struct {
	int fd;
	uint32_t port;
	struct sockaddr_storage ss;
	socklen_t sl;
} stash[STASH_N]; /* accepted ahead of their admission */
static int nstash;
static char acc_obj, poll_obj;
/* pollers waiting on descriptors outside the log (a unix listener, a pipe
 * of another process): only a bubble makes them look again, so while there
 * are any a bubble is useful (core.c, ingest) */
int dmt_ext_waiters;

static struct jconn *jc_get(uint32_t id)
{
	struct jconn *c = &jc[id % JC_N];
	return c->used && c->id == id ? c : 0;
}

static struct jconn *jfd(int fd)
{
	if (!atomic_load_explicit(&G.joint_on, memory_order_relaxed) || fd < 0 || fd >= FD_TAB)
		return 0;
	int32_t v = fdconn[fd];
	return v ? jc_get((uint32_t)(v - 1)) : 0;
}

void dmt_joint_admit_locked(const struct dmt_chan_ent *e)
{
	struct jconn *c;
	switch (e->kind) {
	case DMT_EV_CONNECT:
		c = &jc[e->conn % JC_N];
		if (c->used && c->fd >= 0 && c->fd < FD_TAB)
			fdconn[c->fd] = 0;
		memset(c, 0, sizeof *c);
		c->used = 1;
		c->id = e->conn;
		c->fd = -1;
		c->port = e->len;
		if (pend_n < PEND_N) {
			pend[(pend_h + pend_n) % PEND_N] = e->conn;
			pend_n++;
		}
		dmt_signal_locked(&acc_obj, 1);
		break;
	case DMT_EV_DATA:
		if ((c = jc_get(e->conn))) {
			c->avail += e->len;
			dmt_signal_locked(c, 1);
		}
		break;
	case DMT_EV_CLOSE:
		if ((c = jc_get(e->conn))) {
			c->eof = 1;
			dmt_signal_locked(c, 1);
			if (c->appclosed)
				c->used = 0;
		}
		break;
	}
	dmt_signal_locked(&poll_obj, 1);
}

static int is_listener(int fd)
{
	if (fd < 0 || fd >= FD_TAB)
		return 0;
	int v = lsn[fd];
	if (!v) {
		int acc = 0, e = errno;
		socklen_t l = sizeof acc;
		struct sockaddr_storage ss;
		socklen_t sl = sizeof ss;
		v = 2;
		if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) == 0 && acc &&
		    getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
		    (ss.ss_family == AF_INET || ss.ss_family == AF_INET6))
			v = 1;
		errno = e;
		lsn[fd] = (uint8_t)v;
	}
	return v == 1;
}

/* Take the turn if this process consumes the channel (claiming it when
 * listener says the call is on an inet listener). Returns 1 holding it. */
static int joint_enter(dmt_thread *s, int listener)
{
	if (!G.joint_env)
		return 0;
	turn_get(s);
	if (atomic_load(&G.joint_on) || (listener && dmt_joint_claim()))
		return 1;
	turn_put(s);
	return 0;
}

static int jwait(dmt_thread *s, const void *obj, uint64_t deadline, int *timed)
{
	s->interruptible = 1;
	s->interrupted = 0;
	s->sig_seen = dmt_sig_gen();
	int t = turn_wait(s, obj, deadline);
	s->interruptible = 0;
	if (timed)
		*timed = t;
	if (s->interrupted) {
		errno = EINTR;
		return -1;
	}
	return 0;
}

static void fd_forget(int fd)
{
	if (fd >= 0 && fd < FD_TAB) {
		lsn[fd] = 0;
		fdconn[fd] = 0;
	}
}

static uint32_t sa_port(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)ss)->sin_port);
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
	return 0;
}

static int joint_accept(dmt_thread *s, int lfd, struct sockaddr *a, socklen_t *al, int flags)
{
	int nb = fd_nonblock(lfd);
	while (pend_n == 0) {
		if (nb) {
			errno = EAGAIN;
			return -1;
		}
		if (jwait(s, &acc_obj, 0, 0))
			return -1;
	}
	uint32_t id = pend[pend_h];
	pend_h = (pend_h + 1) % PEND_N;
	pend_n--;
	struct jconn *c = jc_get(id);
	uint32_t port = c ? c->port : 0;
	int fd = -1, tries = 0;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	for (int i = 0; i < nstash; i++)
		if (stash[i].port == port) {
			fd = stash[i].fd;
			ss = stash[i].ss;
			sl = stash[i].sl;
			stash[i] = stash[--nstash];
			break;
		}
	while (fd < 0) {
		/* the feeder connected before it published the connect: the
		 * connection is on its way, wait for it holding the turn */
		struct pollfd p = {lfd, POLLIN, 0};
		if (RI.poll(&p, 1, 100) == 0) {
			if (++tries > 300) {
				dmt_log("joint: connection %u (port %u) never reached the listener", id, port);
				errno = ECONNABORTED;
				return -1;
			}
			continue;
		}
		sl = sizeof ss;
		int r = RI.accept4(lfd, (struct sockaddr *)&ss, &sl, 0);
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
			    errno == ECONNABORTED)
				continue;
			return -1;
		}
		fd_set_class(r, FC_SOCK);
		if (sa_port(&ss) == port) {
			fd = r;
		} else if (nstash < STASH_N) {
			stash[nstash].fd = r;
			stash[nstash].port = sa_port(&ss);
			stash[nstash].ss = ss;
			stash[nstash].sl = sl;
			nstash++;
		} else {
			RI.close(r);
		}
	}
	if (flags & SOCK_NONBLOCK)
		REAL(fcntl)(fd, F_SETFL, REAL(fcntl)(fd, F_GETFL) | O_NONBLOCK);
	if (flags & SOCK_CLOEXEC)
		REAL(fcntl)(fd, F_SETFD, FD_CLOEXEC);
	if (a && al) {
		memcpy(a, &ss, *al < sl ? *al : sl);
		*al = sl;
	}
	fd_forget(fd);
	fd_set_class(fd, FC_SOCK);
	if (fd < FD_TAB)
		lsn[fd] = 2;
	if (c) {
		c->fd = fd;
		if (fd < FD_TAB)
			fdconn[fd] = (int32_t)id + 1;
	}
	return fd;
}

static int wait_fd(int fd, short ev, int *tries)
{
	struct pollfd p = {fd, ev, 0};
	if (RI.poll(&p, 1, 100) == 0 && ++*tries > 300)
		return -1; /* 30 s: give up */
	return 0;
}

/* Build in v (max cap entries) the first want bytes of src. */
static int iov_cut(struct iovec *v, int cap, const struct iovec *src, size_t cnt, size_t want)
{
	int k = 0;
	for (size_t i = 0; i < cnt && want && k < cap; i++) {
		size_t l = src[i].iov_len < want ? src[i].iov_len : want;
		if (!l)
			continue;
		v[k].iov_base = src[i].iov_base;
		v[k].iov_len = l;
		want -= l;
		k++;
	}
	return k;
}

static ssize_t joint_in(dmt_thread *s, struct jconn *c, int k, int fd, void *buf, size_t n,
			int flags, void *a, void *b)
{
	struct msghdr *um = k == K_RECVMSG ? a : 0;
	const struct iovec *src;
	size_t cnt, total;
	struct iovec one;
	if (k == K_READ || k == K_RECVFROM) {
		one.iov_base = buf;
		one.iov_len = n;
		src = &one;
		cnt = 1;
	} else if (k == K_READV) {
		src = buf;
		cnt = n;
	} else {
		src = um->msg_iov;
		cnt = um->msg_iovlen;
	}
	total = iov_total(src, cnt);
	if (total == 0)
		return 0;
	int nb = (flags & MSG_DONTWAIT) || fd_nonblock(fd);
	for (;;) {
		if (c->avail > 0 && (!(flags & MSG_WAITALL) || c->avail >= total || c->eof))
			break;
		if (c->avail == 0 && c->eof)
			break;
		if (nb) {
			errno = EAGAIN;
			return -1;
		}
		if (jwait(s, c, 0, 0))
			return -1;
	}
	size_t want = c->avail < total ? c->avail : total;
	int tries = 0, peek = flags & MSG_PEEK;
	int rf = (flags & ~(MSG_WAITALL | MSG_DONTWAIT)) | MSG_DONTWAIT;
	if (want == 0) {
		/* the client's end was admitted: wait for it */
		char x;
		for (;;) {
			ssize_t r = RI.recvfrom(fd, &x, 1, rf | MSG_PEEK, 0, 0);
			if (r == 0)
				return 0;
			if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
				if (wait_fd(fd, POLLIN, &tries))
					return 0;
				continue;
			}
			if (r < 0)
				return -1;
			/* bytes beyond what the log admitted: not ours to show */
			return 0;
		}
	}
	struct iovec v[64];
	size_t got = 0;
	while (got < want) {
		int nv = iov_cut(v, 64, src, cnt, want);
		/* skip what was already read */
		size_t skip = peek ? 0 : got;
		int i = 0;
		while (i < nv && skip >= v[i].iov_len) {
			skip -= v[i].iov_len;
			i++;
		}
		if (i < nv) {
			v[i].iov_base = (char *)v[i].iov_base + skip;
			v[i].iov_len -= skip;
		}
		struct msghdr m;
		memset(&m, 0, sizeof m);
		if (um) {
			m = *um;
		} else if (k == K_RECVFROM && a && b) {
			m.msg_name = a;
			m.msg_namelen = *(socklen_t *)b;
		}
		m.msg_iov = &v[i];
		m.msg_iovlen = nv - i;
		ssize_t r = RI.recvmsg(fd, &m, rf);
		if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
			if (wait_fd(fd, POLLIN, &tries))
				break;
			continue;
		}
		if (r <= 0) {
			if (got)
				break;
			return r;
		}
		if (um) {
			um->msg_flags = m.msg_flags;
			um->msg_namelen = m.msg_namelen;
			um->msg_controllen = m.msg_controllen;
		} else if (k == K_RECVFROM && a && b) {
			*(socklen_t *)b = m.msg_namelen;
		}
		if (peek) {
			if ((size_t)r >= want) {
				got = (size_t)r;
				break;
			}
			if (wait_fd(fd, POLLIN, &tries))
				break;
			continue;
		}
		got += (size_t)r;
	}
	if (!peek)
		c->avail -= got;
	return (ssize_t)got;
}

static ssize_t joint_out(int k, int fd, const void *buf, size_t n, int flags, const void *a,
			 socklen_t al, size_t want)
{
	ssize_t r = out_call(k, fd, buf, n, flags | MSG_DONTWAIT, a, al);
	if (r < 0 && !would_block(r, errno))
		return r;
	size_t done = r < 0 ? 0 : (size_t)r;
	int tries = 0;
	while (done < want) {
		if (wait_fd(fd, POLLOUT, &tries))
			break;
		ssize_t r2 = out_rest(k, fd, buf, n, flags | MSG_DONTWAIT, a, al, done);
		if (r2 < 0) {
			if (would_block(r2, errno) || errno == EINTR)
				continue;
			return done ? (ssize_t)done : r2;
		}
		if ((size_t)r2 > done) {
			done = (size_t)r2;
			tries = 0;
		}
	}
	return (ssize_t)done;
}

/* readiness of one descriptor from the admitted input (or the kernel) */
static short joint_ready(int fd, short events)
{
	struct jconn *c = jfd(fd);
	if (c) {
		short ev = 0;
		if ((events & (POLLIN | POLLRDNORM)) && (c->avail || c->eof))
			ev |= events & (POLLIN | POLLRDNORM);
		if (events & (POLLOUT | POLLWRNORM))
			ev |= events & (POLLOUT | POLLWRNORM);
		if ((events & POLLRDHUP) && c->eof && !c->avail)
			ev |= POLLRDHUP;
		return ev;
	}
	if (is_listener(fd))
		return (events & (POLLIN | POLLRDNORM)) && pend_n ? (events & (POLLIN | POLLRDNORM)) : 0;
	struct pollfd p = {fd, events, 0};
	if (RI.poll(&p, 1, 0) > 0)
		return p.revents;
	return 0;
}

static int joint_poll_once(struct pollfd *fds, nfds_t n)
{
	int cnt = 0;
	for (nfds_t i = 0; i < n; i++) {
		fds[i].revents = 0;
		if (fds[i].fd < 0)
			continue;
		fds[i].revents = joint_ready(fds[i].fd, fds[i].events);
		if (fds[i].revents)
			cnt++;
	}
	return cnt;
}

static int external(int fd) { return fd >= 0 && !jfd(fd) && !is_listener(fd); }

/* wait for an admission (or the deadline) as a poller; ext: some of its
 * descriptors are outside the log */
static int pwait(dmt_thread *s, uint64_t dl, int ext, int *timed)
{
	dmt_ext_waiters += ext;
	int r = jwait(s, &poll_obj, dl, timed);
	dmt_ext_waiters -= ext;
	return r;
}

/* timeout_ns < 0: none. Holding the turn. */
static int joint_poll(dmt_thread *s, struct pollfd *fds, nfds_t n, int64_t timeout_ns)
{
	uint64_t dl = timeout_ns > 0 ? dmt_deadline_rel((uint64_t)timeout_ns) : 0;
	int ext = 0;
	for (nfds_t i = 0; i < n; i++)
		ext |= external(fds[i].fd);
	for (;;) {
		int cnt = joint_poll_once(fds, n);
		if (cnt || timeout_ns == 0)
			return cnt;
		int timed = 0;
		if (pwait(s, dl, ext, &timed))
			return -1;
		if (timed)
			return joint_poll_once(fds, n);
	}
}

static int any_listener(struct pollfd *fds, nfds_t n)
{
	for (nfds_t i = 0; i < n; i++)
		if (is_listener(fds[i].fd))
			return 1;
	return 0;
}

/* epoll interest sets, kept so that joint_sched can answer epoll_wait */
struct epi {
	int fd, off;
	uint32_t events;
	uint64_t data;
};
struct eps {
	int ep, n, cap;
	struct epi *v;
};
#define EPS_N 64
static struct eps epsets[EPS_N];

static struct eps *eps_find(int ep, int make)
{
	for (int i = 0; i < EPS_N; i++)
		if (epsets[i].cap && epsets[i].ep == ep)
			return &epsets[i];
	if (!make)
		return 0;
	for (int i = 0; i < EPS_N; i++)
		if (!epsets[i].cap) {
			epsets[i].ep = ep;
			epsets[i].n = 0;
			epsets[i].cap = 16;
			epsets[i].v = calloc(16, sizeof(struct epi));
			return &epsets[i];
		}
	return 0;
}

static void eps_forget_fd(int fd)
{
	for (int i = 0; i < EPS_N; i++) {
		struct eps *e = &epsets[i];
		if (!e->cap)
			continue;
		if (e->ep == fd) {
			free(e->v);
			memset(e, 0, sizeof *e);
			continue;
		}
		for (int j = 0; j < e->n; j++)
			if (e->v[j].fd == fd) {
				memmove(&e->v[j], &e->v[j + 1], (e->n - j - 1) * sizeof(struct epi));
				e->n--;
				break;
			}
	}
}

static void eps_ctl(int ep, int op, int fd, struct epoll_event *ev)
{
	struct eps *e = eps_find(ep, op == EPOLL_CTL_ADD);
	if (!e)
		return;
	int j;
	for (j = 0; j < e->n; j++)
		if (e->v[j].fd == fd)
			break;
	switch (op) {
	case EPOLL_CTL_ADD:
		if (j < e->n)
			return;
		if (e->n == e->cap) {
			struct epi *nv = realloc(e->v, 2 * e->cap * sizeof(struct epi));
			if (!nv)
				return;
			e->v = nv;
			e->cap *= 2;
		}
		e->v[e->n].fd = fd;
		e->v[e->n].off = 0;
		e->v[e->n].events = ev ? ev->events : 0;
		e->v[e->n].data = ev ? ev->data.u64 : 0;
		e->n++;
		break;
	case EPOLL_CTL_MOD:
		if (j < e->n && ev) {
			e->v[j].events = ev->events;
			e->v[j].data = ev->data.u64;
			e->v[j].off = 0;
		}
		break;
	case EPOLL_CTL_DEL:
		if (j < e->n) {
			memmove(&e->v[j], &e->v[j + 1], (e->n - j - 1) * sizeof(struct epi));
			e->n--;
		}
		break;
	}
}

EXPORT int epoll_ctl(int ep, int op, int fd, struct epoll_event *ev)
{
	static int (*real)(int, int, int, struct epoll_event *);
	if (!real)
		real = dlsym(RTLD_NEXT, "epoll_ctl");
	int r = real(ep, op, fd, ev);
	if (r != 0 || !G.joint_env)
		return r;
	dmt_thread *s = dmt_enter();
	int turn = s && atomic_load(&G.joint_on);
	if (turn)
		turn_get(s); /* the order of the interest set is the order of the calls */
	dmt_lock();
	eps_ctl(ep, op, fd, ev);
	dmt_unlock();
	if (turn)
		turn_put(s);
	return r;
}

static int joint_epoll_once(int ep, struct epoll_event *out, int max)
{
	struct eps *e = eps_find(ep, 0);
	if (!e)
		return 0;
	int cnt = 0;
	for (int j = 0; j < e->n && cnt < max; j++) {
		struct epi *it = &e->v[j];
		if (it->off)
			continue;
		short want = (short)(it->events & (EPOLLIN | EPOLLOUT | EPOLLPRI | EPOLLRDHUP));
		short r = joint_ready(it->fd, want);
		if (!r)
			continue;
		out[cnt].events = (uint32_t)(unsigned short)r;
		out[cnt].data.u64 = it->data;
		cnt++;
		if (it->events & EPOLLONESHOT)
			it->off = 1;
	}
	return cnt;
}

static int eps_has_listener(int ep)
{
	struct eps *e = eps_find(ep, 0);
	if (!e)
		return 0;
	for (int j = 0; j < e->n; j++)
		if (is_listener(e->v[j].fd))
			return 1;
	return 0;
}

static int joint_epoll(dmt_thread *s, int ep, struct epoll_event *ev, int max, int64_t timeout_ns)
{
	uint64_t dl = timeout_ns > 0 ? dmt_deadline_rel((uint64_t)timeout_ns) : 0;
	int ext = 0;
	struct eps *e = eps_find(ep, 0);
	for (int j = 0; e && j < e->n; j++)
		ext |= external(e->v[j].fd);
	for (;;) {
		int cnt = joint_epoll_once(ep, ev, max);
		if (cnt || timeout_ns == 0)
			return cnt;
		int timed = 0;
		if (pwait(s, dl, ext, &timed))
			return -1;
		if (timed)
			return joint_epoll_once(ep, ev, max);
	}
}

/* ---------------------------------------------------------------- hooks */

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(read)(fd, buf, n);
	for (;;) {
		int c = fd_class(fd);
		if (c == FC_PASS)
			return RI.read(fd, buf, n);
		if (c == FC_OTHER)
			return DMT_BLOCKING(s, DMT_OP_PIPE_IO, RI.read(fd, buf, n));
		ssize_t r = sock_in(s, K_READ, fd, buf, n, 0, 0, 0);
		if (r != -2)
			return r;
	}
}

EXPORT ssize_t readv(int fd, const struct iovec *v, int cnt)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(readv)(fd, v, cnt);
	for (;;) {
		int c = fd_class(fd);
		if (c == FC_PASS)
			return RI.readv(fd, v, cnt);
		if (c == FC_OTHER)
			return DMT_BLOCKING(s, DMT_OP_PIPE_IO, RI.readv(fd, v, cnt));
		ssize_t r = sock_in(s, K_READV, fd, (void *)v, (size_t)cnt, 0, 0, 0);
		if (r != -2)
			return r;
	}
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(recvfrom)(fd, buf, n, flags, 0, 0);
	return sock_in(s, K_RECVFROM, fd, buf, n, flags, 0, 0);
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *a, socklen_t *al)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(recvfrom)(fd, buf, n, flags, a, al);
	return sock_in(s, K_RECVFROM, fd, buf, n, flags, a, al);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *m, int flags)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(recvmsg)(fd, m, flags);
	return sock_in(s, K_RECVMSG, fd, 0, 0, flags, m, 0);
}

/* recvmmsg and sendmmsg are, in the kernel, loops of recvmsg and sendmsg
 * that return the messages done before an error, if any. Built here from
 * the interposed calls, every message takes the turn and blocks outside
 * it; as in the kernel, the timeout is checked only after a message. */
EXPORT int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *tmo)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(recvmmsg)(fd, v, n, flags, tmo);
	struct timespec end = {0, 0}, now;
	if (tmo) {
		if (tmo->tv_sec < 0 || tmo->tv_nsec < 0 || tmo->tv_nsec >= 1000000000) {
			errno = EINVAL;
			return -1;
		}
		R.clock_gettime(CLOCK_MONOTONIC, &end);
		end.tv_sec += tmo->tv_sec + (end.tv_nsec + tmo->tv_nsec) / 1000000000;
		end.tv_nsec = (end.tv_nsec + tmo->tv_nsec) % 1000000000;
	}
	int e = errno;
	unsigned int i = 0;
	while (i < n) {
		ssize_t r = recvmsg(fd, &v[i].msg_hdr, flags & ~MSG_WAITFORONE);
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		v[i++].msg_len = (unsigned int)r;
		if (flags & MSG_WAITFORONE)
			flags |= MSG_DONTWAIT;
		if (tmo) {
			R.clock_gettime(CLOCK_MONOTONIC, &now);
			int64_t left = (int64_t)(end.tv_sec - now.tv_sec) * 1000000000 +
				       (end.tv_nsec - now.tv_nsec);
			if (left < 0)
				left = 0;
			tmo->tv_sec = left / 1000000000;
			tmo->tv_nsec = left % 1000000000;
			if (left == 0)
				break;
		}
		if (v[i - 1].msg_hdr.msg_flags & MSG_OOB)
			break;
	}
	errno = e;
	return (int)i;
}

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(write)(fd, buf, n);
	for (;;) {
		int c = fd_class(fd);
		if (c == FC_PASS)
			return RI.write(fd, buf, n);
		if (c == FC_OTHER && atomic_load(&G.joint_on) && fd_nonblock(fd)) {
			/* a wakeup pipe or eventfd: its readiness is part of the order */
			turn_get(s);
			stat_op(DMT_OP_PIPE_IO);
			ssize_t r = RI.write(fd, buf, n);
			int e = errno;
			dmt_lock();
			dmt_signal_locked(&poll_obj, 1);
			dmt_unlock();
			turn_put(s);
			errno = e;
			return r;
		}
		if (c == FC_OTHER)
			return DMT_BLOCKING(s, DMT_OP_PIPE_IO, RI.write(fd, buf, n));
		ssize_t r = sock_out(s, K_WRITE, fd, buf, n, 0, 0, 0);
		if (r != -2)
			return r;
	}
}

EXPORT ssize_t writev(int fd, const struct iovec *v, int cnt)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(writev)(fd, v, cnt);
	for (;;) {
		int c = fd_class(fd);
		if (c == FC_PASS)
			return RI.writev(fd, v, cnt);
		if (c == FC_OTHER)
			return DMT_BLOCKING(s, DMT_OP_PIPE_IO, RI.writev(fd, v, cnt));
		ssize_t r = sock_out(s, K_WRITEV, fd, v, (size_t)cnt, 0, 0, 0);
		if (r != -2)
			return r;
	}
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(sendto)(fd, buf, n, flags, 0, 0);
	return sock_out(s, K_SENDTO, fd, buf, n, flags, 0, 0);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a,
		      socklen_t al)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(sendto)(fd, buf, n, flags, a, al);
	return sock_out(s, K_SENDTO, fd, buf, n, flags, a, al);
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *m, int flags)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(sendmsg)(fd, m, flags);
	return sock_out(s, K_SENDMSG, fd, 0, 0, flags, m, 0);
}

EXPORT int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(sendmmsg)(fd, v, n, flags);
	if (n > 1024) /* UIO_MAXIOV: the kernel sends at most that many */
		n = 1024;
	int e = errno;
	unsigned int i = 0;
	for (; i < n; i++) {
		ssize_t r = sendmsg(fd, &v[i].msg_hdr, flags);
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		v[i].msg_len = (unsigned int)r;
	}
	errno = e;
	return (int)i;
}

static ssize_t do_sendfile(int out, int in, off_t *off, size_t n)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(sendfile)(out, in, off, n);
	int c = fd_class(out);
	if (c == FC_PASS)
		return RI.sendfile(out, in, off, n);
	if (G.joint_env) {
		turn_get(s);
		if (jfd(out)) {
			/* a connection of the log: complete holding the turn */
			stat_op(DMT_OP_SEND);
			size_t done = 0;
			int tries = 0;
			ssize_t r = 0;
			while (done < n) {
				r = RI.sendfile(out, in, off, n - done);
				if (r > 0) {
					done += (size_t)r;
					tries = 0;
					continue;
				}
				if (r == 0)
					break;
				if (errno != EAGAIN && errno != EINTR)
					break;
				if (wait_fd(out, POLLOUT, &tries))
					break;
			}
			int e = errno;
			turn_put(s);
			errno = e;
			return done ? (ssize_t)done : r;
		}
		turn_put(s);
	}
	if (fd_nonblock(out)) {
		turn_get(s);
		stat_op(DMT_OP_SEND);
		ssize_t r = RI.sendfile(out, in, off, n);
		int e = errno;
		turn_put(s);
		errno = e;
		return r;
	}
	return DMT_BLOCKING(s, DMT_OP_SEND, RI.sendfile(out, in, off, n));
}

EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t n) { return do_sendfile(out, in, off, n); }
EXPORT ssize_t sendfile64(int out, int in, off_t *off, size_t n) { return do_sendfile(out, in, off, n); }

static int do_accept(int fd, struct sockaddr *a, socklen_t *al, int flags, int four)
{
	dmt_thread *s = dmt_enter();
	int r, e;
	if (!s) {
		r = four ? REAL(accept4)(fd, a, al, flags) : REAL(accept)(fd, a, al);
	} else if (G.joint_env && is_listener(fd) && joint_enter(s, 1)) {
		/* only inet listeners carry the log's connections */
		stat_op(DMT_OP_ACCEPT);
		r = joint_accept(s, fd, a, al, four ? flags : 0);
		e = errno;
		turn_put(s);
		errno = e;
		return r;
	} else if (fd_nonblock(fd)) {
		turn_get(s);
		stat_op(DMT_OP_ACCEPT);
		r = four ? RI.accept4(fd, a, al, flags) : RI.accept(fd, a, al);
		e = errno;
		turn_put(s);
		errno = e;
	} else {
		r = DMT_BLOCKING(s, DMT_OP_ACCEPT,
				 four ? RI.accept4(fd, a, al, flags) : RI.accept(fd, a, al));
	}
	if (r >= 0)
		fd_set_class(r, FC_SOCK);
	return r;
}

EXPORT int accept(int fd, struct sockaddr *a, socklen_t *al) { return do_accept(fd, a, al, 0, 0); }
EXPORT int accept4(int fd, struct sockaddr *a, socklen_t *al, int fl)
{
	return do_accept(fd, a, al, fl, 1);
}

EXPORT int connect(int fd, const struct sockaddr *a, socklen_t al)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(connect)(fd, a, al);
	if (fd_nonblock(fd)) {
		turn_get(s);
		stat_op(DMT_OP_CONNECT);
		int r = RI.connect(fd, a, al), e = errno;
		turn_put(s);
		errno = e;
		return r;
	}
	return DMT_BLOCKING(s, DMT_OP_CONNECT, RI.connect(fd, a, al));
}

EXPORT int socket(int d, int t, int p)
{
	int r = REAL(socket)(d, t, p);
	fd_forget(r);
	fd_set_class(r, FC_SOCK);
	return r;
}

EXPORT int socketpair(int d, int t, int p, int sv[2])
{
	int r = REAL(socketpair)(d, t, p, sv);
	if (r == 0) {
		fd_set_class(sv[0], FC_SOCK);
		fd_set_class(sv[1], FC_SOCK);
	}
	return r;
}

EXPORT int pipe(int fds[2])
{
	int r = REAL(pipe)(fds);
	if (r == 0) {
		fd_set_class(fds[0], FC_OTHER);
		fd_set_class(fds[1], FC_OTHER);
	}
	return r;
}

EXPORT int pipe2(int fds[2], int fl)
{
	int r = REAL(pipe2)(fds, fl);
	if (r == 0) {
		fd_set_class(fds[0], FC_OTHER);
		fd_set_class(fds[1], FC_OTHER);
	}
	return r;
}

static void fd_copy(int from, int to)
{
	if (to >= 0 && to != from)
		fd_forget(to);
	if (to >= 0 && to != from)
		fd_set_class(to, from >= 0 && from < FD_TAB ? fdtab[from] : FC_UNKNOWN);
}

EXPORT int dup(int fd)
{
	int r = REAL(dup)(fd);
	fd_copy(fd, r);
	return r;
}

EXPORT int dup2(int fd, int to)
{
	int r = REAL(dup2)(fd, to);
	fd_copy(fd, r);
	return r;
}

EXPORT int dup3(int fd, int to, int fl)
{
	int r = REAL(dup3)(fd, to, fl);
	fd_copy(fd, r);
	return r;
}

EXPORT int close(int fd)
{
	dmt_thread *s = dmt_enter();
	int sock = fd >= 0 && fd < FD_TAB && fdtab[fd] == FC_SOCK;
	fd_set_class(fd, FC_UNKNOWN);
	if (G.joint_env && fd >= 0 && fd < FD_TAB) {
		if (s)
			turn_get(s);
		dmt_lock();
		if (fdconn[fd]) {
			struct jconn *c = jc_get((uint32_t)(fdconn[fd] - 1));
			if (c) {
				c->appclosed = 1;
				c->fd = -1;
				if (c->eof)
					c->used = 0;
			}
		}
		fd_forget(fd);
		eps_forget_fd(fd);
		dmt_unlock();
		if (s)
			turn_put(s);
	}
	if (!s || !sock)
		return REAL(close)(fd);
	turn_get(s);
	stat_op(DMT_OP_CLOSE);
	int r = RI.close(fd), e = errno;
	turn_put(s);
	errno = e;
	return r;
}

EXPORT int shutdown(int fd, int how)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(shutdown)(fd, how);
	turn_get(s);
	stat_op(DMT_OP_SHUTDOWN);
	int r = RI.shutdown(fd, how), e = errno;
	turn_put(s);
	errno = e;
	return r;
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
	dmt_thread *s;
	switch (cmd) {
	case F_SETLKW:
	case F_OFD_SETLKW:
		s = dmt_enter();
		if (s)
			return DMT_BLOCKING(s, DMT_OP_FILE_LOCK, real(fd, cmd, arg));
		return real(fd, cmd, arg);
	case F_DUPFD:
	case F_DUPFD_CLOEXEC: {
		int r = real(fd, cmd, arg);
		fd_copy(fd, r);
		return r;
	}
	default:
		return real(fd, cmd, arg);
	}
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl64), fd, cmd, arg);
}

/* ---------------------------------------------------------------- readiness */

EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(poll)(fds, n, timeout);
	if (n == 0 && timeout >= 0)
		return dmt_sleep_ns(s, (uint64_t)timeout * 1000000ull);
	if (joint_enter(s, any_listener(fds, n))) {
		stat_op(DMT_OP_POLL);
		int jr = joint_poll(s, fds, n, timeout < 0 ? -1 : (int64_t)timeout * 1000000);
		int je = errno;
		turn_put(s);
		errno = je;
		return jr;
	}
	turn_get(s);
	stat_op(DMT_OP_POLL);
	int r = RI.poll(fds, n, 0), e = errno;
	if (r == 0 && timeout != 0) {
		int blk = turn_block(s);
		r = RI.poll(fds, n, timeout);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
	}
	errno = e;
	return r;
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(ppoll)(fds, n, ts, mask);
	static const struct timespec zero;
	if (joint_enter(s, any_listener(fds, n))) {
		stat_op(DMT_OP_POLL);
		int jr = joint_poll(s, fds, n,
				    ts ? (int64_t)ts->tv_sec * 1000000000ll + ts->tv_nsec : -1);
		int je = errno;
		turn_put(s);
		errno = je;
		return jr;
	}
	turn_get(s);
	stat_op(DMT_OP_POLL);
	int r = RI.ppoll(fds, n, &zero, mask), e = errno;
	if (r == 0 && !(ts && ts->tv_sec == 0 && ts->tv_nsec == 0)) {
		int blk = turn_block(s);
		r = RI.ppoll(fds, n, ts, mask);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
	}
	errno = e;
	return r;
}

/* ---------------------------------------------------------------- fortified */

/*
 * Entry points of -D_FORTIFY_SOURCE builds (MariaDB imports __poll_chk).
 * glibc's own check the buffer size and then call glibc's internal
 * poll/read/recv, out of LD_PRELOAD's reach: the call would escape the
 * runtime, and only the safety net would notice. These make the same
 * check, failing as glibc does, then go through the interposed call.
 */
extern void __chk_fail(void) __attribute__((noreturn));

EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		__chk_fail();
	return poll(fds, n, timeout);
}

EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
		       const sigset_t *mask, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		__chk_fail();
	return ppoll(fds, n, ts, mask);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
	if (n > buflen)
		__chk_fail();
	return read(fd, buf, n);
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
	if (n > buflen)
		__chk_fail();
	return recv(fd, buf, n, flags);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
			      struct sockaddr *a, socklen_t *al)
{
	if (n > buflen)
		__chk_fail();
	return recvfrom(fd, buf, n, flags, a, al);
}

/* ---------------------------------------------------------------- select */

static int sets_empty(int n, fd_set *a, fd_set *b, fd_set *c)
{
	return n <= 0 || (!a && !b && !c);
}

EXPORT int select(int n, fd_set *rd, fd_set *wr, fd_set *ex, struct timeval *tv)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(select)(n, rd, wr, ex, tv);
	if (sets_empty(n, rd, wr, ex) && tv) {
		/* apr_sleep and friends: a sleep in logical time */
		int r = dmt_sleep_ns(s, (uint64_t)tv->tv_sec * 1000000000ull +
					       (uint64_t)tv->tv_usec * 1000);
		tv->tv_sec = tv->tv_usec = 0;
		return r;
	}
	fd_set r0, w0, e0;
	if (rd)
		r0 = *rd;
	if (wr)
		w0 = *wr;
	if (ex)
		e0 = *ex;
	struct timeval z = {0, 0};
	turn_get(s);
	stat_op(DMT_OP_SELECT);
	int r = RI.select(n, rd, wr, ex, &z), e = errno;
	if (r == 0 && !(tv && tv->tv_sec == 0 && tv->tv_usec == 0)) {
		if (rd)
			*rd = r0;
		if (wr)
			*wr = w0;
		if (ex)
			*ex = e0;
		int blk = turn_block(s);
		r = RI.select(n, rd, wr, ex, tv);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
	}
	errno = e;
	return r;
}

EXPORT int pselect(int n, fd_set *rd, fd_set *wr, fd_set *ex, const struct timespec *ts,
		   const sigset_t *mask)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return REAL(pselect)(n, rd, wr, ex, ts, mask);
	fd_set r0, w0, e0;
	if (rd)
		r0 = *rd;
	if (wr)
		w0 = *wr;
	if (ex)
		e0 = *ex;
	static const struct timespec zero;
	turn_get(s);
	stat_op(DMT_OP_SELECT);
	int r = RI.pselect(n, rd, wr, ex, &zero, mask), e = errno;
	if (r == 0 && !(ts && ts->tv_sec == 0 && ts->tv_nsec == 0)) {
		if (rd)
			*rd = r0;
		if (wr)
			*wr = w0;
		if (ex)
			*ex = e0;
		int blk = turn_block(s);
		r = RI.pselect(n, rd, wr, ex, ts, mask);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
	}
	errno = e;
	return r;
}

/* epoll: the wait is a readiness check under the turn, then (if nothing is
 * ready) a kernel wait outside the runq. epoll_ctl does not block. */
static int epoll_common(int ep, struct epoll_event *ev, int max, int ms,
			const struct timespec *ts, const sigset_t *mask, int kind)
{
	dmt_thread *s = dmt_enter();
	if (!s) {
		if (kind == 2)
			return REAL(epoll_pwait2)(ep, ev, max, ts, mask);
		if (kind == 1)
			return REAL(epoll_pwait)(ep, ev, max, ms, mask);
		return REAL(epoll_wait)(ep, ev, max, ms);
	}
	static const struct timespec zero;
	if (max > 0 && joint_enter(s, eps_has_listener(ep))) {
		stat_op(DMT_OP_EPOLL_WAIT);
		int64_t tns = kind == 2 ? (ts ? (int64_t)ts->tv_sec * 1000000000ll + ts->tv_nsec : -1)
					: (ms < 0 ? -1 : (int64_t)ms * 1000000);
		int jr = joint_epoll(s, ep, ev, max, tns);
		int je = errno;
		turn_put(s);
		errno = je;
		return jr;
	}
	turn_get(s);
	stat_op(DMT_OP_EPOLL_WAIT);
	int r = kind == 2 ? RI.epoll_pwait2(ep, ev, max, &zero, mask)
			  : RI.epoll_pwait(ep, ev, max, 0, kind ? mask : 0);
	int e = errno;
	int may_wait = kind == 2 ? (ts == 0 || ts->tv_sec || ts->tv_nsec) : ms != 0;
	if (r == 0 && may_wait) {
		int blk = turn_block(s);
		if (kind == 2)
			r = RI.epoll_pwait2(ep, ev, max, ts, mask);
		else if (kind == 1)
			r = RI.epoll_pwait(ep, ev, max, ms, mask);
		else
			r = RI.epoll_wait(ep, ev, max, ms);
		e = errno;
		turn_unblock(s, blk);
	} else {
		turn_put(s);
	}
	errno = e;
	return r;
}

EXPORT int epoll_wait(int ep, struct epoll_event *ev, int max, int ms)
{
	return epoll_common(ep, ev, max, ms, 0, 0, 0);
}
EXPORT int epoll_pwait(int ep, struct epoll_event *ev, int max, int ms, const sigset_t *m)
{
	return epoll_common(ep, ev, max, ms, 0, m, 1);
}
EXPORT int epoll_pwait2(int ep, struct epoll_event *ev, int max, const struct timespec *ts,
			const sigset_t *m)
{
	return epoll_common(ep, ev, max, 0, ts, m, 2);
}

/* ---------------------------------------------------------------- others */

#define BLOCKING_HOOK(op, realcall, fallback)                                 \
	do {                                                                  \
		dmt_thread *s = dmt_enter();                                  \
		if (!s)                                                       \
			return fallback;                                      \
		return DMT_BLOCKING(s, op, realcall);                         \
	} while (0)

EXPORT pid_t waitpid(pid_t p, int *st, int o)
{
	if (o & WNOHANG)
		return REAL(waitpid)(p, st, o);
	BLOCKING_HOOK(DMT_OP_PROC_WAIT, RI.waitpid(p, st, o), REAL(waitpid)(p, st, o));
}
EXPORT pid_t wait(int *st)
{
	BLOCKING_HOOK(DMT_OP_PROC_WAIT, RI.wait(st), REAL(wait)(st));
}
EXPORT pid_t wait3(int *st, int o, struct rusage *ru)
{
	if (o & WNOHANG)
		return REAL(wait3)(st, o, ru);
	BLOCKING_HOOK(DMT_OP_PROC_WAIT, RI.wait3(st, o, ru), REAL(wait3)(st, o, ru));
}
EXPORT pid_t wait4(pid_t p, int *st, int o, struct rusage *ru)
{
	if (o & WNOHANG)
		return REAL(wait4)(p, st, o, ru);
	BLOCKING_HOOK(DMT_OP_PROC_WAIT, RI.wait4(p, st, o, ru), REAL(wait4)(p, st, o, ru));
}
EXPORT int waitid(idtype_t t, id_t id, siginfo_t *si, int o)
{
	if (o & WNOHANG)
		return REAL(waitid)(t, id, si, o);
	BLOCKING_HOOK(DMT_OP_PROC_WAIT, RI.waitid(t, id, si, o), REAL(waitid)(t, id, si, o));
}
EXPORT int pause(void)
{
	BLOCKING_HOOK(DMT_OP_SIGNAL_WAIT, RI.pause(), REAL(pause)());
}
EXPORT int sigsuspend(const sigset_t *m)
{
	BLOCKING_HOOK(DMT_OP_SIGNAL_WAIT, RI.sigsuspend(m), REAL(sigsuspend)(m));
}
EXPORT int sigwait(const sigset_t *m, int *sig)
{
	BLOCKING_HOOK(DMT_OP_SIGNAL_WAIT, RI.sigwait(m, sig), REAL(sigwait)(m, sig));
}
EXPORT int sigwaitinfo(const sigset_t *m, siginfo_t *si)
{
	BLOCKING_HOOK(DMT_OP_SIGNAL_WAIT, RI.sigwaitinfo(m, si), REAL(sigwaitinfo)(m, si));
}
EXPORT int sigtimedwait(const sigset_t *m, siginfo_t *si, const struct timespec *ts)
{
	BLOCKING_HOOK(DMT_OP_SIGNAL_WAIT, RI.sigtimedwait(m, si, ts),
		      REAL(sigtimedwait)(m, si, ts));
}
EXPORT int flock(int fd, int op)
{
	if (op & LOCK_NB)
		return REAL(flock)(fd, op);
	BLOCKING_HOOK(DMT_OP_FILE_LOCK, RI.flock(fd, op), REAL(flock)(fd, op));
}
EXPORT int lockf(int fd, int cmd, off_t len)
{
	if (cmd != F_LOCK)
		return REAL(lockf)(fd, cmd, len);
	BLOCKING_HOOK(DMT_OP_FILE_LOCK, RI.lockf(fd, cmd, len), REAL(lockf)(fd, cmd, len));
}

static int sem_nowait(struct sembuf *ops, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!(ops[i].sem_flg & IPC_NOWAIT))
			return 0;
	return 1;
}

EXPORT int semop(int id, struct sembuf *ops, size_t n)
{
	if (sem_nowait(ops, n))
		return REAL(semop)(id, ops, n);
	BLOCKING_HOOK(DMT_OP_OTHER_BLOCKING, RI.semop(id, ops, n), REAL(semop)(id, ops, n));
}
EXPORT int semtimedop(int id, struct sembuf *ops, size_t n, const struct timespec *ts)
{
	if (sem_nowait(ops, n))
		return REAL(semtimedop)(id, ops, n, ts);
	BLOCKING_HOOK(DMT_OP_OTHER_BLOCKING, RI.semtimedop(id, ops, n, ts),
		      REAL(semtimedop)(id, ops, n, ts));
}
EXPORT ssize_t msgrcv(int id, void *p, size_t n, long t, int fl)
{
	if (fl & IPC_NOWAIT)
		return REAL(msgrcv)(id, p, n, t, fl);
	BLOCKING_HOOK(DMT_OP_OTHER_BLOCKING, RI.msgrcv(id, p, n, t, fl),
		      REAL(msgrcv)(id, p, n, t, fl));
}
EXPORT int msgsnd(int id, const void *p, size_t n, int fl)
{
	if (fl & IPC_NOWAIT)
		return REAL(msgsnd)(id, p, n, fl);
	BLOCKING_HOOK(DMT_OP_OTHER_BLOCKING, RI.msgsnd(id, p, n, fl), REAL(msgsnd)(id, p, n, fl));
}

/* ---------------------------------------------------------------- fork */

EXPORT pid_t fork(void)
{
	dmt_thread *s = dmt_enter();
	if (!s)
		return R.fork ? R.fork() : ((pid_t(*)(void))dlsym(RTLD_NEXT, "fork"))();
	turn_get(s);
	stat_op(DMT_OP_FORK);
	stat_add(&G.slot->forks, 1);
	pid_t p = R.fork(); /* the child is rebuilt by the atfork handler */
	int e = errno;
	turn_put(s);
	errno = e;
	return p;
}

/* ---------------------------------------------------------------- syscall */

static int blocking_syscall(long n, long a2, long a3, long a4, int *op)
{
	*op = DMT_OP_OTHER_BLOCKING;
	switch (n) {
	case SYS_futex:
		switch (a2 & FUTEX_CMD_MASK) {
		case FUTEX_WAIT:
		case FUTEX_WAIT_BITSET:
		case FUTEX_LOCK_PI:
		case FUTEX_WAIT_REQUEUE_PI:
#ifdef FUTEX_LOCK_PI2
		case FUTEX_LOCK_PI2:
#endif
			*op = DMT_OP_FUTEX;
			return 1;
		}
		return 0;
#ifdef SYS_futex_waitv
	case SYS_futex_waitv:
		*op = DMT_OP_FUTEX;
		return 1;
#endif
	case SYS_io_getevents:
		return a2 > 0;
#ifdef SYS_io_pgetevents
	case SYS_io_pgetevents:
		return a2 > 0;
#endif
#ifdef SYS_io_uring_enter
	case SYS_io_uring_enter:
		return (a4 & 1 /* IORING_ENTER_GETEVENTS */) && a3 > 0;
#endif
	case SYS_epoll_wait:
	case SYS_epoll_pwait:
	case SYS_poll:
	case SYS_ppoll:
	case SYS_select:
	case SYS_pselect6:
	case SYS_nanosleep:
	case SYS_clock_nanosleep:
	case SYS_wait4:
	case SYS_waitid:
	case SYS_pause:
	case SYS_rt_sigsuspend:
	case SYS_rt_sigtimedwait:
	case SYS_accept:
	case SYS_accept4:
	case SYS_connect:
	case SYS_recvfrom:
	case SYS_recvmsg:
	case SYS_read:
	case SYS_readv:
	case SYS_msgrcv:
	case SYS_semop:
	case SYS_semtimedop:
	case SYS_flock:
		return 1;
	}
	return 0;
}

EXPORT long syscall(long n, ...)
{
	va_list ap;
	va_start(ap, n);
	long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long);
	long a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
	va_end(ap);
	long (*real)(long, ...) = R.syscall ? R.syscall : (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
	int op;
	if (!blocking_syscall(n, a2, a3, a4, &op))
		return real(n, a1, a2, a3, a4, a5, a6);
	dmt_thread *s = dmt_enter();
	if (!s)
		return real(n, a1, a2, a3, a4, a5, a6);
	return DMT_BLOCKING(s, op, real(n, a1, a2, a3, a4, a5, a6));
}
