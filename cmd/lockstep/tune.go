package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// sysNanosleep is nanosleep's number in /proc/<tid>/syscall: the Go
// runtime's usleep, which its monitor thread sleeps in between rounds.
var sysNanosleep = map[string]string{"amd64": "35", "arm64": "101"}

// slowSysmon raises the timer slack of the Go runtime's monitor thread
// (sysmon) to slack.
//
// Why: whenever a Go process comes back from idle, sysmon wakes every 20 µs
// until it has seen 50 rounds with nothing to do. A replica serving a
// client one request at a time comes back from idle several times per
// request, so sysmon never slows down: on this project's 2-vCPU machines it
// was about a third of a replica's context switches and a sixth of its CPU
// per request (docs/BENCHMARKS.md). A larger slack lets the kernel fold
// those wakeups together. What sysmon does then happens up to slack later:
// taking back a P from a thread blocked in a syscall (an fsync), preempting
// a goroutine that ran 10 ms, polling the network when no thread did for
// 10 ms. The runtime has no setting for it, so the thread is found by what
// it does: of the process's threads, the one seen in nanosleep while the
// process is busy.
func slowSysmon(slack time.Duration, arch string) (tid int, err error) {
	nr, ok := sysNanosleep[arch]
	if !ok {
		return 0, fmt.Errorf("sysmon: no nanosleep number known for %s", arch)
	}
	seen, most := map[int]int{}, 0
	// Reading /proc is a syscall, and a syscall wakes a sleeping sysmon
	// into its 20 µs rounds: sampling makes the activity it looks for.
	for i := 0; i < 1000 && most < 5; i++ {
		tids, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return 0, fmt.Errorf("sysmon: %w", err)
		}
		for _, t := range tids {
			b, err := os.ReadFile(filepath.Join("/proc/self/task", t.Name(), "syscall"))
			if err != nil {
				continue // the thread exited
			}
			if f := strings.Fields(string(b)); len(f) > 0 && f[0] == nr {
				id, _ := strconv.Atoi(t.Name())
				seen[id]++
				most = max(most, seen[id])
			}
		}
		time.Sleep(50 * time.Microsecond)
	}
	// The runtime's other threads nanosleep only for a few µs while
	// stealing work; sysmon must stand out clearly.
	best, second := 0, 0
	for id, n := range seen {
		if n > seen[best] {
			best, second = id, seen[best]
		} else if n > second {
			second = n
		}
	}
	if seen[best] < 5 || second*2 >= seen[best] {
		return 0, errors.New("sysmon: its thread could not be told apart")
	}
	f := fmt.Sprintf("/proc/%d/timerslack_ns", best)
	if err := os.WriteFile(f, []byte(strconv.FormatInt(slack.Nanoseconds(), 10)), 0); err != nil {
		return 0, fmt.Errorf("sysmon: %w", err)
	}
	return best, nil
}

// sysmonSlack is the timer slack given to the Go runtime's monitor thread
// in replica processes (see slowSysmon).
const sysmonSlack = time.Millisecond

// slowSysmonInBackground gives the runtime's monitor thread sysmonSlack
// (slowSysmon) from a goroutine: finding the thread takes a few
// milliseconds, and a failure is worth a log line, not an error.
//
// Measured on the project's 2-vCPU machines with Apache behind three
// replicas at ab -c 1: a replica's context switches per request fell from
// about 35 to 20 and its CPU per request by about a sixth; at 64 log
// clients, throughput stayed the same (docs/BENCHMARKS.md).
func slowSysmonInBackground(log logrus.FieldLogger) {
	go func() {
		tid, err := slowSysmon(sysmonSlack, runtime.GOARCH)
		if err != nil {
			log.WithError(err).Info("runtime: sysmon keeps its default timer slack")
			return
		}
		log.WithFields(logrus.Fields{"tid": tid, "slack": sysmonSlack}).Debug("runtime: sysmon slowed")
	}()
}
