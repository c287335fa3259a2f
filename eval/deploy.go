package eval

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/sirupsen/logrus"

	"lockstep/configs"
	"lockstep/container"
	"lockstep/dmt"
)

// DeployOptions start one mode of an application on this machine.
type DeployOptions struct {
	Config *configs.Config
	Mode   string
	// Replicas in the modes with consensus (default 3); the others run one.
	Replicas int
	// CPUQuota per namespace; negative: the config's cluster.cpu_quota.
	CPUQuota float64
	// Bin is the lockstep binary that runs the replicas (default: this one).
	Bin string
	// WorkDir holds every replica's data; it is created.
	WorkDir string
	// Run names the namespaces and cgroup (default: the config's name).
	Run string
	// Admin is where xtern_only serves the runtime's metrics (/metrics),
	// from this process; default 127.0.0.1:0, localhost as a replica's
	// admin. The modes with replicas use theirs.
	Admin  string
	Logger logrus.FieldLogger
}

// Deployment is a running mode: namespaces r1..rN and client, and either a
// server alone (orig, xtern_only) or N lockstep replicas each with its
// server (proxy_only, joint_sched).
type Deployment struct {
	opts     DeployOptions
	cluster  *container.Cluster
	server   *container.Server
	replicas []*exec.Cmd
	exited   []chan struct{}
	addrs    []string // where clients connect, per replica
	admins   []string
	log      logrus.FieldLogger
	// xtern_only: the runtime's statistics file and their metrics server
	dmtShm, dmtAddr string
	dmtSrv          *http.Server
}

// Port of the replicas' client listener and of their log (per namespace,
// so the same on every replica).
const (
	peerPort  = 7000
	adminPort = 7100
)

