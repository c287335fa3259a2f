package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"lockstep/paxos"
)

// watchLeadership follows the node's role: a new leader announces its
// epoch; a replica that stops leading resets the clients it served; a
// change of leader resets the connections relayed to the old one.
func (r *Replica) watchLeadership() {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	var leading bool
	var term, leader uint64
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		st := r.node.Status()
		now := st.Role == "leader" && st.Leader == r.o.ID
		switch {
		case now && (!leading || st.Term != term):
			r.lmu.Lock()
			r.tenure, r.serving, r.nextConn = st.Term, false, 0
			r.lmu.Unlock()
			r.resetClients(st.Term, "new term")
			r.log.Infof("proxy: leading in term %d; announcing the epoch", st.Term)
			go r.proposeEpoch(st.Term)
		case !now && leading:
			r.lmu.Lock()
			r.tenure, r.serving = 0, false
			r.lmu.Unlock()
			r.setFeederOrdering(true)
			r.resetClients(0, "lost leadership")
			r.log.Infof("proxy: no longer leading (term %d, leader %d)", st.Term, st.Leader)
		}
		if st.Leader != leader {
			r.lmu.Lock()
			r.leader = st.Leader
			r.lmu.Unlock()
			r.resetRelays(st.Leader)
		}
		leading, term, leader = now, st.Term, st.Leader
	}
}

func (r *Replica) leadingIn(term uint64) bool {
	r.lmu.Lock()
	defer r.lmu.Unlock()
	return r.tenure == term && term != 0
}

func (r *Replica) proposeEpoch(term uint64) {
	ev := EncodeEvent(Event{Type: Epoch, Leader: r.o.ID, Term: term, Addr: r.advertise})
	for r.ctx.Err() == nil && r.leadingIn(term) {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		r.m.proposed.WithLabelValues(Epoch.String()).Inc()
		res := <-r.node.ProposeAsync(ctx, ev)
		cancel()
		if res.Err == nil {
			return
		}
		r.m.proposeFailed.WithLabelValues(Epoch.String()).Inc()
		r.log.WithError(res.Err).Warnf("proxy: epoch of term %d not committed; retrying", term)
		time.Sleep(20 * time.Millisecond)
	}
}

// resetClients resets the sessions this replica serves, but for those of
// term keep.
func (r *Replica) resetClients(keep uint64, why string) {
	r.lmu.Lock()
	var ss []*session
	for _, s := range r.sessions {
		if s.term != keep || keep == 0 {
			ss = append(ss, s)
		}
	}
	var rs []*relay
	if keep == 0 && r.ctx.Err() != nil {
		for rl := range r.relays {
			rs = append(rs, rl)
		}
	}
	r.lmu.Unlock()
	for _, s := range ss {
		s.abort(why)
	}
	for _, rl := range rs {
		rl.reset(r, why)
	}
}

// resetRelays resets the connections relayed to another leader than
// leader.
func (r *Replica) resetRelays(leader uint64) {
	r.lmu.Lock()
	var rs []*relay
	for rl := range r.relays {
		if rl.leader != leader {
			rs = append(rs, rl)
		}
	}
	r.lmu.Unlock()
	for _, rl := range rs {
		rl.reset(r, "leader changed")
	}
}

func (r *Replica) session(conn uint64) *session {
	r.lmu.Lock()
	defer r.lmu.Unlock()
	return r.sessions[conn]
}

// Client keepalive: a client that vanished without a FIN or RST (its
// machine died) must not hold a connection slot forever. Go's defaults.
const (
	keepAliveIdle     = 15 // seconds
	keepAliveInterval = 15 // seconds
	keepAliveCount    = 9
)

// listenClients listens for clients with keepalive set on the listening
// socket, which the accepted ones inherit (Linux copies the socket
// options): Go's default would set it with four calls on every accepted
// connection, on the way to its first bytes.
func listenClients(addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			for _, o := range []struct{ level, opt, v int }{
				{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
				{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, keepAliveIdle},
				{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, keepAliveInterval},
				{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, keepAliveCount},
			} {
				if serr = syscall.SetsockoptInt(int(fd), o.level, o.opt, o.v); serr != nil {
					serr = os.NewSyscallError("setsockopt", serr)
					return
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}

func (r *Replica) acceptLoop() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			if r.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			r.log.WithError(err).Warn("proxy: accept")
			time.Sleep(10 * time.Millisecond)
			continue
		}
		tc := c.(*net.TCPConn)
		select {
		case r.sem <- struct{}{}:
		default:
			r.m.rejected.Inc()
			resetConn(tc)
			continue
		}
		r.m.clientsOpen.Inc()
		r.goFunc(func() {
			defer func() {
				<-r.sem
				r.m.clientsOpen.Dec()
			}()
			r.handle(tc)
		})
	}
}

