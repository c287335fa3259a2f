package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"lockstep/configs"
	"lockstep/proxy"
)

func newStatusCmd() *cobra.Command {
	var (
		cfgPath string
		admins  string
		asJSON  bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every replica's role, log position, connections and output divergences",
		Long: `Queries each replica's admin endpoint (/status) and prints one line per
replica: id, role, term, commit and applied index, open connections, client
connections and divergences found, then the most recent divergences
(connection, log index, diverging replica). A replica that does not answer
is shown as unreachable.

The replicas come from the config's [[cluster.replica]] admin addresses, or
from --admin host:port,...`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var targets []statusTarget
			switch {
			case admins != "":
				for _, a := range strings.Split(admins, ",") {
					if a = strings.TrimSpace(a); a != "" {
						targets = append(targets, statusTarget{addr: a})
					}
				}
			case cfgPath != "":
				cfg, err := configs.Load(cfgPath)
				if err != nil {
					return err
				}
				for _, r := range cfg.Cluster.Replicas {
					targets = append(targets, statusTarget{id: r.ID, addr: r.Admin})
				}
			default:
				return errors.New("give --config or --admin")
			}
			if len(targets) == 0 {
				return errors.New("no replicas to ask (the config lists no [[cluster.replica]])")
			}
			results := queryStatus(targets, timeout)
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(results)
			}
			printStatus(cmd.OutOrStdout(), results)
			for _, r := range results {
				if r.Status != nil {
					return nil
				}
			}
			return errors.New("no replica answered")
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "", "the application's config: its [[cluster.replica]] admin addresses")
	cmd.Flags().StringVar(&admins, "admin", "", "admin addresses to ask instead (host:port,...)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the answers as JSON")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "how long to wait for each replica")
	return cmd
}

type statusTarget struct {
	id   uint64
	addr string
}

type statusResult struct {
	ID     uint64        `json:"id,omitempty"`
	Admin  string        `json:"admin"`
	Status *proxy.Status `json:"status,omitempty"`
	Error  string        `json:"error,omitempty"`
}

func queryStatus(targets []statusTarget, timeout time.Duration) []statusResult {
	out := make([]statusResult, len(targets))
	client := &http.Client{Timeout: timeout}
	var wg sync.WaitGroup
	for i, t := range targets {
		out[i] = statusResult{ID: t.id, Admin: t.addr}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := fetchStatus(client, t.addr)
			if err != nil {
				out[i].Error = err.Error()
				return
			}
			out[i].Status = st
			out[i].ID = st.ID
		}()
	}
	wg.Wait()
	return out
}

func fetchStatus(client *http.Client, addr string) (*proxy.Status, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("admin address %q: %w", addr, err)
	}
	if port == "0" {
		return nil, errors.New("admin address has no fixed port (set admin in [[cluster.replica]])")
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	resp, err := client.Get("http://" + net.JoinHostPort(host, port) + "/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var st proxy.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("not a lockstep status: %w", err)
	}
	return &st, nil
}

func printStatus(w io.Writer, results []statusResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tLEADER\tTERM\tCOMMIT\tAPPLIED\tCONNECTIONS\tCLIENTS\tDIVERGENCES\tADMIN")
	for _, r := range results {
		id := "?"
		if r.ID != 0 {
			id = fmt.Sprint(r.ID)
		}
		if r.Status == nil {
			fmt.Fprintf(tw, "%s\tunreachable\t-\t-\t-\t-\t-\t-\t-\t%s (%s)\n", id, r.Admin, r.Error)
			continue
		}
		s := r.Status
		role := s.Role
		if s.Error != "" {
			role += " (failed: " + s.Error + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", id, role, s.Leader, s.Term, s.Commit, s.Applied,
			s.Connections, s.Clients, s.Divergences, r.Admin)
	}
	tw.Flush()

	// Every replica finds the same divergences (they come from the log):
	// list each once.
	type key struct{ conn, seq, replica uint64 }
	seen := map[key]bool{}
	var divs []proxy.Divergence
	for _, r := range results {
		if r.Status == nil {
			continue
		}
		for _, d := range r.Status.DivergenceList {
			k := key{d.Conn, d.Seq, d.Replica}
			if !seen[k] {
				seen[k] = true
				divs = append(divs, d)
			}
		}
	}
	if len(divs) == 0 {
		return
	}
	sort.Slice(divs, func(i, j int) bool { return divs[i].Index < divs[j].Index })
	fmt.Fprintf(w, "\nrecent divergences:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "INDEX\tCONNECTION\tCHECKPOINT\tREPLICA\tAGREEING\tLENGTH\tAGREED LENGTH")
	for _, d := range divs {
		agree := "none (no majority)"
		if len(d.Agree) > 0 {
			agree = strings.Trim(fmt.Sprint(d.Agree), "[]")
		}
		fmt.Fprintf(tw, "%d\t%x\t%d\t%d\t%s\t%d\t%d\n", d.Index, d.Conn, d.Seq, d.Replica, agree, d.Len, d.AgreeLen)
	}
	tw.Flush()
}
