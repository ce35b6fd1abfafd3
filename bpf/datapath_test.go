package bpf

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// skbCtx is the prefix of struct __sk_buff that BPF_PROG_TEST_RUN accepts.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TCIndex                                  uint32
	CB                                                                          [5]uint32
}

const (
	testSandboxID  = 7
	testRedirect   = 0x0c1e0000
	testSocketMark = 0x5a5a
)

var (
	sbxMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	gwMAC   = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	sbxIP   = netip.MustParseAddr("10.99.0.2")
	gwIP    = netip.MustParseAddr("10.99.0.1")
	sbxIP6  = netip.MustParseAddr("fd99::2")
	gwIP6   = netip.MustParseAddr("fd99::1")
	sbxLL   = netip.MustParseAddr("fe80::2")
	gwLL    = netip.MustParseAddr("fe80::1")
	remote  = netip.MustParseAddr("198.51.100.10")
	remote6 = netip.MustParseAddr("2001:db8::10")
)

type testEnv struct {
	dp         *Datapath
	nsPath     string
	ifindex    int
	ports      [4]uint16
	tcp4, tcp6 *net.TCPListener // the TCP proxy listeners of listen()
}

func newTestEnv(t *testing.T) *testEnv {
	testutil.RequireRoot(t)
	name := fmt.Sprintf("cwbpf-%d", os.Getpid())
	_ = netns.Delete(name)
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })

	root := t.TempDir()
	if err := EnsureBPFFS(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	dp, err := Load(Options{PinRoot: filepath.Join(root, "cw")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })

	env := &testEnv{dp: dp, nsPath: path}
	err = netns.Do(path, func() error {
		// This kernel has no dummy driver; a veth pair serves.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "cw0"}, PeerName: "cw1"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("cw0")
		if err != nil {
			return err
		}
		env.ifindex = l.Attrs().Index
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.PutSandbox(env.ifindex, Sandbox{
		ID: testSandboxID, MAC: sbxMAC, GatewayMAC: gwMAC,
		IPv4: sbxIP, GatewayIPv4: gwIP, IPv6: sbxIP6, GatewayIPv6: gwIP6,
		IPv6LinkLocal: sbxLL, GatewayIPv6LinkLocal: gwLL, Name: "test-sandbox",
	}); err != nil {
		t.Fatal(err)
	}
	if err := dp.PutRules(testSandboxID, 0, []RuleEntry{
		{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Proto: 6, Port: 8080, RuleID: 1, Mode: 1, Listener: ListenerTCP},
		{Prefix: netip.MustParsePrefix("198.51.100.10/32"), Proto: 6, Port: 8080, RuleID: 2, Mode: 1, Listener: ListenerTCP},
		{Prefix: netip.MustParsePrefix("2001:db8::/32"), Proto: 6, Port: 443, RuleID: 3, Mode: 1, Listener: ListenerTCP},
		{Prefix: netip.MustParsePrefix("198.51.100.10/32"), Proto: 17, Port: 9000, RuleID: 4, Mode: 1, Listener: ListenerUDP},
		{Prefix: netip.MustParsePrefix("198.51.100.20/32"), Proto: 6, Port: 8080, RuleID: 5, Mode: 1, Listener: ListenerTCP, Expires: 1},
	}); err != nil {
		t.Fatal(err)
	}
	return env
}

// listen opens marked proxy sockets (TCP v4+v6, UDP, DNS UDP) inside the
// namespace and writes their ports into the config.
func (e *testEnv) listen(t *testing.T, mark uint32) {
	t.Helper()
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		})
		if err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false) // as the proxy's listeners (a sockmap refuses MPTCP)
	err := netns.Do(e.nsPath, func() error {
		ctx := context.Background()
		tl, err := lc.Listen(ctx, "tcp4", "0.0.0.0:0")
		if err != nil {
			return err
		}
		t.Cleanup(func() { tl.Close() })
		port := tl.Addr().(*net.TCPAddr).Port
		tl6, err := lc.Listen(ctx, "tcp6", fmt.Sprintf("[::]:%d", port))
		if err != nil {
			return err
		}
		t.Cleanup(func() { tl6.Close() })
		ul, err := lc.ListenPacket(ctx, "udp4", "0.0.0.0:0")
		if err != nil {
			return err
		}
		t.Cleanup(func() { ul.Close() })
		dl, err := lc.ListenPacket(ctx, "udp4", "0.0.0.0:0")
		if err != nil {
			return err
		}
		t.Cleanup(func() { dl.Close() })
		e.ports = [4]uint16{uint16(port), uint16(ul.LocalAddr().(*net.UDPAddr).Port), uint16(dl.LocalAddr().(*net.UDPAddr).Port), 0}
		e.tcp4, e.tcp6 = tl.(*net.TCPListener), tl6.(*net.TCPListener)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.dp.SetConfig(Config{RedirectMark: testRedirect, SocketMark: testSocketMark, Ports: e.ports}); err != nil {
		t.Fatal(err)
	}
}

// run feeds one frame to the sandbox program as if the sandbox sent it.
func (e *testEnv) run(t *testing.T, frame []byte) (verdict uint32, mark uint32) {
	t.Helper()
	err := netns.Do(e.nsPath, func() error {
		in := skbCtx{Ifindex: uint32(e.ifindex)}
		// The kernel copies out its whole __sk_buff: leave room for it.
		var out struct {
			skbCtx
			Rest [64]uint32
		}
		ret, err := e.dp.SandboxProgram().Run(&ebpf.RunOptions{Data: frame, Context: in, ContextOut: &out})
		verdict, mark = ret, out.Mark
		return err
	})
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return verdict, mark
}

func (e *testEnv) counter(t *testing.T, rule uint32, v Verdict, r Reason) CounterValue {
	t.Helper()
	c, err := e.dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c[CounterKey{SandboxID: testSandboxID, RuleID: rule, Verdict: v, Reason: r}]
}

// frame builders

type frameOpts struct {
	srcMAC, dstMAC net.HardwareAddr
	src, dst       netip.Addr
	proto          layers.IPProtocol
	sport, dport   uint16
	syn, ack       bool
	payload        []byte
	fragOffset     uint16
	moreFrags      bool
	options        bool
	ipv6Next       layers.IPProtocol // extension header before L4
	hopByHop       bool              // ipv6Next is hop-by-hop (value 0)
	hopLimit       uint8
}

func build(t *testing.T, o frameOpts) []byte {
	t.Helper()
	if o.srcMAC == nil {
		o.srcMAC = sbxMAC
	}
	if o.dstMAC == nil {
		o.dstMAC = gwMAC
	}
	if o.sport == 0 {
		o.sport = 40000
	}
	eth := &layers.Ethernet{SrcMAC: o.srcMAC, DstMAC: o.dstMAC}
	var ls []gopacket.SerializableLayer
	var netLayer gopacket.NetworkLayer
	if o.src.Is4() {
		eth.EthernetType = layers.EthernetTypeIPv4
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: o.proto, SrcIP: o.src.AsSlice(), DstIP: o.dst.AsSlice(), FragOffset: o.fragOffset}
		if o.moreFrags {
			ip.Flags = layers.IPv4MoreFragments
		}
		if o.options {
			ip.Options = []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}
		}
		ls = append(ls, eth, ip)
		netLayer = ip
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		hl := o.hopLimit
		if hl == 0 {
			hl = 64
		}
		ip := &layers.IPv6{Version: 6, HopLimit: hl, NextHeader: o.proto, SrcIP: o.src.AsSlice(), DstIP: o.dst.AsSlice()}
		ls = append(ls, eth, ip)
		netLayer = ip
		if o.ipv6Next != 0 || o.hopByHop {
			ip.NextHeader = o.ipv6Next
			// next header, length 0 (8 bytes), PadN option of 4 bytes
			ls = append(ls, gopacket.Payload([]byte{byte(o.proto), 0, 1, 4, 0, 0, 0, 0}))
		}
	}
	switch o.proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(o.sport), DstPort: layers.TCPPort(o.dport), SYN: o.syn, ACK: o.ack, Window: 1000}
		_ = tcp.SetNetworkLayerForChecksum(netLayer)
		ls = append(ls, tcp)
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(o.sport), DstPort: layers.UDPPort(o.dport)}
		_ = udp.SetNetworkLayerForChecksum(netLayer)
		ls = append(ls, udp)
	case layers.IPProtocolICMPv4:
		ls = append(ls, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0)})
	}
	if o.payload != nil {
		ls = append(ls, gopacket.Payload(o.payload))
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	frame := buf.Bytes()
	if o.ipv6Next != 0 || o.hopByHop {
		// gopacket rewrites some next-header values (hop-by-hop): set it by hand.
		frame[14+6] = byte(o.ipv6Next)
	}
	return frame
}

