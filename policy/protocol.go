package policy

import (
	"sort"
	"strconv"
	"strings"
)

// Protocol is an IP protocol number (IANA): the datapath uses it as is.
type Protocol uint8

const (
	ProtoTCP Protocol = 6
	ProtoUDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case ProtoTCP:
		return "TCP"
	case ProtoUDP:
		return "UDP"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// parseProtocol reads a ports[].protocol value: exactly TCP or UDP, and
// empty for the default, TCP.
func parseProtocol(s string) (Protocol, bool) {
	switch s {
	case "", "TCP":
		return ProtoTCP, true
	case "UDP":
		return ProtoUDP, true
	}
	return 0, false
}

// Mode is the proxy mode of an egress rule. The values are stable: the
// datapath and the proxies exchange them.
type Mode uint8

const (
	ModeOpen    Mode = 1
	ModeTrusted Mode = 2
	ModeSecure  Mode = 3
)

func (m Mode) String() string {
	switch m {
	case ModeOpen:
		return "open"
	case ModeTrusted:
		return "trusted"
	case ModeSecure:
		return "secure"
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

func parseMode(s string) (Mode, bool) {
	switch s {
	case "open":
		return ModeOpen, true
	case "trusted":
		return ModeTrusted, true
	case "secure":
		return ModeSecure, true
	}
	return 0, false
}

// PortProto is one destination port of a rule.
type PortProto struct {
	Port  uint16
	Proto Protocol
}

func (pp PortProto) String() string {
	return strconv.Itoa(int(pp.Port)) + "/" + pp.Proto.String()
}

// rrTypes are the DNS query types a policy may allow, by name (RFC 1035,
// 3596, 2782, 8659, 9460).
var rrTypes = map[string]uint16{
	"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
	"AAAA": 28, "SRV": 33, "SVCB": 64, "HTTPS": 65, "CAA": 257,
}

// defaultQueryTypes apply when spec.dns.queryTypes is absent.
var defaultQueryTypes = []string{"A", "AAAA", "CNAME"}

var rrTypeList = func() string {
	names := make([]string, 0, len(rrTypes))
	for n := range rrTypes {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return rrTypes[names[i]] < rrTypes[names[j]] })
	return strings.Join(names, ", ")
}()
