// Package enforce programs the kernel for the daemon's sandboxes: it
// admits a sandbox (the nftables wall first, bridge port isolation, rule
// entries, the datapath entry, the kernel budgets, the program's
// attachment, the persisted record: each step rolled back if a later one
// fails), flips a sandbox to a new policy generation, tears it down,
// checks that the kernel holds what it wrote, re-adopts sandboxes after a
// restart, removes what no sandbox owns, and repairs what was removed
// under it (the watchdog). It reaches the kernel only through the
// Datapath, Links and Wall interfaces; runtime/fake has in-memory ones, so
// all of this is tested without root.
//
// Callers serialize changes with the sandbox registry's lock
// (sandbox.Registry.Lock): the methods that change the set say so.
package enforce

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/fqdn"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Enforcer programs the kernel for the sandboxes of one runtime.
type Enforcer struct {
	DP        Datapath
	Links     Links
	Wall      Wall
	Store     sandbox.Store
	Sandboxes *sandbox.Registry
	Learner   *fqdn.Learner
	// AttachMode is "auto" (tcx, else legacy tc), "tcx" or "tc".
	AttachMode string
	// DNSRate is the DNS proxy's per-sandbox query rate and EventRate the
	// deny events a sandbox reports per second (negative: no budget).
	DNSRate, EventRate float64
	Log                *slog.Logger
	// Phase, when set, is told how long each part of an admission
	// ("add") or a teardown ("del") took: for the admission histograms
	// and `make bench`'s breakdown of CNI ADD.
	Phase func(op, phase string, d time.Duration)

	// retired are the wall chains of torn-down sandboxes whose interface
	// was still there: kept, dropping everything unmarked, until the
	// interface is gone (reapRetired). Guarded by the registry's lock.
	retired map[uint32]retiredWall
}

// retiredWall is a torn-down sandbox's wall chain waiting for its
// interface to go.
type retiredWall struct {
	ifindex int
	ifname  string
}

// phases times the parts of one operation: mark(phase) ends the part
// begun at the previous mark.
type phases struct {
	e    *Enforcer
	op   string
	last time.Time
}

func (e *Enforcer) phases(op string) *phases {
	if e.Phase == nil {
		return nil
	}
	return &phases{e: e, op: op, last: time.Now()}
}

func (p *phases) mark(phase string) {
	if p == nil {
		return
	}
	now := time.Now()
	p.e.Phase(p.op, phase, now.Sub(p.last))
	p.last = now
}

func (e *Enforcer) log() *slog.Logger {
	if e.Log != nil {
		return e.Log
	}
	return slog.Default()
}

// BadRequest is an API error naming the request field at fault.
func BadRequest(field, format string, args ...any) error {
	return &api.Error{Field: field, Message: fmt.Sprintf(format, args...)}
}

// Admission is an ADD request as the daemon resolved it: validated, its
// policy compiled, its keys released, its proxies configured.
type Admission struct {
	Req      api.AddRequest
	Policy   []byte
	Source   string
	Compiled *policy.Compiled
	Configs  proxies.RuleConfigs
	Limits   limits.Limits // the effective ones
}

// undo collects rollback steps, run in reverse unless disarmed.
type undo []func()

func (u *undo) push(f func()) { *u = append(*u, f) }
func (u *undo) run() {
	for i := len(*u) - 1; i >= 0; i-- {
		(*u)[i]()
	}
	*u = nil
}

