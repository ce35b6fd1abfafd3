// Package netns creates, enters and removes named network namespaces, the
// way iproute2 does (a bind mount under /run/netns), so `ip netns exec`
// works on everything cleanwall makes. Entering a namespace goes through Do
// only: it locks the OS thread and lets the thread die if the original
// namespace cannot be restored.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Dir is where named namespaces are bind-mounted (as iproute2 does).
const Dir = "/run/netns"

// Path returns the bind-mount path of a named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// Do runs fn with the calling goroutine's thread in the namespace at path.
func Do(path string, fn func() error) error {
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

// Exists reports whether a named namespace exists.
func Exists(name string) bool {
	return ns.IsNSorErr(Path(name)) == nil
}

// ensureDir makes /run/netns a shared mount point, as `ip netns add` does, so
// namespace mounts propagate to other mount namespaces.
func ensureDir() error {
	if err := os.MkdirAll(Dir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", Dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("making %s shared: %w", Dir, err)
	}
	// Not a mount point yet: bind it onto itself first.
	if err := unix.Mount(Dir, Dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind-mounting %s: %w", Dir, err)
	}
	if err := unix.Mount("", Dir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("making %s shared: %w", Dir, err)
	}
	return nil
}

// Create makes a new named network namespace with its loopback up and
// returns its path. It fails if the name exists.
func Create(name string) (string, error) {
	if err := ensureDir(); err != nil {
		return "", err
	}
	path := Path(name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return "", fmt.Errorf("creating netns %s: %w", name, err)
	}
	f.Close()

	errc := make(chan error, 1)
	go func() {
		// This thread ends up in the new namespace; it is never unlocked, so
		// the runtime retires it instead of reusing it elsewhere.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind-mounting netns: %w", err)
			return
		}
		errc <- setLoopbackUp()
	}()
	if err := <-errc; err != nil {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = os.Remove(path)
		return "", fmt.Errorf("creating netns %s: %w", name, err)
	}
	return path, nil
}

func setLoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("reading lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("setting lo up: %w", err)
	}
	return nil
}

// Delete removes a named namespace; a missing one is not an error. The
// namespace itself disappears when no process or interface holds it.
func Delete(name string) error {
	path := Path(name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting netns %s: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing netns %s: %w", name, err)
	}
	return nil
}
