package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

func threadSlack(t *testing.T, tid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/timerslack_ns", tid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestSlowSysmon finds the runtime's monitor thread, gives it the slack and
// leaves every other thread's alone.
func TestSlowSysmon(t *testing.T) {
	if _, ok := sysNanosleep[runtime.GOARCH]; !ok {
		t.Skipf("no nanosleep number for %s", runtime.GOARCH)
	}
	before := threadSlack(t, os.Getpid())
	tid, err := slowSysmon(3*time.Millisecond, runtime.GOARCH)
	if errors.Is(err, os.ErrPermission) {
		t.Skipf("changing a thread's timer slack needs CAP_SYS_NICE: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if tid == os.Getpid() {
		t.Fatalf("picked the main thread %d", tid)
	}
	if got := threadSlack(t, tid); got != "3000000" {
		t.Errorf("thread %d: timer slack %s ns, want 3000000", tid, got)
	}
	if got := threadSlack(t, os.Getpid()); got != before {
		t.Errorf("main thread's slack changed from %s to %s ns", before, got)
	}
	// The thread sleeps in nanosleep and nothing else does: it is still
	// the one seen there while the process is busy.
	again, err := slowSysmon(3*time.Millisecond, runtime.GOARCH)
	if err != nil || again != tid {
		t.Errorf("second search found %d (%v), first %d", again, err, tid)
	}
}

func TestSlowSysmonUnknownArch(t *testing.T) {
	if _, err := slowSysmon(time.Millisecond, "vax"); err == nil {
		t.Fatal("no error for an architecture without a known nanosleep number")
	}
}
