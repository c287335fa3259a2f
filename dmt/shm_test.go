package dmt

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// The Go mirror of runtime/shm.h must match the C header: compile a
// program that prints the C layout and compare.
func TestShmLayoutMatchesHeader(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	hdr := filepath.Join(root, "dmt", "runtime", "shm.h")
	src, err := os.ReadFile(hdr)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i, m := range regexp.MustCompile(`X\((\d+), \w+, "(\w+)"\)`).FindAllStringSubmatch(string(src), -1) {
		if m[1] != strconv.Itoa(i) {
			t.Fatalf("shm.h: op %s numbered %s, want %d", m[2], m[1], i)
		}
		names = append(names, m[2])
	}
	if strings.Join(names, ",") != strings.Join(OpNames, ",") {
		t.Fatalf("OpNames differ from shm.h:\n go: %v\n  c: %v", OpNames, names)
	}
	if len(OpNames) > shmNOps {
		t.Fatalf("%d ops do not fit the slot's %d counters", len(OpNames), shmNOps)
	}

	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skipf("no C compiler: %v", err)
	}
	dir := t.TempDir()
	prog := `#include <stdio.h>
#include <stddef.h>
#include "shm.h"
#define P(name, v) printf("%s %llu\n", name, (unsigned long long)(v))
int main(void) {
	P("magic", DMT_SHM_MAGIC); P("version", DMT_SHM_VERSION); P("hdr", DMT_SHM_HDR_SIZE);
	P("nslots", DMT_SHM_NSLOTS); P("slotsize", DMT_SHM_SLOT_SIZE); P("nops", DMT_SHM_NOPS);
	P("sizeof_slot", sizeof(struct dmt_slot));
	P("pid", offsetof(struct dmt_slot, pid)); P("state", offsetof(struct dmt_slot, state));
	P("ppid", offsetof(struct dmt_slot, ppid)); P("turns", offsetof(struct dmt_slot, turns));
	P("wait_ns", offsetof(struct dmt_slot, wait_ns)); P("waits", offsetof(struct dmt_slot, waits));
	P("clock", offsetof(struct dmt_slot, clock)); P("threads", offsetof(struct dmt_slot, threads));
	P("live_threads", offsetof(struct dmt_slot, live_threads));
	P("blocked", offsetof(struct dmt_slot, blocked)); P("timeouts", offsetof(struct dmt_slot, timeouts));
	P("idle_advances", offsetof(struct dmt_slot, idle_advances));
	P("forks", offsetof(struct dmt_slot, forks)); P("steals", offsetof(struct dmt_slot, steals));
	P("ops", offsetof(struct dmt_slot, ops));
	P("h_ns_per_turn", offsetof(struct dmt_shm_header, ns_per_turn));
	P("h_chan_off", offsetof(struct dmt_shm_header, chan_off));
	P("chan_off", DMT_CHAN_OFF); P("shm_size", DMT_SHM_SIZE);
	P("c_head", offsetof(struct dmt_chan, head)); P("c_tail", offsetof(struct dmt_chan, tail));
	P("c_prod_sleep", offsetof(struct dmt_chan, prod_sleep)); P("c_cons_sleep", offsetof(struct dmt_chan, cons_sleep));
	P("c_cap", offsetof(struct dmt_chan, cap)); P("c_ent_size", offsetof(struct dmt_chan, ent_size));
	P("c_consumer", offsetof(struct dmt_chan, consumer)); P("c_starve", offsetof(struct dmt_chan, starve));
	P("c_starving", offsetof(struct dmt_chan, starving)); P("c_clock", offsetof(struct dmt_chan, clock));
	P("c_admitted", offsetof(struct dmt_chan, admitted)); P("c_ent", offsetof(struct dmt_chan, ent));
	P("sizeof_ent", sizeof(struct dmt_chan_ent)); P("chan_cap", DMT_CHAN_CAP);
	P("e_ltime", offsetof(struct dmt_chan_ent, ltime)); P("e_kind", offsetof(struct dmt_chan_ent, kind));
	P("e_conn", offsetof(struct dmt_chan_ent, conn)); P("e_len", offsetof(struct dmt_chan_ent, len));
	P("ev_connect", DMT_EV_CONNECT); P("ev_data", DMT_EV_DATA); P("ev_close", DMT_EV_CLOSE); P("ev_bubble", DMT_EV_BUBBLE);
	return 0;
}`
	if err := os.WriteFile(filepath.Join(dir, "layout.c"), []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "layout")
	if out, err := exec.Command(cc, "-I", filepath.Dir(hdr), "-o", bin, filepath.Join(dir, "layout.c")).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	c := map[string]uint64{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		v, _ := strconv.ParseUint(f[1], 10, 64)
		c[f[0]] = v
	}
	want := map[string]uint64{
		"magic": shmMagic, "version": shmVersion, "hdr": shmHdrSize, "nslots": shmNSlots,
		"slotsize": shmSlotSize, "nops": shmNOps, "pid": slotPID, "state": slotState, "ppid": slotPPID,
		"turns": slotTurns, "wait_ns": slotWaitNS, "waits": slotWaits, "clock": slotClock,
		"threads": slotThreads, "live_threads": slotLiveThreads, "blocked": slotBlocked,
		"timeouts": slotTimeouts, "idle_advances": slotIdleAdvances, "forks": slotForks,
		"steals": slotSteals, "ops": slotOps, "h_ns_per_turn": 40, "h_chan_off": 24,
		"chan_off": chanOff, "shm_size": ShmSize,
		"c_head": chHead, "c_tail": chTail, "c_prod_sleep": chProdSleep, "c_cons_sleep": chConsSleep,
		"c_cap": chCap, "c_ent_size": chEntSizeOff, "c_consumer": chConsumer, "c_starve": chStarve,
		"c_starving": chStarving, "c_clock": chClock, "c_admitted": chAdmitted, "c_ent": chanHdrSize,
		"sizeof_ent": chanEntSize, "chan_cap": chanCap, "e_ltime": 8, "e_kind": 16, "e_conn": 20, "e_len": 24,
		"ev_connect": EvConnect, "ev_data": EvData, "ev_close": EvClose, "ev_bubble": EvBubble,
	}
	for k, v := range want {
		if c[k] != v {
			t.Errorf("%s: C has %d, Go %d", k, c[k], v)
		}
	}
	if c["sizeof_slot"] > shmSlotSize {
		t.Errorf("struct dmt_slot is %d bytes, more than a slot (%d)", c["sizeof_slot"], shmSlotSize)
	}
}

