// Package harness builds isolated test topologies on one machine:
//
//	sandbox netns ──veth (ptp or bridge, made by the real CNI chain)── node netns ──veth── remote netns
//	                                                                   cleanwalld          servers
//
// The node namespace has no route to the machine's uplink: its only links
// are the sandboxes' veths and the veth to the remote namespace, whose
// addresses are documentation ranges (198.51.100.0/24, 2001:db8:100::/64).
// Every name carries the test process's pid and a counter; everything is
// removed in cleanup, and leftovers of killed runs are swept at start.
package harness

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// Addresses of the test topology.
var (
	NodeRemoteIP  = netip.MustParseAddr("198.51.100.1")
	RemoteIP      = netip.MustParseAddr("198.51.100.10")
	RemoteIP2     = netip.MustParseAddr("198.51.100.11")
	NodeRemoteIP6 = netip.MustParseAddr("2001:db8:100::1")
	RemoteIP6     = netip.MustParseAddr("2001:db8:100::10")
)

// Prefix is the namespace name prefix of every test namespace.
const Prefix = "cwt-"

var seq atomic.Int64

// Env is one topology: a node namespace and a remote namespace.
type Env struct {
	T        testing.TB
	Name     string // unique short name, e.g. cwt-1234-3
	Dir      string // scratch directory
	Node     string // node netns path
	Remote   string // remote netns path
	Bin      string // directory of cleanwall binaries
	CNIPaths []string
	// SandboxNet is the IPv4 subnet host-local hands sandboxes out of.
	SandboxNet  netip.Prefix
	SandboxNet6 netip.Prefix

	mu       sync.Mutex
	cleanups []func()
}

// Options tune a topology.
type Options struct {
	// Subnet index (0-255) keeps concurrent environments apart (default: pid-derived).
	Subnet int
}

// New builds the node and remote namespaces. It needs root.
func New(t testing.TB) *Env {
	t.Helper()
	testutil.RequireRoot(t)
	n := seq.Add(1)
	name := fmt.Sprintf("%s%d-%d", Prefix, os.Getpid(), n)
	e := &Env{
		T:           t,
		Name:        name,
		Dir:         t.TempDir(),
		Bin:         Binaries(t),
		CNIPaths:    []string{Binaries(t), CNIPluginDir(t)},
		SandboxNet:  netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 100+int(n%100), os.Getpid()%250)),
		SandboxNet6: netip.MustParsePrefix(fmt.Sprintf("fd77:%x:%x::/64", n%0xffff, os.Getpid()%0xffff)),
	}
	t.Cleanup(e.cleanup)
	var err error
	if e.Node, err = netns.Create(name + "-node"); err != nil {
		t.Fatal(err)
	}
	e.onCleanup(func() { _ = netns.Delete(name + "-node") })
	if e.Remote, err = netns.Create(name + "-remote"); err != nil {
		t.Fatal(err)
	}
	e.onCleanup(func() { _ = netns.Delete(name + "-remote") })
	if err := e.wire(); err != nil {
		t.Fatalf("wiring topology: %v", err)
	}
	return e
}

func (e *Env) onCleanup(f func()) {
	e.mu.Lock()
	e.cleanups = append(e.cleanups, f)
	e.mu.Unlock()
}

func (e *Env) cleanup() {
	e.mu.Lock()
	c := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	for i := len(c) - 1; i >= 0; i-- {
		c[i]()
	}
}

