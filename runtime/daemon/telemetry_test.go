package daemon

import (
	"bytes"
	"net"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
)

// A dropped packet's sample keeps its headers and loses its payload,
// whatever the protocol.
func TestHeadersOnlyCutsThePayload(t *testing.T) {
	canary := []byte("CANARY-payload-0123456789")
	mac := func(b byte) net.HardwareAddr { return net.HardwareAddr{2, 0, 0, 0, 0, b} }
	v4 := func(proto layers.IPProtocol, opts ...layers.IPv4Option) *layers.IPv4 {
		return &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: net.IP{10, 0, 0, 2}, DstIP: net.IP{198, 51, 100, 10}, Options: opts}
	}
	v6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: net.ParseIP("fd00::2"), DstIP: net.ParseIP("2001:db8::10")}
	tcpOpts := &layers.TCP{SrcPort: 40000, DstPort: 9999, Seq: 1, ACK: true, PSH: true, Window: 1000,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}}
	udp := &layers.UDP{SrcPort: 40000, DstPort: 9999}
	for _, c := range []struct {
		name    string
		eth     layers.EthernetType
		ls      []gopacket.SerializableLayer
		headers int
	}{
		{"udp", layers.EthernetTypeIPv4, []gopacket.SerializableLayer{v4(layers.IPProtocolUDP), udp}, 14 + 20 + 8},
		{"tcp with options", layers.EthernetTypeIPv4, []gopacket.SerializableLayer{v4(layers.IPProtocolTCP), tcpOpts}, 14 + 20 + 32},
		{"ip options", layers.EthernetTypeIPv4, []gopacket.SerializableLayer{v4(layers.IPProtocolUDP, layers.IPv4Option{OptionType: 7, OptionLength: 7, OptionData: []byte{4, 0, 0, 0, 0}}), udp}, 14 + 28 + 8},
		{"icmp echo", layers.EthernetTypeIPv4, []gopacket.SerializableLayer{v4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 1, Seq: 1}}, 14 + 20 + 8},
		{"ipv6 udp", layers.EthernetTypeIPv6, []gopacket.SerializableLayer{v6, udp}, 14 + 40 + 8},
		{"unknown ethertype", layers.EthernetType(0x88b5), nil, 14},
	} {
		buf := gopacket.NewSerializeBuffer()
		ls := append([]gopacket.SerializableLayer{&layers.Ethernet{SrcMAC: mac(1), DstMAC: mac(2), EthernetType: c.eth}}, c.ls...)
		ls = append(ls, gopacket.Payload(canary))
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, ls...); err != nil {
			t.Fatal(c.name, err)
		}
		frame := buf.Bytes()
		got := headersOnly(frame[:min(len(frame), 128)])
		if len(got) != c.headers || bytes.Contains(got, canary[:4]) {
			t.Errorf("%s: kept %d bytes (%x), want the %d bytes of headers and no payload", c.name, len(got), got, c.headers)
		}
	}
	if got := headersOnly([]byte{1, 2, 3}); len(got) != 3 {
		t.Errorf("a runt sample: %x", got)
	}
}

// What the daemon passes on of a refusal in a flow: no path, a standard
// method or "other", and of a refused question only the policy's entry.
func TestSafeDenialAndDNS(t *testing.T) {
	d := safeDenial(proxies.Denial{Reason: "path", Status: 403, Method: "EXFILCANARY", Path: "/secret/CANARY", Detail: "rule-key"})
	if d.Path != "" || d.Method != "other" || d.Reason != "path" || d.Status != 403 || d.Detail != "rule-key" {
		t.Errorf("safeDenial: %+v", d)
	}
	if m := httpproxy.SafeMethod("DELETE"); m != "DELETE" {
		t.Errorf("SafeMethod(DELETE) = %q", m)
	}
	ev := safeDNSDenial(dnsproxy.DenyEvent{Reason: dnsproxy.ReasonNotAllowed, Name: "canary.exfil.test"})
	if ev.Name != "" {
		t.Errorf("an unlisted name passed: %+v", ev)
	}
	ev = safeDNSDenial(dnsproxy.DenyEvent{Reason: dnsproxy.ReasonQueryType, Name: "CANARY.wild.example.test", Listed: "*.wild.example.test."})
	if ev.Name != "*.wild.example.test." {
		t.Errorf("a name under a listed pattern: %+v", ev)
	}
}