func resetConn(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// handle serves a client itself if this replica leads and serves, relays
// it to the leader otherwise, and refuses it if no leader appears in time.
func (r *Replica) handle(c *net.TCPConn) {
	// Accepted TCP connections come with TCP_NODELAY set.
	deadline := time.Now().Add(r.o.LeaderWait)
	for r.ctx.Err() == nil {
		st := r.node.Status()
		if st.Leader == r.o.ID && st.Role == "leader" {
			if s := r.newSession(c, st.Term); s != nil {
				r.m.clientsTotal.WithLabelValues("served").Inc()
				s.run()
				return
			}
		} else if st.Leader != 0 {
			if addr := r.leaderAddr(st.Leader); addr != "" {
				r.m.clientsTotal.WithLabelValues("relayed").Inc()
				r.runRelay(c, st.Leader, addr)
				return
			}
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.m.rejected.Inc()
	r.m.resets.WithLabelValues("no leader").Inc()
	resetConn(c)
}

// leaderAddr is where leader's clients connect: what its epoch announced,
// else the configured address (if it has a port).
func (r *Replica) leaderAddr(leader uint64) string {
	r.smu.Lock()
	ep := r.epoch
	r.smu.Unlock()
	if ep.Leader == leader && ep.Addr != "" {
		return ep.Addr
	}
	for _, rep := range r.o.Replicas {
		if rep.ID == leader {
			if _, port, err := net.SplitHostPort(rep.Listen); err == nil && port != "0" {
				return rep.Listen
			}
		}
	}
	return ""
}

// ---------------------------------------------------------------------
// Sessions: clients the leader serves.

type session struct {
	r    *Replica
	id   uint64
	term uint64
	c    *net.TCPConn

	mu         sync.Mutex
	cond       *sync.Cond
	inflight   int // read from the client, not yet delivered to the server
	aborted    bool
	serverDone bool
	clientDone bool

	outMu   sync.Mutex
	results chan pendingProposal
}

type pendingProposal struct {
	ch  <-chan paxos.ProposeResult
	typ Type
	n   int
}

// newSession registers a session for c if this replica serves in term.
func (r *Replica) newSession(c *net.TCPConn, term uint64) *session {
	r.lmu.Lock()
	defer r.lmu.Unlock()
	if r.tenure != term || !r.serving || r.ctx.Err() != nil {
		return nil
	}
	r.nextConn++
	if r.nextConn == 0 {
		r.nextConn = 1
	}
	// The connection id: origin, term and a counter (only its uniqueness
	// among open connections matters; the term decides its epoch).
	id := r.o.ID<<48 | (term&0xffff)<<32 | uint64(r.nextConn)
	for r.sessions[id] != nil {
		r.nextConn++
		id = r.o.ID<<48 | (term&0xffff)<<32 | uint64(r.nextConn)
	}
	s := &session{r: r, id: id, term: term, c: c, results: make(chan pendingProposal, 64)}
	s.cond = sync.NewCond(&s.mu)
	r.sessions[id] = s
	return s
}

func (s *session) unregister() {
	s.r.lmu.Lock()
	if s.r.sessions[s.id] == s {
		delete(s.r.sessions, s.id)
	}
	s.r.lmu.Unlock()
}

// propose queues an event of the client's stream; proposals of one
// session are made from its run goroutine only, so they enter the log in
// order.
func (s *session) propose(typ Type, data []byte, n int) {
	s.r.m.proposed.WithLabelValues(typ.String()).Inc()
	ch := s.r.node.ProposeAsync(s.r.ctx, data)
	s.results <- pendingProposal{ch: ch, typ: typ, n: n}
}

// proposeConnectData queues the Connect and the first Data together, so
// that they commit in one round.
func (s *session) proposeConnectData(connect, data []byte, n int) {
	s.r.m.proposed.WithLabelValues(Connect.String()).Inc()
	s.r.m.proposed.WithLabelValues(Data.String()).Inc()
	chs := s.r.node.ProposeAsyncBatch(s.r.ctx, connect, data)
	s.results <- pendingProposal{ch: chs[0], typ: Connect}
	s.results <- pendingProposal{ch: chs[1], typ: Data, n: n}
}

// proposeOnce proposes an event outside the client's stream order
// (closes), without waiting.
func (s *session) proposeOnce(ev Event) { s.proposeOutOfStream(ev, false) }

// proposeOutOfStream proposes ev without waiting; a lazy one shares the
// round of the next proposal (a graceful server close is in no hurry: the
// client already saw it).
func (s *session) proposeOutOfStream(ev Event, lazy bool) {
	r := s.r
	if !r.leadingIn(s.term) {
		return
	}
	r.m.proposed.WithLabelValues(ev.Type.String()).Inc()
	propose := r.node.ProposeAsync
	if lazy {
		propose = r.node.ProposeAsyncLazy
	}
	ch := propose(r.ctx, EncodeEvent(ev))
	go func() {
		if res := <-ch; res.Err != nil {
			r.m.proposeFailed.WithLabelValues(ev.Type.String()).Inc()
		}
	}()
}

// collect follows the session's proposals: their bytes leave the
// uncommitted budget; a failed one resets the client, since its stream has
// a hole (the replicas reset the connection when they see it).
func (s *session) collect(done chan<- struct{}) {
	defer close(done)
	for p := range s.results {
		res := <-p.ch
		s.r.releaseUncommitted(p.n)
		if res.Err != nil {
			s.r.m.proposeFailed.WithLabelValues(p.typ.String()).Inc()
			if s.abort("proposal failed") {
				s.proposeOnce(Event{Type: Close, Conn: s.id, Abort: true})
			}
		}
	}
}

const dataHeaderRoom = 2 + 2*binary.MaxVarintLen64

func (s *session) run() {
	r := s.r
	collected := make(chan struct{})
	go s.collect(collected)
	connect := EncodeEvent(Event{Type: Connect, Conn: s.id, Term: s.term})
	// A client usually sends right after it connects: waiting a moment for
	// its first bytes lets Connect and them commit in one round (one
	// fsync) instead of two in a row. A client that waits for the server
	// to speak first gets its Connect after the wait.
	if r.o.ConnectWait > 0 {
		_ = s.c.SetReadDeadline(time.Now().Add(r.o.ConnectWait))
	} else {
		s.propose(Connect, connect, 0)
		connect = nil
	}

	bp := r.readBufs.Get().(*[]byte)
	defer r.readBufs.Put(bp)
	buf := *bp
	var hdr [dataHeaderRoom]byte
	var off uint64
	for {
		s.mu.Lock()
		for s.inflight >= r.o.Window && !s.aborted && !s.serverDone {
			s.cond.Wait()
		}
		aborted := s.aborted
		s.mu.Unlock()
		if aborted {
			break
		}
		n, err := s.c.Read(buf[dataHeaderRoom:])
		if connect != nil {
			_ = s.c.SetReadDeadline(time.Time{})
			if n == 0 {
				s.propose(Connect, connect, 0)
				connect = nil
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					continue // the wait is over
				}
			}
		}
		if n > 0 {
			s.mu.Lock()
			sd := s.serverDone || s.aborted
			if !sd {
				s.inflight += n
			}
			s.mu.Unlock()
			if !sd && r.acquireUncommitted(n, s.isAborted) {
				h := AppendEvent(hdr[:0], Event{Type: Data, Conn: s.id, Off: off})
				start := dataHeaderRoom - len(h)
				copy(buf[start:], h)
				if connect != nil {
					s.proposeConnectData(connect, buf[start:dataHeaderRoom+n], n)
					connect = nil
				} else {
					s.propose(Data, buf[start:dataHeaderRoom+n], n)
				}
				r.m.bytesProposed.Add(float64(n))
				off += uint64(n)
			}
		}
		if err != nil {
			s.mu.Lock()
			sd, ab := s.serverDone, s.aborted
			if errors.Is(err, io.EOF) {
				s.clientDone = true
			}
			s.mu.Unlock()
			switch {
			case ab || sd:
			case errors.Is(err, io.EOF):
				s.propose(Shutdown, EncodeEvent(Event{Type: Shutdown, Conn: s.id, Off: off}), 0)
			default:
				if s.abort("client reset") {
					s.proposeOnce(Event{Type: Close, Conn: s.id, Abort: true})
				}
			}
			break
		}
	}
	close(s.results)
	// Relay the server's output until it ends (or the session is reset).
	s.mu.Lock()
	for !s.serverDone && !s.aborted {
		s.cond.Wait()
	}
	aborted := s.aborted
	s.mu.Unlock()
	if !aborted {
		_ = s.c.Close()
	}
	<-collected
	s.unregister()
}

func (s *session) isAborted() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.aborted
}

// abort resets the client's connection; it reports whether it did (the
// first time).
func (s *session) abort(why string) bool {
	s.mu.Lock()
	if s.aborted || (s.serverDone && s.clientDone) {
		s.mu.Unlock()
		return false
	}
	s.aborted = true
	s.cond.Broadcast()
	s.mu.Unlock()
	s.r.ucond.Broadcast()
	s.r.m.resets.WithLabelValues(why).Inc()
	resetConn(s.c)
	return true
}

// output relays server output to the client.
func (s *session) output(b []byte) {
	s.outMu.Lock()
	_, err := s.c.Write(b)
	s.outMu.Unlock()
	if err != nil && s.abort("client gone") {
		s.proposeOnce(Event{Type: Close, Conn: s.id, Abort: true})
	}
}

func (s *session) delivered(n int) {
	s.mu.Lock()
	s.inflight -= n
	s.cond.Broadcast()
	s.mu.Unlock()
}

// serverEOF: the leader's server ended its output on the connection.
func (s *session) serverEOF(err error) {
	switch {
	case err == nil:
		s.mu.Lock()
		if s.aborted {
			s.mu.Unlock()
			return
		}
		s.serverDone = true
		s.cond.Broadcast()
		s.mu.Unlock()
		s.outMu.Lock()
		_ = s.c.CloseWrite()
		s.outMu.Unlock()
		s.proposeOutOfStream(Event{Type: ServerClose, Conn: s.id}, true)
		// Keep reading (and dropping) what the client still sends, for a
		// while, as a server's lingering close would.
		_ = s.c.SetReadDeadline(time.Now().Add(s.r.o.Linger))
	case errors.Is(err, ErrAborted):
		s.abort("closed by the log")
	default:
		if s.abort("server reset") {
			s.proposeOnce(Event{Type: ServerClose, Conn: s.id, Abort: true})
		}
	}
}

// acquireUncommitted waits until n more bytes fit the leader's budget of
// uncommitted bytes; it fails if stop() turns true or the replica stops.
func (r *Replica) acquireUncommitted(n int, stop func() bool) bool {
	r.umu.Lock()
	defer r.umu.Unlock()
	for r.uncommitted > 0 && r.uncommitted+int64(n) > r.o.MaxUncommitted {
		if stop() || r.ctx.Err() != nil {
			return false
		}
		r.ucond.Wait()
	}
	r.uncommitted += int64(n)
	return true
}

func (r *Replica) releaseUncommitted(n int) {
	if n == 0 {
		return
	}
	r.umu.Lock()
	r.uncommitted -= int64(n)
	r.ucond.Broadcast()
	r.umu.Unlock()
}

// ---------------------------------------------------------------------
// Relays: clients of a backup, carried to the leader's client listener.

type relay struct {
	leader     uint64
	client, up *net.TCPConn
	once       sync.Once
}

func (rl *relay) reset(r *Replica, why string) {
	rl.once.Do(func() {
		r.m.resets.WithLabelValues(why).Inc()
		resetConn(rl.client)
		resetConn(rl.up)
	})
}

func (r *Replica) runRelay(c *net.TCPConn, leader uint64, addr string) {
	nc, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		r.log.WithError(err).Debugf("proxy: cannot reach leader %d at %s", leader, addr)
		r.m.resets.WithLabelValues("leader unreachable").Inc()
		resetConn(c)
		return
	}
	up := nc.(*net.TCPConn)
	_ = up.SetNoDelay(true)
	rl := &relay{leader: leader, client: c, up: up}
	r.lmu.Lock()
	if r.leader != leader && r.leader != 0 || r.ctx.Err() != nil {
		r.lmu.Unlock()
		rl.reset(r, "leader changed")
		return
	}
	r.relays[rl] = struct{}{}
	r.lmu.Unlock()
	defer func() {
		r.lmu.Lock()
		delete(r.relays, rl)
		r.lmu.Unlock()
	}()

	pipe := func(dst, src *net.TCPConn, done chan<- bool) {
		n, err := io.Copy(dst, src)
		r.m.bytesRelayed.Add(float64(n))
		if err == nil {
			_ = dst.CloseWrite()
		}
		done <- err == nil
	}
	upc, downc := make(chan bool, 1), make(chan bool, 1)
	go pipe(up, c, upc)
	go pipe(c, up, downc)
	ok := true
	for upc != nil || downc != nil {
		select {
		case v := <-upc:
			ok, upc = ok && v, nil
		case v := <-downc:
			ok, downc = ok && v, nil
		}
		if !ok {
			rl.reset(r, "relay broken")
		}
	}
	if ok {
		_ = c.Close()
		_ = up.Close()
	}
}
