package container

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultSubnet is the private network of a cluster's namespaces. It never
// meets the machine's own networks: nothing of a cluster is attached to the
// root namespace.
const DefaultSubnet = "10.77.0.0/24"

const (
	switchHost = "sw"   // the switch namespace is ls-<run>-sw
	bridgeName = "br0"  // in the switch namespace
	hostIf     = "eth0" // in each host namespace
	killWait   = 5 * time.Second
)

var (
	// Run names may contain '-', host names may not: that keeps
	// ls-<run>-<host> unambiguous, so that cleaning run "a" never touches
	// run "a-b" (whose namespaces look like ls-a-b-r1).
	runRe  = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)
	hostRe = regexp.MustCompile(`^[a-z][a-z0-9_]{0,11}$`) // "v-"+host fits IFNAMSIZ
)

// ClusterOptions describes a cluster of network namespaces on one machine.
type ClusterOptions struct {
	// Name of the run: namespaces are ls-<Name>-<host>, the cgroup is
	// lockstep/<Name>, the lock /run/lockstep/<Name>.lock.
	Name string
	// Hosts, e.g. "r1", "r2", "r3", "client"; they get addresses in this
	// order (.1, .2, ...).
	Hosts []string
	// Subnet is an IPv4 CIDR (default DefaultSubnet).
	Subnet string
	// CPUQuota is the number of cores each host may use; 0 means no limit.
	CPUQuota float64
	Logger   logrus.FieldLogger
}

// Cluster is a set of network namespaces joined by a bridge that lives in a
// namespace of its own, plus one cgroup per host.
type Cluster struct {
	name   string
	log    logrus.FieldLogger
	subnet *net.IPNet
	cg     *cgroupTree
	lock   *os.File
	hosts  []*clusterHost
	byName map[string]*clusterHost

	mu     sync.RWMutex
	closed bool
}

type clusterHost struct {
	name   string
	ip     net.IP
	ns     string // namespace name
	cgroup string // cgroup directory
}

func nsName(run, host string) string { return "ls-" + run + "-" + host }

// NewCluster takes the run's lock, removes leftovers of a crashed run of the
// same name and builds the namespaces. Close undoes everything.
func NewCluster(opts ClusterOptions) (*Cluster, error) {
	return newCluster(opts)
}

func newCluster(opts ClusterOptions) (_ *Cluster, err error) {
	log := opts.Logger
	if log == nil {
		log = logrus.StandardLogger()
	}
	log = log.WithField("run", opts.Name)
	if !runRe.MatchString(opts.Name) {
		return nil, fmt.Errorf("container: run name %q must match %s", opts.Name, runRe)
	}
	if len(opts.Hosts) == 0 {
		return nil, errors.New("container: a cluster needs at least one host")
	}
	seen := map[string]bool{}
	for _, h := range opts.Hosts {
		if !hostRe.MatchString(h) || h == switchHost {
			return nil, fmt.Errorf("container: host name %q must match %s and not be %q", h, hostRe, switchHost)
		}
		if seen[h] {
			return nil, fmt.Errorf("container: host %q appears twice", h)
		}
		seen[h] = true
	}
	if opts.CPUQuota < 0 {
		return nil, fmt.Errorf("container: negative CPU quota %v", opts.CPUQuota)
	}
	if opts.Subnet == "" {
		opts.Subnet = DefaultSubnet
	}
	subnet, err := parseSubnet(opts.Subnet, len(opts.Hosts))
	if err != nil {
		return nil, err
	}
	cg, err := findCgroupTree()
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	lock, err := lockRun(opts.Name)
	if err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	c := &Cluster{name: opts.Name, log: log, subnet: subnet, cg: cg, lock: lock, byName: map[string]*clusterHost{}}
	defer func() {
		if err != nil {
			if terr := c.teardown(); terr != nil {
				log.WithError(terr).Warn("container: cleaning up after a failed start")
			}
			lock.Close()
		}
	}()
	if err := cleanupRun(opts.Name, cg, log); err != nil {
		return nil, fmt.Errorf("container: removing leftovers of run %q: %w", opts.Name, err)
	}
	if err := ensureNetnsDir(); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if err := c.build(opts); err != nil {
		return nil, fmt.Errorf("container: run %q: %w", opts.Name, err)
	}
	log.WithFields(logrus.Fields{"hosts": opts.Hosts, "subnet": subnet.String(), "cpu_quota": opts.CPUQuota}).Info("container: cluster up")
	return c, nil
}

