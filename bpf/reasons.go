package bpf

import "fmt"

// Verdict is the fate of a packet.
type Verdict uint8

// Verdicts as counted by the datapath.
const (
	VerdictRedirect = Verdict(datapathVerdictVERDICT_REDIRECT)
	VerdictDrop     = Verdict(datapathVerdictVERDICT_DROP)
	VerdictPass     = Verdict(datapathVerdictVERDICT_PASS)
)

func (v Verdict) String() string {
	switch v {
	case VerdictRedirect:
		return "redirect"
	case VerdictDrop:
		return "drop"
	case VerdictPass:
		return "pass"
	}
	return fmt.Sprintf("verdict-%d", uint8(v))
}

// Reason says why the datapath decided a verdict.
type Reason uint8

// Reasons, named after the C enum in datapath.h.
const (
	ReasonRule           = Reason(datapathReasonREASON_RULE)
	ReasonEstablished    = Reason(datapathReasonREASON_ESTABLISHED)
	ReasonDNS            = Reason(datapathReasonREASON_DNS)
	ReasonARP            = Reason(datapathReasonREASON_ARP)
	ReasonNDP            = Reason(datapathReasonREASON_NDP)
	ReasonUnknownSandbox = Reason(datapathReasonREASON_UNKNOWN_SANDBOX)
	ReasonSpoofedMAC     = Reason(datapathReasonREASON_SPOOFED_MAC)
	ReasonSpoofedIP      = Reason(datapathReasonREASON_SPOOFED_IP)
	ReasonARPNotGateway  = Reason(datapathReasonREASON_ARP_NOT_GATEWAY)
	ReasonNDPNotGateway  = Reason(datapathReasonREASON_NDP_NOT_GATEWAY)
	ReasonNoRule         = Reason(datapathReasonREASON_NO_RULE)
	ReasonNoProxy        = Reason(datapathReasonREASON_NO_PROXY)
	ReasonNoSocket       = Reason(datapathReasonREASON_NO_SOCKET)
	ReasonICMP           = Reason(datapathReasonREASON_ICMP)
	ReasonFragment       = Reason(datapathReasonREASON_FRAGMENT)
	ReasonIPOptions      = Reason(datapathReasonREASON_IP_OPTIONS)
	ReasonIPv6Ext        = Reason(datapathReasonREASON_IPV6EXT)
	ReasonProtocol       = Reason(datapathReasonREASON_PROTOCOL)
	ReasonEthertype      = Reason(datapathReasonREASON_ETHERTYPE)
	ReasonMalformed      = Reason(datapathReasonREASON_MALFORMED)
	ReasonExpired        = Reason(datapathReasonREASON_EXPIRED)
	ReasonAssignFailed   = Reason(datapathReasonREASON_ASSIGN_FAILED)
	ReasonL2NotGateway   = Reason(datapathReasonREASON_L2NOT_GATEWAY)
	ReasonUnclassified   = Reason(datapathReasonREASON_UNCLASSIFIED)
	ReasonTrailer        = Reason(datapathReasonREASON_TRAILER)
	ReasonARPField       = Reason(datapathReasonREASON_ARP_FIELD)
	ReasonNDPField       = Reason(datapathReasonREASON_NDP_FIELD)
	ReasonNDPOption      = Reason(datapathReasonREASON_NDP_OPTION)
	ReasonNDPDAD         = Reason(datapathReasonREASON_NDP_DAD)
	ReasonNDPChecksum    = Reason(datapathReasonREASON_NDP_CHECKSUM)
	ReasonTimeWait       = Reason(datapathReasonREASON_TIME_WAIT)
	ReasonFlowLimit      = Reason(datapathReasonREASON_FLOW_LIMIT)
	ReasonDNSLimit       = Reason(datapathReasonREASON_DNS_LIMIT)
)

var reasonNames = map[Reason]string{
	ReasonRule:           "rule",
	ReasonEstablished:    "established",
	ReasonDNS:            "dns",
	ReasonARP:            "arp",
	ReasonNDP:            "ndp",
	ReasonUnknownSandbox: "unknown-sandbox",
	ReasonSpoofedMAC:     "spoofed-mac",
	ReasonSpoofedIP:      "spoofed-ip",
	ReasonARPNotGateway:  "arp-not-gateway",
	ReasonNDPNotGateway:  "ndp-not-gateway",
	ReasonNoRule:         "no-rule",
	ReasonNoProxy:        "no-proxy",
	ReasonNoSocket:       "no-socket",
	ReasonICMP:           "icmp",
	ReasonFragment:       "fragment",
	ReasonIPOptions:      "ip-options",
	ReasonIPv6Ext:        "ipv6-extension-header",
	ReasonProtocol:       "protocol",
	ReasonEthertype:      "ethertype",
	ReasonMalformed:      "malformed",
	ReasonExpired:        "expired",
	ReasonAssignFailed:   "assign-failed",
	ReasonL2NotGateway:   "l2-not-gateway",
	ReasonUnclassified:   "unclassified",
	ReasonTrailer:        "trailer",
	ReasonARPField:       "arp-field",
	ReasonNDPField:       "ndp-field",
	ReasonNDPOption:      "ndp-option",
	ReasonNDPDAD:         "ndp-dad",
	ReasonNDPChecksum:    "ndp-checksum",
	ReasonTimeWait:       "time-wait",
	ReasonFlowLimit:      "flow-limit",
	ReasonDNSLimit:       "dns-limit",
}

func (r Reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return fmt.Sprintf("reason-%d", uint8(r))
}

// ParseReason maps a reason name back to its value.
func ParseReason(s string) (Reason, bool) {
	for r, n := range reasonNames {
		if n == s {
			return r, true
		}
	}
	return 0, false
}

// Reasons lists every named reason (for metrics and docs).
func Reasons() []Reason {
	out := make([]Reason, 0, len(reasonNames))
	for r := range reasonNames {
		out = append(out, r)
	}
	return out
}
