package adversarial

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// frameSniffer records every frame arriving on an interface of a sandbox.
type frameSniffer struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
}

// sniffSandbox opens an AF_PACKET socket on the sandbox's interface; frames
// that arrive after it returns are recorded.
func sniffSandbox(t *testing.T, sb *harness.Sandbox) *frameSniffer {
	t.Helper()
	s := &frameSniffer{done: make(chan struct{})}
	err := sb.Do(func() error {
		proto := int(uint16(unix.ETH_P_ALL)<<8 | uint16(unix.ETH_P_ALL)>>8) // network byte order
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		ifi, err := net.InterfaceByName(sb.IfName)
		if err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		tv := unix.Timeval{Usec: 100000}
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		s.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("sniffing in %s: %v", sb.Name, err)
	}
	go func() {
		defer close(s.done)
		buf := make([]byte, 65536)
		for {
			n, from, err := unix.Recvfrom(s.fd, buf, 0)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				return
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue // what the sandbox itself sends
			}
			s.mu.Lock()
			s.frames = append(s.frames, append([]byte(nil), buf[:n]...))
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		unix.Close(s.fd)
		<-s.done
	})
	return s
}

func (s *frameSniffer) count(match func(f []byte) bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, f := range s.frames {
		if match(f) {
			n++
		}
	}
	return n
}

// linkLocal is the IPv6 link-local address of an interface in the calling
// thread's namespace.
func linkLocal(name string) (netip.Addr, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is6() && p.Addr().IsLinkLocalUnicast() {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%s has no link-local address", name)
}

// arpRequest is a 42-byte ARP request from sha/spa for tpa, with tha in the
// target MAC field and trailer after the message.
func arpRequest(ethDst, sha net.HardwareAddr, spa, tpa netip.Addr, tha []byte, trailer []byte) []byte {
	f := append(append([]byte{}, ethDst...), sha...)
	f = append(f, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1)
	f = append(append(f, sha...), spa.AsSlice()...)
	f = append(append(f, tha...), tpa.AsSlice()...)
	return append(f, trailer...)
}

// ndMessage is an ICMPv6 neighbour discovery frame with a correct checksum:
// type, the 32-bit reserved/flags word, the target (NS, NA) and options.
func ndMessage(t *testing.T, srcMAC, ethDst net.HardwareAddr, src, dst netip.Addr, typ uint8, word uint32, target netip.Addr, opts []byte) []byte {
	t.Helper()
	msg := binary.BigEndian.AppendUint32([]byte{typ, 0, 0, 0}, word)
	if target.IsValid() {
		msg = append(msg, target.AsSlice()...)
	}
	msg = append(msg, opts...)
	ph := append(append(src.AsSlice(), dst.AsSlice()...), 0, 0, 0, 0, 0, 0, 0, 58)
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
	binary.BigEndian.PutUint16(msg[2:], ^uint16(sum))
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: ethDst, EthernetType: layers.EthernetTypeIPv6}
	ip := &layers.IPv6{Version: 6, HopLimit: 255, NextHeader: layers.IPProtocolICMPv6, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, eth, ip, gopacket.Payload(msg)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// policyCovert allows the remote's port 8080 over IPv4 and IPv6.
const policyCovert = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: covert}
spec:
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}, {cidr: "2001:db8:100::/64"}]
      ports: [{port: 8080}]
      mode: open
