// Package dispatch hands each flow the datapath redirected to the privacy
// proxy that serves it. For every accepted connection (TCP) or new
// (sandbox address, destination) pair (UDP) it finds the sandbox by source
// address, admits the flow under the sandbox's limits, decides its rule
// from the kernel's own rule map (so the proxy decides exactly what the
// datapath decided, learnt fqdn entries and expiry included), registers it
// with the sandbox for revocation, and calls the proxy registered for the
// rule's (mode, protocol) in the proxies.Registry. A flow that cannot be
// decided, admitted or served is reset and counted, never forwarded
// another way. DNS (every port-53 flow) goes to the proxy of
// proxies.DNSKey. It knows no proxy by type.
package dispatch

import (
	"net/netip"
	"slices"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Datapath is what dispatch asks of the kernel.
type Datapath interface {
	LookupRule(id uint32, generation, proto uint8, addr netip.Addr, port uint16) (bpf.RuleEntry, bool, error)
	// NoteUDPFlow and ForgetUDPFlow tell the datapath which UDP flows a
	// relay holds: their datagrams do not pay the new-flow budget.
	NoteUDPFlow(id uint32, src, dst netip.AddrPort) error
	ForgetUDPFlow(id uint32, src, dst netip.AddrPort) error
}

// Refusal says why a flow was refused (the flows metric's result, the
// audit record's reason); "" means it was not.
type Refusal string

const (
	RefuseUnknownSource Refusal = "unknown-source"  // no sandbox has the source address
	RefuseNoRule        Refusal = "no-rule"         // the active generation has no rule for the destination
	RefuseExpired       Refusal = "expired"         // the learnt fqdn entry has expired
	RefuseNoProxy       Refusal = "no-proxy"        // no proxy is registered for the rule (never after policy check)
	RefuseDeleted       Refusal = "sandbox-deleted" // the sandbox is being deleted
)

// Decision is what a flow falls under.
type Decision struct {
	// Sandbox is nil only with RefuseUnknownSource.
	Sandbox *sandbox.Sandbox
	// Rule is the rule the kernel's entry names, resolved with the policy
	// of the generation slot it was read from (Compiled).
	Rule     *policy.Rule
	Compiled *policy.Compiled
	// Key is the proxy's registry key, Config its configuration of Rule.
	Key    proxies.Key
	Config any
	// Learnt: the kernel entry was learnt through DNS (an fqdn
	// destination), not written from a cidr.
	Learnt bool
	// Record is the sandbox record the decision was taken under.
	Record  *sandbox.Record
	Refusal Refusal
}

// Decide finds what a flow from src to dst falls under, by asking the
// kernel's rule map (the active generation). If the policy flipped since
// the packet was classified, the newer policy decides, which can only
// close flows.
//
// The active generation's slot comes from the sandbox's record, read under
// its lock, rather than from a second system call reading the sandbox's
// kernel entry: they are the same value. Only the daemon writes that
// entry, and every write of a registered sandbox's entry happens under
// the sandbox's lock with the record's generation (enforce.Flip, the rule
// epoch bumps of fqdn learning); admission writes it before the sandbox is
// registered, and teardown deletes the entry and then the rules of both
// slots, so a flow looked up after that finds no rule.
func (d *Dispatcher) Decide(s *sandbox.Sandbox, dst netip.AddrPort, proto policy.Protocol) Decision {
	s.Lock()
	rec := s.Rec
	slot := uint8(rec.Generation % 2)
	compiled := s.Slots[slot]
	configs := s.Configs
	s.Unlock()
	dec := Decision{Sandbox: s, Record: rec, Compiled: compiled}
	e, ok, err := d.DP.LookupRule(s.ID, slot, uint8(proto), dst.Addr().Unmap(), dst.Port())
	if err != nil || !ok {
		dec.Refusal = RefuseNoRule
		return dec
	}
	dec.Learnt = e.Expires != 0
	if dec.Learnt && e.Expires <= sandbox.MonotonicNow() {
		dec.Refusal = RefuseExpired
		return dec
	}
	if compiled == nil {
		dec.Refusal = RefuseNoRule
		return dec
	}
	if dec.Rule = compiled.Rule(e.RuleID); dec.Rule == nil {
		dec.Refusal = RefuseNoRule
		return dec
	}
	transport := "tcp"
	if proto == policy.ProtoUDP {
		transport = "udp"
	}
	dec.Key = proxies.KeyOf(dec.Rule, transport)
	var configured bool
	dec.Config, configured = configs[proxies.RuleTransport{Rule: dec.Rule, Transport: transport}]
	if !configured {
		dec.Refusal = RefuseNoProxy
	}
	return dec
}

// hosts lists the names a flow's destination may be called by (the Host
// an HTTP request must carry, docs/policy.md): the rule's fqdns that
// resolved to it through the DNS proxy, for an entry learnt through DNS;
// the literal IP for a cidr entry.
func hosts(dec *Decision, dst netip.Addr) []string {
	if !dec.Learnt {
		return []string{dst.String()}
	}
	s := dec.Sandbox
	s.Lock()
	defer s.Unlock()
	var out []string
	for k := range s.Learned {
		if k.Addr == dst && slices.Contains(dec.Rule.FQDNs, k.Name) {
			out = append(out, k.Name)
		}
	}
	slices.Sort(out)
	return out
}