// Admit attaches and programs a sandbox and registers it. It returns only
// once enforcement is in place; on any error nothing of the sandbox
// remains. Call with the registry locked.
func (e *Enforcer) Admit(a Admission) (*sandbox.Sandbox, error) {
	req := &a.Req
	key := sandbox.AttachmentKey(req.ContainerID, req.IfName)
	ph := e.phases("add")
	if len(e.retired) > 0 {
		e.reapRetired()
	}
	if e.Sandboxes.Get(key) != nil {
		return nil, BadRequest("containerID", "%s is already attached", key)
	}
	for _, ip := range req.IPs {
		if other := e.Sandboxes.OwnerOf(ip.Address.Addr()); other != nil {
			return nil, BadRequest("ips", "%v already belongs to sandbox %s", ip.Address.Addr(), other.Name)
		}
	}
	host, err := e.Links.ByName(req.HostInterface)
	if err != nil {
		return nil, BadRequest("hostInterface", "%s: %v", req.HostInterface, err)
	}
	gateway := host
	var bridge *Link
	if req.Bridge != "" {
		br, err := e.Links.ByName(req.Bridge)
		if err != nil {
			return nil, BadRequest("bridge", "%s: %v", req.Bridge, err)
		}
		if br.Type != "bridge" {
			return nil, BadRequest("bridge", "%s is a %s, not a bridge", req.Bridge, br.Type)
		}
		if host.MasterIndex != br.Index {
			return nil, BadRequest("hostInterface", "%s is not a port of bridge %s", req.HostInterface, req.Bridge)
		}
		gateway, bridge = br, &br
	}
	entry, stored, err := e.buildEntry(req, gateway)
	if err != nil {
		return nil, err
	}
	id, err := e.Sandboxes.AllocateID()
	if err != nil {
		return nil, err
	}
	entry.ID = id
	entry.Epoch = sandbox.NextEpoch(0)

	rec := &sandbox.Record{
		ContainerID: req.ContainerID, IfName: req.IfName, Netns: req.Netns,
		HostInterface: req.HostInterface, HostIfindex: host.Index,
		Bridge: req.Bridge, DatapathID: id, Entry: stored,
		IPs: req.IPs, MAC: entry.MAC.String(),
		Policy: a.Policy, PolicyName: a.Compiled.Name, PolicySource: a.Source,
		Generation: 0, Created: time.Now().UTC(),
		Attachment: bpf.Attachment{Name: fmt.Sprintf("sandbox-%d-if%d", id, host.Index), Ifindex: host.Index},
	}
	if bridge != nil {
		rec.BridgeIfindex = bridge.Index
	}

	var rollback undo
	defer rollback.run()
	ph.mark("links")

	// The second wall goes in first: from here on, whatever happens to the
	// programs, nothing unmarked leaves the sandbox's interface.
	if err := e.Wall.AddSandbox(wallSandbox(rec)); err != nil {
		return nil, err
	}
	rollback.push(func() { _ = e.Wall.RemoveSandbox(id) })
	if bridge != nil {
		if err := e.isolate(rec); err != nil {
			return nil, err
		}
		rollback.push(func() { _ = e.Links.SetIsolated(host.Index, false) })
	}
	ph.mark("wall")

	entries := sandbox.DatapathEntries(a.Compiled)
	if _, err := e.DP.DeleteRules(id, -1); err != nil { // leftovers of a crashed ADD
		return nil, err
	}
	if err := e.DP.PutRules(id, 0, entries); err != nil {
		return nil, fmt.Errorf("programming rules of %s: %w", key, err)
	}
	rollback.push(func() { _, _ = e.DP.DeleteRules(id, -1) })
	if err := e.DP.PutSandbox(rec.HostIfindex, entry); err != nil {
		return nil, fmt.Errorf("programming sandbox %s: %w", key, err)
	}
	rollback.push(func() { e.deleteEntryIfOwned(rec.HostIfindex, id) })
	// Before the write: a write that fails halfway leaves a budget too.
	rollback.push(func() { _ = e.DP.DeleteFlowRate(id) })
	if err := e.writeBudgets(id, a.Limits); err != nil {
		return nil, err
	}
	ph.mark("maps")
	if bridge != nil {
		if err := e.ensureBridge(req.Bridge, bridge.Index); err != nil {
			return nil, err
		}
	}
	att, err := e.DP.Attach(rec.Attachment, e.AttachMode == "tc")
	if err != nil {
		return nil, fmt.Errorf("attaching to %s: %w", req.HostInterface, err)
	}
	if e.AttachMode == "tcx" && att.Mode != bpf.AttachTCX {
		_ = e.DP.Detach(att)
		return nil, errors.New("attach mode tcx required but the kernel has no tcx")
	}
	rec.Attachment = att
	rollback.push(func() { _ = e.DP.Detach(att) })
	ph.mark("attach")
	if err := e.DP.Check(att); err != nil {
		return nil, fmt.Errorf("verifying attachment: %w", err)
	}
	ph.mark("check")
	if err := e.Store.Save(rec); err != nil {
		return nil, err
	}
	ph.mark("save")
	rollback = nil // committed

	s := sandbox.New(rec, a.Compiled, a.Configs, entries, entry.Epoch, a.Limits)
	e.Sandboxes.Add(s)
	e.log().Info("sandbox attached", "sandbox", key, "interface", rec.HostInterface,
		"datapath_id", id, "policy", a.Compiled.Name, "rules", len(entries), "attach", att.Mode)
	return s, nil
}

