package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrPinRootNotDurable means the pins would live on a bpffs that dies with
// the process: the kernel would drop the pinned links when it exits and
// detach enforcement from every sandbox.
var ErrPinRootNotDurable = errors.New("bpf pin root would not outlive this process")

// initRoot is the root directory of the init mount namespace, reached
// through a kernel thread (kthreadd, pid 2 in the host's pid namespace,
// always lives in the init namespaces). Variables for tests.
var (
	initRoot    = "/proc/2/root"
	initMntNS   = "/proc/2/ns/mnt"
	initComm    = "/proc/2/comm"
	selfMntNS   = "/proc/thread-self/ns/mnt"
	selfMntInfo = "/proc/thread-self/mountinfo"
)

// ResolvePinRoot returns the directory where pins under root outlive the
// calling process, creating it (and mounting a bpffs when that is safe).
//
// Pinned links are what keeps a sandbox enforced while its daemon is down.
// A bpffs that only the caller's private mount namespace holds (`ip netns
// exec` remounts /sys; `unshare -m`; a container without the host's
// /sys/fs/bpf) is unmounted by the kernel with that namespace, which
// releases the links: tcx detaches and the sandbox is open. So:
//
//   - in the init mount namespace, any bpffs lives as long as the system:
//     root is mounted when missing (EnsureBPFFS) and returned as is;
//   - in another mount namespace, root is accepted when its bpffs is the
//     same superblock the init namespace has at that path; otherwise the
//     init namespace's bpffs is used through /proc/2/root (pins made
//     there outlive us), when the host has one at root's place;
//   - without a view of the host's processes (a private pid namespace),
//     root is accepted when its bpffs mount receives propagation from
//     outside (mountinfo "master:", e.g. a hostPath volume with
//     mountPropagation HostToContainer);
//   - anything else fails with ErrPinRootNotDurable and what to do.
func ResolvePinRoot(root string) (string, error) {
	root = filepath.Clean(root)
	if !filepath.IsAbs(root) {
		return "", fmt.Errorf("bpf pin root %q: not an absolute path", root)
	}
	self, err := os.Readlink(selfMntNS)
	if err != nil {
		return "", fmt.Errorf("reading this process's mount namespace: %w", err)
	}
	if hostVisible() {
		initNS, err := os.Readlink(initMntNS)
		if err != nil {
			return "", fmt.Errorf("reading the init mount namespace: %w", err)
		}
		if self == initNS {
			if err := EnsureBPFFS(root); err != nil {
				return "", err
			}
			return root, nil
		}
		// A private mount namespace: our own view of root counts only if
		// the init namespace shows the same bpffs at the same place.
		if anc, ok := bpffsAncestor(root); ok && sameFile(anc, initRoot+anc) {
			if err := os.MkdirAll(root, 0o700); err != nil {
				return "", fmt.Errorf("creating %s: %w", root, err)
			}
			return root, nil
		}
		host := initRoot + root
		if _, ok := bpffsAncestor(host); ok {
			if err := os.MkdirAll(host, 0o700); err != nil {
				return "", fmt.Errorf("creating %s: %w", host, err)
			}
			return host, nil
		}
		return "", notDurable(root, "this process runs in a private mount namespace (e.g. under `ip netns exec`, which remounts /sys, or `unshare -m`) and the host has no bpffs at "+root)
	}
	anc, ok := bpffsAncestor(root)
	if ok && receivesPropagation(anc) {
		if err := os.MkdirAll(root, 0o700); err != nil {
			return "", fmt.Errorf("creating %s: %w", root, err)
		}
		return root, nil
	}
	return "", notDurable(root, "the host's processes are not visible (a private pid namespace) and "+root+" is not on a bpffs mounted from the host with propagation")
}

func notDurable(root, why string) error {
	return fmt.Errorf("%w: %s: %s; a bpffs that dies with this process would detach enforcement from every sandbox when it exits. "+
		"Mount a bpffs on the host (mount -t bpf bpf /sys/fs/bpf) so the pins are made there, "+
		"enter only the network namespace instead of a private mount namespace (nsenter --net=/run/netns/NODE ... rather than ip netns exec NODE ...), "+
		"or in a container mount the host's /sys/fs/bpf with mountPropagation HostToContainer or run in the host's pid namespace",
		ErrPinRootNotDurable, root, why)
}

// hostVisible reports whether pid 2 is the kernel's kthreadd, i.e. this
// process sees the host's pid namespace and can reach the init mount
// namespace through it.
func hostVisible() bool {
	b, err := os.ReadFile(initComm)
	if err != nil || strings.TrimSpace(string(b)) != "kthreadd" {
		return false
	}
	_, err = os.Readlink(initMntNS)
	return err == nil
}

// bpffsAncestor returns the nearest existing ancestor of dir (dir itself
// included) and whether it is on a bpffs.
func bpffsAncestor(dir string) (string, bool) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			return d, isBPFFS(d)
		}
		if d == "/" || d == "." {
			return "", false
		}
	}
}

func sameFile(a, b string) bool {
	var x, y unix.Stat_t
	if unix.Stat(a, &x) != nil || unix.Stat(b, &y) != nil {
		return false
	}
	return x.Dev == y.Dev && x.Ino == y.Ino
}

// receivesPropagation reports whether the mount holding dir is a slave of
// a mount elsewhere (mountinfo optional field "master:N").
func receivesPropagation(dir string) bool {
	f, err := os.Open(selfMntInfo)
	if err != nil {
		return false
	}
	defer f.Close()
	best, master := "", false
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superopts
		fields := strings.Fields(s.Text())
		if len(fields) < 7 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if !(dir == mp || mp == "/" || strings.HasPrefix(dir, mp+"/")) || len(mp) < len(best) {
			continue
		}
		best, master = mp, false
		for _, opt := range fields[6:] {
			if opt == "-" {
				break
			}
			if strings.HasPrefix(opt, "master:") {
				master = true
			}
		}
	}
	return master
}

// unescapeMountinfo undoes the octal escapes of mountinfo paths (\040 ...).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
