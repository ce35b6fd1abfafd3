package adversarial

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyBoth allows TCP 8080 to the remote over IPv4 and IPv6, and UDP
// 9000 over IPv4: every attack below is aimed at an allowed destination
// where it can be, so that only the trick itself is wrong.
const policyBoth = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: adversarial}
spec:
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}, {cidr: "2001:db8:100::10/128"}]
      ports: [{port: 8080}, {port: 9000, protocol: UDP}]
      mode: open
`

// datapathTarget is one topology the packet-level attacks share: a daemon,
// one sandbox with IPv4 and IPv6, and the places a leak would show up.
type datapathTarget struct {
	env     *harness.Env
	d       *harness.Daemon
	sb      *harness.Sandbox
	targets *harness.EscapeTargets
	v6      *harness.TCPServer
	udp9000 *harness.UDPServer
	gateway netip.Addr
}

func newDatapathTarget(t *testing.T) *datapathTarget {
	env := harness.New(t)
	x := &datapathTarget{env: env, d: env.StartDaemon()}
	x.targets = env.NewEscapeTargets()
	x.v6 = env.TCPServer("[2001:db8:100::10]:8080")
	x.udp9000 = env.UDPServer("198.51.100.10:9000")
	x.sb = env.MustAddSandbox("target", harness.SandboxOptions{Policy: policyBoth})
	if !x.sb.IP6.IsValid() {
		t.Fatal("the sandbox got no IPv6 address")
	}
	gw, ok := netip.AddrFromSlice(x.sb.Result.IPs[0].Gateway)
	if !ok {
		t.Fatal("no gateway")
	}
	x.gateway = gw.Unmap()
	return x
}

// spoofed is a source address of nobody's the spoofing attacks use.
var spoofed = netip.MustParseAddr("10.99.99.99")

// run performs one attack and proves it was dropped under reason (counted
// by the datapath) and that nothing of it arrived at the remote side.
func (x *datapathTarget) run(t *testing.T, reason bpf.Reason, attack func(t *testing.T)) {
	t.Helper()
	sources := []netip.Addr{x.sb.IP, x.sb.IP6, spoofed}
	seen := make([]int, len(sources))
	for i, a := range sources {
		seen[i] = x.targets.Sniff.FromSource(a)
	}
	v4conns, v6conns, udp := len(x.targets.Allowed.Conns()), len(x.v6.Conns()), len(x.udp9000.Received())
	before := x.d.Counter(t, x.sb, "drop", reason.String(), "")
	attack(t)
	if !harness.Eventually(3*time.Second, func() bool { return x.d.Counter(t, x.sb, "drop", reason.String(), "") > before }) {
		t.Fatalf("no drop counted under %q: %s", reason, x.d.CountersString(x.sb))
	}
	time.Sleep(200 * time.Millisecond) // stragglers
	for i, a := range sources {
		if n := x.targets.Sniff.FromSource(a) - seen[i]; n != 0 {
			t.Errorf("%d packets from %v reached the remote side", n, a)
		}
	}
	if len(x.targets.Allowed.Conns()) != v4conns || len(x.v6.Conns()) != v6conns {
		t.Error("a server on the allowed port got a connection")
	}
	if len(x.targets.Denied.Conns()) != 0 || len(x.targets.UDP.Received()) != 0 || len(x.udp9000.Received()) != udp {
		t.Error("a server got something")
	}
	if x.targets.MetadataConns() != 0 {
		t.Error("the node's metadata listener got a connection")
	}
}

func (x *datapathTarget) inject(t *testing.T, frames ...[]byte) {
	t.Helper()
	for _, f := range frames {
		if err := x.sb.Inject(f); err != nil {
			t.Fatal(err)
		}
	}
}

func (x *datapathTarget) ip4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: x.sb.IP.AsSlice(), DstIP: harness.RemoteIP.AsSlice()}
}

func (x *datapathTarget) ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: x.sb.IP6.AsSlice(), DstIP: harness.RemoteIP6.AsSlice()}
}

func syn(dport uint16) *layers.TCP {
	return &layers.TCP{SrcPort: 40123, DstPort: layers.TCPPort(dport), SYN: true, Window: 1024, Seq: 7}
}

// tcpBytes is a serialized TCP SYN (no checksum) for hand-built headers.
func tcpBytes(dport uint16) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b[0:], 40123)
	binary.BigEndian.PutUint16(b[2:], dport)
	b[12] = 5 << 4
	b[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(b[14:], 1024)
	return b
}

// extHeader is an 8-byte IPv6 extension header (hop-by-hop, routing,
// destination options, fragment) in front of next.
func extHeader(kind int, next layers.IPProtocol) []byte {
	h := make([]byte, 8)
	h[0] = byte(next)
	switch kind {
	case 44: // fragment: offset 0, more fragments, id 1
		h[3] = 1
		h[7] = 1
	case 43: // routing type 0 (deprecated, RFC 5095), no segments left
		h[2] = 0
	default: // hop-by-hop / destination options: PadN
		h[2], h[3] = 1, 4
	}
	return h
}

func TestDatapathAttacks(t *testing.T) {
	x := newDatapathTarget(t)
	sb := x.sb
	cases := []struct {
		name   string
		reason bpf.Reason
		attack func(t *testing.T)
	}{
		{"ipv4-first-fragment", bpf.ReasonFragment, func(t *testing.T) {
			ip := x.ip4(layers.IPProtocolTCP)
			ip.Flags = layers.IPv4MoreFragments
			x.inject(t, sb.Frame(t, nil, ip, syn(8080)))
		}},
		{"ipv4-later-fragment", bpf.ReasonFragment, func(t *testing.T) {
			ip := x.ip4(layers.IPProtocolTCP)
			ip.FragOffset = 1 // 8 bytes in: no ports to judge
			x.inject(t, sb.Frame(t, nil, ip, gopacket.Payload([]byte("exfiltrated bytes"))))
		}},
		{"ipv4-overlapping-fragments", bpf.ReasonFragment, func(t *testing.T) {
			first := x.ip4(layers.IPProtocolTCP)
			first.Flags, first.Id = layers.IPv4MoreFragments, 99
			second := x.ip4(layers.IPProtocolTCP)
			second.Id = 99 // offset 0 again: would rewrite the ports to 8081
			x.inject(t, sb.Frame(t, nil, first, syn(8080)), sb.Frame(t, nil, second, syn(8081)))
		}},
		{"ipv6-fragment-header", bpf.ReasonIPv6Ext, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip6(layers.IPProtocolIPv6Fragment), gopacket.Payload(append(extHeader(44, layers.IPProtocolTCP), tcpBytes(8080)...))))
		}},
		{"ipv6-hop-by-hop", bpf.ReasonIPv6Ext, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip6(layers.IPProtocolIPv6HopByHop), gopacket.Payload(append(extHeader(0, layers.IPProtocolTCP), tcpBytes(8080)...))))
		}},
		{"ipv6-routing-header", bpf.ReasonIPv6Ext, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip6(layers.IPProtocolIPv6Routing), gopacket.Payload(append(extHeader(43, layers.IPProtocolTCP), tcpBytes(8080)...))))
		}},
		{"ipv6-destination-options", bpf.ReasonIPv6Ext, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip6(layers.IPProtocolIPv6Destination), gopacket.Payload(append(extHeader(60, layers.IPProtocolTCP), tcpBytes(8080)...))))
		}},
		{"vlan-tag", bpf.ReasonEthertype, func(t *testing.T) {
			gw, _ := sb.GatewayMAC()
			eth := &layers.Ethernet{SrcMAC: sb.MAC, DstMAC: gw, EthernetType: layers.EthernetTypeDot1Q}
			x.inject(t, sb.Frame(t, eth, &layers.Dot1Q{VLANIdentifier: 10, Type: layers.EthernetTypeIPv4}, x.ip4(layers.IPProtocolTCP), syn(8080)))
		}},
		{"qinq", bpf.ReasonEthertype, func(t *testing.T) {
			gw, _ := sb.GatewayMAC()
			eth := &layers.Ethernet{SrcMAC: sb.MAC, DstMAC: gw, EthernetType: layers.EthernetTypeQinQ}
			x.inject(t, sb.Frame(t, eth, &layers.Dot1Q{VLANIdentifier: 20, Type: layers.EthernetTypeDot1Q},
				&layers.Dot1Q{VLANIdentifier: 10, Type: layers.EthernetTypeIPv4}, x.ip4(layers.IPProtocolTCP), syn(8080)))
		}},
		{"ipv4-options", bpf.ReasonIPOptions, func(t *testing.T) {
			ip := x.ip4(layers.IPProtocolTCP)
			ip.Options = []layers.IPv4Option{{OptionType: 7, OptionLength: 7, OptionData: []byte{4, 0, 0, 0, 0}}} // record route
			x.inject(t, sb.Frame(t, nil, ip, syn(8080)))
		}},
		{"spoofed-ipv4-source", bpf.ReasonSpoofedIP, func(t *testing.T) {
			x.inject(t, sb.SYNFrame(t, sb.MAC, spoofed, netip.AddrPortFrom(harness.RemoteIP, 8080)))
		}},
		{"spoofed-ipv6-source", bpf.ReasonSpoofedIP, func(t *testing.T) {
			ip := x.ip6(layers.IPProtocolTCP)
			ip.SrcIP = netip.MustParseAddr("fd77::99").AsSlice()
			x.inject(t, sb.Frame(t, nil, ip, syn(8080)))
		}},
		{"spoofed-mac", bpf.ReasonSpoofedMAC, func(t *testing.T) {
			x.inject(t, sb.SYNFrame(t, net.HardwareAddr{0x02, 0xde, 0xad, 0xbe, 0xef, 0x01}, sb.IP, netip.AddrPortFrom(harness.RemoteIP, 8080)))
		}},
		{"frame-to-another-mac", bpf.ReasonL2NotGateway, func(t *testing.T) {
			eth := &layers.Ethernet{SrcMAC: sb.MAC, DstMAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}, EthernetType: layers.EthernetTypeIPv4}
			x.inject(t, sb.Frame(t, eth, x.ip4(layers.IPProtocolTCP), syn(8080)))
		}},
		{"udp-broadcast", bpf.ReasonL2NotGateway, func(t *testing.T) {
			eth := &layers.Ethernet{SrcMAC: sb.MAC, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeIPv4}
			ip := x.ip4(layers.IPProtocolUDP)
			ip.DstIP = net.IPv4bcast
			udp := &layers.UDP{SrcPort: 40000, DstPort: 9000}
			x.inject(t, sb.Frame(t, eth, ip, udp, gopacket.Payload("broadcast")))
		}},
		{"gre", bpf.ReasonProtocol, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolGRE), &layers.GRE{Protocol: layers.EthernetTypeIPv4}, x.ip4(layers.IPProtocolTCP), syn(8081)))
		}},
		{"sctp", bpf.ReasonProtocol, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolSCTP), gopacket.Payload(make([]byte, 28))))
		}},
		{"esp", bpf.ReasonProtocol, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolESP), gopacket.Payload("encrypted exfiltration...")))
		}},
		{"ip-in-ip", bpf.ReasonProtocol, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolIPv4), x.ip4(layers.IPProtocolTCP), syn(8081)))
		}},
		{"ipv6-in-ipv4", bpf.ReasonProtocol, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolIPv6), x.ip6(layers.IPProtocolTCP), syn(8081)))
		}},
		{"icmpv4-echo-with-data", bpf.ReasonICMP, func(t *testing.T) {
			err := sb.Do(func() error {
				c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
				if err != nil {
					return err
				}
				defer c.Close()
				m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: 7, Seq: 1, Data: []byte("ssn 123-45-6789")}}
				b, _ := m.Marshal(nil)
				_, err = c.WriteTo(b, &net.IPAddr{IP: harness.RemoteIP.AsSlice()})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}},
		{"icmpv6-echo", bpf.ReasonICMP, func(t *testing.T) {
			ip := x.ip6(layers.IPProtocolICMPv6)
			ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeEchoRequest, 0)}
			_ = ic.SetNetworkLayerForChecksum(ip)
			x.inject(t, sb.Frame(t, nil, ip, ic, &layers.ICMPv6Echo{Identifier: 1, SeqNumber: 1}, gopacket.Payload("data")))
		}},
		{"tcp-ack-without-a-flow", bpf.ReasonNoSocket, func(t *testing.T) {
			tcp := &layers.TCP{SrcPort: 40777, DstPort: 8080, ACK: true, PSH: true, Seq: 1000, Ack: 2000, Window: 1024}
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolTCP), tcp, gopacket.Payload("data without a handshake")))
		}},
		{"tcp-source-port-zero", bpf.ReasonMalformed, func(t *testing.T) {
			tcp := syn(8080)
			tcp.SrcPort = 0
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolTCP), tcp))
		}},
		{"truncated-tcp-header", bpf.ReasonMalformed, func(t *testing.T) {
			x.inject(t, sb.Frame(t, nil, x.ip4(layers.IPProtocolTCP), gopacket.Payload(tcpBytes(8080)[:10])))
		}},
		{"tcp-to-a-denied-port", bpf.ReasonNoRule, func(t *testing.T) {
			if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 700*time.Millisecond); err == nil {
				c.Close()
				t.Error("connected to a denied port")
			}
		}},
		{"udp-to-a-tcp-only-port", bpf.ReasonNoRule, func(t *testing.T) {
			err := sb.Do(func() error {
				c, err := net.Dial("udp4", "198.51.100.10:8080")
				if err != nil {
					return err
				}
				defer c.Close()
				_, err = c.Write([]byte("exfiltrate"))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}},
		{"so-mark-redirect-mark", bpf.ReasonNoRule, func(t *testing.T) {
			err := sb.Do(func() error {
				d := net.Dialer{Timeout: 700 * time.Millisecond, Control: func(_, _ string, rc syscall.RawConn) error {
					var serr error
					_ = rc.Control(func(fd uintptr) {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, 0x0c1e0000)
					})
					return serr
				}}
				if c, err := d.Dial("tcp4", "198.51.100.10:8081"); err == nil {
					c.Close()
					t.Error("a socket carrying the redirect mark reached a denied port")
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}},
		{"metadata-address", bpf.ReasonNoRule, func(t *testing.T) {
			if c, err := sb.Dial("tcp4", harness.MetadataAddr.String(), 700*time.Millisecond); err == nil {
				c.Close()
				t.Error("reached the metadata address")
			}
		}},
		{"node-service-on-the-gateway", bpf.ReasonNoRule, func(t *testing.T) {
			var l net.Listener
			if err := x.env.InNode(func() (err error) {
				l, err = net.Listen("tcp4", "0.0.0.0:2222")
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			accepted := make(chan struct{}, 1)
			go func() {
				if c, err := l.Accept(); err == nil {
					accepted <- struct{}{}
					c.Close()
				}
			}()
			if c, err := sb.Dial("tcp4", net.JoinHostPort(x.gateway.String(), "2222"), 700*time.Millisecond); err == nil {
				c.Close()
				t.Error("reached a node service on the gateway address")
			}
			select {
			case <-accepted:
				t.Error("the node service accepted a connection")
			default:
			}
		}},
		{"dns-over-tls-port", bpf.ReasonNoRule, func(t *testing.T) {
			if c, err := sb.Dial("tcp4", "198.51.100.10:853", 700*time.Millisecond); err == nil {
				c.Close()
				t.Error("connected to 853")
			}
		}},
		{"unknown-ethertype", bpf.ReasonEthertype, func(t *testing.T) {
			gw, _ := sb.GatewayMAC()
			eth := &layers.Ethernet{SrcMAC: sb.MAC, DstMAC: gw, EthernetType: layers.EthernetType(0x88b5)} // local experimental
			x.inject(t, sb.Frame(t, eth, gopacket.Payload("a private protocol carrying data")))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { x.run(t, c.reason, c.attack) })
	}
}
