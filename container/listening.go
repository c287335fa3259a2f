package container

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// Listening tells whether a TCP socket of this process's network
// namespace listens on addr (host:port; a wildcard listener counts for
// any host), from /proc/net/tcp and tcp6 (of the calling thread). It is the health check of a
// server under joint_sched, which must not be connected to: the
// deterministic runtime keeps a connection that is not in the log for
// ever, and its source port could later be taken for one that is.
func Listening(addr string) (bool, error) {
	host, port, err := splitPort(addr)
	if err != nil {
		return false, err
	}
	want := net.ParseIP(host)
	found := false
	for _, f := range procNetTCP {
		ok, err := listeningIn(f, want, port)
		if err != nil && !os.IsNotExist(err) {
			return false, err
		}
		found = found || ok
	}
	return found, nil
}

// AcceptQueue is how many connections wait in the accept queues of this
// network namespace's sockets listening on addr's port (0 if none
// listens). CRIU cannot image a connection there (an "in-flight" one): a
// dump waits until the server has taken them.
func AcceptQueue(addr string) (int, error) {
	_, port, err := splitPort(addr)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, f := range procNetTCP {
		err := scanListeners(f, func(_ net.IP, p uint16, queued int) bool {
			if p == port {
				n += queued
			}
			return false
		})
		if err != nil && !os.IsNotExist(err) {
			return 0, err
		}
	}
	return n, nil
}

// splitPort splits host:port with a numeric port.
func splitPort(addr string) (string, uint16, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("container: port of %q: %w", addr, err)
	}
	return host, uint16(port), nil
}

// procNetTCP are read through thread-self: /proc/net is the namespace of
// the process's main thread, which a Go program may have moved (a locked
// goroutine that set another namespace and ended on the main thread leaves
// it there), and sockets belong to the namespace of the thread that made
// them.
var procNetTCP = []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"}

// scanListeners calls fn for every listening socket in path (a
// /proc/net/tcp file) with its address, port and accept queue, until fn
// returns true.
func scanListeners(path string, fn func(ip net.IP, port uint16, queued int) bool) error {
	runtime.LockOSThread() // the thread-self we read is this one
	defer runtime.UnlockOSThread()
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// sl local rem st tx_queue:rx_queue ...; for a listener rx_queue
		// is its accept queue
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[3] != "0A" { // TCP_LISTEN
			continue
		}
		ip, p, err := parseProcAddr(fields[1])
		if err != nil {
			continue
		}
		queued := 0
		if _, rx, ok := strings.Cut(fields[4], ":"); ok {
			if v, err := strconv.ParseUint(rx, 16, 32); err == nil {
				queued = int(v)
			}
		}
		if fn(ip, p, queued) {
			return nil
		}
	}
	return sc.Err()
}

func listeningIn(path string, want net.IP, port uint16) (bool, error) {
	found := false
	err := scanListeners(path, func(ip net.IP, p uint16, _ int) bool {
		found = p == port && (want == nil || ip.IsUnspecified() || ip.Equal(want))
		return found
	})
	return found, err
}

// parseProcAddr parses /proc/net/tcp's "0100007F:1F90": the address in
// the kernel's byte order, 32 bits at a time, and the port in hex.
func parseProcAddr(s string) (net.IP, uint16, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return nil, 0, fmt.Errorf("container: address %q", s)
	}
	raw, err := hex.DecodeString(a)
	if err != nil || len(raw)%4 != 0 {
		return nil, 0, fmt.Errorf("container: address %q", s)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return nil, 0, fmt.Errorf("container: port %q", s)
	}
	return net.IP(raw), uint16(port), nil
}
