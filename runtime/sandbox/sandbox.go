// Package sandbox is the daemon's registry of enforced sandboxes: their
// persisted records (record.go), the live state of each (its compiled
// policies per generation slot, the datapath entries they compiled to,
// the addresses learnt for its fqdn rules, its flows, its limits) and the
// index by attachment and by address. It holds no kernel handle: the
// datapath programming (runtime/enforce), FQDN learning (runtime/fqdn) and
// flow dispatch (runtime/dispatch) act on what it records.
package sandbox

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/limits"
)

// Sandbox is a registered, enforced sandbox. Fields are guarded by the
// sandbox's lock (Lock/Unlock) unless they say otherwise.
type Sandbox struct {
	// Name (the attachment key), ContainerID and ID (the datapath id) never
	// change: read them without the lock.
	Name        string
	ContainerID string
	ID          uint32

	mu sync.Mutex

	// Rec is the persisted record; an apply replaces it (a new pointer),
	// so a record read under the lock names the generation it was read in.
	Rec *Record
	// Compiled is the active generation's policy.
	Compiled *policy.Compiled
	// Slots holds the compiled policy of each datapath generation slot: a
	// rule id read from the kernel is resolved with the policy of the slot
	// it was read from, even across a flip.
	Slots [2]*policy.Compiled
	// Configs are the proxies' configurations of both slots' rules.
	Configs proxies.RuleConfigs
	// Entries are the static datapath entries of the active generation;
	// Static indexes its host entries (a learnt address that collides with
	// one obeys the datapath's rule: the lower rule id owns the key).
	Entries []bpf.RuleEntry
	Static  map[HostKey]bpf.RuleEntry
	// Learned are the fqdn addresses in the datapath, by name and address:
	// their expiry (CLOCK_MONOTONIC ns).
	Learned map[LearnKey]uint64
	// Epoch is the rule epoch in the datapath entry (bpf.Sandbox.Epoch).
	Epoch uint64
	// Closed is set when teardown starts: no new flow may register.
	Closed bool
	// Limits bound the sandbox's flows (its policy's spec.limits lowering
	// the daemon's). Safe without the lock.
	Limits *limits.Limiter

	flows map[*Flow]struct{}
}

// New returns the live state of a sandbox whose active generation holds
// entries compiled from compiled.
func New(rec *Record, compiled *policy.Compiled, configs proxies.RuleConfigs, entries []bpf.RuleEntry, epoch uint64, lim limits.Limits) *Sandbox {
	s := &Sandbox{Name: rec.Key(), ContainerID: rec.ContainerID, ID: rec.DatapathID, Rec: rec, Compiled: compiled, Configs: configs, Entries: entries, Static: StaticHosts(entries),
		Learned: map[LearnKey]uint64{}, Epoch: epoch, Limits: limits.NewLimiter(lim), flows: map[*Flow]struct{}{}}
	s.Slots[rec.Generation%2] = compiled
	return s
}

// Lock takes the sandbox's lock.
func (s *Sandbox) Lock() { s.mu.Lock() }

// Unlock releases it.
func (s *Sandbox) Unlock() { s.mu.Unlock() }

// Record returns the current record (under the lock).
func (s *Sandbox) Record() *Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.Rec
}

// Flow is one proxied connection (TCP) or datagram flow (UDP) of a
// sandbox, as the registry tracks it for revocation.
type Flow struct {
	Rule   *policy.Rule
	Proto  policy.Protocol
	Src    netip.AddrPort
	Dst    netip.AddrPort
	Cancel context.CancelCauseFunc
}

// ErrDeleted refuses a flow of a sandbox being deleted.
var ErrDeleted = errors.New("sandbox deleted")

// AddFlowDecidedAt registers a flow whose rule was decided under record
// rec, unless an apply replaced the record since: apply closes the flows
// its new policy does not allow, from a list taken after the flip, so a
// flow decided before the flip and registered after it would escape. The
// caller decides again (false, nil). A sandbox being deleted takes no new
// flows (ErrDeleted): teardown closes the flows it knows of, so a flow
// registered after that would escape.
func (s *Sandbox) AddFlowDecidedAt(f *Flow, rec *Record) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Closed {
		return false, ErrDeleted
	}
	if s.Rec != rec {
		return false, nil
	}
	s.flows[f] = struct{}{}
	return true, nil
}

// RecordChanged reports whether an apply replaced the record a decision
// was taken under: the old generation's entries may have been removed
// between reading the record and looking the rule up, so a refusal taken
// under it is not to be trusted either way.
func (s *Sandbox) RecordChanged(rec *Record) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return rec != nil && s.Rec != rec
}

// RemoveFlow forgets an ended flow.
func (s *Sandbox) RemoveFlow(f *Flow) {
	s.mu.Lock()
	delete(s.flows, f)
	s.mu.Unlock()
}

