package logbench

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"lockstep/paxos"
)

// Client is one connection to a log node, one request at a time (as one
// etcd client goroutine issues one Put at a time).
type Client struct {
	c    net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
	next uint64
}

// Dial connects to a node's client address.
func Dial(addr string, timeout time.Duration) (*Client, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &Client{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c)}, nil
}

// Close closes the connection.
func (cl *Client) Close() error { return cl.c.Close() }

func (cl *Client) call(op byte, payload []byte, timeout time.Duration) ([]byte, error) {
	cl.next++
	if err := cl.c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	if err := writeFrame(cl.w, frame{kind: op, id: cl.next, payload: payload}); err != nil {
		return nil, err
	}
	if err := cl.w.Flush(); err != nil {
		return nil, err
	}
	resp, err := readFrame(cl.r)
	if err != nil {
		return nil, err
	}
	if resp.id != cl.next {
		return nil, fmt.Errorf("logbench: response %d to request %d", resp.id, cl.next)
	}
	if resp.kind != statusOK {
		return nil, &RemoteError{Msg: string(resp.payload)}
	}
	return resp.payload, nil
}

// RemoteError is an error the node returned, as opposed to a broken
// connection.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return "node: " + e.Msg }

// Propose appends data and returns its committed index.
func (cl *Client) Propose(data []byte, timeout time.Duration) (uint64, error) {
	p, err := cl.call(opPropose, data, timeout)
	if err != nil {
		return 0, err
	}
	if len(p) != 8 {
		return 0, errors.New("logbench: bad propose response")
	}
	return binary.BigEndian.Uint64(p), nil
}

// Dump returns the node's applied sequence (nodes run with Record).
func (cl *Client) Dump(timeout time.Duration) ([]Record, error) {
	p, err := cl.call(opDump, nil, timeout)
	if err != nil {
		return nil, err
	}
	return decodeRecords(p)
}

// Status returns the node's raft status.
func (cl *Client) Status(timeout time.Duration) (paxos.Status, error) {
	var st paxos.Status
	p, err := cl.call(opStatus, nil, timeout)
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(p, &st)
}