`

// TestBridgeCovertChannel: two sandboxes on one bridge. Sandbox A (with
// CAP_NET_RAW, as an attacker has) crafts neighbour solicitations, router
// solicitations and neighbour advertisements to B's MAC and to all nodes,
// and broadcast ARP requests with data in the target MAC field or a
// 900-byte trailer: the frames a bridge would carry to B. A sniffer inside
// B proves that none of them arrived. Two walls stand in the way: bridge
// port isolation (the daemon's) and the datapath; the counters prove the
// datapath's half on its own: every frame was dropped (a drop is the only
// thing counted under these reasons) and under its own reason, whatever
// the bridge would have done with it. Afterwards A's own kernel still
// resolves the gateway (IPv4 and IPv6 flows through the proxy work) and
// none of its ARP/ND is dropped: what a Linux sandbox needs passes.
func TestBridgeCovertChannel(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	env.TCPServer("[2001:db8:100::10]:8080")
	a := env.MustAddSandbox("cov-a", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyCovert})
	b := env.MustAddSandbox("cov-b", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyCovert})
	gwMAC, err := a.GatewayMAC()
	if err != nil {
		t.Fatal(err)
	}
	var aLL, bLL, gwLL netip.Addr
	if err := a.Do(func() (err error) { aLL, err = linkLocal(a.IfName); return err }); err != nil {
		t.Fatal(err)
	}
	if err := b.Do(func() (err error) { bLL, err = linkLocal(b.IfName); return err }); err != nil {
		t.Fatal(err)
	}
	if err := env.InNode(func() (err error) { gwLL, err = linkLocal("cwbr0"); return err }); err != nil {
		t.Fatal(err)
	}
	gw4 := netip.MustParseAddr(a.Result.IPs[0].Gateway.String())

	sniff := sniffSandbox(t, b)
	// The sniffer sees what reaches B: B's own flow through the proxy
	// brings frames from the gateway.
	if c, err := b.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err != nil {
		t.Fatalf("B's allowed flow: %v (%s)", err, d.CountersString(b))
	} else {
		c.Close()
	}
	if !harness.Eventually(3*time.Second, func() bool {
		return sniff.count(func(f []byte) bool { return bytes.Equal(f[6:12], gwMAC) }) > 0
	}) {
		t.Fatal("the sniffer in B saw no frame from the gateway: it would prove nothing")
	}

	allNodes := netip.MustParseAddr("ff02::1")
	allNodesMAC := net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
	gwSolicited := netip.AddrFrom16([16]byte{0xff, 0x02, 11: 1, 12: 0xff, 13: gwLL.As16()[13], 14: gwLL.As16()[14], 15: gwLL.As16()[15]})
	gwSolicitedMAC := net.HardwareAddr{0x33, 0x33, 0xff, gwLL.As16()[13], gwLL.As16()[14], gwLL.As16()[15]}
	slla := append([]byte{1, 1}, a.MAC...)
	tlla := append([]byte{2, 1}, a.MAC...)
	const naSolicitedOverride = 0x60000000
	covert := bytes.Repeat([]byte("exfiltrated "), 75) // 900 bytes
	attacks := []struct {
		name   string
		frame  []byte
		reason bpf.Reason
	}{
		{"NS to B's MAC", ndMessage(t, a.MAC, b.MAC, aLL, bLL, 135, 0, bLL, slla), bpf.ReasonNDPNotGateway},
		{"NS for the gateway sent to B's MAC", ndMessage(t, a.MAC, b.MAC, aLL, gwSolicited, 135, 0, gwLL, slla), bpf.ReasonL2NotGateway},
		{"NS to all nodes", ndMessage(t, a.MAC, allNodesMAC, aLL, allNodes, 135, 0, gwLL, slla), bpf.ReasonNDPNotGateway},
		{"NS for the gateway with data in the reserved field", ndMessage(t, a.MAC, gwSolicitedMAC, aLL, gwSolicited, 135, 0xc0ffee, gwLL, slla), bpf.ReasonNDPField},
		{"NS for the gateway with a 900-byte option", ndMessage(t, a.MAC, gwSolicitedMAC, aLL, gwSolicited, 135, 0, gwLL, append([]byte{200, 113, 0, 0, 0, 0, 0, 0}, covert[:896]...)), bpf.ReasonNDPOption},
		{"RS to B's MAC", ndMessage(t, a.MAC, b.MAC, aLL, bLL, 133, 0, netip.Addr{}, slla), bpf.ReasonNDPNotGateway},
		{"RS to all nodes", ndMessage(t, a.MAC, allNodesMAC, aLL, allNodes, 133, 0, netip.Addr{}, slla), bpf.ReasonNDPNotGateway},
		{"NA to B's MAC", ndMessage(t, a.MAC, b.MAC, aLL, bLL, 136, naSolicitedOverride, aLL, tlla), bpf.ReasonNDPNotGateway},
		{"NA to all nodes", ndMessage(t, a.MAC, allNodesMAC, aLL, allNodes, 136, naSolicitedOverride, aLL, tlla), bpf.ReasonNDPNotGateway},
		{"broadcast ARP with data in the target MAC", arpRequest(layers.EthernetBroadcast, a.MAC, a.IP, gw4, []byte("secret"), nil), bpf.ReasonARPField},
		{"broadcast ARP with a 900-byte trailer", arpRequest(layers.EthernetBroadcast, a.MAC, a.IP, gw4, make([]byte, 6), covert), bpf.ReasonTrailer},
		{"ARP request for the gateway sent to B's MAC", arpRequest(b.MAC, a.MAC, a.IP, gw4, make([]byte, 6), nil), bpf.ReasonL2NotGateway},
	}
	want := map[bpf.Reason]uint64{}
	before := map[bpf.Reason]uint64{}
	for _, at := range attacks {
		want[at.reason]++
	}
	for r := range want {
		before[r] = d.Counter(t, a, "drop", r.String(), "")
	}
	for _, at := range attacks {
		if err := a.Inject(at.frame); err != nil {
			t.Fatalf("%s: injecting: %v", at.name, err)
		}
	}
	counted := func() bool {
		for r, n := range want {
			if d.Counter(t, a, "drop", r.String(), "")-before[r] < n {
				return false
			}
		}
		return true
	}
	harness.Eventually(3*time.Second, counted)
	time.Sleep(200 * time.Millisecond) // let the sniffer read what may have come
	for _, at := range attacks {
		if n := sniff.count(func(f []byte) bool { return len(f) >= len(at.frame) && bytes.Equal(f[:len(at.frame)], at.frame) }); n != 0 {
			t.Errorf("%s: arrived in sandbox B (%d times)", at.name, n)
		}
	}
	if n := sniff.count(func(f []byte) bool { return bytes.Contains(f, []byte("secret")) || bytes.Contains(f, covert[:64]) }); n != 0 {
		t.Errorf("%d frames carrying A's data arrived in sandbox B", n)
	}
	for r, n := range want {
		if got := d.Counter(t, a, "drop", r.String(), "") - before[r]; got != n {
			t.Errorf("%d drops counted as %s, want %d: %s", got, r, n, d.CountersString(a))
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// What A's own kernel sends for its gateway still passes: its flows
	// through the proxy need ARP and neighbour discovery both ways.
	for _, dst := range []string{"198.51.100.10:8080", "[2001:db8:100::10]:8080"} {
		c, err := a.Dial("tcp", dst, 5*time.Second)
		if err != nil {
			t.Fatalf("A's allowed flow to %s: %v (%s)", dst, err, d.CountersString(a))
		}
		c.Write([]byte("ok"))
		if ack, err := harness.ReadAck(c, 5*time.Second); err != nil || ack != "ack:2" {
			t.Fatalf("A's round trip to %s: %q %v", dst, ack, err)
		}
		c.Close()
	}
	if d.Counter(t, a, "pass", bpf.ReasonARP.String(), "") == 0 || d.Counter(t, a, "pass", bpf.ReasonNDP.String(), "") == 0 {
		t.Fatalf("A's ARP and ND for the gateway not counted as passed: %s", d.CountersString(a))
	}
	for _, r := range []bpf.Reason{bpf.ReasonTrailer, bpf.ReasonARPField, bpf.ReasonNDPField, bpf.ReasonNDPOption, bpf.ReasonNDPChecksum, bpf.ReasonNDPDAD} {
		if got := d.Counter(t, a, "drop", r.String(), "") - before[r]; got != want[r] {
			t.Errorf("A's own kernel traffic dropped as %s (%d beyond the attacks): %s", r, got-want[r], d.CountersString(a))
		}
	}
}
