package harness

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
)

// Helpers for tests that attack a sandbox's enforcement: counters read
// through the daemon's API, frames crafted with gopacket, and the places a
// leaked packet would show up.

// Counter sums the packets of a sandbox's datapath counters with this
// verdict and reason (and rule, when not empty).
func (d *Daemon) Counter(t testing.TB, s *Sandbox, verdict, reason, rule string) uint64 {
	t.Helper()
	sb, err := d.Client().Get(Ctx(), s.ContainerID, "")
	if err != nil {
		t.Fatalf("reading counters: %v", err)
	}
	var n uint64
	for _, c := range sb.Counters {
		if c.Verdict == verdict && c.Reason == reason && (rule == "" || c.Rule == rule) {
			n += c.Packets
		}
	}
	return n
}

// CountersString renders a sandbox's counters for failure messages.
func (d *Daemon) CountersString(s *Sandbox) string {
	sb, err := d.Client().Get(Ctx(), s.ContainerID, "")
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, c := range sb.Counters {
		fmt.Fprintf(&b, "%s/%s rule=%q packets=%d; ", c.Verdict, c.Reason, c.Rule, c.Packets)
	}
	return b.String()
}

// Frame serializes layers behind an Ethernet header from the sandbox to
// its gateway (eth, when given, is used as it is), computing lengths and
// checksums.
func (s *Sandbox) Frame(t testing.TB, eth *layers.Ethernet, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	if eth == nil {
		gw, err := s.GatewayMAC()
		if err != nil {
			t.Fatal(err)
		}
		eth = &layers.Ethernet{SrcMAC: s.MAC, DstMAC: gw}
		if len(ls) > 0 {
			switch ls[0].(type) {
			case *layers.IPv6:
				eth.EthernetType = layers.EthernetTypeIPv6
			case *layers.ARP:
				eth.EthernetType = layers.EthernetTypeARP
			default:
				eth.EthernetType = layers.EthernetTypeIPv4
			}
		}
	}
	for _, l := range ls {
		if n, ok := l.(interface {
			SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
		}); ok {
			for _, nl := range ls {
				if net, ok := nl.(gopacket.NetworkLayer); ok {
					_ = n.SetNetworkLayerForChecksum(net)
					break
				}
			}
		}
	}
	buf := gopacket.NewSerializeBuffer()
	all := append([]gopacket.SerializableLayer{eth}, ls...)
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, all...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// SYNFrame is a TCP SYN from the sandbox's interface to dst, with the
// given source MAC and IP.
func (s *Sandbox) SYNFrame(t testing.TB, srcMAC net.HardwareAddr, src netip.Addr, dst netip.AddrPort) []byte {
	t.Helper()
	gw, err := s.GatewayMAC()
	if err != nil {
		t.Fatal(err)
	}
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: gw, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.Addr().AsSlice()}
	tcp := &layers.TCP{SrcPort: 40000, DstPort: layers.TCPPort(dst.Port()), SYN: true, Window: 1024, Seq: 1}
	return s.Frame(t, eth, ip, tcp)
}

// MetadataAddr stands for a cloud metadata service on the node: a sandbox
// that ever reached it would have escaped to a node service.
var MetadataAddr = netip.MustParseAddrPort("169.254.169.254:80")

// EscapeTargets are the places a leaked packet would show up: the remote's
// servers on the allowed (8080) and a denied (8081) TCP port and on UDP
// 8080, a sniffer on the remote's link, and a listener on the node's
// metadata address.
type EscapeTargets struct {
	Allowed  *TCPServer // the rule's destination: only the proxy may connect
	Denied   *TCPServer
	UDP      *UDPServer
	Sniff    *Sniffer
	metadata atomic.Int64
}

// NewEscapeTargets starts the targets.
func (e *Env) NewEscapeTargets() *EscapeTargets {
	t := e.T
	t.Helper()
	x := &EscapeTargets{
		Allowed: e.TCPServer("198.51.100.10:8080"),
		Denied:  e.TCPServer("198.51.100.10:8081"),
		UDP:     e.UDPServer("198.51.100.10:8080"),
		Sniff:   e.Sniff(),
	}
	var l net.Listener
	err := e.InNode(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: MetadataAddr.Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		l, err = net.Listen("tcp4", MetadataAddr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	e.onCleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			x.metadata.Add(1)
			c.Close()
		}
	}()
	return x
}

// MetadataConns is how many connections the node's metadata listener took.
func (x *EscapeTargets) MetadataConns() int64 { return x.metadata.Load() }

