// Package checkpoint takes and restores CRIU images of a server's process
// tree, keeps them in a store tied to the replicated log, and ships them to
// peers.
//
// CRIU is driven as a library through go-criu (its RPC, `criu swrk`): Dump
// freezes a tree, writes its image and by default kills it; Restore brings
// the tree back as a child of the calling process (CRIU's restore-sibling
// mode), so the caller waits for it like any child. Trees that live in
// their own namespaces (an LXC container: pid, mount, uts, ipc, cgroup
// namespaces) are handled: mounts that are the host's own are treated as
// external and bind-mounted back, nsfs mounts are skipped, and a network
// namespace that belongs to the replica rather than to the tree can be left
// out of the image (Options.ExternalNetns) and given back at restore
// (Options.Netns).
//
// TCP connections (Options.TCPEstablished) use CRIU's TCP repair: the
// socket's sequence numbers and queues go into the image, and nftables
// rules in its network namespace drop its packets from the dump until the
// restore, so that the peer sees silence and retransmits rather than a
// reset (a new client's SYN is dropped too, and retried). The peer does
// not have to be in the dumped tree: a server in a container that shares
// the replica's network namespace keeps its connections to the replica's
// feeder across a dump and restore in place (tested). What the image
// cannot carry is the peer's end: restored where that end no longer exists
// (another replica, a restarted one), the connection is restored but gets
// a reset at its first packet. For recovery, the feeder's end of each
// server connection must therefore be inside the dumped tree (both ends
// are then restored together), or the feeder must reconnect.
//
// Go servers listen with MPTCP by default since Go 1.24, which CRIU cannot
// dump ("Unsupported proto 262"): run them with GODEBUG=multipathtcp=0.
// C servers (Apache, Redis, MariaDB) use plain TCP.
// A Store keeps one directory per checkpoint, named <index>-<id> after the
// log index it was taken at, with a manifest.json (index, id, created,
// size, app, and the size and SHA-256 of every file). Store.Handler serves
// checkpoints as tar streams and Fetch brings one into another store,
// verified, with an atomic rename.
//
// A server's data is either a tmpfs inside its container, which CRIU
// archives into the image while the tree is frozen (the pause grows with
// the data), or a data volume (volume.go: btrfs on a loop device backed by
// a tmpfs of the host, bound into the container), which the dump marks
// external, snapshots from Options.PostDump while the tree is still frozen
// (constant time) and archives into the images directory afterwards
// (VolumeArchive); the restore extracts it into a new volume first.
//
// Everything here needs root and scripts/criu.sh's CRIU: 4.1.1 with two
// patches, one for Linux 6.16+ (TCP sockets), one for machines where root
// lacks CAP_SYS_RESOURCE (tasks of another user, such as Apache's child).
package checkpoint