func syn4(dst netip.Addr, port uint16) frameOpts {
	return frameOpts{src: sbxIP, dst: dst, proto: layers.IPProtocolTCP, dport: port, syn: true}
}

// arpOpts describe an ARP frame; zero values are what a Linux sandbox sends
// for its gateway: a broadcast request from its own MAC and IP, 42 bytes.
type arpOpts struct {
	op        uint16 // default 1 (request)
	htype     uint16 // default 1 (Ethernet)
	ethDst    net.HardwareAddr
	sha       net.HardwareAddr
	spa, tpa  netip.Addr
	tha       net.HardwareAddr // default zero
	trailer   []byte           // bytes after the 28-byte message
	unspecSPA bool             // sender 0.0.0.0
}

// arpFrame builds the frame byte for byte (gopacket would pad it to 60).
func arpFrame(o arpOpts) []byte {
	if o.op == 0 {
		o.op = 1
	}
	if o.htype == 0 {
		o.htype = 1
	}
	if o.ethDst == nil {
		o.ethDst = layers.EthernetBroadcast
	}
	if o.sha == nil {
		o.sha = sbxMAC
	}
	if !o.spa.IsValid() {
		o.spa = sbxIP
	}
	if !o.tpa.IsValid() {
		o.tpa = gwIP
	}
	if o.tha == nil {
		o.tha = make(net.HardwareAddr, 6)
	}
	f := make([]byte, 0, 42+len(o.trailer))
	f = append(f, o.ethDst...)
	f = append(f, o.sha...)
	f = binary.BigEndian.AppendUint16(f, 0x0806)
	f = binary.BigEndian.AppendUint16(f, o.htype)
	f = binary.BigEndian.AppendUint16(f, 0x0800)
	f = append(f, 6, 4)
	f = binary.BigEndian.AppendUint16(f, o.op)
	f = append(f, o.sha...)
	if o.unspecSPA {
		f = append(f, 0, 0, 0, 0)
	} else {
		f = append(f, o.spa.AsSlice()...)
	}
	f = append(f, o.tha...)
	f = append(f, o.tpa.AsSlice()...)
	return append(f, o.trailer...)
}