// buildEntry computes the datapath entry of a sandbox from its request and
// the host side of its link.
func (e *Enforcer) buildEntry(req *api.AddRequest, gateway Link) (bpf.Sandbox, sandbox.StoredEntry, error) {
	mac, _ := net.ParseMAC(req.MAC)
	sb := bpf.Sandbox{MAC: mac, GatewayMAC: gateway.MAC, Bridge: req.Bridge != "", Name: req.ContainerID}
	if len(sb.GatewayMAC) != 6 {
		return sb, sandbox.StoredEntry{}, BadRequest("hostInterface", "%s has no Ethernet address", gateway.Name)
	}
	for _, ip := range req.IPs {
		if ip.Address.Addr().Is4() {
			sb.IPv4, sb.GatewayIPv4 = ip.Address.Addr(), ip.Gateway
		} else {
			sb.IPv6, sb.GatewayIPv6 = ip.Address.Addr(), ip.Gateway
		}
	}
	var ok bool
	if sb.IPv6LinkLocal, ok = e.Links.LinkLocal(req.Netns, req.IfName); !ok {
		sb.IPv6LinkLocal = eui64(mac) // not configured yet: what the kernel will assign
	}
	if sb.GatewayIPv6LinkLocal, ok = e.Links.LinkLocal("", gateway.Name); !ok {
		sb.GatewayIPv6LinkLocal = eui64(gateway.MAC)
	}
	str := func(a netip.Addr) string {
		if a.IsValid() {
			return a.String()
		}
		return ""
	}
	st := sandbox.StoredEntry{
		MAC: sb.MAC.String(), GatewayMAC: sb.GatewayMAC.String(),
		IPv4: str(sb.IPv4), GatewayIPv4: str(sb.GatewayIPv4),
		IPv6: str(sb.IPv6), GatewayIPv6: str(sb.GatewayIPv6),
		IPv6LinkLocal: str(sb.IPv6LinkLocal), GatewayIPv6LinkLocal: str(sb.GatewayIPv6LinkLocal),
	}
	return sb, st, nil
}

// wallSandbox is what a record's nftables chain is built from.
func wallSandbox(r *sandbox.Record) WallSandbox {
	return WallSandbox{ID: r.DatapathID, Ifname: r.HostInterface, Gateway: r.Gateways6()}
}

// deleteEntryIfOwned removes the datapath entry of ifindex only if it still
// belongs to sandbox id (ifindexes are reused once an interface is gone).
func (e *Enforcer) deleteEntryIfOwned(ifindex int, id uint32) {
	if cur, err := e.DP.Sandbox(ifindex); err == nil && cur.ID == id {
		_ = e.DP.DeleteSandbox(ifindex)
	}
}

// ErrDeleted is the cause a deleted sandbox's flows are closed with.
var ErrDeleted = sandbox.ErrDeleted

// Teardown removes everything of a sandbox and unregisters it; its flows
// are closed (ErrDeleted). Call with the registry locked.
func (e *Enforcer) Teardown(s *sandbox.Sandbox) error {
	rec := s.Record()
	ph := e.phases("del")
	var errs []error
	// The detach waits for an RCU grace period in the kernel (tcx swaps
	// its program array), and so does unhooking the wall's chain: run
	// them side by side. Neither order protects anything the other does
	// not: once both are gone the interface is on its own either way,
	// and the runtime deletes it next.
	detached := make(chan error, 1)
	go func() { detached <- e.DP.Detach(rec.Attachment) }()
	e.deleteEntryIfOwned(rec.HostIfindex, rec.DatapathID)
	if _, err := e.DP.DeleteRules(rec.DatapathID, -1); err != nil {
		errs = append(errs, err)
	}
	_ = e.DP.DeleteCounters(rec.DatapathID)
	if err := e.DP.DeleteFlowRate(rec.DatapathID); err != nil {
		errs = append(errs, err)
	}
	ph.mark("maps")
	if err := e.retireWall(rec); err != nil {
		errs = append(errs, err)
	}
	ph.mark("wall")
	if err := <-detached; err != nil {
		errs = append(errs, err)
	}
	ph.mark("attach")
	s.Lock()
	s.Closed = true
	s.Unlock()
	s.CloseFlows(nil, ErrDeleted)
	if err := e.Store.Remove(rec.ContainerID, rec.IfName); err != nil {
		errs = append(errs, err)
	}
	ph.mark("save")
	e.Sandboxes.Remove(s)
	if rec.Bridge != "" {
		e.releaseBridge(rec.Bridge)
	}
	e.log().Info("sandbox detached", "sandbox", s.Name)
	return errors.Join(errs...)
}