func parseSubnet(s string, hosts int) (*net.IPNet, error) {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		return nil, fmt.Errorf("container: subnet: %w", err)
	}
	ones, bits := n.Mask.Size()
	if n.IP.To4() == nil || bits != 32 {
		return nil, fmt.Errorf("container: subnet %s is not IPv4", s)
	}
	// Keep the network and broadcast addresses free.
	if free := (1 << (32 - ones)) - 2; free < hosts {
		return nil, fmt.Errorf("container: subnet %s has room for %d hosts, %d wanted", s, max(free, 0), hosts)
	}
	return n, nil
}

// hostIP is the i-th (0-based) host address of n.
func hostIP(n *net.IPNet, i int) net.IP {
	ip := make(net.IP, 4)
	binary.BigEndian.PutUint32(ip, binary.BigEndian.Uint32(n.IP.To4())+uint32(i)+1)
	return ip
}

// build creates the switch, then each host; c.hosts grows as it goes so
// that teardown knows what exists.
func (c *Cluster) build(opts ClusterOptions) error {
	sw, swNL, err := openNetns(nsName(c.name, switchHost), true)
	if err != nil {
		return err
	}
	defer sw.Close()
	defer swNL.Close()
	if err := linkUp(swNL, "lo"); err != nil {
		return err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := swNL.LinkAdd(br); err != nil {
		return fmt.Errorf("adding bridge: %w", err)
	}
	if err := swNL.LinkSetUp(br); err != nil {
		return fmt.Errorf("bridge up: %w", err)
	}
	for i, name := range opts.Hosts {
		h := &clusterHost{name: name, ip: hostIP(c.subnet, i), ns: nsName(c.name, name)}
		c.hosts = append(c.hosts, h)
		c.byName[name] = h
		if err := c.buildHost(h, swNL, br, opts.CPUQuota); err != nil {
			return fmt.Errorf("host %s: %w", name, err)
		}
		c.log.WithFields(logrus.Fields{"host": name, "addr": h.ip.String(), "netns": h.ns}).Debug("container: host up")
	}
	return nil
}

func (c *Cluster) buildHost(h *clusterHost, swNL *netlink.Handle, br netlink.Link, quota float64) error {
	ns, nl, err := openNetns(h.ns, true)
	if err != nil {
		return err
	}
	defer ns.Close()
	defer nl.Close()
	// Create the pair in the switch and push one end into the host.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "v-" + h.name},
		PeerName:      hostIf,
		PeerNamespace: netlink.NsFd(ns),
	}
	if err := swNL.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth: %w", err)
	}
	if err := swNL.LinkSetMaster(veth, br); err != nil {
		return fmt.Errorf("attaching veth to bridge: %w", err)
	}
	if err := swNL.LinkSetUp(veth); err != nil {
		return fmt.Errorf("veth up: %w", err)
	}
	if err := linkUp(nl, "lo"); err != nil {
		return err
	}
	eth, err := nl.LinkByName(hostIf)
	if err != nil {
		return fmt.Errorf("finding %s: %w", hostIf, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: h.ip, Mask: c.subnet.Mask}}
	if err := nl.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("adding address %s: %w", addr, err)
	}
	if err := nl.LinkSetUp(eth); err != nil {
		return fmt.Errorf("%s up: %w", hostIf, err)
	}
	h.cgroup, err = c.cg.createHost(c.name, h.name, quota)
	return err
}

// openNetns opens (and with create, first creates) a named namespace and a
// netlink handle inside it.
func openNetns(name string, create bool) (netns.NsHandle, *netlink.Handle, error) {
	if create {
		if err := createNetns(name); err != nil {
			return netns.None(), nil, err
		}
	}
	ns, err := netns.GetFromName(name)
	if err != nil {
		return netns.None(), nil, fmt.Errorf("opening netns %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return netns.None(), nil, fmt.Errorf("netlink in %s: %w", name, err)
	}
	return ns, nl, nil
}

func linkUp(nl *netlink.Handle, name string) error {
	l, err := nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
	}
	if err := nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	return nil
}

// Close stops every process of the cluster and removes its veths, bridge,
// namespaces and cgroups, then releases the run's lock. It is idempotent.
func (c *Cluster) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	err := c.teardown()
	c.lock.Close()
	if err != nil {
		return fmt.Errorf("container: closing run %q: %w", c.name, err)
	}
	c.log.Info("container: cluster removed")
	return nil
}