// Deploy builds the namespaces and starts the mode; Close undoes it.
func Deploy(ctx context.Context, o DeployOptions) (_ *Deployment, err error) {
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	if o.Run == "" {
		o.Run = o.Config.Name
	}
	if o.CPUQuota < 0 {
		o.CPUQuota = o.Config.Cluster.CPUQuota
	}
	consensus := o.Mode == configs.ModeProxyOnly || o.Mode == configs.ModeJointSched
	switch {
	case !consensus && (o.Mode == configs.ModeOrig || o.Mode == configs.ModeXternOnly):
		o.Replicas = 1
	case consensus:
		if o.Replicas == 0 {
			o.Replicas = 3
		}
	default:
		return nil, fmt.Errorf("eval: unknown mode %q (want one of %s)", o.Mode, strings.Join(configs.Modes, ", "))
	}
	if o.Bin == "" {
		if o.Bin, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(o.WorkDir, 0o755); err != nil {
		return nil, err
	}
	var hosts []string
	for i := 1; i <= o.Replicas; i++ {
		hosts = append(hosts, fmt.Sprintf("r%d", i))
	}
	hosts = append(hosts, "client")
	cl, err := container.NewCluster(container.ClusterOptions{Name: o.Run, Hosts: hosts, CPUQuota: o.CPUQuota, Logger: o.Logger})
	if err != nil {
		return nil, err
	}
	// The client stands for a different machine: its load generator must
	// not be squeezed into a replica's quota.
	if err := cl.SetCPUQuota("client", 0); err != nil {
		cl.Close()
		return nil, err
	}
	d := &Deployment{opts: o, cluster: cl, log: o.Logger.WithField("mode", o.Mode)}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if consensus {
		err = d.startReplicas(ctx)
	} else {
		err = d.startServer(ctx)
	}
	return d, err
}

func (d *Deployment) serverPort() (int, error) {
	_, p, err := net.SplitHostPort(d.opts.Config.Server.Listen)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(p)
}

// startServer runs the server alone on r1, listening on r1's address.
func (d *Deployment) startServer(ctx context.Context) error {
	port, err := d.serverPort()
	if err != nil {
		return err
	}
	so := container.ServerOptions{Config: d.opts.Config.Server, AppDir: d.opts.Config.AppDir(),
		Dir: filepath.Join(d.opts.WorkDir, "r1", "server"), Name: d.opts.Config.Name + "-r1",
		Host: d.cluster.Addr("r1"), Port: port, Logger: d.log}
	if d.opts.Mode == configs.ModeXternOnly {
		shm := filepath.Join(d.opts.WorkDir, "r1", "dmt.shm")
		env, err := dmt.Env(dmt.Options{Shm: shm})
		if err != nil {
			return err
		}
		so.Env = env
		if err := d.serveDMT(d.opts.Admin, shm); err != nil {
			return err
		}
	}
	if err := d.cluster.Place("r1", &so); err != nil {
		return err
	}
	srv, err := container.StartServer(ctx, so)
	if err != nil {
		return err
	}
	d.server = srv
	d.addrs = []string{net.JoinHostPort(d.cluster.Addr("r1"), strconv.Itoa(port))}
	return nil
}

// startReplicas writes the deployment's config (the app's, with the
// replicas' addresses in the namespaces) and runs `lockstep replica` on
// each replica host.
func (d *Deployment) startReplicas(ctx context.Context) error {
	port, err := d.serverPort()
	if err != nil {
		return err
	}
	cfg := *d.opts.Config
	cfg.Server.App = cfg.AppDir()
	cfg.Cluster.DataDir = d.opts.WorkDir
	cfg.Cluster.Replicas = nil
	for i := 1; i <= d.opts.Replicas; i++ {
		host := fmt.Sprintf("r%d", i)
		ip := d.cluster.Addr(host)
		r := configs.Replica{ID: uint64(i), Peer: net.JoinHostPort(ip, strconv.Itoa(peerPort)),
			Listen: net.JoinHostPort(ip, strconv.Itoa(port)), Admin: net.JoinHostPort(ip, strconv.Itoa(adminPort))}
		cfg.Cluster.Replicas = append(cfg.Cluster.Replicas, r)
		d.addrs = append(d.addrs, r.Listen)
		d.admins = append(d.admins, r.Admin)
	}
	path := filepath.Join(d.opts.WorkDir, "cluster.toml")
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(cfg); err != nil {
		return fmt.Errorf("eval: writing %s: %w", path, err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return err
	}
	for i := 1; i <= d.opts.Replicas; i++ {
		host := fmt.Sprintf("r%d", i)
		args := []string{"replica", "--config", path, "--id", strconv.Itoa(i)}
		if d.opts.Mode == configs.ModeJointSched {
			args = append(args, "--dmt")
		}
		cmd := d.cluster.ExecContext(ctx, host, d.opts.Bin, args...)
		logf, err := os.Create(filepath.Join(d.opts.WorkDir, host+".log"))
		if err != nil {
			return err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if _, set := os.LookupEnv("GOMAXPROCS"); !set {
			cmd.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(replicaProcs(d.opts.CPUQuota, d.opts.Replicas, runtime.NumCPU())))
		}
		if err := cmd.Start(); err != nil {
			logf.Close()
			return fmt.Errorf("eval: starting replica %d: %w", i, err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
		d.replicas = append(d.replicas, cmd)
		d.exited = append(d.exited, done)
	}
	return d.waitServing(ctx, 60*time.Second)
}

// replicaProcs is the GOMAXPROCS of a replica on a machine that stands in
// for several: the cores of its quota, or its share of the machine's
// without one. Go's default (every core, or at least 2 under a quota) lets
// each of N replicas run as many threads as the machine has cores; their
// idle Ps then spin and hand goroutines between OS threads on cores the
// other replicas need. With 3 replicas on 2 cores, one P each cut the CPU
// per request of the replicas and their servers by a fifth at ab -c 1
// (docs/BENCHMARKS.md). A replica on its own machine (lockstep replica)
// keeps Go's default.
func replicaProcs(quota float64, replicas, cores int) int {
	n := cores / max(replicas, 1)
	if quota > 0 {
		n = int(math.Ceil(quota))
	}
	return max(n, 1)
}

// waitServing waits until every replica accepts clients, so that a
// benchmark starts against a cluster that is up.
func (d *Deployment) waitServing(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for i, addr := range d.addrs {
		for {
			select {
			case <-d.exited[i]:
				return fmt.Errorf("eval: replica %d exited while starting; see %s", i+1,
					filepath.Join(d.opts.WorkDir, fmt.Sprintf("r%d.log", i+1)))
			default:
			}
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			c, err := d.cluster.DialContext(cctx, "client", "tcp", addr)
			cancel()
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("eval: replica %d not serving on %s after %s: %w", i+1, addr, timeout, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// Addrs are where clients connect (one per replica).
func (d *Deployment) Addrs() []string { return d.addrs }

// Admins are the replicas' admin addresses (modes with consensus).
func (d *Deployment) Admins() []string { return d.admins }

// Cluster gives access to the namespaces.
func (d *Deployment) Cluster() *container.Cluster { return d.cluster }

// KillReplica sends SIGKILL to replica i's process group (1-based).
func (d *Deployment) KillReplica(i int) error {
	if i < 1 || i > len(d.replicas) {
		return fmt.Errorf("eval: no replica %d", i)
	}
	cmd := d.replicas[i-1]
	if cmd.Process == nil {
		return errors.New("eval: replica not started")
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-d.exited[i-1]
	return nil
}

// ClientCommand expands a client command line ({{.Addr}}, {{.Host}},
// {{.Port}}) for replica i's address and returns it ready to run in the
// client namespace, with LOCKSTEP_ADDR set.
func (d *Deployment) ClientCommand(ctx context.Context, argv []string, replica int) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("eval: empty client command")
	}
	addr := d.addrs[replica%len(d.addrs)]
	host, port, _ := net.SplitHostPort(addr)
	data := map[string]string{"Addr": addr, "Host": host, "Port": port}
	var out []string
	for _, a := range argv {
		t, err := template.New("arg").Option("missingkey=error").Parse(a)
		if err != nil {
			return nil, fmt.Errorf("eval: client argument %q: %w", a, err)
		}
		var b strings.Builder
		if err := t.Execute(&b, data); err != nil {
			return nil, fmt.Errorf("eval: client argument %q: %w", a, err)
		}
		out = append(out, b.String())
	}
	cmd := d.cluster.ExecContext(ctx, "client", out[0], out[1:]...)
	cmd.Env = append(os.Environ(), "LOCKSTEP_ADDR="+addr)
	return cmd, nil
}

// Close stops the replicas or the server and removes the namespaces.
func (d *Deployment) Close() error {
	for i, cmd := range d.replicas {
		if cmd.Process != nil {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-d.exited[i]:
			case <-time.After(10 * time.Second):
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-d.exited[i]
			}
		}
	}
	if d.server != nil {
		if err := d.server.Stop(); err != nil {
			d.log.WithError(err).Warn("eval: stopping server")
		}
	}
	d.closeDMT()
	if d.cluster != nil {
		return d.cluster.Close()
	}
	return nil
}
