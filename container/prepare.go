package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Prepared is a server rendered for a container: its files are in
// SeedDir on the host, rendered as if they lived at Dir (the container's
// data directory, a tmpfs seeded from SeedDir at start).
type Prepared struct {
	// Args is the start command line, rendered.
	Args []string
	// Env is Config.Env (sorted) and ServerOptions.Env, KEY=VALUE,
	// without this process's environment.
	Env []string
	// Addr is where the server is reached inside the container.
	Addr string
	// Dir is the directory the files were rendered for ({{.Dir}}).
	Dir string
	// StopSignal is server.stop_signal.
	StopSignal syscall.Signal
}

// PrepareServer renders o.AppDir into o.Dir (the seed directory, on the
// host) with {{.Dir}} expanding to dir, the path the files will have
// inside the container, and renders the start command line; it starts
// nothing. It is StartServer's first half, for servers that run in an
// LXC container (StartLXC with DataDir dir and SeedDir o.Dir).
func PrepareServer(o ServerOptions, dir string) (*Prepared, error) {
	if len(o.Config.Start) == 0 {
		return nil, errors.New("container: server has no start command")
	}
	if o.Dir == "" || !filepath.IsAbs(dir) {
		return nil, errors.New("container: PrepareServer needs a seed directory and an absolute data directory")
	}
	name := o.Name
	if name == "" {
		name = filepath.Base(dir)
	}
	host, port, err := listenAddr(o)
	if err != nil {
		return nil, err
	}
	sig, err := parseSignal(o.Config.StopSignal)
	if err != nil {
		return nil, fmt.Errorf("container: server.stop_signal: %w", err)
	}
	_, lookup := serverEnv(o)
	data := newTemplateData(dir, name, host, port)
	funcs := templateFuncs(lookup)
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("container: %w", err)
	}
	if o.AppDir != "" {
		if err := renderDir(o.AppDir, o.Dir, data, funcs); err != nil {
			return nil, fmt.Errorf("container: %w", err)
		}
	}
	p := &Prepared{Addr: data.Addr, Dir: dir, StopSignal: sig, Args: make([]string, len(o.Config.Start))}
	for i, a := range o.Config.Start {
		if p.Args[i], err = renderString("start", a, data, funcs); err != nil {
			return nil, fmt.Errorf("container: server.start[%d]: %w", i, err)
		}
	}
	keys := make([]string, 0, len(o.Config.Env))
	for k := range o.Config.Env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		p.Env = append(p.Env, k+"="+o.Config.Env[k])
	}
	for _, e := range o.Env {
		if strings.Contains(e, "=") {
			p.Env = append(p.Env, e)
		}
	}
	return p, nil
}
