/*
 * racy: a TCP server whose answer depends on how its threads interleave.
 * It is the fixture for lockstep's deterministic runtime (dmt/): run plainly,
 * the same request gives different answers from run to run; under the
 * runtime, the same sequence of requests gives the same answers every run.
 *
 *   racy [-p port]      listens on 127.0.0.1:port (0: any), prints "PORT n"
 *
 * Protocol, one line per request on a connection:
 *   RUN k n   fan out to k fresh threads (2 <= k <= 16, 1 <= n <= 500) that
 *             race n rounds on shared state under a mutex, condition
 *             variables, a rwlock, a semaphore, a barrier, timed waits and
 *             sleeps, then feed each other through a bounded queue. Reply:
 *             "OK hash=<h> seq=<order of appends> got=<who consumed what>
 *             rd=<what readers saw>"
 *   STATE     the server's state: "STATE runs=<n> hash=<h>", every RUN's
 *             hash folded in the order the runs ended, over all
 *             connections (so it also depends on how they interleaved)
 *   QUIT      exit the server
 * Everything in the reply comes from the interleaving, nothing from time,
 * addresses or thread ids.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define QCAP 2
#define MAXSEQ 65536

struct run {
	int k, n;
	pthread_mutex_t mu;
	pthread_cond_t tick, not_full, not_empty;
	pthread_rwlock_t rw;
	sem_t room;
	pthread_barrier_t start;
	char seq[MAXSEQ];
	int len;
	int counter, shared;
	int q[QCAP], qh, qn;
	int total, popped;
	char got[MAXSEQ];
	int glen;
	uint64_t rd[16];
};

struct worker {
	struct run *r;
	int id;
};

static void put(struct run *r, char c)
{
	if (r->len < MAXSEQ - 1)
		r->seq[r->len++] = c;
}

static void spin(unsigned n)
{
	volatile unsigned x = 0;
	for (unsigned i = 0; i < n; i++)
		x += i;
}

static void *work(void *arg)
{
	struct worker *w = arg;
	struct run *r = w->r;
	int id = w->id;
	unsigned seed = 7919u * (id + 1);
	uint64_t rd = 0;

	pthread_barrier_wait(&r->start);
	for (int i = 0; i < r->n; i++) {
		spin(rand_r(&seed) % 3000);
		pthread_mutex_lock(&r->mu);
		put(r, 'a' + id);
		if (++r->counter % 5 == 0)
			pthread_cond_broadcast(&r->tick);
		pthread_mutex_unlock(&r->mu);

		if (i % 4 == 1) {
			pthread_rwlock_rdlock(&r->rw);
			rd = rd * 31 + r->shared;
			pthread_rwlock_unlock(&r->rw);
		} else if (i % 4 == 3) {
			pthread_rwlock_wrlock(&r->rw);
			r->shared += id + 1;
			pthread_rwlock_unlock(&r->rw);
		}
		if (i % 5 == 2) {
			sem_wait(&r->room);
			pthread_mutex_lock(&r->mu);
			put(r, 'A' + id);
			pthread_mutex_unlock(&r->mu);
			sem_post(&r->room);
		}
		if (i % 7 == 0)
			sched_yield();
		if (i % 9 == 4)
			usleep(20);
		if (i % 11 == 5) {
			/* wait for the next tick, but not for long */
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 50000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_mutex_lock(&r->mu);
			int c0 = r->counter / 5, rc = 0;
			while (r->counter / 5 == c0 && rc == 0)
				rc = pthread_cond_timedwait(&r->tick, &r->mu, &ts);
			put(r, rc == ETIMEDOUT ? 'T' : 'W');
			pthread_mutex_unlock(&r->mu);
		}
	}
	r->rd[id] = rd;

	/* even ids produce, odd ids consume */
	pthread_mutex_lock(&r->mu);
	if (id % 2 == 0) {
		for (int j = 0; j < r->n / 2 + 1; j++) {
			while (r->qn == QCAP)
				pthread_cond_wait(&r->not_full, &r->mu);
			r->q[(r->qh + r->qn++) % QCAP] = id * 1000 + j;
			pthread_cond_signal(&r->not_empty);
			pthread_mutex_unlock(&r->mu);
			spin(rand_r(&seed) % 2000);
			pthread_mutex_lock(&r->mu);
		}
	} else {
		for (;;) {
			while (r->qn == 0 && r->popped < r->total)
				pthread_cond_wait(&r->not_empty, &r->mu);
			if (r->popped == r->total)
				break;
			int v = r->q[r->qh];
			r->qh = (r->qh + 1) % QCAP;
			r->qn--;
			if (++r->popped == r->total)
				pthread_cond_broadcast(&r->not_empty);
			pthread_cond_signal(&r->not_full);
			if (r->glen < MAXSEQ - 16)
				r->glen += snprintf(r->got + r->glen, MAXSEQ - r->glen, "%c%d.", 'a' + id, v);
			pthread_mutex_unlock(&r->mu);
			spin(rand_r(&seed) % 2000);
			pthread_mutex_lock(&r->mu);
		}
	}
	pthread_mutex_unlock(&r->mu);
	return 0;
}

