/*
 * signal.c: the application's signal handlers, counted per thread.
 *
 * A wait of the runtime that stands for an interruptible call (a sleep,
 * a receive, an accept, a poll) ends with EINTR, as the real call would,
 * when a signal handler runs; the runtime learns of it from its timed
 * futex wait returning EINTR. That alone is not proof: CRIU, when it dumps
 * (leaving the server running) or restores the server, makes a timed wait
 * it interrupted return EINTR with no signal at all (compel turns
 * -ERESTART_RESTARTBLOCK into -EINTR), and an application that installed
 * no handler never expects EINTR from recv or accept; on one replica only,
 * it would also change the schedule. So every handler the application
 * installs runs behind a trampoline that counts it, and a wait ends with
 * EINTR only if the count moved (dmt_sig_gen).
 *
 * sigaction and signal are interposed (bsd_signal, sysv_signal and sigset
 * are not: a handler installed through them is not counted, and its
 * thread's interrupted waits are not reported); what the application
 * reads back (the old action) is its own handler, never the trampoline.
 */
#include "dmt.h"

#include <dlfcn.h>
#include <signal.h>
#include <string.h>

static __thread __attribute__((tls_model("initial-exec"))) unsigned sig_gen;
static struct sigaction app_act[_NSIG]; /* the application's handlers */
static _Atomic int wrapped[_NSIG];

unsigned dmt_sig_gen(void)
{
	return sig_gen;
}

static void trampoline(int sig, siginfo_t *info, void *uc)
{
	sig_gen++;
	struct sigaction *a = &app_act[sig];
	if (a->sa_flags & SA_SIGINFO)
		a->sa_sigaction(sig, info, uc);
	else if (a->sa_handler != SIG_DFL && a->sa_handler != SIG_IGN)
		a->sa_handler(sig);
}

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	static int (*real)(int, const struct sigaction *, struct sigaction *);
	if (!real)
		real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
	return real(sig, act, old);
}

EXPORT int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	if (sig <= 0 || sig >= _NSIG)
		return real_sigaction(sig, act, old);
	struct sigaction prev = app_act[sig], mine;
	int was = atomic_load(&wrapped[sig]);
	/* sa_handler and sa_sigaction share their storage */
	int wrap = act && act->sa_handler != SIG_DFL && act->sa_handler != SIG_IGN;
	if (wrap) {
		/* the handler first: a signal between the two calls finds it */
		app_act[sig] = *act;
		mine = *act;
		mine.sa_sigaction = trampoline;
		mine.sa_flags |= SA_SIGINFO;
	}
	int r = real_sigaction(sig, wrap ? &mine : act, old);
	if (r != 0) {
		if (wrap)
			app_act[sig] = prev;
		return r;
	}
	if (old && was && old->sa_sigaction == trampoline) {
		*old = prev;
	}
	if (act)
		atomic_store(&wrapped[sig], wrap);
	return 0;
}

/* glibc's signal(): BSD semantics (SA_RESTART), through sigaction. */
EXPORT sighandler_t signal(int sig, sighandler_t handler)
{
	struct sigaction act, old;
	memset(&act, 0, sizeof act);
	act.sa_handler = handler;
	act.sa_flags = SA_RESTART;
	sigemptyset(&act.sa_mask);
	if (sig > 0 && sig < _NSIG)
		sigaddset(&act.sa_mask, sig);
	if (sigaction(sig, &act, &old) < 0)
		return SIG_ERR;
	return old.sa_handler; /* shares its storage with sa_sigaction */
}
