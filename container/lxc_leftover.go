//go:build linux && cgo

package container

import (
	"errors"
	"fmt"
	"time"

	lxc "github.com/lxc/go-lxc"
)

// StopLXCByName kills a container that LXC runs under name (one an earlier
// run of the caller left behind) and waits until it is gone, and removes
// its data volume, if any. A container that is not running is not an
// error.
func StopLXCByName(name, lxcpath string) error {
	if lxcpath == "" {
		lxcpath = DefaultLXCPath
	}
	c, err := lxc.NewContainer(name, lxcpath)
	if err != nil {
		return fmt.Errorf("container: lxc %s: %w", name, err)
	}
	defer c.Release()
	if !c.Running() {
		return errors.Join(removeLXCCgroups(name), OpenVolume(name).Remove())
	}
	if err := c.Stop(); err != nil && c.Running() {
		return fmt.Errorf("container: stopping lxc %s: %w", name, err)
	}
	if !c.Wait(lxc.STOPPED, 10*time.Second) {
		return fmt.Errorf("container: lxc %s did not stop", name)
	}
	return OpenVolume(name).Remove()
}
