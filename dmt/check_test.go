package dmt

import (
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var dmtcheck struct {
	once sync.Once
	path string
	err  error
}

// buildCheck compiles testdata/dmtcheck.c with the system compiler.
func buildCheck(t *testing.T) string {
	t.Helper()
	dmtcheck.once.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			dmtcheck.err = err
			return
		}
		dir := filepath.Join(root, ".build", "dmt")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			dmtcheck.err = err
			return
		}
		dmtcheck.path = filepath.Join(dir, "dmtcheck")
		out, err := exec.Command("cc", "-O2", "-pthread", "-Wall", "-o", dmtcheck.path,
			filepath.Join(root, "dmt", "testdata", "dmtcheck.c")).CombinedOutput()
		if err != nil {
			dmtcheck.err = &buildError{err, string(out)}
		}
	})
	if dmtcheck.err != nil {
		t.Fatal(dmtcheck.err)
	}
	return dmtcheck.path
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "cc dmtcheck.c: " + e.err.Error() + "\n" + e.out }

// runCheck runs one mode of dmtcheck under the runtime and returns its
// statistics.
func runCheck(t *testing.T, mode string) Stats {
	t.Helper()
	st, _ := runCheckShm(t, mode)
	return st
}

// runCheckShm is runCheck that also returns the statistics file.
func runCheckShm(t *testing.T, mode string) (Stats, string) {
	t.Helper()
	lib, _ := build(t)
	bin := buildCheck(t)
	shm := filepath.Join(t.TempDir(), "dmt.shm")
	env, err := Env(Options{Library: lib, Shm: shm})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, mode)
	cmd.Env = MergeEnv(os.Environ(), env)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("dmtcheck %s: still running after 30s (deadlock?)\n%s", mode, out)
	}
	if err != nil || !strings.Contains(string(out), "OK "+mode) {
		t.Fatalf("dmtcheck %s: %v\n%s", mode, err, out)
	}
	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	return st, shm
}

// A thread blocked in a system call the runtime cannot see, whose wake-up
// needs another thread to get the turn first, must not stall the process:
// the safety net takes it out of the run queue.
func TestSafetyNetUnknownBlockingCall(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the test program's raw system call is written for amd64")
	}
	st, shm := runCheckShm(t, "steal")
	if st.Total.Steals == 0 {
		t.Errorf("no steal counted; the test program did not block where it should: %+v", st.Total)
	}
	checkCollector(t, shm) // lockstep_dmt_steals_total among them

}

// fork with threads running: parent and child each keep a working runtime.
func TestFork(t *testing.T) {
	st := runCheck(t, "fork")
	if len(st.Processes) != 2 || st.Total.Forks != 1 {
		t.Fatalf("want 2 processes and 1 fork, got %d processes, %d forks", len(st.Processes), st.Total.Forks)
	}
	for _, p := range st.Processes {
		if p.Ops["mutex_lock"]+p.Ops["mutex_lock_private"] == 0 || p.Ops["thread_create"] == 0 {
			t.Errorf("process %d did no work under the runtime: %v", p.PID, p.Ops)
		}
	}
}

// Logical sleeps and timed waits end when nobody else runs, and a handled
// signal interrupts a sleep.
func TestLogicalTime(t *testing.T) {
	st := runCheck(t, "time")
	if st.Total.Timeouts < 2 || st.Total.IdleAdvances < 2 {
		t.Errorf("want the sleep and the timed wait to expire while idle: timeouts %d, idle advances %d",
			st.Total.Timeouts, st.Total.IdleAdvances)
	}
}

// pthread_once, spin locks, trylock, recursive and errorcheck mutexes,
// detached threads.
func TestMiscPrimitives(t *testing.T) {
	st := runCheck(t, "misc")
	for _, op := range []string{"once", "spin", "thread_exit"} {
		if st.Total.Ops[op] == 0 {
			t.Errorf("no %s counted: %v", op, st.Total.Ops)
		}
	}
}