// Flows is the number of flows registered.
func (s *Sandbox) Flows() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.flows)
}

// CloseFlows cancels every flow for which keep returns false (nil: all)
// with cause, and returns how many. keep runs without the lock (it may
// look rules up).
func (s *Sandbox) CloseFlows(keep func(*Flow) bool, cause error) int {
	s.mu.Lock()
	flows := make([]*Flow, 0, len(s.flows))
	for f := range s.flows {
		flows = append(flows, f)
	}
	s.mu.Unlock()
	closed := 0
	for _, f := range flows {
		if keep == nil || !keep(f) {
			f.Cancel(cause)
			closed++
		}
	}
	return closed
}

// DatapathEntries turns a compiled policy into its static rule entries.
func DatapathEntries(c *policy.Compiled) []bpf.RuleEntry {
	out := make([]bpf.RuleEntry, 0, len(c.Entries))
	for _, e := range c.Entries {
		out = append(out, RuleEntry(c, e, 0))
	}
	return out
}

// RuleEntry is the datapath entry of one compiled entry (expires: 0 for a
// static one, the CLOCK_MONOTONIC deadline of a learnt one).
func RuleEntry(c *policy.Compiled, e policy.Entry, expires uint64) bpf.RuleEntry {
	listener := bpf.ListenerTCP
	if e.Proto == policy.ProtoUDP {
		listener = bpf.ListenerUDP
	}
	var mode uint8
	if r := c.Rule(e.RuleID); r != nil {
		mode = uint8(r.Mode)
	}
	return bpf.RuleEntry{Prefix: e.Prefix, Proto: uint8(e.Proto), Port: e.Port, RuleID: e.RuleID, Mode: mode, Listener: listener, Expires: expires}
}

// HostKey identifies a host entry (an address as /32 or /128, proto, port).
type HostKey struct {
	Addr  netip.Addr
	Proto uint8
	Port  uint16
}

// LearnKey is one address learnt for one name.
type LearnKey struct {
	Name string
	Addr netip.Addr
}

// StaticHosts indexes a policy's host-prefix entries.
func StaticHosts(entries []bpf.RuleEntry) map[HostKey]bpf.RuleEntry {
	m := map[HostKey]bpf.RuleEntry{}
	for _, e := range entries {
		if e.Prefix.Bits() == e.Prefix.Addr().BitLen() {
			m[HostKey{e.Prefix.Addr(), e.Proto, e.Port}] = e
		}
	}
	return m
}

// LearntEntries are the datapath entries an address learnt for name opens
// under policy c, whose static hosts are static: an earlier rule's
// identical static entry stands.
func LearntEntries(c *policy.Compiled, static map[HostKey]bpf.RuleEntry, name string, a netip.Addr, expires uint64) []bpf.RuleEntry {
	var out []bpf.RuleEntry
	for _, e := range c.EntriesForName(name, a) {
		if st, ok := static[HostKey{a, uint8(e.Proto), e.Port}]; ok && st.RuleID < e.RuleID {
			continue
		}
		out = append(out, RuleEntry(c, e, expires))
	}
	return out
}

// Decode turns a stored entry back into the datapath's sandbox entry.
func (e StoredEntry) Decode(id uint32, slot uint32, bridge bool, name string) bpf.Sandbox {
	parse := func(s string) netip.Addr {
		a, _ := netip.ParseAddr(s)
		return a
	}
	mac, _ := net.ParseMAC(e.MAC)
	gw, _ := net.ParseMAC(e.GatewayMAC)
	return bpf.Sandbox{
		ID: id, Generation: slot, Bridge: bridge, MAC: mac, GatewayMAC: gw,
		IPv4: parse(e.IPv4), GatewayIPv4: parse(e.GatewayIPv4),
		IPv6: parse(e.IPv6), GatewayIPv6: parse(e.GatewayIPv6),
		IPv6LinkLocal: parse(e.IPv6LinkLocal), GatewayIPv6LinkLocal: parse(e.GatewayIPv6LinkLocal),
		Name: name,
	}
}

// DatapathEntry is the record's sandbox entry under rule epoch epoch.
func (r *Record) DatapathEntry(epoch uint64) bpf.Sandbox {
	e := r.Entry.Decode(r.DatapathID, uint32(r.Generation%2), r.Bridge != "", r.ContainerID)
	e.Epoch = epoch
	return e
}

// Gateways6 are the record's IPv6 gateways (neighbour discovery targets).
func (r *Record) Gateways6() []netip.Addr {
	var out []netip.Addr
	for _, ip := range r.IPs {
		if ip.Gateway.Is6() {
			out = append(out, ip.Gateway)
		}
	}
	if a, err := netip.ParseAddr(r.Entry.GatewayIPv6); err == nil && !slices.Contains(out, a) {
		out = append(out, a)
	}
	return out
}