// retireWall deals with a torn-down sandbox's wall chain. CNI DEL runs
// the chain backwards: cleanwall-cni's DEL comes before ptp or bridge
// delete the interface, and a sandbox's processes may still be running.
// Were the chain removed now, the interface would forward whatever it
// is sent until then. So while the interface is there the chain stays
// (nothing is marked any more: it drops everything but ARP and neighbour
// discovery) and its datapath id stays reserved; reapRetired removes it
// once the interface is gone. That also keeps the kernel's unhooking of
// the chain, which waits for a grace period, off DEL's path. Call with
// the registry locked.
func (e *Enforcer) retireWall(rec *sandbox.Record) error {
	if l, err := e.Links.ByIndex(rec.HostIfindex); err == nil && l.Name == rec.HostInterface {
		if e.retired == nil {
			e.retired = map[uint32]retiredWall{}
		}
		e.retired[rec.DatapathID] = retiredWall{ifindex: rec.HostIfindex, ifname: rec.HostInterface}
		e.Sandboxes.Reserve(rec.DatapathID)
		return nil
	}
	return e.Wall.RemoveSandbox(rec.DatapathID)
}

// reapRetired removes the retired wall chains whose interface is gone
// and frees their datapath ids; it returns how many are left. Call with
// the registry locked.
func (e *Enforcer) reapRetired() int {
	for id, r := range e.retired {
		if l, err := e.Links.ByIndex(r.ifindex); err == nil && l.Name == r.ifname {
			continue
		}
		if err := e.Wall.RemoveSandbox(id); err != nil {
			e.log().Warn("removing a retired wall chain", "datapath_id", id, "interface", r.ifname, "error", err)
			continue
		}
		delete(e.retired, id)
		e.Sandboxes.Release(id)
	}
	return len(e.retired)
}

// Retired is the number of wall chains kept for interfaces that outlived
// their sandbox. Call with the registry locked.
func (e *Enforcer) Retired() int { return len(e.retired) }

// isolate turns on bridge port isolation for a sandbox's bridge port: the
// bridge then forwards nothing between two isolated ports, whatever the
// frame (a broadcast, a flood, another sandbox's MAC), with or without the
// datapath programs. A sandbox on a ptp link has no port to isolate.
func (e *Enforcer) isolate(rec *sandbox.Record) error {
	if rec.Bridge == "" {
		return nil
	}
	if err := e.Links.SetIsolated(rec.HostIfindex, true); err != nil {
		return fmt.Errorf("isolating bridge port %s: %w", rec.HostInterface, err)
	}
	return nil
}

// checkIsolated verifies that a bridge sandbox's port is still isolated.
func (e *Enforcer) checkIsolated(rec *sandbox.Record) error {
	if rec.Bridge == "" {
		return nil
	}
	on, err := e.Links.Isolated(rec.HostIfindex)
	if err != nil {
		return fmt.Errorf("reading bridge port flags of %s: %w", rec.HostInterface, err)
	}
	if !on {
		return fmt.Errorf("bridge port %s is not isolated", rec.HostInterface)
	}
	return nil
}

// ensureBridge attaches the bridge program to a bridge device once.
func (e *Enforcer) ensureBridge(name string, ifindex int) error {
	att := e.bridgeAttachment(name, ifindex)
	if err := e.DP.Check(att); err == nil {
		return nil
	}
	if _, err := e.DP.Attach(att, e.AttachMode == "tc"); err != nil {
		return fmt.Errorf("attaching bridge program to %s: %w", name, err)
	}
	return nil
}

// bridgeAttachment is the attachment of a bridge device's program.
func (e *Enforcer) bridgeAttachment(name string, ifindex int) bpf.Attachment {
	att := bpf.Attachment{Name: "bridge-" + name, Ifindex: ifindex, Bridge: true, Mode: bpf.AttachTCX}
	if e.AttachMode == "tc" {
		att.Mode = bpf.AttachLegacyTC
	}
	return att
}

// releaseBridge detaches the bridge program when no sandbox uses it.
// Call with the registry locked.
func (e *Enforcer) releaseBridge(name string) {
	for _, s := range e.Sandboxes.All() {
		if s.Rec.Bridge == name {
			return
		}
	}
	if l, err := e.Links.ByName(name); err == nil {
		_ = e.DP.Detach(e.bridgeAttachment(name, l.Index))
	} else {
		_ = e.DP.Detach(bpf.Attachment{Name: "bridge-" + name, Bridge: true, Mode: bpf.AttachTCX})
	}
}

