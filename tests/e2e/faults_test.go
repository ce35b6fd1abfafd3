package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Faults: what happens to a sandbox's enforcement when the daemon dies,
// when its programs or pins are removed under it, and across restarts.
// The invariant: nothing from the sandbox ever reaches the remote side or
// a node service; every attempt is dropped and counted somewhere (the
// pinned datapath counters, or the nftables wall's counters).

// metadataAddr stands for a cloud metadata service on the node: a sandbox
// that ever reached it would have escaped to a node service.
var metadataAddr = netip.MustParseAddrPort("169.254.169.254:80")

// escapeTargets are the places a leaked packet would show up.
type escapeTargets struct {
	env      *harness.Env
	allowed  *harness.TCPServer // the rule's destination: only the proxy may connect
	denied   *harness.TCPServer
	udp      *harness.UDPServer
	sniff    *harness.Sniffer
	metadata atomic.Int64 // connections the node's metadata listener accepted
}

func newEscapeTargets(t *testing.T, env *harness.Env) *escapeTargets {
	t.Helper()
	e := &escapeTargets{env: env,
		allowed: env.TCPServer("198.51.100.10:8080"),
		denied:  env.TCPServer("198.51.100.10:8081"),
		udp:     env.UDPServer("198.51.100.10:8080"),
		sniff:   env.Sniff(),
	}
	var l net.Listener
	err := env.InNode(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: metadataAddr.Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		l, err = net.Listen("tcp4", metadataAddr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			e.metadata.Add(1)
			c.Close()
		}
	}()
	return e
}

// attempt tries every way out the review found open after a crash: TCP to
// the allowed and a denied port, UDP, a spoofed source, a socket carrying
// the redirect mark (SO_MARK), the node's metadata address. Each attempt
// is expected to fail.
func (e *escapeTargets) attempt(t *testing.T, sb *harness.Sandbox) {
	t.Helper()
	for _, dst := range []string{"198.51.100.10:8080", "198.51.100.10:8081", metadataAddr.String()} {
		if c, err := sb.Dial("tcp4", dst, 700*time.Millisecond); err == nil {
			c.Close()
			t.Errorf("a TCP connection to %s succeeded", dst)
		}
	}
	err := sb.Do(func() error {
		c, err := net.Dial("udp4", "198.51.100.10:8080")
		if err != nil {
			return err
		}
		defer c.Close()
		for i := 0; i < 3; i++ {
			_, _ = c.Write([]byte("exfiltrate"))
		}
		// A socket marked like a redirected packet (SO_MARK needs
		// CAP_NET_ADMIN in the sandbox, which a root sandbox has).
		d := net.Dialer{Timeout: 700 * time.Millisecond, Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			_ = rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, 0x0c1e0000) })
			return serr
		}}
		if mc, err := d.Dial("tcp4", "198.51.100.10:8081"); err == nil {
			mc.Close()
			t.Error("a connection with the redirect mark set in the sandbox succeeded")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sb.Inject(synFrame(t, sb, sb.MAC, netip.MustParseAddr("10.99.99.99"))); err != nil {
		t.Fatal(err)
	}
}

// assertNothingEscaped proves that nothing of the sandbox's arrived
// anywhere, after a moment for stragglers.
func (e *escapeTargets) assertNothingEscaped(t *testing.T, sb *harness.Sandbox, allowedBefore int) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	for _, a := range []netip.Addr{sb.IP, sb.IP6, netip.MustParseAddr("10.99.99.99")} {
		if a.IsValid() {
			if n := e.sniff.FromSource(a); n != 0 {
				t.Errorf("%d packets from %v reached the remote side", n, a)
			}
		}
	}
	if n := len(e.allowed.Conns()); n != allowedBefore {
		t.Errorf("the allowed destination saw %d new connections", n-allowedBefore)
	}
	if n := len(e.denied.Conns()); n != 0 {
		t.Errorf("the denied port saw %d connections", n)
	}
	if n := len(e.udp.Received()); n != 0 {
		t.Errorf("the UDP server received %d datagrams", n)
	}
	if n := e.metadata.Load(); n != 0 {
		t.Errorf("the node's metadata listener accepted %d connections", n)
	}
}

