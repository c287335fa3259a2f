package eval

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"time"
)

// adminClient reaches the replicas' admin addresses from the client
// namespace.
func (d *Deployment) adminClient() *http.Client {
	return &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.cluster.DialContext(ctx, "client", network, addr)
		},
		DisableKeepAlives: true,
	}}
}

// Leader is the 0-based index of the replica that leads, as the first
// replica that answers /status says; 0 in the modes without consensus.
// Clients pointed at a backup are relayed to the leader, a hop that a
// benchmark of the replication itself should not measure.
func (d *Deployment) Leader(ctx context.Context) (int, error) {
	if len(d.admins) == 0 {
		return 0, nil
	}
	client := d.adminClient()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, admin := range d.admins {
			var st struct {
				Leader uint64 `json:"leader"`
			}
			req, err := http.NewRequestWithContext(ctx, "GET", "http://"+admin+"/status", nil)
			if err != nil {
				return 0, err
			}
			resp, err := client.Do(req)
			if err != nil {
				continue
			}
			err = json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
			if err == nil && st.Leader >= 1 && int(st.Leader) <= len(d.admins) {
				return int(st.Leader) - 1, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, errors.New("eval: no replica reports a leader")
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
