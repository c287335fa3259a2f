package proxy

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

type nopOutput struct{}

func (nopOutput) ServerData(uint64, []byte)    {}
func (nopOutput) ServerEOF(uint64, error)      {}
func (nopOutput) Delivered(conn uint64, n int) {}

// orderServer accepts connections; each sends one line naming itself
// ("a", "b", ...), and "slow" lines are worked on for a while. It records
// when each connection's line was taken up, in accept order, and closes
// a connection once its client half-closed.
type orderServer struct {
	ln       net.Listener
	mu       sync.Mutex
	seen     []string
	accepted []string // first line of each connection, in accept order
}

func newOrderServer(t *testing.T) *orderServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &orderServer{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			k := len(s.accepted)
			s.accepted = append(s.accepted, "")
			s.mu.Unlock()
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return // EOF: the client half-closed
					}
					name, slow := strings.CutSuffix(strings.TrimSpace(line), " slow")
					s.mu.Lock()
					s.seen = append(s.seen, name)
					if s.accepted[k] == "" {
						s.accepted[k] = name
					}
					s.mu.Unlock()
					if slow {
						time.Sleep(300 * time.Millisecond)
						s.mu.Lock()
						s.seen = append(s.seen, name+" done")
						s.mu.Unlock()
					}
				}
			}()
		}
	}()
	return s
}

func (s *orderServer) order() (seen, accepted string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.seen, ","), strings.Join(s.accepted, ",")
}

// before says whether a comes before b in the comma-separated list l.
func before(l, a, b string) bool {
	ia, ib := -1, -1
	for i, x := range strings.Split(l, ",") {
		switch x {
		case a:
			ia = i
		case b:
			ib = i
		}
	}
	return ia >= 0 && ib >= 0 && ia < ib
}

// TestTCPFeederOrderConnects: with OrderConnects a connection opened after
// another one was shut down reaches the server only once the server has
// ended the first (its work on it is done), and waiting connections keep
// their order; without it, or switched off (the leader's feeder), the
// server runs them concurrently.
func TestTCPFeederOrderConnects(t *testing.T) {
	for _, tc := range []struct {
		name            string
		option, leading bool
	}{{"on", true, false}, {"off", false, false}, {"switched off (leading)", true, true}} {
		order := tc.option && !tc.leading
		srv := newOrderServer(t)
		f := NewTCPFeeder(TCPFeederOptions{Addr: func() string { return srv.ln.Addr().String() }, Output: nopOutput{},
			CloseGrace: 10 * time.Second, OrderConnects: tc.option})
		if tc.leading {
			f.SetOrderConnects(false)
		}
		idx := uint64(0)
		feed := func(e Event) {
			idx++
			f.Feed(Committed{Index: idx, Event: e})
		}
		feed(Event{Type: Connect, Conn: 1})
		feed(Event{Type: Data, Conn: 1, Data: []byte("a slow\n")})
		feed(Event{Type: Shutdown, Conn: 1})
		feed(Event{Type: Connect, Conn: 2})
		feed(Event{Type: Data, Conn: 2, Data: []byte("b\n")})
		feed(Event{Type: Connect, Conn: 3})
		feed(Event{Type: Data, Conn: 3, Data: []byte("c slow\n")})
		feed(Event{Type: Close, Conn: 3})
		feed(Event{Type: Connect, Conn: 4})
		feed(Event{Type: Data, Conn: 4, Data: []byte("d\n")})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := f.Quiesce(ctx, idx); err != nil {
			t.Fatal(err)
		}
		cancel()
		deadline := time.Now().Add(5 * time.Second)
		for {
			if seen, _ := srv.order(); strings.Count(seen, ",") == 5 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		seen, accepted := srv.order()
		if order {
			if !before(seen, "a done", "b") || !before(seen, "a done", "c") || !before(seen, "c done", "d") || accepted != "a,b,c,d" {
				t.Errorf("%s: the server saw %q, accepted %q", tc.name, seen, accepted)
			}
		} else if before(seen, "a done", "b") {
			t.Errorf("%s: the server saw %q: a wait where there should be none", tc.name, seen)
		}
		f.Close()
	}
}
