package paxos

import (
	"slices"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"lockstep/paxos/transport"
)

type sendRecorder struct {
	transport.Transport
	sent []raftpb.Message
}

func (s *sendRecorder) Send(msgs []raftpb.Message) { s.sent = append(s.sent, msgs...) }

// An append without entries (a commit index for a follower) waits for the
// next append to that follower, which carries the index instead; any other
// message sends it first; after CommitDelay it goes alone.
func TestHoldCommits(t *testing.T) {
	rec := &sendRecorder{}
	n := &Node{cfg: Config{CommitDelay: time.Hour}, tr: rec, held: map[uint64]raftpb.Message{}}
	n.heldTimer = time.NewTimer(time.Hour)
	n.heldTimer.Stop()
	commit := func(to, c uint64) raftpb.Message {
		return raftpb.Message{Type: raftpb.MsgApp, To: to, Index: 5, Commit: c}
	}
	appendTo := func(to uint64) raftpb.Message {
		return raftpb.Message{Type: raftpb.MsgApp, To: to, Index: 5, Commit: 6, Entries: []raftpb.Entry{{Index: 6}}}
	}
	kinds := func(msgs []raftpb.Message) (s []string) {
		for _, m := range msgs {
			s = append(s, m.Type.String()+"@"+string(rune('0'+m.To)))
			if m.Type == raftpb.MsgApp && len(m.Entries) == 0 {
				s[len(s)-1] += "(commit)"
			}
		}
		return s
	}
	check := func(got []raftpb.Message, want ...string) {
		t.Helper()
		if g := kinds(got); !slices.Equal(g, want) {
			t.Fatalf("sent %v, want %v", g, want)
		}
	}

	check(n.holdCommits([]raftpb.Message{commit(2, 5), commit(3, 5), commit(4, 5)}))
	check(n.holdCommits([]raftpb.Message{commit(2, 6)})) // replaces the older one
	if len(n.held) != 3 || n.held[2].Commit != 6 || !n.heldArmed {
		t.Fatalf("held %v, armed %v", n.held, n.heldArmed)
	}
	// An append to 2 carries the commit index: the held one is dropped.
	check(n.holdCommits([]raftpb.Message{appendTo(2)}), "MsgApp@2")
	// A heartbeat to 3 goes after the held commit, in order.
	check(n.holdCommits([]raftpb.Message{{Type: raftpb.MsgHeartbeat, To: 3}}), "MsgApp@3(commit)", "MsgHeartbeat@3")
	// The timer fires before the messages held now waited their delay:
	// nothing goes, and it is armed again.
	n.sendHeld()
	check(rec.sent)
	if len(n.held) != 1 || !n.heldArmed {
		t.Fatalf("held %v, armed %v after an early timer", n.held, n.heldArmed)
	}
	// The delay over, what is left goes alone.
	n.heldSince = n.heldSince.Add(-time.Hour)
	n.sendHeld()
	check(rec.sent, "MsgApp@4(commit)")
	if len(n.held) != 0 || n.heldArmed {
		t.Fatalf("held %v after the delay", n.held)
	}
	// A commit held after an append carried the one the timer was armed
	// for waits its own delay, not what is left of that one's.
	check(n.holdCommits([]raftpb.Message{commit(2, 8)}))
	n.heldSince = n.heldSince.Add(-time.Hour)
	check(n.holdCommits([]raftpb.Message{appendTo(2)}), "MsgApp@2")
	check(n.holdCommits([]raftpb.Message{commit(3, 9)}))
	n.sendHeld()
	check(rec.sent, "MsgApp@4(commit)")
	if len(n.held) != 1 || !n.heldArmed {
		t.Fatalf("held %v, armed %v after the timer of a carried commit", n.held, n.heldArmed)
	}

	// A negative delay holds nothing.
	n.cfg.CommitDelay = -1
	check(n.holdCommits([]raftpb.Message{commit(2, 7)}), "MsgApp@2(commit)")
}