// wire connects node and remote with a veth pair and routes.
func (e *Env) wire() error {
	err := netns.Do(e.Node, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "to-remote"}, PeerName: "to-node"}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("veth: %w", err)
		}
		peer, err := netlink.LinkByName("to-node")
		if err != nil {
			return err
		}
		remote, err := os.Open(e.Remote)
		if err != nil {
			return err
		}
		defer remote.Close()
		if err := netlink.LinkSetNsFd(peer, int(remote.Fd())); err != nil {
			return err
		}
		l, _ := netlink.LinkByName("to-remote")
		if err := addAddr(l, NodeRemoteIP, 24); err != nil {
			return err
		}
		if err := addAddr(l, NodeRemoteIP6, 64); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		// Forwarding on: if cleanwall ever failed open, sandbox packets
		// would really reach the remote side, and the tests would see them.
		return sysctls(map[string]string{
			"net/ipv4/ip_forward":              "1",
			"net/ipv6/conf/all/forwarding":     "1",
			"net/ipv6/conf/default/accept_dad": "0",
			"net/ipv6/conf/all/accept_dad":     "0",
		})
	})
	if err != nil {
		return err
	}
	return netns.Do(e.Remote, func() error {
		l, err := netlink.LinkByName("to-node")
		if err != nil {
			return err
		}
		if err := sysctls(map[string]string{"net/ipv6/conf/all/accept_dad": "0", "net/ipv6/conf/default/accept_dad": "0", "net/ipv6/conf/to-node/accept_dad": "0"}); err != nil {
			return err
		}
		for _, a := range []netip.Addr{RemoteIP, RemoteIP2} {
			if err := addAddr(l, a, 24); err != nil {
				return err
			}
		}
		if err := addAddr(l, RemoteIP6, 64); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		// Routes back to every sandbox range: a leaked packet would be answered.
		for _, r := range []struct {
			dst netip.Prefix
			gw  netip.Addr
		}{{netip.MustParsePrefix("10.0.0.0/8"), NodeRemoteIP}, {netip.MustParsePrefix("fd00::/8"), NodeRemoteIP6}} {
			err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixToIPNet(r.dst), Gw: r.gw.AsSlice()})
			if err != nil {
				return fmt.Errorf("route %v: %w", r.dst, err)
			}
		}
		return nil
	})
}

func addAddr(l netlink.Link, a netip.Addr, bits int) error {
	addr := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(a, bits))}
	if a.Is6() {
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrAdd(l, addr); err != nil {
		return fmt.Errorf("address %v on %s: %w", a, l.Attrs().Name, err)
	}
	return nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// sysctls writes /proc/sys entries of the calling thread's namespace.
func sysctls(kv map[string]string) error {
	for k, v := range kv {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
			return fmt.Errorf("sysctl %s: %w", k, err)
		}
	}
	return nil
}

// InNode runs fn in the node namespace.
func (e *Env) InNode(fn func() error) error { return netns.Do(e.Node, fn) }

// InRemote runs fn in the remote namespace.
func (e *Env) InRemote(fn func() error) error { return netns.Do(e.Remote, fn) }

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Binaries builds cleanwall's commands once per test process and returns
// their directory.
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		binDir, err = os.MkdirTemp("", "cleanwall-bin-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/...")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/...: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("finding the module root: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// CNIPluginDir is where Debian's containernetworking-plugins live.
func CNIPluginDir(t testing.TB) string {
	t.Helper()
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		if _, err := os.Stat(filepath.Join(d, "ptp")); err == nil {
			return d
		}
	}
	testutil.Skip(t, "the CNI reference plugins are not installed (make deps installs containernetworking-plugins)")
	return ""
}

// SweepLeftovers removes namespaces of earlier test processes that died
// without cleaning up (their pid is gone).
func SweepLeftovers() {
	entries, _ := os.ReadDir(netns.Dir)
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, Prefix) {
			continue
		}
		pid, err := strconv.Atoi(strings.SplitN(strings.TrimPrefix(name, Prefix), "-", 2)[0])
		if err != nil {
			continue
		}
		if unix.Kill(pid, 0) == nil {
			continue
		}
		_ = netns.Delete(name)
	}
}

// Ctx is a background context for harness calls.
func Ctx() context.Context { return context.Background() }

// Main is the TestMain of the suites that build topologies: it sweeps the
// leftovers of killed runs and makes sure the host has a bpffs at
// /sys/fs/bpf (every systemd host mounts one at boot; this machine may
// not have), which runtimes started in a private mount namespace (ip netns
// exec) reach for their pins.
func Main(m *testing.M) {
	if os.Geteuid() == 0 {
		SweepLeftovers()
		if err := EnsureHostBPFFS(); err != nil {
			fmt.Fprintln(os.Stderr, "mounting the host's bpffs:", err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}