// teardown deletes the links explicitly, so that they are gone when Close
// returns rather than when the kernel gets round to freeing the
// namespaces, then removes the rest like a stale run.
func (c *Cluster) teardown() error {
	var errs []error
	if _, err := os.Stat(filepath.Join(netnsDir, nsName(c.name, switchHost))); err == nil {
		sw, nl, err := openNetns(nsName(c.name, switchHost), false)
		if err != nil {
			errs = append(errs, err)
		} else {
			for _, h := range c.hosts {
				if l, err := nl.LinkByName("v-" + h.name); err == nil {
					if err := nl.LinkDel(l); err != nil {
						errs = append(errs, fmt.Errorf("deleting veth of %s: %w", h.name, err))
					}
				}
			}
			if l, err := nl.LinkByName(bridgeName); err == nil {
				if err := nl.LinkDel(l); err != nil {
					errs = append(errs, fmt.Errorf("deleting bridge: %w", err))
				}
			}
			nl.Close()
			sw.Close()
		}
	}
	errs = append(errs, cleanupRun(c.name, c.cg, nil))
	return errors.Join(errs...)
}

// CleanupStale removes what a crashed run of that name left behind: its
// processes, namespaces (ls-<name>-*) and cgroups. It fails if a live run of
// that name holds the lock. NewCluster does the same on its own.
func CleanupStale(name string) error {
	if !runRe.MatchString(name) {
		return fmt.Errorf("container: run name %q must match %s", name, runRe)
	}
	cg, err := findCgroupTree()
	if err != nil {
		return fmt.Errorf("container: %w", err)
	}
	lock, err := lockRun(name)
	if err != nil {
		return fmt.Errorf("container: %w", err)
	}
	defer lock.Close()
	if err := cleanupRun(name, cg, logrus.WithField("run", name)); err != nil {
		return fmt.Errorf("container: cleaning run %q: %w", name, err)
	}
	return nil
}

// runNamespaces lists the existing namespaces of a run (see runRe).
func runNamespaces(run string) []string {
	prefix := "ls-" + run + "-"
	ents, err := os.ReadDir(netnsDir)
	if err != nil {
		return nil
	}
	var names []string
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if ok && rest != "" && !strings.Contains(rest, "-") {
			names = append(names, e.Name())
		}
	}
	return names
}

// killRun kills every process in the run's cgroups or namespaces.
func killRun(run string, cg *cgroupTree) error {
	ids := map[nsID]bool{}
	for _, n := range runNamespaces(run) {
		if id, ok := statNS(filepath.Join(netnsDir, n)); ok {
			ids[id] = true
		}
	}
	list := func() []int {
		pids := pidsInNetns(ids)
		ents, _ := os.ReadDir(cg.runDir(run))
		for _, e := range ents {
			if e.IsDir() {
				p, _ := cgroupProcs(filepath.Join(cg.runDir(run), e.Name()))
				pids = append(pids, p...)
			}
		}
		slices.Sort(pids)
		return slices.Compact(pids)
	}
	if err := killAll(list, killWait); err != nil {
		return fmt.Errorf("killing processes of run %q: %w", run, err)
	}
	return nil
}

// cleanupRun removes the run's processes, namespaces and cgroups; log, if
// set, reports what was found (leftovers of a crash).
func cleanupRun(run string, cg *cgroupTree, log logrus.FieldLogger) error {
	names := runNamespaces(run)
	_, cgErr := os.Stat(cg.runDir(run))
	if len(names) == 0 && cgErr != nil {
		return nil
	}
	if log != nil {
		log.WithField("netns", names).Warn("container: removing leftovers of an earlier run")
	}
	var errs []error
	errs = append(errs, killRun(run, cg))
	for _, n := range names {
		errs = append(errs, deleteNetns(n))
	}
	errs = append(errs, cg.removeRun(run))
	return errors.Join(errs...)
}

// Name is the run's name.
func (c *Cluster) Name() string { return c.name }

// Hosts lists the host names in address order.
func (c *Cluster) Hosts() []string {
	names := make([]string, len(c.hosts))
	for i, h := range c.hosts {
		names[i] = h.name
	}
	return names
}

// Addr is the host's IP address, or "" for an unknown host.
func (c *Cluster) Addr(host string) string {
	if h := c.byName[host]; h != nil {
		return h.ip.String()
	}
	return ""
}