// sandboxDrops sums a sandbox's drops in the pinned counter map.
func sandboxDrops(t *testing.T, d *harness.Daemon, sb *harness.Sandbox, id uint32) uint64 {
	t.Helper()
	dp, err := bpf.OpenPinned(d.PinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for k, v := range c {
		if k.SandboxID == id && k.Verdict == bpf.VerdictDrop {
			n += v.Packets
		}
	}
	return n
}

// roundTrip proves the allowed flow works (through the proxy).
func roundTrip(t *testing.T, sb *harness.Sandbox, d *harness.Daemon) {
	t.Helper()
	var c net.Conn
	ok := harness.Eventually(10*time.Second, func() bool {
		var err error
		c, err = sb.Dial("tcp4", "198.51.100.10:8080", time.Second)
		return err == nil
	})
	if !ok {
		t.Fatalf("the allowed flow does not work\n%s", d.Log())
	}
	defer c.Close()
	c.Write([]byte("ping"))
	if ack, err := harness.ReadAck(c, 5*time.Second); err != nil || ack != "ack:4" {
		t.Fatalf("round trip: %q %v", ack, err)
	}
}

// TestFailClosedAfterSIGKILL: SIGKILL of the daemon started each supported
// way leaves the sandbox enforced. Under `ip netns exec` (a private mount
// namespace without /sys/fs/bpf) the daemon used to mount a bpffs of its
// own there: SIGKILL dropped the mount, the links were released, tcx
// detached, and the sandbox reached the remote on every port.
func TestFailClosedAfterSIGKILL(t *testing.T) {
	for _, launch := range []harness.Launch{harness.LaunchEnterNetns, harness.LaunchIPNetnsExec, harness.LaunchOwnMountNS} {
		t.Run(launch.String(), func(t *testing.T) {
			env := harness.New(t)
			o := harness.DaemonOptions{Launch: launch}
			if launch != harness.LaunchEnterNetns {
				o.PinRoot = "/sys/fs/bpf/" + env.Name
			}
			d := env.StartDaemonWith(o)
			targets := newEscapeTargets(t, env)
			sb := env.MustAddSandbox("crash", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
			roundTrip(t, sb, d)
			info, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
			if err != nil {
				t.Fatal(err)
			}
			before := len(targets.allowed.Conns())

			d.Kill()
			if _, err := os.Stat(filepath.Join(d.PinRoot, "links")); err != nil {
				// Show what that means before failing: the sandbox is open.
				t.Errorf("the link pins did not outlive the daemon: %v", err)
				targets.attempt(t, sb)
				targets.assertNothingEscaped(t, sb, before)
				t.FailNow()
			}
			drops := sandboxDrops(t, d, sb, info.DatapathID)
			targets.attempt(t, sb)
			targets.assertNothingEscaped(t, sb, before)
			if after := sandboxDrops(t, d, sb, info.DatapathID); after <= drops {
				t.Errorf("the attempts were not counted as drops (%d before, %d after)", drops, after)
			}

			if err := d.TryStart(); err != nil {
				t.Fatal(err)
			}
			if err := sb.Check(); err != nil {
				t.Fatalf("CHECK after restart: %v", err)
			}
			roundTrip(t, sb, d)
		})
	}
}

// TestDaemonRefusesPinsThatDieWithIt: where no bpffs that outlives the
// daemon can be had, it refuses to start and says how to run it.
func TestDaemonRefusesPinsThatDieWithIt(t *testing.T) {
	env := harness.New(t)
	t.Run("ip-netns-exec-without-host-bpffs", func(t *testing.T) {
		plain := filepath.Join("/run", env.Name+"-plain")
		if err := os.MkdirAll(plain, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(plain) })
		d := env.NewDaemon(harness.DaemonOptions{Launch: harness.LaunchIPNetnsExec, PinRoot: filepath.Join(plain, "bpf")})
		err := d.TryStart()
		if err == nil {
			d.Stop()
			t.Fatal("cleanwalld started with pins on a bpffs private to its mount namespace")
		}
		var se *harness.StartError
		if !errors.As(err, &se) || !strings.Contains(se.Log, "would not outlive") || !strings.Contains(se.Log, "nsenter --net=") {
			t.Fatalf("want a refusal that says how to run it, got: %v", err)
		}
	})
	t.Run("own-bpffs-in-a-private-mount-namespace", func(t *testing.T) {
		dir := filepath.Join(env.Dir, "private-bpf")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf("mount -t bpf bpf %s && exec nsenter --net=%s %s --socket %s --bpf-root %s --state-dir %s --audit-log -",
			dir, env.Node, filepath.Join(env.Bin, "cleanwalld"), filepath.Join(env.Dir, "private.sock"), dir, filepath.Join(env.Dir, "private-state"))
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		select {
		case err := <-exited:
			if err == nil || !strings.Contains(out.String(), "would not outlive") {
				t.Fatalf("want the pin root refused, got %v:\n%s", err, out.String())
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Fatalf("cleanwalld runs with pins on its own private bpffs:\n%s", out.String())
		}
	})
}

// detach removes a sandbox's program the ways an operator (or an attacker
// with node access) would.
var detachWays = map[string]func(t *testing.T, d *harness.Daemon, sb *harness.Sandbox){
	"pins-removed": func(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) {
		for _, dir := range []string{"links", "maps"} {
			entries, _ := os.ReadDir(filepath.Join(d.PinRoot, dir))
			for _, e := range entries {
				if err := os.Remove(filepath.Join(d.PinRoot, dir, e.Name())); err != nil {
					t.Fatal(err)
				}
			}
		}
	},
	"bpftool-link-detach": func(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) {
		entries, _ := os.ReadDir(filepath.Join(d.PinRoot, "links"))
		n := 0
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "sandbox-") {
				out, err := exec.Command("bpftool", "link", "detach", "pinned", filepath.Join(d.PinRoot, "links", e.Name())).CombinedOutput()
				if err != nil {
					t.Fatalf("bpftool link detach: %v\n%s", err, out)
				}
				n++
			}
		}
		if n == 0 {
			t.Fatal("no sandbox link pinned")
		}
	},
}