// ReadStats on files that hold no statistics.
func TestReadStatsEmpty(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x")
	if err := os.WriteFile(p, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadStats(p); err != ErrNoStats {
		t.Fatalf("zero file: %v, want ErrNoStats", err)
	}
	if _, err := ReadStats(filepath.Join(t.TempDir(), "missing")); !os.IsNotExist(err) {
		t.Fatalf("missing file: %v", err)
	}
}

func TestEnvAndMerge(t *testing.T) {
	env, err := Env(Options{Library: "/x/liblockstep_dmt.so", Shm: "/tmp/s", NsPerTurn: 500, Spin: -1,
		InputWeight: 1, Trace: "/tmp/t", Debug: true})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"LD_PRELOAD=/x/liblockstep_dmt.so", "LOCKSTEP_DMT_SHM=/tmp/s",
		"LOCKSTEP_DMT_NS_PER_TURN=500", "LOCKSTEP_DMT_SPIN=0", "LOCKSTEP_DMT_INPUT_WEIGHT=1",
		"LOCKSTEP_DMT_TRACE=/tmp/t", "LOCKSTEP_DMT_DEBUG=1"}
	if strings.Join(env, " ") != strings.Join(want, " ") {
		t.Fatalf("Env: %v, want %v", env, want)
	}
	got := MergeEnv([]string{"A=1", "LD_PRELOAD=/other.so", "LOCKSTEP_DMT_SHM=/old"}, env)
	m := map[string]string{}
	for _, kv := range got {
		k, v, _ := strings.Cut(kv, "=")
		if _, dup := m[k]; dup {
			t.Fatalf("MergeEnv: %s twice in %v", k, got)
		}
		m[k] = v
	}
	if m["A"] != "1" || m["LD_PRELOAD"] != "/x/liblockstep_dmt.so:/other.so" || m["LOCKSTEP_DMT_SHM"] != "/tmp/s" {
		t.Fatalf("MergeEnv: %v", got)
	}
	if _, err := Env(Options{Library: "/a b/lib.so"}); err == nil {
		t.Fatal("Env accepted a library path LD_PRELOAD cannot carry")
	}
}
