// Package container runs lockstep's servers and gives a whole cluster a home
// on one machine.
//
// A Cluster is one network namespace per host (ls-<run>-<host>), each joined
// by a veth pair to a bridge that lives in a switch namespace of its own
// (ls-<run>-sw). Nothing is attached to the root namespace, so no packet of
// a cluster can leave the machine. Each host also gets a cgroup
// (lockstep/<run>/<host>) with an optional CPU quota, so that one machine
// can stand in for several. Cluster.Exec starts programs inside a host,
// Cluster.Do runs Go code there (listeners, dials).
//
// StartServer runs one copy of an unmodified server from an apps/<app>
// folder: it renders the folder's files with text/template, starts the
// configured command in a process group of its own and waits for its health
// check. LXC containers come later; the Cluster's namespaces and cgroups are
// where they will live.
package container