// Attempt tries every way out a crash review found open: TCP to the
// allowed and a denied port, UDP, a spoofed source, a socket carrying the
// redirect mark (SO_MARK), the node's metadata address. Each is expected
// to fail.
func (x *EscapeTargets) Attempt(t testing.TB, sb *Sandbox) {
	t.Helper()
	for _, dst := range []string{"198.51.100.10:8080", "198.51.100.10:8081", MetadataAddr.String()} {
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
	if err := sb.Inject(sb.SYNFrame(t, sb.MAC, netip.MustParseAddr("10.99.99.99"), netip.MustParseAddrPort("198.51.100.10:8080"))); err != nil {
		t.Fatal(err)
	}
}

// AssertNothingEscaped proves that nothing of the sandbox's arrived
// anywhere, after a moment for stragglers. allowedBefore is the number of
// connections the allowed server had seen (through the proxy) before.
func (x *EscapeTargets) AssertNothingEscaped(t testing.TB, sb *Sandbox, allowedBefore int) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	for _, a := range []netip.Addr{sb.IP, sb.IP6, netip.MustParseAddr("10.99.99.99")} {
		if a.IsValid() {
			if n := x.Sniff.FromSource(a); n != 0 {
				t.Errorf("%d packets from %v reached the remote side", n, a)
			}
		}
	}
	if n := len(x.Allowed.Conns()); n != allowedBefore {
		t.Errorf("the allowed destination saw %d new connections", n-allowedBefore)
	}
	if n := len(x.Denied.Conns()); n != 0 {
		t.Errorf("the denied port saw %d connections", n)
	}
	if n := len(x.UDP.Received()); n != 0 {
		t.Errorf("the UDP server received %d datagrams", n)
	}
	if n := x.MetadataConns(); n != 0 {
		t.Errorf("the node's metadata listener accepted %d connections", n)
	}
}

// RoundTrip proves the allowed flow to 198.51.100.10:8080 works (through
// the proxy), retrying for a while (after a restart, say).
func (d *Daemon) RoundTrip(t testing.TB, sb *Sandbox) {
	t.Helper()
	var c net.Conn
	ok := Eventually(10*time.Second, func() bool {
		var err error
		c, err = sb.Dial("tcp4", "198.51.100.10:8080", time.Second)
		return err == nil
	})
	if !ok {
		t.Fatalf("the allowed flow does not work\n%s", d.Log())
	}
	defer c.Close()
	c.Write([]byte("ping"))
	if ack, err := ReadAck(c, 5*time.Second); err != nil || ack != "ack:4" {
		t.Fatalf("round trip: %q %v", ack, err)
	}
}

// PinnedDrops sums a sandbox's drops in the pinned counter map (readable
// while the daemon is dead).
func (d *Daemon) PinnedDrops(t testing.TB, datapathID uint32) uint64 {
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
		if k.SandboxID == datapathID && k.Verdict == bpf.VerdictDrop {
			n += v.Packets
		}
	}
	return n
}

// WallDrops reads cleanwall_wall_drops_total of a sandbox: what the
// nftables wall dropped because no program redirected it.
func (d *Daemon) WallDrops(t testing.TB, sb *Sandbox) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	v, _ := MetricValue(m, "cleanwall_wall_drops_total", `sandbox="`+sb.ContainerID+`"`)
	return v
}

// Detachers remove a sandbox's program the ways an operator (or an
// attacker with node access) would: by removing the pins, or with
// `bpftool link detach`.
var Detachers = map[string]func(t testing.TB, d *Daemon){
	"pins-removed": func(t testing.TB, d *Daemon) {
		for _, dir := range []string{"links", "maps"} {
			entries, _ := os.ReadDir(filepath.Join(d.PinRoot, dir))
			for _, e := range entries {
				if err := os.Remove(filepath.Join(d.PinRoot, dir, e.Name())); err != nil {
					t.Fatal(err)
				}
			}
		}
	},
	"bpftool-link-detach": func(t testing.TB, d *Daemon) {
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

// TCXPrograms counts the programs attached to an interface's tcx ingress
// in the node namespace.
func (e *Env) TCXPrograms(t testing.TB, ifname string) int {
	t.Helper()
	var n int
	err := e.InNode(func() error {
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

// Curl runs Debian's curl inside the sandbox and returns the HTTP status,
// the response headers and the body.
func (s *Sandbox) Curl(t testing.TB, args ...string) (int, string, string) {
	t.Helper()
	hdr := filepath.Join(t.TempDir(), "headers")
	all := append([]string{"netns", "exec", filepath.Base(s.NS), "curl", "-sS", "-m", "5", "-D", hdr, "-o", "-", "-w", "\n%{http_code}"}, args...)
	out, err := exec.Command("ip", all...).Output()
	if err != nil && len(out) == 0 {
		t.Fatalf("curl %v: %v", args, err)
	}
	str := string(out)
	i := strings.LastIndex(str, "\n")
	code, _ := strconv.Atoi(str[i+1:])
	h, _ := os.ReadFile(hdr)
	return code, string(h), str[:i]
}

// DNSExchange sends one raw query from inside the sandbox (miekg's client:
// it checks that the answer comes from the address asked).
func (s *Sandbox) DNSExchange(resolver, name string, qtype uint16, tcp bool) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Timeout: 3 * time.Second}
	if tcp {
		c.Net = "tcp"
	}
	var conn *dns.Conn
	if err := s.Do(func() (err error) {
		conn, err = c.Dial(resolver)
		return err
	}); err != nil {
		return nil, err
	}
	defer conn.Close()
	r, _, err := c.ExchangeWithConn(m, conn)
	return r, err
}