// fortifySrc calls poll, ppoll, read, recv and recvfrom as a program built
// with -O2 -D_FORTIFY_SOURCE=2 does: through glibc's __poll_chk,
// __ppoll_chk, __read_chk, __recv_chk and __recvfrom_chk (MariaDB imports
// __poll_chk), plus recvmmsg and sendmmsg.
const fortifySrc = `/* Built with -O2 -D_FORTIFY_SOURCE=2: poll, ppoll, read, recv and
 * recvfrom on buffers of known size, with counts the compiler cannot
 * see, become calls to glibc's __poll_chk, __ppoll_chk, __read_chk,
 * __recv_chk and __recvfrom_chk. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FAIL(...) do { printf(__VA_ARGS__); printf("\n"); exit(1); } while (0)

static volatile size_t one = 1, eight = 8;
static volatile nfds_t nfds1 = 1, nfds2 = 2;
static int sv[2];

enum { R_POLL, R_PPOLL, R_READ, R_RECV, R_RECVFROM, R_RECVMMSG, ROUNDS };
static pthread_mutex_t mu[ROUNDS];
static pthread_mutex_t smu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t scv = PTHREAD_COND_INITIALIZER;
static int stage = -1;

static void drain(void)
{
	char c;
	if (recv(sv[0], &c, 1, MSG_DONTWAIT) != 1)
		FAIL("drain: %s", strerror(errno));
}

/*
 * Round i: the reader makes mu[i] its own (a biased mutex), tells the
 * writer, and blocks in call i. The writer must take mu[i] from it before
 * it writes the byte that ends the call: at once if the reader is blocked
 * through the runtime, else only when the safety net steals the reader.
 */
static void *reader(void *arg)
{
	for (int i = 0; i < ROUNDS; i++) {
		char buf[16];
		pthread_mutex_init(&mu[i], 0);
		pthread_mutex_lock(&mu[i]);
		pthread_mutex_unlock(&mu[i]);
		pthread_mutex_lock(&smu);
		stage = i;
		pthread_cond_signal(&scv);
		pthread_mutex_unlock(&smu);
		struct pollfd p[1] = {{.fd = sv[0], .events = POLLIN}};
		ssize_t r = -1;
		switch (i) {
		case R_POLL:
			r = poll(p, nfds1, -1);
			drain();
			break;
		case R_PPOLL:
			r = ppoll(p, nfds1, 0, 0);
			drain();
			break;
		case R_READ:
			r = read(sv[0], buf, one);
			break;
		case R_RECV:
			r = recv(sv[0], buf, one, 0);
			break;
		case R_RECVFROM:
			r = recvfrom(sv[0], buf, one, 0, 0, 0);
			break;
		case R_RECVMMSG: {
			/* two asked, one sent: MSG_WAITFORONE returns after it */
			struct iovec v[2] = {{buf, 1}, {buf + 1, 1}};
			struct mmsghdr m[2];
			memset(m, 0, sizeof m);
			m[0].msg_hdr.msg_iov = &v[0];
			m[0].msg_hdr.msg_iovlen = 1;
			m[1].msg_hdr.msg_iov = &v[1];
			m[1].msg_hdr.msg_iovlen = 1;
			r = recvmmsg(sv[0], m, 2, MSG_WAITFORONE, 0);
			if (r == 1 && m[0].msg_len != 1)
				FAIL("recvmmsg: msg_len %u", m[0].msg_len);
			break;
		}
		}
		if (r != 1)
			FAIL("round %d: returned %zd (%s)", i, r, strerror(errno));
	}
	return arg;
}

static void *writer(void *arg)
{
	for (int i = 0; i < ROUNDS; i++) {
		pthread_mutex_lock(&smu);
		while (stage < i)
			pthread_cond_wait(&scv, &smu);
		pthread_mutex_unlock(&smu);
		pthread_mutex_lock(&mu[i]);
		pthread_mutex_unlock(&mu[i]);
		if (i == R_RECVMMSG) {
			struct iovec v = {"x", 1};
			struct mmsghdr m;
			memset(&m, 0, sizeof m);
			m.msg_hdr.msg_iov = &v;
			m.msg_hdr.msg_iovlen = 1;
			if (sendmmsg(sv[1], &m, 1, 0) != 1 || m.msg_len != 1)
				FAIL("sendmmsg: %s", strerror(errno));
		} else if (write(sv[1], "x", 1) != 1) {
			FAIL("write: %s", strerror(errno));
		}
	}
	return arg;
}

/* A count beyond the buffer must abort as glibc's checks do. Two bytes
 * wait in the socket and two pollfds exist, so a missing check returns
 * without overflowing anything. */
static struct { struct pollfd p[1], spare[1]; } ps;
static char small[4];

static int overflow(const char *what)
{
	ssize_t r = -1;
	if (write(sv[1], "xy", 2) != 2)
		FAIL("write");
	ps.p[0] = (struct pollfd){.fd = sv[0], .events = POLLIN};
	ps.spare[0] = (struct pollfd){.fd = -1};
	if (!strcmp(what, "poll"))
		r = poll(ps.p, nfds2, 0);
	else if (!strcmp(what, "ppoll"))
		r = ppoll(ps.p, nfds2, &(struct timespec){0, 0}, 0);
	else if (!strcmp(what, "read"))
		r = read(sv[0], small, eight);
	else if (!strcmp(what, "recv"))
		r = recv(sv[0], small, eight, 0);
	else if (!strcmp(what, "recvfrom"))
		r = recvfrom(sv[0], small, eight, 0, 0, 0);
	else
		FAIL("unknown call %s", what);
	printf("NOT CHECKED: %s returned %zd\n", what, r);
	return 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, 0, _IONBF, 0);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		FAIL("socketpair");
	if (argc == 3 && !strcmp(argv[1], "overflow"))
		return overflow(argv[2]);
	pthread_t a, b;
	pthread_create(&a, 0, reader, 0);
	pthread_create(&b, 0, writer, 0);
	pthread_join(a, 0);
	pthread_join(b, 0);
	printf("OK fortify\n");
	return 0;
}
`

