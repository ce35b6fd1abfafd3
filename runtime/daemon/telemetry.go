package daemon

import (
	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
)

// What the daemon logs, audits and streams to observers of a refusal
// inside a flow is the policy's words and the packet's headers, never the
// sandbox's data (docs/telemetry.md).

// safeDenial keeps of a proxy's Denial its reason, status, detail (the
// proxies fill it with policy names: a key id, a server name, a statement's
// fingerprint, a denied column) and method, an unknown method reading
// "other"; the path goes: a request path is the sandbox's data, whoever
// refused it.
func safeDenial(den proxies.Denial) proxies.Denial {
	den.Path = ""
	den.Method = httpproxy.SafeMethod(den.Method)
	return den
}

// safeDNSDenial replaces a refused question's name by the policy's entry
// it matched ("" when none): a name the policy does not list is the
// sandbox's data, and a name under a listed pattern carries the sandbox's
// labels.
func safeDNSDenial(ev dnsproxy.DenyEvent) dnsproxy.DenyEvent {
	ev.Name = ev.Listed
	return ev
}

// headersOnly cuts a dropped packet's sample (from its Ethernet header) at
// the end of its headers: Ethernet, IPv4 with its options or the fixed
// IPv6 header, then TCP with its options, UDP's or ICMP's 8 bytes; ARP's
// 28 bytes; only the Ethernet header for anything else. The datapath
// samples a fixed number of bytes, which for a small header includes
// payload: the sandbox's data never reaches observers or a capture.
func headersOnly(sample []byte) []byte {
	const eth = 14
	if len(sample) < eth {
		return sample
	}
	n := eth
	l4 := uint8(0)
	switch uint16(sample[12])<<8 | uint16(sample[13]) {
	case 0x0800: // IPv4
		if len(sample) < eth+20 {
			return sample
		}
		ihl := int(sample[eth]&0x0f) * 4
		if ihl < 20 {
			return sample[:eth]
		}
		n, l4 = eth+ihl, sample[eth+9]
		if frag := uint16(sample[eth+6]&0x1f)<<8 | uint16(sample[eth+7]); frag != 0 {
			l4 = 0 // a later fragment: no transport header
		}
	case 0x86dd: // IPv6: extension headers are not followed
		if len(sample) < eth+40 {
			return sample
		}
		n, l4 = eth+40, sample[eth+6]
	case 0x0806: // ARP
		n = eth + 28
	}
	switch l4 {
	case 6: // TCP
		if len(sample) >= n+13 {
			if off := int(sample[n+12]>>4) * 4; off >= 20 {
				n += off
			} else {
				n += 20
			}
		} else {
			n += 20
		}
	case 17, 1, 58: // UDP, ICMP, ICMPv6
		n += 8
	}
	return sample[:min(n, len(sample))]
}