// writeBudgets writes a sandbox's kernel budgets for limits l.
func (e *Enforcer) writeBudgets(id uint32, l limits.Limits) error {
	if err := e.DP.SetFlowRate(id, limits.FlowRate(l)); err != nil {
		return err
	}
	if err := e.DP.SetDNSRate(id, limits.DNSBudget(e.DNSRate)); err != nil {
		return err
	}
	return e.DP.SetEventRate(id, limits.EventBudget(e.EventRate))
}

// checkBudgets compares a sandbox's kernel budgets with limits l.
func (e *Enforcer) checkBudgets(id uint32, l limits.Limits) error {
	for _, b := range []struct {
		what string
		want bpf.FlowRate
		read func(uint32) (bpf.FlowRate, bool, error)
	}{{"new-flow", limits.FlowRate(l), e.DP.FlowRateOf}, {"DNS", limits.DNSBudget(e.DNSRate), e.DP.DNSRateOf},
		{"deny-event", limits.EventBudget(e.EventRate), e.DP.EventRateOf}} {
		got, ok, err := b.read(id)
		if err != nil {
			return err
		}
		want := b.want
		if ok != (want.PerSecond > 0) || (ok && (math.Abs(got.PerSecond-want.PerSecond) > want.PerSecond/1000 || math.Abs(got.Burst-want.Burst) > 1)) {
			return fmt.Errorf("%s budget differs: have %+v, want %+v", b.what, got, want)
		}
	}
	return nil
}

// Check verifies a sandbox: its attachment runs our program on its
// interface, its wall chain and port isolation are in place, its budgets
// and datapath entry are what we wrote, and the kernel's rules of the
// active generation are exactly the compiled policy's.
func (e *Enforcer) Check(s *sandbox.Sandbox) error {
	rec := s.Record()
	if err := e.DP.Check(rec.Attachment); err != nil {
		return fmt.Errorf("attachment: %w", err)
	}
	if err := e.Wall.CheckSandbox(wallSandbox(rec)); err != nil {
		return err
	}
	if err := e.checkIsolated(rec); err != nil {
		return err
	}
	if err := e.checkBudgets(rec.DatapathID, s.Limits.Get()); err != nil {
		return err
	}
	got, err := e.DP.Sandbox(rec.HostIfindex)
	if err != nil {
		return fmt.Errorf("datapath entry: %w", err)
	}
	s.Lock()
	want := rec.DatapathEntry(s.Epoch)
	expected := append([]bpf.RuleEntry(nil), s.Entries...)
	s.Unlock()
	if got.ID != want.ID || got.Generation != want.Generation || got.MAC.String() != want.MAC.String() ||
		got.IPv4 != want.IPv4 || got.IPv6 != want.IPv6 || got.GatewayMAC.String() != want.GatewayMAC.String() {
		return fmt.Errorf("datapath entry differs: have %+v, want %+v", got, want)
	}
	kernel, err := e.DP.SandboxRules(rec.DatapathID, uint8(rec.Generation%2))
	if err != nil {
		return err
	}
	if diff := diffEntries(kernel, expected); diff != "" {
		return fmt.Errorf("rules differ from the policy: %s", diff)
	}
	return nil
}

func entryKey(e bpf.RuleEntry) string {
	return fmt.Sprintf("%v/%d/%d", e.Prefix.Masked(), e.Proto, e.Port)
}

// diffEntries compares the kernel's static entries with the expected ones.
// A static host entry an earlier rule's learnt address holds (fqdn.Learner:
// the lower rule id owns the key) is not missing: it comes back when the
// learnt one expires.
func diffEntries(kernel, want []bpf.RuleEntry) string {
	have := map[string]bpf.RuleEntry{}
	learnt := map[string]bool{}
	for _, e := range kernel {
		if e.Expires == 0 {
			have[entryKey(e)] = e
		} else {
			learnt[entryKey(e)] = true
		}
	}
	var missing, wrong []string
	for _, e := range want {
		k := entryKey(e)
		h, ok := have[k]
		switch {
		case !ok && learnt[k]:
		case !ok:
			missing = append(missing, k)
		case h.RuleID != e.RuleID || h.Listener != e.Listener || h.Mode != e.Mode:
			wrong = append(wrong, k)
		}
		delete(have, k)
	}
	var extra []string
	for k := range have {
		extra = append(extra, k)
	}
	if len(missing)+len(wrong)+len(extra) == 0 {
		return ""
	}
	return fmt.Sprintf("%d missing %v, %d wrong %v, %d extra %v", len(missing), head(missing), len(wrong), head(wrong), len(extra), head(extra))
}

