package logbench

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Cluster is N log nodes, each its own process of the lockstep binary
// (`lockstep bench log-node`), on loopback.
type Cluster struct {
	Bin    string // the lockstep binary
	Dir    string
	NoSync bool
	// SnapshotEvery is passed to the nodes (0: never compact).
	SnapshotEvery uint64
	Nodes         []*ProcNode
}

// ProcNode is one node process.
type ProcNode struct {
	ID     uint64
	Peer   string
	Client string
	Admin  string // metrics and status (HTTP)
	Dir    string
	cmd    *exec.Cmd
	exited chan struct{}
}

// StartCluster starts n nodes that record what they apply.
func StartCluster(bin, dir string, n int, noSync bool, snapshotEvery uint64) (*Cluster, error) {
	c := &Cluster{Bin: bin, Dir: dir, NoSync: noSync, SnapshotEvery: snapshotEvery}
	for i := 1; i <= n; i++ {
		peer, err := freeAddr()
		if err != nil {
			return nil, err
		}
		client, err := freeAddr()
		if err != nil {
			return nil, err
		}
		admin, err := freeAddr()
		if err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, &ProcNode{ID: uint64(i), Peer: peer, Client: client, Admin: admin,
			Dir: filepath.Join(dir, fmt.Sprintf("n%d", i))})
	}
	for i := range c.Nodes {
		if err := c.Start(i); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) peers() string {
	var ps []string
	for _, n := range c.Nodes {
		ps = append(ps, fmt.Sprintf("%d=%s", n.ID, n.Peer))
	}
	return strings.Join(ps, ",")
}

// Start (re)starts node i's process on its data directory.
func (c *Cluster) Start(i int) error {
	n := c.Nodes[i]
	args := []string{"bench", "log-node", "--id", strconv.FormatUint(n.ID, 10), "--peers", c.peers(),
		"--client", n.Client, "--admin", n.Admin, "--data-dir", n.Dir, "--record",
		"--snapshot-every", strconv.FormatUint(c.SnapshotEvery, 10), "--log-level", "warn"}
	if c.NoSync {
		args = append(args, "--no-sync")
	}
	cmd := exec.Command(c.Bin, args...)
	if err := os.MkdirAll(c.Dir, 0o750); err != nil {
		return err
	}
	logf, err := os.OpenFile(n.Dir+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("logbench: starting node %d: %w", n.ID, err)
	}
	n.cmd = cmd
	n.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(n.exited) }()
	return nil
}

// Kill sends SIGKILL to node i and waits for it to die.
func (c *Cluster) Kill(i int) {
	n := c.Nodes[i]
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
	n.cmd = nil
}

// Close kills every node.
func (c *Cluster) Close() {
	for i := range c.Nodes {
		c.Kill(i)
	}
}

// Leader polls the nodes until one reports itself leader, and returns its
// position in Nodes.
func (c *Cluster) Leader(timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for i, n := range c.Nodes {
			if n.cmd == nil {
				continue
			}
			cl, err := Dial(n.Client, 200*time.Millisecond)
			if err != nil {
				continue
			}
			st, err := cl.Status(time.Second)
			cl.Close()
			if err == nil && st.Role == "leader" {
				return i, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return -1, errors.New("logbench: no leader elected in time")
}

// Dump reads node i's applied sequence once it has applied at least
// minIndex (waiting up to timeout).
func (c *Cluster) Dump(i int, minIndex uint64, timeout time.Duration) ([]Record, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		cl, err := Dial(c.Nodes[i].Client, time.Second)
		if err != nil {
			last = err
			time.Sleep(100 * time.Millisecond)
			continue
		}
		st, err := cl.Status(time.Second)
		if err == nil && st.Applied >= minIndex {
			recs, err := cl.Dump(10 * time.Second)
			cl.Close()
			return recs, err
		}
		cl.Close()
		last = fmt.Errorf("node %d applied %d of %d", c.Nodes[i].ID, st.Applied, minIndex)
		time.Sleep(100 * time.Millisecond)
	}
	return nil, fmt.Errorf("logbench: dump of node %d: %w", c.Nodes[i].ID, last)
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