// buildFortify compiles fortifySrc and checks that it calls the fortified
// entry points, without which its test would prove nothing.
func buildFortify(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	src, bin := filepath.Join(dir, "fortify.c"), filepath.Join(dir, "fortify")
	if err := os.WriteFile(src, []byte(fortifySrc), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cc", "-O2", "-D_FORTIFY_SOURCE=2", "-pthread", "-Wall", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("cc fortify.c: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.ImportedSymbols()
	if err != nil {
		t.Fatal(err)
	}
	imported := map[string]bool{}
	for _, s := range syms {
		imported[s.Name] = true
	}
	for _, name := range []string{"__poll_chk", "__ppoll_chk", "__read_chk", "__recv_chk", "__recvfrom_chk", "recvmmsg", "sendmmsg"} {
		if !imported[name] {
			t.Fatalf("fortify.c built with -D_FORTIFY_SOURCE=2 does not import %s", name)
		}
	}
	return bin
}

// Fortified poll, ppoll, read, recv and recvfrom, and recvmmsg, go through
// the runtime: a thread blocked in them is parked outside the run queue,
// so the thread that must take its mutex first does not need the safety
// net (no steal), and the calls are counted. A count beyond the buffer
// aborts as glibc's checks do.
func TestFortifiedCalls(t *testing.T) {
	lib, _ := build(t)
	bin := buildFortify(t)
	shm := filepath.Join(t.TempDir(), "dmt.shm")
	env, err := Env(Options{Library: lib, Shm: shm})
	if err != nil {
		t.Fatal(err)
	}
	env = MergeEnv(os.Environ(), env)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "OK fortify") {
		t.Fatalf("fortify: %v\n%s", err, out)
	}
	st, err := ReadStats(shm)
	if err != nil {
		t.Fatal(err)
	}
	ops := st.Total.Ops
	t.Logf("fortify: steals=%d poll=%d recv=%d send=%d", st.Total.Steals, ops["poll"], ops["recv"], ops["send"])
	// poll and ppoll; read, recv, recvfrom, the two drains after the polls
	// and recvmmsg's two recvmsg; five writes and sendmmsg's sendmsg.
	if ops["poll"] != 2 || ops["recv"] != 7 || ops["send"] != 6 {
		t.Errorf("ops %v: want 2 poll, 7 recv, 6 send", ops)
	}
	if st.Total.Steals != 0 {
		t.Errorf("%d steals: a call blocked outside the runtime", st.Total.Steals)
	}

	for _, call := range []string{"poll", "ppoll", "read", "recv", "recvfrom"} {
		cmd := exec.CommandContext(ctx, bin, "overflow", call)
		// glibc's fatal messages go to the terminal unless this is set
		cmd.Env = append(env, "LIBC_FATAL_STDERR_=1")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() ||
			ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGABRT ||
			!strings.Contains(string(out), "buffer overflow detected") {
			t.Errorf("%s with a count beyond its buffer: %v, want glibc's abort\n%s", call, err, out)
		}
	}
}