// tcxPrograms counts the programs attached to an interface's tcx ingress.
func tcxPrograms(t *testing.T, env *harness.Env, ifname string) int {
	t.Helper()
	var n int
	err := env.InNode(func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		n = len(res.Programs)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSecondWallHoldsWithoutPrograms: with the sandbox's program gone and
// the watchdog held back, the nftables wall alone keeps everything in:
// nothing reaches the remote or a node service, and the wall counts it.
func TestSecondWallHoldsWithoutPrograms(t *testing.T) {
	for way, detach := range detachWays {
		t.Run(way, func(t *testing.T) {
			env := harness.New(t)
			d := env.StartDaemon("--watchdog-interval", "1h")
			targets := newEscapeTargets(t, env)
			sb := env.MustAddSandbox("bare", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
			roundTrip(t, sb, d)
			before := len(targets.allowed.Conns())

			detach(t, d, sb)
			if !harness.Eventually(2*time.Second, func() bool { return tcxPrograms(t, env, sb.HostVeth()) == 0 }) {
				t.Fatalf("the program is still attached after %s", way)
			}
			if err := sb.Check(); err == nil {
				t.Error("CNI CHECK passes with the program gone")
			}
			wallBefore := wallDrops(t, d, sb)
			targets.attempt(t, sb)
			targets.assertNothingEscaped(t, sb, before)
			if after := wallDrops(t, d, sb); after <= wallBefore {
				t.Errorf("the wall counted no drops (%v before, %v after)", wallBefore, after)
			}
		})
	}
}

// wallDrops reads cleanwall_wall_drops_total of a sandbox.
func wallDrops(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	v, _ := harness.MetricValue(m, "cleanwall_wall_drops_total", `sandbox="`+sb.ContainerID+`"`)
	return v
}

// TestWatchdogRepairs: what is removed under a running daemon is put back
// within the watchdog's interval (1 s by default): the program, the link
// and map pins, the sandbox's nftables chain, bridge port isolation.
func TestWatchdogRepairs(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("heal", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyOpen, NoIPv6: true})
	roundTrip(t, sb, d)
	info, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}

	detachWays["pins-removed"](t, d, sb)
	err = env.InNode(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyNetdev)
		if err != nil {
			return err
		}
		for _, ch := range chains {
			if strings.HasPrefix(ch.Name, fmt.Sprintf("sb_%d_", info.DatapathID)) {
				c.DelChain(ch)
			}
		}
		if err := c.Flush(); err != nil {
			return err
		}
		l, err := netlink.LinkByName(sb.HostVeth())
		if err != nil {
			return err
		}
		return netlink.LinkSetIsolated(l, false)
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if !harness.Eventually(5*time.Second, func() bool { return sb.Check() == nil }) {
		t.Fatalf("not repaired within 5 s: CHECK says %v\n%s", sb.Check(), d.Log())
	}
	t.Logf("repaired %v after the removal", time.Since(start).Round(time.Millisecond))
	for _, m := range []string{bpf.MapRules, bpf.MapSandboxes, bpf.MapCounters} {
		if _, err := os.Stat(filepath.Join(d.PinRoot, "maps", m)); err != nil {
			t.Errorf("map pin %s not restored: %v", m, err)
		}
	}
	metrics, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, what := range []string{"attachment", "wall", "port-isolation", "map-pin"} {
		if v, _ := harness.MetricValue(metrics, "cleanwall_repairs_total", `what="`+what+`"`); v < 1 {
			t.Errorf("cleanwall_repairs_total{what=%q} = %v", what, v)
		}
	}
	if n := tcxPrograms(t, env, sb.HostVeth()); n != 1 {
		t.Errorf("%d programs on the sandbox's interface, want 1", n)
	}
	roundTrip(t, sb, d)
}

// TestTwentyRestarts: 20 restarts in a row (SIGTERM and SIGKILL in turn)
// while the sandbox keeps trying: no duplicate links, the allowed flow
// recovers after each, and nothing passes meanwhile.
func TestTwentyRestarts(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	targets := newEscapeTargets(t, env)
	sb := env.MustAddSandbox("restarts", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	roundTrip(t, sb, d)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a sandbox that keeps trying the denied port and UDP
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 200*time.Millisecond); err == nil {
				c.Close()
			}
			_ = sb.Do(func() error {
				c, err := net.Dial("udp4", "198.51.100.10:8080")
				if err == nil {
					_, _ = c.Write([]byte("x"))
					c.Close()
				}
				return nil
			})
		}
	}()
	for i := 0; i < 20; i++ {
		if i%2 == 0 {
			d.Kill()
		} else {
			d.Stop()
		}
		if err := d.TryStart(); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		roundTrip(t, sb, d)
	}
	close(stop)
	wg.Wait()
	if n := tcxPrograms(t, env, sb.HostVeth()); n != 1 {
		t.Errorf("%d programs attached to the sandbox's interface after 20 restarts, want 1", n)
	}
	// Every connection the allowed server saw came from the proxy.
	for _, c := range targets.allowed.Conns() {
		if c.From.Addr() != harness.NodeRemoteIP {
			t.Errorf("the allowed server saw a connection from %v", c.From)
		}
	}
	targets.assertNothingEscaped(t, sb, len(targets.allowed.Conns()))
}