// ndOpts describe a neighbour discovery frame; zero values are what a Linux
// sandbox sends to resolve its gateway's link-local address: a multicast
// NS from its link-local address with its own MAC as SLLA.
type ndOpts struct {
	typ        uint8 // default 135 (NS)
	ethDst     net.HardwareAddr
	src, dst   netip.Addr
	target     netip.Addr // NS, NA
	reserved   uint32     // NA: flags
	opts       []byte     // default: SLLA (NS, RS) / none (NA); noOpts for none
	noOpts     bool
	hop        uint8 // default 255
	class      uint8
	flow       uint32
	trailer    []byte // bytes after the IPv6 payload
	badCsum    bool
	unspecSrc  bool
	rawPayload []byte // replaces the ICMPv6 message built from the fields above
}

func lla(typ byte, mac net.HardwareAddr) []byte { return append([]byte{typ, 1}, mac...) }

func solicited(a netip.Addr) netip.Addr {
	b := a.As16()
	return netip.AddrFrom16([16]byte{0xff, 0x02, 11: 1, 12: 0xff, 13: b[13], 14: b[14], 15: b[15]})
}

func multicastMAC(a netip.Addr) net.HardwareAddr {
	b := a.As16()
	return net.HardwareAddr{0x33, 0x33, b[12], b[13], b[14], b[15]}
}

func ndFrame(t *testing.T, o ndOpts) []byte {
	t.Helper()
	if o.typ == 0 {
		o.typ = 135
	}
	if o.hop == 0 {
		o.hop = 255
	}
	if !o.src.IsValid() {
		o.src = sbxLL
	}
	if o.unspecSrc {
		o.src = netip.IPv6Unspecified()
	}
	if !o.target.IsValid() && o.typ != 133 {
		o.target = gwLL
	}
	if !o.dst.IsValid() {
		o.dst = solicited(o.target)
		if o.typ == 133 {
			o.dst = netip.MustParseAddr("ff02::2")
		}
	}
	if o.ethDst == nil {
		o.ethDst = gwMAC
		if o.dst.IsMulticast() {
			o.ethDst = multicastMAC(o.dst)
		}
	}
	if o.opts == nil && !o.noOpts && o.typ != 136 {
		o.opts = lla(1, sbxMAC)
	}
	msg := o.rawPayload
	if msg == nil {
		msg = []byte{o.typ, 0, 0, 0}
		msg = binary.BigEndian.AppendUint32(msg, o.reserved)
		if o.typ != 133 {
			msg = append(msg, o.target.AsSlice()...)
		}
		msg = append(msg, o.opts...)
		// ICMPv6 checksum over the pseudo-header and the message.
		ph := append(append(o.src.AsSlice(), o.dst.AsSlice()...), 0, 0, 0, 0, 0, 0, 0, 58)
		binary.BigEndian.PutUint32(ph[32:], uint32(len(msg)))
		var sum uint32
		for _, b := range [][]byte{ph, msg} {
			for i := 0; i+1 < len(b); i += 2 {
				sum += uint32(b[i])<<8 | uint32(b[i+1])
			}
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		csum := ^uint16(sum)
		if o.badCsum {
			csum ^= 0x5a5a
		}
		binary.BigEndian.PutUint16(msg[2:], csum)
	}
	eth := &layers.Ethernet{SrcMAC: sbxMAC, DstMAC: o.ethDst, EthernetType: layers.EthernetTypeIPv6}
	ip := &layers.IPv6{Version: 6, TrafficClass: o.class, FlowLabel: o.flow, HopLimit: o.hop, NextHeader: layers.IPProtocolICMPv6,
		SrcIP: o.src.AsSlice(), DstIP: o.dst.AsSlice()}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, eth, ip, gopacket.Payload(msg)); err != nil {
		t.Fatal(err)
	}
	return append(append([]byte(nil), buf.Bytes()...), o.trailer...)
}

