/*
 * dmtcheck: small programs exercising corners of the dmt runtime, run by
 * dmt's tests under LD_PRELOAD. Each mode prints "OK ..." and exits 0, or
 * prints what went wrong and exits 1.
 *
 *   steal  a thread blocks in a raw system call (invisible to the runtime)
 *          until another thread, which first needs the turn, wakes it
 *   fork   fork with threads running; the child uses threads of its own
 *   time   logical sleeps and timed waits end when nobody can run, and a
 *          handled signal interrupts a sleep (EINTR)
 *   misc   pthread_once, spin locks, trylock, recursive and errorcheck
 *          mutexes, detached threads
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FAIL(...)                                                             \
	do {                                                                  \
		printf(__VA_ARGS__);                                          \
		printf("\n");                                                 \
		exit(1);                                                      \
	} while (0)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- steal */

static int pfd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int shared;

static long raw_read(int fd, void *buf, long n)
{
#if defined(__x86_64__)
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(SYS_read), "D"(fd), "S"(buf), "d"(n)
			 : "rcx", "r11", "memory");
	return ret;
#else
	return read(fd, buf, n);
#endif
}

static pthread_mutex_t mu2 = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv2 = PTHREAD_COND_INITIALIZER;
static int ready;

/*
 * The blocker makes mu its own (a private, biased mutex), tells the waker,
 * and blocks in a raw read. The waker then needs mu: it must ask the
 * blocker to give it up, and waits for that in the wait queue while the
 * blocker stalls the run queue. Only the safety net can untie this.
 */
static void *blocker(void *arg)
{
	char c;
	pthread_mutex_lock(&mu);
	shared++;
	pthread_mutex_unlock(&mu);
	pthread_mutex_lock(&mu2);
	ready = 1;
	pthread_cond_signal(&cv2);
	pthread_mutex_unlock(&mu2);
	if (raw_read(pfd[0], &c, 1) != 1)
		FAIL("raw read failed");
	pthread_mutex_lock(&mu);
	shared++;
	pthread_mutex_unlock(&mu);
	return arg;
}

static void *waker(void *arg)
{
	pthread_mutex_lock(&mu2);
	while (!ready)
		pthread_cond_wait(&cv2, &mu2);
	pthread_mutex_unlock(&mu2);
	for (int i = 0; i < 100; i++) {
		pthread_mutex_lock(&mu);
		shared++;
		pthread_mutex_unlock(&mu);
	}
	if (write(pfd[1], "x", 1) != 1)
		FAIL("write failed");
	return arg;
}

static int steal(void)
{
	if (pipe(pfd))
		FAIL("pipe");
	pthread_t a, b;
	pthread_create(&b, 0, waker, 0);
	pthread_create(&a, 0, blocker, 0);
	pthread_join(a, 0);
	pthread_join(b, 0);
	if (shared != 102)
		FAIL("shared=%d, want 102", shared);
	printf("OK steal\n");
	return 0;
}

/* ---------------------------------------------------------------- fork */

static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int stop, ticks;

static void *ticker(void *arg)
{
	pthread_mutex_lock(&mu);
	while (!stop) {
		ticks++;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
		sched_yield();
		pthread_mutex_lock(&mu);
	}
	pthread_mutex_unlock(&mu);
	return arg;
}

static int child_work(void)
{
	pthread_t t[3];
	pthread_mutex_lock(&mu);
	stop = 0;
	ticks = 0;
	pthread_mutex_unlock(&mu);
	for (int i = 0; i < 3; i++)
		pthread_create(&t[i], 0, ticker, 0);
	pthread_mutex_lock(&mu);
	while (ticks < 1000)
		pthread_cond_wait(&cv, &mu);
	stop = 1;
	pthread_mutex_unlock(&mu);
	for (int i = 0; i < 3; i++)
		pthread_join(t[i], 0);
	return 0;
}

static int forktest(void)
{
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], 0, ticker, 0);
	pthread_mutex_lock(&mu);
	while (ticks < 100)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	pid_t p = fork();
	if (p < 0)
		FAIL("fork: %s", strerror(errno));
	if (p == 0) {
		/* the parent's tickers do not exist here; mu may be in any
		 * state the fork caught it in: start from a fresh one */
		pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
		mu = fresh;
		_exit(child_work());
	}
	int st;
	if (waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		FAIL("child failed: status %d", st);
	pthread_mutex_lock(&mu);
	stop = 1;
	pthread_mutex_unlock(&mu);
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], 0);
	printf("OK fork\n");
	return 0;
}

