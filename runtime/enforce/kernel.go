package enforce

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/cleanwall/cleanwall/bpf"
)

// Datapath is the kernel datapath as the enforcer programs it: the methods
// of *bpf.Datapath it uses. runtime/fake has an in-memory one.
type Datapath interface {
	PutRules(id uint32, generation uint8, entries []bpf.RuleEntry) error
	DeleteRules(id uint32, generation int) (int, error)
	DeleteRuleEntries(id uint32, generation uint8, entries []bpf.RuleEntry) error
	SandboxRules(id uint32, generation uint8) ([]bpf.RuleEntry, error)
	LookupRule(id uint32, generation, proto uint8, addr netip.Addr, port uint16) (bpf.RuleEntry, bool, error)
	RuleSandboxIDs() []uint32

	PutSandbox(ifindex int, s bpf.Sandbox) error
	Sandbox(ifindex int) (bpf.Sandbox, error)
	Sandboxes() (map[int]bpf.Sandbox, error)
	DeleteSandbox(ifindex int) error

	Counters() (map[bpf.CounterKey]bpf.CounterValue, error)
	DeleteCounters(id uint32) error

	Attach(a bpf.Attachment, preferLegacy bool) (bpf.Attachment, error)
	Detach(a bpf.Attachment) error
	Check(a bpf.Attachment) error
	PinnedLinks() ([]string, error)
	RepinMaps() ([]string, error)

	SetFlowRate(id uint32, r bpf.FlowRate) error
	SetDNSRate(id uint32, r bpf.FlowRate) error
	SetEventRate(id uint32, r bpf.FlowRate) error
	FlowRateOf(id uint32) (bpf.FlowRate, bool, error)
	DNSRateOf(id uint32) (bpf.FlowRate, bool, error)
	EventRateOf(id uint32) (bpf.FlowRate, bool, error)
	DeleteFlowRate(id uint32) error
	FlowRateIDs() []uint32
}

var _ Datapath = (*bpf.Datapath)(nil)

// Link is a network interface as the enforcer needs it.
type Link struct {
	Name        string
	Index       int
	Type        string // "veth", "bridge", ...
	MasterIndex int    // the bridge a port belongs to, 0 when none
	MAC         net.HardwareAddr
}

// Links reaches the node namespace's interfaces (netlink) and, for its
// link-local address, a sandbox's own. runtime/fake has an in-memory one.
type Links interface {
	ByName(name string) (Link, error)
	ByIndex(index int) (Link, error)
	// SetIsolated turns bridge port isolation on or off.
	SetIsolated(index int, on bool) error
	// Isolated reads a bridge port's isolation flag.
	Isolated(index int) (bool, error)
	// LinkLocal is the first IPv6 link-local address of interface ifName
	// in the network namespace at nsPath ("": the daemon's own), if any.
	LinkLocal(nsPath, ifName string) (netip.Addr, bool)
}

// WallSandbox is what a sandbox's wall chain is built from.
type WallSandbox struct {
	ID      uint32
	Ifname  string
	Gateway []netip.Addr // the sandbox's IPv6 gateways (neighbour discovery targets)
}

// ChainName is the wall chain of a sandbox: sb_<id>_<ifname>.
func ChainName(s WallSandbox) string { return fmt.Sprintf("sb_%d_%s", s.ID, s.Ifname) }

// ChainParts splits a sandbox chain name (sb_<id>_<ifname>).
func ChainParts(name string) (id uint32, ifname string, ok bool) {
	rest, ok := strings.CutPrefix(name, "sb_")
	if !ok {
		return 0, "", false
	}
	num, ifname, ok := strings.Cut(rest, "_")
	if !ok || ifname == "" {
		return 0, "", false
	}
	n, err := strconv.ParseUint(num, 10, 32)
	return uint32(n), ifname, err == nil
}

// WallCounts are the wall's drop counters.
type WallCounts struct {
	Sandboxes  map[uint32]uint64 // packets dropped on a sandbox's interface
	Unassigned uint64            // redirected packets that reached no proxy socket
}

// Wall is the BPF-independent second wall (runtime/kernel's NFTWall).
type Wall interface {
	Install() error
	CheckNode() error
	AddSandbox(s WallSandbox) error
	RemoveSandbox(id uint32) error
	CheckSandbox(s WallSandbox) error
	SandboxChains() (map[string]uint32, error)
	Counts() (WallCounts, error)
	Remove() error
	Present() (bool, error)
}

// eui64 is the link-local address the kernel gives an interface with mac
// (when it is not configured yet).
func eui64(mac net.HardwareAddr) netip.Addr {
	if len(mac) != 6 {
		return netip.Addr{}
	}
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	b[8] = mac[0] ^ 0x02
	b[9], b[10], b[11], b[12] = mac[1], mac[2], 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}
