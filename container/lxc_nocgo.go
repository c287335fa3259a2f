//go:build !(linux && cgo)

package container

import (
	"context"
	"errors"
	"time"
)

// Without cgo (or off Linux) there are no LXC containers: liblxc is reached
// through go-lxc, which is cgo.

// ErrNoLXC is returned by StartLXC in builds without cgo.
var ErrNoLXC = errors.New("container: LXC containers need a build with cgo on Linux (liblxc through go-lxc)")

// DefaultLXCPath is where lockstep keeps its LXC containers.
const DefaultLXCPath = "/run/lockstep/lxc"

// LXCInit is LXC's minimal init.
const LXCInit = "/usr/sbin/init.lxc"

// LXCOptions describes an application container (see the cgo build).
type LXCOptions struct {
	Name, LXCPath       string
	Command, Env, Binds []string
	Cwd, Netns          string
	Veth                *LXCVeth
	DataDir, SeedDir    string
	DataSize            string
	Config              [][2]string
	LogLevel, Output    string
}

// LXCVeth is a container network device (see the cgo build).
type LXCVeth struct{ Netns, Bridge, HostName, Address, Gateway string }

// LXC is a running container (see the cgo build).
type LXC struct{}

// LXCVersion is liblxc's version ("" without cgo).
func LXCVersion() string { return "" }

// StartLXC fails without cgo.
func StartLXC(context.Context, LXCOptions) (*LXC, error) { return nil, ErrNoLXC }

// AdoptRestoredLXC fails without cgo.
func AdoptRestoredLXC(string, string, int) (*LXC, error) { return nil, ErrNoLXC }

func (*LXC) Name() string                 { return "" }
func (*LXC) InitPid() int                 { return 0 }
func (*LXC) Restored() bool               { return false }
func (*LXC) Running() bool                { return false }
func (*LXC) Stop(time.Duration) error     { return ErrNoLXC }
func (*LXC) WaitGone(time.Duration) error { return ErrNoLXC }
func (*LXC) Destroy() error               { return ErrNoLXC }

// StopLXCByName fails without cgo.
func StopLXCByName(string, string) error { return ErrNoLXC }