func head(s []string) []string {
	if len(s) > 5 {
		return s[:5]
	}
	return s
}

// Change is a new policy for a sandbox, resolved by the daemon.
type Change struct {
	Policy   []byte
	Source   string
	Compiled *policy.Compiled
	Configs  proxies.RuleConfigs
	Limits   limits.Limits
}

// Flip moves a sandbox to a new policy generation: the new rules go into
// the inactive generation slot, one atomic update of the sandbox entry
// flips to it, then the old generation is removed. A failure before the
// flip leaves the old generation enforced, untouched. The caller closes
// the flows the new policy does not allow (it knows how flows decide).
// Call with the registry locked.
func (e *Enforcer) Flip(s *sandbox.Sandbox, c Change) error {
	rec := s.Record()
	next := rec.Generation + 1
	slot, old := uint8(next%2), uint8(rec.Generation%2)
	entries := sandbox.DatapathEntries(c.Compiled)
	// The inactive slot is empty: every flip removes the generation it
	// replaces, a failed write removes what it wrote, and reconcile sweeps
	// both slots of a re-adopted sandbox once.
	if err := e.DP.PutRules(rec.DatapathID, slot, entries); err != nil {
		return fmt.Errorf("writing generation %d: %w (generation %d stays enforced)", next, err, rec.Generation)
	}
	updated := *rec
	updated.Generation = next
	updated.Policy = c.Policy
	updated.PolicyName = c.Compiled.Name
	updated.PolicySource = c.Source

	s.Lock()
	prevSlot, prevStatic, prevConfigs := s.Slots[slot], s.Static, s.Configs
	// Rules of both slots stay resolvable through the flip.
	configs := proxies.RuleConfigs{}
	for k, v := range c.Configs {
		configs[k] = v
	}
	if prev := s.Slots[old]; prev != nil {
		for k, v := range s.Configs {
			if prev.Rule(k.Rule.ID) == k.Rule {
				configs[k] = v
			}
		}
	}
	s.Configs = configs
	s.Slots[slot] = c.Compiled
	s.Static = sandbox.StaticHosts(entries)
	if e.Learner != nil {
		e.Learner.Relearn(s, slot) // fqdn addresses learnt so far, under the new policy
	}
	epoch := sandbox.NextEpoch(s.Epoch)
	if err := e.DP.PutSandbox(rec.HostIfindex, updated.DatapathEntry(epoch)); err != nil {
		s.Slots[slot], s.Static, s.Configs = prevSlot, prevStatic, prevConfigs
		s.Unlock()
		_, _ = e.DP.DeleteRules(rec.DatapathID, int(slot)) // rare: sweep what this attempt wrote
		return fmt.Errorf("flipping to generation %d: %w (generation %d stays enforced)", next, err, rec.Generation)
	}
	// The flip happened: from here on the new policy is the truth. The old
	// generation is unreachable; remove exactly what it held.
	stale := s.Entries
	if prev := s.Slots[old]; prev != nil {
		for k, exp := range s.Learned {
			stale = append(stale, sandbox.LearntEntries(prev, prevStatic, k.Name, k.Addr, exp)...)
		}
	}
	s.Rec = &updated
	s.Epoch = epoch
	s.Compiled = c.Compiled
	s.Limits.Set(c.Limits)
	s.Entries = entries
	s.Unlock()
	if err := e.DP.DeleteRuleEntries(rec.DatapathID, old, stale); err != nil {
		e.log().Warn("removing the old generation", "sandbox", s.Name, "error", err)
	}
	if err := e.writeBudgets(rec.DatapathID, c.Limits); err != nil {
		e.log().Warn("writing the kernel budgets: the previous ones stay", "sandbox", s.Name, "error", err)
	}
	if err := e.Store.Save(&updated); err != nil {
		e.log().Error("persisting the new generation failed; a restart re-applies the previous document", "sandbox", s.Name, "error", err)
	}
	e.log().Info("policy applied", "sandbox", s.Name, "policy", c.Compiled.Name, "generation", next, "rules", len(entries))
	return nil
}