// NetnsPath is the host's namespace file (/run/netns/ls-<run>-<host>), for
// tools that join it (LXC, CRIU), or "" for an unknown host.
func (c *Cluster) NetnsPath(host string) string {
	if h := c.byName[host]; h != nil {
		return filepath.Join(netnsDir, h.ns)
	}
	return ""
}

// CgroupDir is the host's cgroup directory, or "" for an unknown host.
func (c *Cluster) CgroupDir(host string) string {
	if h := c.byName[host]; h != nil {
		return h.cgroup
	}
	return ""
}

// SetCPUQuota changes one host's quota (cores, 0 for none), e.g. to lift it
// for the client host.
func (c *Cluster) SetCPUQuota(host string, cores float64) error {
	h, err := c.host(host)
	if err != nil {
		return err
	}
	if err := c.cg.setQuota(h.cgroup, cores); err != nil {
		return fmt.Errorf("container: %w", err)
	}
	return nil
}

func (c *Cluster) host(name string) (*clusterHost, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return nil, fmt.Errorf("container: run %q is closed", c.name)
	}
	h := c.byName[name]
	if h == nil {
		return nil, fmt.Errorf("container: run %q has no host %q", c.name, name)
	}
	return h, nil
}

// Exec returns a command that runs name inside the host's network namespace
// and cgroup (through the re-exec helper described in nsexec.go), like
// exec.Command. Errors (unknown host, program not found) surface from
// Start. Set Dir, Env, Stdout, SysProcAttr etc. as usual, but leave Path
// and Args alone: they name the helper, which then execs name (keeping
// pid, process group and environment).
func (c *Cluster) Exec(host, name string, args ...string) *exec.Cmd {
	return c.ExecContext(context.Background(), host, name, args...)
}

// ExecContext is Exec with a context, like exec.CommandContext.
func (c *Cluster) ExecContext(ctx context.Context, host, name string, args ...string) *exec.Cmd {
	if ctx == nil {
		ctx = context.Background()
	}
	// The kernel resolves /proc/self/exe in the child right after fork, so
	// it is this very binary even if the file has been replaced since.
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	h, err := c.host(host)
	if err != nil {
		cmd.Err = err
		return cmd
	}
	path := name
	if !strings.Contains(name, "/") {
		if path, err = exec.LookPath(name); err != nil {
			cmd.Err = fmt.Errorf("container: %w", err)
			return cmd
		}
	}
	var cgroups []string
	if h.cgroup != "" {
		cgroups = []string{h.cgroup}
	}
	cmd.Args = nsexecArgs(filepath.Join(netnsDir, h.ns), cgroups, path, append([]string{name}, args...))
	return cmd
}

// Do runs fn on an OS thread inside the host's network namespace; sockets
// that fn creates belong to that namespace for good, whichever goroutine
// uses them later. Goroutines started by fn run outside.
func (c *Cluster) Do(host string, fn func() error) error {
	h, err := c.host(host)
	if err != nil {
		return err
	}
	path := filepath.Join(netnsDir, h.ns)
	return inThread(func() error {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("container: opening %s: %w", path, err)
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("container: setns %s: %w", path, err)
		}
		return fn()
	})
}

// DialContext connects from inside the host. addr must be an IP literal
// and port: resolving a name would happen outside the namespace.
func (c *Cluster) DialContext(ctx context.Context, host, network, addr string) (net.Conn, error) {
	if err := literalAddr(addr, false); err != nil {
		return nil, err
	}
	var conn net.Conn
	err := c.Do(host, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// Listen listens inside the host; addr is an IP literal (or empty host)
// and port.
func (c *Cluster) Listen(host, network, addr string) (net.Listener, error) {
	if err := literalAddr(addr, true); err != nil {
		return nil, err
	}
	var l net.Listener
	err := c.Do(host, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

func literalAddr(addr string, emptyOK bool) error {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("container: %w", err)
	}
	if (h == "" && emptyOK) || net.ParseIP(h) != nil {
		return nil
	}
	return fmt.Errorf("container: %q: want an IP address, not a name", addr)
}

// Place makes o run on the host: its process inside the host's namespace
// and cgroup, its health check dialled from there. It leaves o.Host alone
// (the server keeps Config.Listen's address unless the caller sets, e.g.,
// c.Addr(host)).
func (c *Cluster) Place(host string, o *ServerOptions) error {
	if _, err := c.host(host); err != nil {
		return err
	}
	o.Command = func(name string, args ...string) *exec.Cmd { return c.Exec(host, name, args...) }
	o.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return c.DialContext(ctx, host, network, addr)
	}
	return nil
}