// NextEpoch is the rule epoch after prev: CLOCK_MONOTONIC, which only grows
// within a boot (across daemon restarts and sandbox id reuse alike), and
// at least prev+1.
func NextEpoch(prev uint64) uint64 { return max(MonotonicNow(), prev+1) }

// MonotonicNow is CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns,
// used for the expiry of learnt (fqdn) datapath entries.
func MonotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// Registry indexes the enforced sandboxes by attachment and by address.
// Callers that change the set (add, delete, reconcile, GC) serialize with
// Lock; lookups take the read lock themselves.
type Registry struct {
	mu       sync.RWMutex
	byKey    map[string]*Sandbox
	byIP     map[netip.Addr]*Sandbox
	reserved map[uint32]bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{byKey: map[string]*Sandbox{}, byIP: map[netip.Addr]*Sandbox{}}
}

// Lock serializes the changes of the set of sandboxes (and what they do
// to the kernel); the lookups below are safe under it and without it.
func (g *Registry) Lock() { g.mu.Lock() }

// Unlock ends a change.
func (g *Registry) Unlock() { g.mu.Unlock() }

// RLock and RUnlock hold the set steady for readers.
func (g *Registry) RLock()   { g.mu.RLock() }
func (g *Registry) RUnlock() { g.mu.RUnlock() }

// Add registers s. Call with Lock held.
func (g *Registry) Add(s *Sandbox) {
	g.byKey[s.Name] = s
	for _, ip := range s.Rec.IPs {
		g.byIP[ip.Address.Addr()] = s
	}
}

// Remove unregisters s. Call with Lock held.
func (g *Registry) Remove(s *Sandbox) {
	delete(g.byKey, s.Name)
	for _, ip := range s.Rec.IPs {
		if g.byIP[ip.Address.Addr()] == s {
			delete(g.byIP, ip.Address.Addr())
		}
	}
}

// Get returns the sandbox of an attachment key. Call with a lock held.
func (g *Registry) Get(key string) *Sandbox { return g.byKey[key] }

// OwnerOf returns the sandbox an address belongs to. Call with a lock held.
func (g *Registry) OwnerOf(a netip.Addr) *Sandbox { return g.byIP[a.Unmap()] }

// ByIP returns the sandbox a flow from a came from (takes the read lock).
func (g *Registry) ByIP(a netip.Addr) *Sandbox {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.byIP[a.Unmap()]
}

// Lookup returns the sandbox of an attachment key (takes the read lock).
func (g *Registry) Lookup(key string) *Sandbox {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.byKey[key]
}

// Len is the number of sandboxes. Call with a lock held.
func (g *Registry) Len() int { return len(g.byKey) }

// All lists the sandboxes, sorted by key. Call with a lock held.
func (g *Registry) All() []*Sandbox {
	out := make([]*Sandbox, 0, len(g.byKey))
	for _, s := range g.byKey {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *Sandbox) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Snapshot lists the sandboxes under the read lock.
func (g *Registry) Snapshot() []*Sandbox {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.All()
}

// Find returns the attachments of a container (one interface when ifName
// is set), sorted. Call with a lock held.
func (g *Registry) Find(id, ifName string) []*Sandbox {
	var out []*Sandbox
	for _, s := range g.byKey {
		if s.ContainerID == id && (ifName == "" || s.Name == AttachmentKey(id, ifName)) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b *Sandbox) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// ByDatapathID returns the sandbox of a datapath id (takes the read lock).
func (g *Registry) ByDatapathID(id uint32) *Sandbox {
	g.mu.RLock()
	defer g.mu.RUnlock()
	for _, s := range g.byKey {
		if s.ID == id {
			return s
		}
	}
	return nil
}

// Reserve keeps a datapath id from being handed out while something of a
// removed sandbox still carries it (runtime/enforce: a wall chain kept
// until its interface is gone); Release gives it back. Call with Lock
// held.
func (g *Registry) Reserve(id uint32) {
	if g.reserved == nil {
		g.reserved = map[uint32]bool{}
	}
	g.reserved[id] = true
}

// Release undoes Reserve. Call with Lock held.
func (g *Registry) Release(id uint32) { delete(g.reserved, id) }

// AllocateID returns the lowest datapath id no sandbox uses and none is
// reserved. Call with Lock held.
func (g *Registry) AllocateID() (uint32, error) {
	used := make(map[uint32]bool, len(g.byKey)+len(g.reserved))
	for _, s := range g.byKey {
		used[s.ID] = true
	}
	for id := range g.reserved {
		used[id] = true
	}
	for id := uint32(1); id < 1<<24; id++ {
		if !used[id] {
			return id, nil
		}
	}
	return 0, errors.New("no free sandbox id")
}