const (
	actOK   = 0
	actShot = 2
)

type matrixCase struct {
	name    string
	frame   []byte
	verdict Verdict
	reason  Reason
	rule    uint32
}

// TestClassifierMatrix runs every frame through the sandbox program with
// BPF_PROG_TEST_RUN. TEST_RUN does not mark the skb as being at tc ingress,
// so bpf_sk_assign refuses (EOPNOTSUPP): for a ptp sandbox a redirect shows
// up as an assign-failed drop, which still proves that the rule matched and
// our proxy socket was found. As a bridge port the program marks instead of
// assigning, so the full redirect verdict and mark are checked there. Real
// delivery is covered end to end in tests/.
func TestClassifierMatrix(t *testing.T) {
	for _, bridge := range []bool{false, true} {
		t.Run(map[bool]string{false: "ptp", true: "bridge-port"}[bridge], func(t *testing.T) {
			testClassifierMatrix(t, bridge)
		})
	}
}

func testClassifierMatrix(t *testing.T, bridge bool) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	if bridge {
		sb, err := env.dp.Sandbox(env.ifindex)
		if err != nil {
			t.Fatal(err)
		}
		sb.Bridge = true
		if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
			t.Fatal(err)
		}
	}

	cases := []matrixCase{
		{"allowed SYN, most specific prefix wins", build(t, syn4(remote, 8080)), VerdictRedirect, ReasonRule, 2},
		{"allowed SYN via /24", build(t, syn4(netip.MustParseAddr("198.51.100.99"), 8080)), VerdictRedirect, ReasonRule, 1},
		{"allowed IPv6 SYN", build(t, frameOpts{src: sbxIP6, dst: remote6, proto: layers.IPProtocolTCP, dport: 443, syn: true}), VerdictRedirect, ReasonRule, 3},
		{"allowed UDP", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, dport: 9000, payload: []byte("x")}), VerdictRedirect, ReasonRule, 4},
		{"DNS to any resolver", build(t, frameOpts{src: sbxIP, dst: netip.MustParseAddr("203.0.113.53"), proto: layers.IPProtocolUDP, dport: 53, payload: []byte("q")}), VerdictRedirect, ReasonDNS, 0},
		{"disallowed port", build(t, syn4(remote, 8081)), VerdictDrop, ReasonNoRule, 0},
		{"disallowed address", build(t, syn4(netip.MustParseAddr("192.0.2.1"), 8080)), VerdictDrop, ReasonNoRule, 0},
		{"UDP to a TCP rule", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, dport: 8080}), VerdictDrop, ReasonNoRule, 0},
		{"DNS over TCP without listener", build(t, syn4(remote, 53)), VerdictDrop, ReasonNoProxy, 0},
		{"expired fqdn entry", build(t, syn4(netip.MustParseAddr("198.51.100.20"), 8080)), VerdictDrop, ReasonExpired, 0},
		{"non-SYN without socket", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, dport: 8080, ack: true}), VerdictDrop, ReasonNoSocket, 0},
		{"ICMP echo", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolICMPv4}), VerdictDrop, ReasonICMP, 0},
		{"spoofed source IP", build(t, frameOpts{src: netip.MustParseAddr("10.99.0.3"), dst: remote, proto: layers.IPProtocolTCP, dport: 8080, syn: true}), VerdictDrop, ReasonSpoofedIP, 0},
		{"spoofed source MAC", build(t, frameOpts{srcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}, src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, dport: 8080, syn: true}), VerdictDrop, ReasonSpoofedMAC, 0},
		{"spoofed IPv6 source", build(t, frameOpts{src: netip.MustParseAddr("fd99::3"), dst: remote6, proto: layers.IPProtocolTCP, dport: 443, syn: true}), VerdictDrop, ReasonSpoofedIP, 0},
		{"not to the gateway MAC", build(t, frameOpts{dstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x33}, src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, dport: 8080, syn: true}), VerdictDrop, ReasonL2NotGateway, 0},
		{"first fragment", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, dport: 9000, moreFrags: true}), VerdictDrop, ReasonFragment, 0},
		{"non-first fragment", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, dport: 9000, fragOffset: 100}), VerdictDrop, ReasonFragment, 0},
		{"IP options", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, dport: 8080, syn: true, options: true}), VerdictDrop, ReasonIPOptions, 0},
		{"IPv6 destination options header", build(t, frameOpts{src: sbxIP6, dst: remote6, proto: layers.IPProtocolTCP, dport: 443, syn: true, ipv6Next: layers.IPProtocolIPv6Destination}), VerdictDrop, ReasonIPv6Ext, 0},
		{"MLD report from the sandbox's link-local address", build(t, frameOpts{dstMAC: net.HardwareAddr{0x33, 0x33, 0, 0, 0, 0x16}, src: sbxLL, dst: netip.MustParseAddr("ff02::16"), proto: layers.IPProtocolICMPv6, ipv6Next: layers.IPProtocolIPv6HopByHop, hopByHop: true}), VerdictDrop, ReasonIPv6Ext, 0},
		{"MLD report during DAD (unspecified source)", build(t, frameOpts{dstMAC: net.HardwareAddr{0x33, 0x33, 0, 0, 0, 0x16}, src: netip.IPv6Unspecified(), dst: netip.MustParseAddr("ff02::16"), proto: layers.IPProtocolICMPv6, ipv6Next: layers.IPProtocolIPv6HopByHop, hopByHop: true}), VerdictDrop, ReasonIPv6Ext, 0},
		{"TCP from the unspecified address", build(t, frameOpts{src: netip.IPv6Unspecified(), dst: remote6, proto: layers.IPProtocolTCP, dport: 443, syn: true}), VerdictDrop, ReasonSpoofedIP, 0},
		{"TCP from the link-local address", build(t, frameOpts{src: sbxLL, dst: remote6, proto: layers.IPProtocolTCP, dport: 443, syn: true}), VerdictDrop, ReasonSpoofedIP, 0},
		{"other IP protocol (SCTP)", build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolSCTP}), VerdictDrop, ReasonProtocol, 0},
		{"ICMPv6 echo", ndFrame(t, ndOpts{typ: 128, dst: gwLL, noOpts: true}), VerdictDrop, ReasonICMP, 0},
		{"IPv4 IHL below 5", func() []byte {
			f := build(t, syn4(remote, 8080))
			f[14] = 0x44
			return f
		}(), VerdictDrop, ReasonMalformed, 0},
		{"IPv4 total length beyond the frame", func() []byte {
			f := build(t, syn4(remote, 8080))
			binary.BigEndian.PutUint16(f[16:], 1400)
			return f
		}(), VerdictDrop, ReasonMalformed, 0},
		{"truncated TCP header", build(t, syn4(remote, 8080))[:14+20+8], VerdictDrop, ReasonMalformed, 0},
		{"unknown ethertype", func() []byte {
			f := build(t, syn4(remote, 8080))
			binary.BigEndian.PutUint16(f[12:], 0x88b5)
			return f
		}(), VerdictDrop, ReasonEthertype, 0},
	}
	cases = append(cases, neighbourCases(t)...)
	for _, c := range cases {
		if c.verdict == VerdictRedirect && !bridge {
			c.verdict, c.reason, c.rule = VerdictDrop, ReasonAssignFailed, 0
		}
		t.Run(c.name, func(t *testing.T) {
			before := env.counter(t, c.rule, c.verdict, c.reason)
			ret, mark := env.run(t, c.frame)
			want := uint32(actOK)
			if c.verdict == VerdictDrop {
				want = actShot
			}
			if ret != want {
				all, _ := env.dp.Counters()
				t.Fatalf("program returned %d, want %d; counters %v", ret, want, all)
			}
			after := env.counter(t, c.rule, c.verdict, c.reason)
			if after.Packets != before.Packets+1 {
				all, _ := env.dp.Counters()
				t.Fatalf("counter %v/%v rule %d: %d packets, want %d; all: %v", c.verdict, c.reason, c.rule, after.Packets, before.Packets+1, all)
			}
			if c.verdict == VerdictRedirect && mark&^0xff != testRedirect {
				t.Fatalf("redirected packet has mark %#x, want %#x|listener", mark, testRedirect)
			}
			if c.verdict != VerdictRedirect && mark != 0 {
				t.Fatalf("non-redirected packet got mark %#x", mark)
			}
		})
	}
}

