package eval

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
)

// appliedBubbles reads lockstep_proxy_events_applied_total{type="bubble"}
// (time bubbles committed, joint_sched) from the first replica whose
// admin answers; -1 when none does or there are no replicas.
func (d *Deployment) appliedBubbles(ctx context.Context) float64 {
	client := d.adminClient()
	for _, admin := range d.admins {
		req, err := http.NewRequestWithContext(ctx, "GET", "http://"+admin+"/metrics", nil)
		if err != nil {
			continue
		}
		resp, err := client.Do(req)
		if err != nil {
			continue
		}
		v := 0.0
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, `lockstep_proxy_events_applied_total{type="bubble"}`) {
				f := strings.Fields(line)
				if x, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
					v = x
				}
			}
		}
		resp.Body.Close()
		return v
	}
	return -1
}
