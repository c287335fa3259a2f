package paxos

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// TestDiskFull fills the disk under a single-node log: the node stops with
// an error that says so, every proposal acknowledged before is still there
// after the disk has room again, and none after the failure was
// acknowledged.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	defer exec.Command("umount", "-l", dir).Run()

	log := logrus.New()
	log.SetLevel(logrus.PanicLevel)
	peer := freePort(t)
	cfg := Config{ID: 1, Peers: map[uint64]string{1: peer}, DataDir: dir + "/n1", Tick: 10 * time.Millisecond, Logger: log}
	n, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	app := &testApp{node: n, stopped: make(chan struct{})}
	go app.run()
	deadline := time.Now().Add(5 * time.Second)
	for !n.IsLeader() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}

	payload := strings.Repeat("x", 4096)
	var acked int
	var lastErr error
	for i := 0; i < 2000; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := n.Propose(ctx, []byte(payload))
		cancel()
		if err != nil {
			lastErr = err
			break
		}
		acked++
	}
	if lastErr == nil {
		t.Fatal("2000 x 4 KiB proposals fit in a 2 MiB tmpfs")
	}
	select {
	case <-n.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("node kept running after its WAL failed")
	}
	if err := n.Err(); err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("node error %v does not say the disk is full", err)
	}
	if !errors.Is(lastErr, ErrStopped) && !errors.Is(lastErr, context.DeadlineExceeded) {
		t.Logf("proposal after the failure: %v", lastErr)
	}
	<-app.stopped

	if out, err := exec.Command("mount", "-o", "remount,size=16m", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v %s", err, out)
	}
	n, err = Start(cfg)
	if err != nil {
		t.Fatalf("restart after the disk has room: %v", err)
	}
	defer n.Stop()
	app = &testApp{node: n, stopped: make(chan struct{})}
	go app.run()
	deadline = time.Now().Add(5 * time.Second)
	for {
		applied, data := app.state()
		if len(data) >= acked && applied > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after restart %d entries, but %d were acknowledged", len(data), acked)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%d proposals acknowledged before the disk filled; all present after restart", acked)
}