// A socket that is not ours (wrong mark) must never receive sandbox traffic.
func TestForeignListenerIsNotUsed(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, 0x1234) // sockets exist on the configured ports, but unmarked
	ret, _ := env.run(t, build(t, syn4(remote, 8080)))
	if ret != actShot {
		t.Fatalf("SYN was not dropped (ret %d) although the listener is not ours", ret)
	}
	if c := env.counter(t, 0, VerdictDrop, ReasonNoProxy); c.Packets != 1 {
		t.Fatalf("no-proxy drops = %d, want 1", c.Packets)
	}
}

// With no proxy listening (daemon gone), allowed flows drop.
func TestNoProxyDrops(t *testing.T) {
	env := newTestEnv(t)
	if err := env.dp.SetConfig(Config{RedirectMark: testRedirect, SocketMark: testSocketMark, Ports: [4]uint16{15001, 15002, 15003, 15004}}); err != nil {
		t.Fatal(err)
	}
	ret, _ := env.run(t, build(t, syn4(remote, 8080)))
	if ret != actShot {
		t.Fatalf("ret %d, want drop", ret)
	}
	if c := env.counter(t, 0, VerdictDrop, ReasonNoProxy); c.Packets != 1 {
		t.Fatalf("no-proxy drops = %d, want 1", c.Packets)
	}
}