static uint64_t fnv(uint64_t h, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
	return h;
}

static char *run(int k, int n)
{
	struct run *r = calloc(1, sizeof *r);
	r->k = k;
	r->n = n;
	pthread_mutex_init(&r->mu, 0);
	pthread_cond_init(&r->tick, 0);
	pthread_cond_init(&r->not_full, 0);
	pthread_cond_init(&r->not_empty, 0);
	pthread_rwlock_init(&r->rw, 0);
	sem_init(&r->room, 0, (unsigned)(k + 1) / 2);
	pthread_barrier_init(&r->start, 0, (unsigned)k);
	r->total = ((k + 1) / 2) * (n / 2 + 1);

	pthread_t t[16];
	struct worker w[16];
	for (int i = 0; i < k; i++) {
		w[i].r = r;
		w[i].id = i;
		pthread_create(&t[i], 0, work, &w[i]);
	}
	for (int i = 0; i < k; i++)
		pthread_join(t[i], 0);

	char rdbuf[16 * 24] = "";
	int rl = 0;
	for (int i = 0; i < k; i++)
		rl += snprintf(rdbuf + rl, sizeof rdbuf - rl, "%llx%s",
			       (unsigned long long)(r->rd[i] % 0xfffff), i + 1 < k ? "," : "");
	uint64_t h = fnv(1469598103934665603ull, r->seq, r->len);
	h = fnv(h, r->got, r->glen);
	h = fnv(h, rdbuf, rl);
	size_t cap = r->len + r->glen + rl + 128;
	char *out = malloc(cap);
	snprintf(out, cap, "OK hash=%016llx seq=%.*s got=%.*s rd=%s\n", (unsigned long long)h,
		 r->len, r->seq, r->glen, r->got, rdbuf);

	pthread_barrier_destroy(&r->start);
	sem_destroy(&r->room);
	pthread_rwlock_destroy(&r->rw);
	pthread_cond_destroy(&r->tick);
	pthread_cond_destroy(&r->not_full);
	pthread_cond_destroy(&r->not_empty);
	pthread_mutex_destroy(&r->mu);
	free(r);
	return out;
}

static int send_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* The server's state across connections: every run's hash, in the order
 * the runs ended. */
static pthread_mutex_t state_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t state_hash = 1469598103934665603ull;
static unsigned long state_runs;

static void state_add(const char *reply)
{
	pthread_mutex_lock(&state_mu);
	state_hash = fnv(state_hash, reply, strlen(reply));
	state_runs++;
	pthread_mutex_unlock(&state_mu);
}

static char *state(void)
{
	char *out = malloc(64);
	pthread_mutex_lock(&state_mu);
	snprintf(out, 64, "STATE runs=%lu hash=%016llx\n", state_runs, (unsigned long long)state_hash);
	pthread_mutex_unlock(&state_mu);
	return out;
}

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[4096];
	size_t have = 0;
	for (;;) {
		char *nl = memchr(buf, '\n', have);
		if (!nl) {
			if (have == sizeof buf)
				break;
			ssize_t n = recv(fd, buf + have, sizeof buf - have, 0);
			if (n <= 0)
				break;
			have += (size_t)n;
			continue;
		}
		*nl = 0;
		int k, n;
		char *reply;
		if (strncmp(buf, "QUIT", 4) == 0) {
			send_all(fd, "BYE\n", 4);
			exit(0);
		} else if (sscanf(buf, "RUN %d %d", &k, &n) == 2 && k >= 2 && k <= 16 && n >= 1 &&
			   n <= 500) {
			reply = run(k, n);
			state_add(reply);
		} else if (strncmp(buf, "STATE", 5) == 0) {
			reply = state();
		} else {
			reply = strdup("ERR usage: RUN k n | STATE | QUIT\n");
		}
		int bad = send_all(fd, reply, strlen(reply));
		free(reply);
		if (bad)
			break;
		size_t used = (size_t)(nl - buf) + 1;
		memmove(buf, buf + used, have - used);
		have -= used;
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	int port = 0, opt;
	while ((opt = getopt(argc, argv, "p:")) != -1) {
		if (opt == 'p')
			port = atoi(optarg);
		else {
			fprintf(stderr, "usage: racy [-p port]\n");
			return 2;
		}
	}
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t al = sizeof a;
	if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 64) ||
	    getsockname(ls, (struct sockaddr *)&a, &al)) {
		perror("racy: listen");
		return 1;
	}
	printf("PORT %d\n", ntohs(a.sin_port));
	fflush(stdout);
	for (;;) {
		int c = accept(ls, 0, 0);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("racy: accept");
			return 1;
		}
		pthread_t t;
		pthread_attr_t at;
		pthread_attr_init(&at);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		pthread_create(&t, &at, serve, (void *)(intptr_t)c);
		pthread_attr_destroy(&at);
	}
}