/* ---------------------------------------------------------------- time */

static volatile sig_atomic_t got;
static void on_alarm(int sig) { got = sig; }

static int timetest(void)
{
	/* one thread: nobody else runs, so the logical clock advances in
	 * real time while it sleeps */
	double t0 = now();
	usleep(200000);
	double dt = now() - t0;
	if (dt < 0.1 || dt > 5)
		FAIL("usleep(200ms) took %.3fs", dt);

	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += 100000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&mu);
	t0 = now();
	int r = pthread_cond_timedwait(&cv, &mu, &ts);
	dt = now() - t0;
	pthread_mutex_unlock(&mu);
	if (r != ETIMEDOUT || dt > 5)
		FAIL("cond_timedwait: %d after %.3fs, want ETIMEDOUT", r, dt);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, 0);
	/* the runtime counts handlers behind a trampoline of its own; the
	 * application reads back its handler */
	struct sigaction back;
	if (sigaction(SIGALRM, 0, &back) != 0 || back.sa_handler != on_alarm)
		FAIL("sigaction reads back %p, want the handler installed", (void *)back.sa_handler);
	if (signal(SIGALRM, on_alarm) != on_alarm)
		FAIL("signal returns another handler than the one installed");
	alarm(1);
	t0 = now();
	struct timespec ten = {10, 0};
	r = nanosleep(&ten, 0);
	dt = now() - t0;
	if (r != -1 || errno != EINTR || got != SIGALRM || dt > 5)
		FAIL("nanosleep(10s) with SIGALRM at 1s: r=%d errno=%d after %.3fs", r, errno, dt);
	printf("OK time\n");
	return 0;
}

/* ---------------------------------------------------------------- misc */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int inits;
static pthread_spinlock_t spin;
static int spun;
static void init_once(void) { inits++; }

static void *misc_worker(void *arg)
{
	pthread_once(&once, init_once);
	for (int i = 0; i < 100; i++) {
		pthread_spin_lock(&spin);
		spun++;
		pthread_spin_unlock(&spin);
		while (pthread_mutex_trylock(&mu) != 0)
			sched_yield();
		shared++;
		pthread_mutex_unlock(&mu);
	}
	return arg;
}

static void *detached(void *arg)
{
	pthread_mutex_lock(&mu);
	shared += 1000;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return arg;
}

static int misc(void)
{
	pthread_spin_init(&spin, 0);
	pthread_t t[4];
	for (int i = 0; i < 4; i++)
		pthread_create(&t[i], 0, misc_worker, 0);
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], 0);
	if (inits != 1 || spun != 400 || shared != 400)
		FAIL("once ran %d times, spun %d, shared %d", inits, spun, shared);

	pthread_mutexattr_t a;
	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_t rec;
	pthread_mutex_init(&rec, &a);
	pthread_mutex_lock(&rec);
	pthread_mutex_lock(&rec);
	pthread_mutex_unlock(&rec);
	pthread_mutex_unlock(&rec);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
	pthread_mutex_t ec;
	pthread_mutex_init(&ec, &a);
	pthread_mutex_lock(&ec);
	if (pthread_mutex_lock(&ec) != EDEADLK)
		FAIL("errorcheck relock did not fail with EDEADLK");
	pthread_mutex_unlock(&ec);

	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	for (int i = 0; i < 3; i++) {
		pthread_t d;
		pthread_create(&d, &at, detached, 0);
	}
	pthread_mutex_lock(&mu);
	while (shared < 3400)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	printf("OK misc\n");
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, 0, _IONBF, 0);
	if (argc == 2 && !strcmp(argv[1], "steal"))
		return steal();
	if (argc == 2 && !strcmp(argv[1], "fork"))
		return forktest();
	if (argc == 2 && !strcmp(argv[1], "time"))
		return timetest();
	if (argc == 2 && !strcmp(argv[1], "misc"))
		return misc();
	fprintf(stderr, "usage: dmtcheck steal|fork|time|misc\n");
	return 2;
}