func TestUnknownInterfaceDrops(t *testing.T) {
	env := newTestEnv(t)
	if err := env.dp.DeleteSandbox(env.ifindex); err != nil {
		t.Fatal(err)
	}
	ret, _ := env.run(t, build(t, syn4(remote, 8080)))
	if ret != actShot {
		t.Fatalf("ret %d, want drop", ret)
	}
	c, _ := env.dp.Counters()
	if c[CounterKey{Verdict: VerdictDrop, Reason: ReasonUnknownSandbox}].Packets != 1 {
		t.Fatalf("unknown-sandbox drops not counted: %v", c)
	}
}

func TestDenyEventsAreReported(t *testing.T) {
	env := newTestEnv(t)
	rd, err := env.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	frame := build(t, syn4(remote, 8081))
	env.run(t, frame)
	ev, err := rd.Read()
	if err != nil {
		t.Fatal(err)
	}
	if ev.Reason != ReasonNoRule || ev.SandboxID != testSandboxID || ev.Dst != netip.AddrPortFrom(remote, 8081) || ev.Src.Addr() != sbxIP {
		t.Fatalf("unexpected event %+v", ev)
	}
	// The event samples the dropped frame from its Ethernet header: a
	// short frame whole, a long one's first DenySampleLen bytes.
	if ev.Len != uint32(len(frame)) || !bytes.Equal(ev.Sample, frame) || ev.RuleID != 0 {
		t.Fatalf("sample of a %d-byte frame: len %d, rule %d, sample %x, want %x", len(frame), ev.Len, ev.RuleID, ev.Sample, frame)
	}
	o := syn4(remote, 8082)
	o.payload = bytes.Repeat([]byte{0xa5}, 400)
	long := build(t, o)
	env.run(t, long)
	ev, err = rd.Read()
	if err != nil {
		t.Fatal(err)
	}
	if ev.Dst.Port() != 8082 || ev.Len != uint32(len(long)) || len(ev.Sample) != DenySampleLen || !bytes.Equal(ev.Sample, long[:DenySampleLen]) {
		t.Fatalf("sample of a %d-byte frame: len %d, %d bytes sampled: %x", len(long), ev.Len, len(ev.Sample), ev.Sample)
	}
}

// The verdict cache answers for a destination only under the rule epoch it
// was filled in: a new epoch makes every older verdict unreachable, and a
// cached verdict's expiry is still enforced.
func TestVerdictCacheFollowsTheEpoch(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	sb, err := env.dp.Sandbox(env.ifindex)
	if err != nil {
		t.Fatal(err)
	}
	sb.Bridge = true // the full redirect verdict (see TestClassifierMatrix)
	sb.Epoch = 100
	if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
		t.Fatal(err)
	}
	frame := build(t, syn4(remote, 8080))
	if ret, _ := env.run(t, frame); ret != actOK {
		t.Fatalf("allowed SYN: %d", ret)
	}
	// Remove the rules behind the cache's back: the epoch has not moved, so
	// the cached verdict still answers (that is what the cache is for)...
	if _, err := env.dp.DeleteRules(testSandboxID, -1); err != nil {
		t.Fatal(err)
	}
	if ret, _ := env.run(t, frame); ret != actOK {
		t.Fatalf("cached verdict not used: %d", ret)
	}
	// ...and once the epoch moves, nothing older is trusted.
	sb.Epoch = 101
	if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
		t.Fatal(err)
	}
	before := env.counter(t, 0, VerdictDrop, ReasonNoRule)
	if ret, _ := env.run(t, frame); ret != actShot {
		t.Fatalf("a stale verdict passed after the epoch moved: %d", ret)
	}
	if env.counter(t, 0, VerdictDrop, ReasonNoRule).Packets != before.Packets+1 {
		t.Fatal("drop not counted")
	}
	// A cached "no rule" is dropped without a rule lookup, and a rule added
	// under a new epoch is seen at once.
	if err := env.dp.PutRules(testSandboxID, 0, []RuleEntry{{Prefix: netip.MustParsePrefix("198.51.100.10/32"), Proto: 6, Port: 8080, RuleID: 9, Listener: ListenerTCP,
		Expires: 1}}); err != nil {
		t.Fatal(err)
	}
	sb.Epoch = 102
	if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
		t.Fatal(err)
	}
	// The entry expired long ago (1 ns after boot): cached or not, it drops.
	for i := 0; i < 2; i++ {
		if ret, _ := env.run(t, frame); ret != actShot {
			t.Fatalf("expired entry passed (run %d)", i)
		}
	}
	if c := env.counter(t, 0, VerdictDrop, ReasonExpired); c.Packets != 2 {
		t.Fatalf("expired drops = %d, want 2 (the second from the cache)", c.Packets)
	}
}

// neighbourCases: the ARP and neighbour discovery a Linux sandbox sends to
// reach its gateway passes; everything else, and in particular what one
// sandbox could use to reach another on a bridge (frames to another MAC or
// to all nodes, fields or options it chose, trailers), drops under its
// reason. peerMAC and peerLL stand for another sandbox on the bridge.
func neighbourCases(t *testing.T) []matrixCase {
	peerMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x33}
	peerLL := netip.MustParseAddr("fe80::33")
	allNodes := netip.MustParseAddr("ff02::1")
	allNodesMAC := net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
	covert := bytes.Repeat([]byte("exfiltrated "), 75) // 900 bytes
	const na, rs = 136, 133
	const flagsSO = 0x60000000
	return []matrixCase{
		// ARP: legitimate
		{"ARP request for the gateway (broadcast, 42 bytes)", arpFrame(arpOpts{}), VerdictPass, ReasonARP, 0},
		{"ARP request for the gateway (unicast probe)", arpFrame(arpOpts{ethDst: gwMAC}), VerdictPass, ReasonARP, 0},
		{"ARP reply to the gateway", arpFrame(arpOpts{op: 2, ethDst: gwMAC, tha: gwMAC}), VerdictPass, ReasonARP, 0},
		// ARP: crafted
		{"ARP broadcast with data in the target MAC", arpFrame(arpOpts{tha: net.HardwareAddr{'s', 'e', 'c', 'r', 'e', 't'}}), VerdictDrop, ReasonARPField, 0},
		{"ARP broadcast with a 900-byte trailer", arpFrame(arpOpts{trailer: covert}), VerdictDrop, ReasonTrailer, 0},
		{"ARP padded to 60 bytes with zeros", arpFrame(arpOpts{trailer: make([]byte, 18)}), VerdictDrop, ReasonTrailer, 0},
		{"ARP request to another sandbox's MAC", arpFrame(arpOpts{ethDst: peerMAC}), VerdictDrop, ReasonL2NotGateway, 0},
		{"ARP for another host", arpFrame(arpOpts{tpa: netip.MustParseAddr("10.99.0.3")}), VerdictDrop, ReasonARPNotGateway, 0},
		{"ARP reply to another sandbox", arpFrame(arpOpts{op: 2, ethDst: gwMAC, tha: peerMAC}), VerdictDrop, ReasonARPNotGateway, 0},
		{"ARP reply sent to another sandbox's MAC", arpFrame(arpOpts{op: 2, ethDst: peerMAC, tha: gwMAC}), VerdictDrop, ReasonL2NotGateway, 0},
		{"ARP with spoofed sender IP", arpFrame(arpOpts{spa: netip.MustParseAddr("10.99.0.3")}), VerdictDrop, ReasonSpoofedIP, 0},
		{"ARP with spoofed sender MAC", arpFrame(arpOpts{sha: peerMAC}), VerdictDrop, ReasonSpoofedMAC, 0},
		{"ARP probe from 0.0.0.0", arpFrame(arpOpts{unspecSPA: true}), VerdictDrop, ReasonARPField, 0},
		{"ARP with another opcode", arpFrame(arpOpts{op: 3}), VerdictDrop, ReasonARPField, 0},
		{"ARP with another hardware type", arpFrame(arpOpts{htype: 6}), VerdictDrop, ReasonARPField, 0},

		// NS: legitimate
		{"NS for the gateway's link-local address", ndFrame(t, ndOpts{}), VerdictPass, ReasonNDP, 0},
		{"NS for the gateway's global address", ndFrame(t, ndOpts{src: sbxIP6, target: gwIP6}), VerdictPass, ReasonNDP, 0},
		{"NS probing the gateway (unicast)", ndFrame(t, ndOpts{dst: gwLL}), VerdictPass, ReasonNDP, 0},
		{"NS without a link-layer option", ndFrame(t, ndOpts{noOpts: true}), VerdictPass, ReasonNDP, 0},
		// NS: crafted
		{"NS sent to another sandbox's MAC", ndFrame(t, ndOpts{ethDst: peerMAC}), VerdictDrop, ReasonL2NotGateway, 0},
		{"NS to all nodes", ndFrame(t, ndOpts{dst: allNodes}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NS for another sandbox's address", ndFrame(t, ndOpts{target: peerLL}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NS for another host", ndFrame(t, ndOpts{target: netip.MustParseAddr("fe80::9")}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NS for duplicate address detection (from ::)", ndFrame(t, ndOpts{unspecSrc: true, target: sbxLL, noOpts: true}), VerdictDrop, ReasonNDPDAD, 0},
		{"NS with hop limit 64", ndFrame(t, ndOpts{hop: 64}), VerdictDrop, ReasonNDPField, 0},
		{"NS with a flow label", ndFrame(t, ndOpts{flow: 0x12345}), VerdictDrop, ReasonNDPField, 0},
		{"NS with a traffic class", ndFrame(t, ndOpts{class: 0x2e}), VerdictDrop, ReasonNDPField, 0},
		{"NS with data in the reserved field", ndFrame(t, ndOpts{reserved: 0xc0ffee}), VerdictDrop, ReasonNDPField, 0},
		{"NS with a 900-byte trailer", ndFrame(t, ndOpts{trailer: covert}), VerdictDrop, ReasonTrailer, 0},
		{"NS with a 900-byte option", ndFrame(t, ndOpts{opts: append([]byte{200, 113, 0, 0, 0, 0, 0, 0}, covert[:896]...)}), VerdictDrop, ReasonNDPOption, 0},
		{"NS with a second option", ndFrame(t, ndOpts{opts: append(lla(1, sbxMAC), 14, 1, 1, 2, 3, 4, 5, 6)}), VerdictDrop, ReasonNDPOption, 0},
		{"NS with another MAC as SLLA", ndFrame(t, ndOpts{opts: lla(1, peerMAC)}), VerdictDrop, ReasonNDPOption, 0},
		{"NS with a wrong checksum", ndFrame(t, ndOpts{badCsum: true}), VerdictDrop, ReasonNDPChecksum, 0},
		{"NS from a spoofed address", ndFrame(t, ndOpts{src: peerLL}), VerdictDrop, ReasonSpoofedIP, 0},

		// RS: legitimate
		{"RS with the sandbox's SLLA", ndFrame(t, ndOpts{typ: rs}), VerdictPass, ReasonNDP, 0},
		{"RS from :: without options", ndFrame(t, ndOpts{typ: rs, unspecSrc: true, noOpts: true}), VerdictPass, ReasonNDP, 0},
		// RS: crafted
		{"RS sent to another sandbox's MAC", ndFrame(t, ndOpts{typ: rs, ethDst: peerMAC}), VerdictDrop, ReasonL2NotGateway, 0},
		{"RS to all nodes", ndFrame(t, ndOpts{typ: rs, dst: allNodes}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"RS with another MAC as SLLA", ndFrame(t, ndOpts{typ: rs, opts: lla(1, peerMAC)}), VerdictDrop, ReasonNDPOption, 0},
		{"RS from :: with an SLLA", ndFrame(t, ndOpts{typ: rs, unspecSrc: true}), VerdictDrop, ReasonNDPOption, 0},
		{"RS with a 900-byte trailer", ndFrame(t, ndOpts{typ: rs, trailer: covert}), VerdictDrop, ReasonTrailer, 0},
		{"RS with data in the reserved field", ndFrame(t, ndOpts{typ: rs, reserved: 7}), VerdictDrop, ReasonNDPField, 0},

		// NA: legitimate (Linux answers a multicast NS with a TLLA, a unicast one without)
		{"NA of its link-local address to the gateway", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: gwLL, reserved: flagsSO, opts: lla(2, sbxMAC)}), VerdictPass, ReasonNDP, 0},
		{"NA of its global address to the gateway", ndFrame(t, ndOpts{typ: na, src: sbxIP6, target: sbxIP6, dst: gwIP6, reserved: flagsSO}), VerdictPass, ReasonNDP, 0},
		// NA: crafted
		{"NA to all nodes", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: allNodes, ethDst: allNodesMAC, reserved: 0x20000000, opts: lla(2, sbxMAC)}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NA sent to another sandbox's MAC", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: gwLL, ethDst: peerMAC, reserved: flagsSO}), VerdictDrop, ReasonL2NotGateway, 0},
		{"NA to another sandbox's address", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: peerLL, reserved: flagsSO}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NA of the gateway's address", ndFrame(t, ndOpts{typ: na, target: gwLL, dst: gwLL, reserved: flagsSO}), VerdictDrop, ReasonNDPNotGateway, 0},
		{"NA with data in the reserved bits", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: gwLL, reserved: flagsSO | 0xbeef}), VerdictDrop, ReasonNDPField, 0},
		{"NA with another MAC as TLLA", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: gwLL, reserved: flagsSO, opts: lla(2, peerMAC)}), VerdictDrop, ReasonNDPOption, 0},
		{"NA with a 900-byte trailer", ndFrame(t, ndOpts{typ: na, target: sbxLL, dst: gwLL, reserved: flagsSO, trailer: covert}), VerdictDrop, ReasonTrailer, 0},
	}
}
