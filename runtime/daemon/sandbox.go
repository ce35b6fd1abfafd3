package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/policy"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// sandbox is a registered, enforced sandbox.
type sandbox struct {
	rec *record

	mu       sync.Mutex
	compiled *policy.Compiled
	// slots holds the compiled policy of each datapath generation slot: a
	// rule id read from the kernel is resolved with the policy of the slot
	// it was read from, even across a flip.
	slots   [2]*policy.Compiled
	entries []bpf.RuleEntry // static datapath entries of the active generation
	static  map[hostKey]bpf.RuleEntry
	http    map[*policy.Rule]*httpproxy.Rules // open HTTP rules of both slots' policies
	learned map[learnKey]uint64               // fqdn addresses: expiry (CLOCK_MONOTONIC ns)
	flows   map[*flow]struct{}
	// epoch is the rule epoch in the datapath entry (see bpf.Sandbox.Epoch).
	epoch uint64
	// closed is set when teardown starts: no new flow may register.
	closed bool
	// limits bound the sandbox's flows (its policy's spec.limits lowering
	// the daemon's).
	limits *flowLimiter
}

func newSandbox(rec *record, compiled *policy.Compiled, entries []bpf.RuleEntry, epoch uint64, limits Limits) *sandbox {
	s := &sandbox{epoch: epoch, rec: rec, compiled: compiled, entries: entries, static: staticHosts(entries),
		http: httpRulesOf(compiled, nil), learned: map[learnKey]uint64{}, flows: map[*flow]struct{}{},
		limits: newFlowLimiter(effectiveLimits(limits, compiled))}
	s.slots[rec.Generation%2] = compiled
	return s
}

// badRequest is an API error naming the request field at fault.
func badRequest(field, format string, args ...any) error {
	return &api.Error{Field: field, Message: fmt.Sprintf(format, args...)}
}

var containerIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$`)

// validateAdd checks every field before anything is touched.
func validateAdd(req *api.AddRequest) error {
	if !containerIDPattern.MatchString(req.ContainerID) {
		return badRequest("containerID", "%q is not a container ID (letters, digits, _ . -; up to 255)", req.ContainerID)
	}
	if req.IfName == "" || len(req.IfName) > 15 || strings.ContainsAny(req.IfName, "/ \x00") {
		return badRequest("ifName", "%q is not an interface name", req.IfName)
	}
	if req.Netns == "" {
		return badRequest("netns", "required")
	}
	if req.HostInterface == "" {
		return badRequest("hostInterface", "required: the chain's previous result names no host-side interface")
	}
	if mac, err := net.ParseMAC(req.MAC); err != nil || len(mac) != 6 {
		return badRequest("mac", "%q is not an Ethernet MAC address", req.MAC)
	}
	if len(req.IPs) == 0 {
		return badRequest("ips", "the sandbox has no IP address")
	}
	var v4, v6 int
	for i, ip := range req.IPs {
		f := fmt.Sprintf("ips[%d]", i)
		if !ip.Address.IsValid() {
			return badRequest(f+".address", "missing or invalid")
		}
		a := ip.Address.Addr()
		if a.Is4In6() || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
			return badRequest(f+".address", "%v cannot be a sandbox address", a)
		}
		if !ip.Gateway.IsValid() {
			return badRequest(f+".gateway", "missing: the sandbox needs a gateway")
		}
		if ip.Gateway.Is4() != a.Is4() {
			return badRequest(f+".gateway", "%v is not of the address's family", ip.Gateway)
		}
		if a.Is4() {
			v4++
		} else {
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return badRequest("ips", "at most one IPv4 and one IPv6 address per sandbox interface")
	}
	if len(req.Policy) == 0 && req.PolicyName == "" {
		return badRequest("policy", "no policy: set the CNI conf's policy or CNI_ARGS CLEANWALL_POLICY")
	}
	if len(req.Policy) > 0 && req.PolicyName != "" {
		return badRequest("policyName", "give a policy document or a policy name, not both")
	}
	if req.PolicyName != "" && !policyNamePattern.MatchString(req.PolicyName) {
		return badRequest("policyName", "%q is not a policy name (a DNS label)", req.PolicyName)
	}
	return nil
}

var policyNamePattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// resolvePolicy returns the policy document of a request: its own bytes, or
// the named file in the policy directory.
func (d *Daemon) resolvePolicy(req *api.AddRequest) ([]byte, string, error) {
	if req.PolicyName == "" {
		src := req.PolicySource
		if src == "" {
			src = "request"
		}
		return req.Policy, src, nil
	}
	for _, ext := range []string{".yaml", ".yml"} {
		path := filepath.Join(d.cfg.PolicyDir, req.PolicyName+ext)
		data, err := os.ReadFile(path)
		if err == nil {
			return data, path, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, "", badRequest("policyName", "reading %s: %v", path, err)
		}
	}
	return nil, "", badRequest("policyName", "unknown policy %q: no %s/%s.yaml", req.PolicyName, d.cfg.PolicyDir, req.PolicyName)
}

func compilePolicy(doc []byte, source string) (*policy.Compiled, error) {
	p, err := policy.Parse(doc)
	if err != nil {
		return nil, &api.Error{Field: "policy", Message: fmt.Sprintf("%s: invalid policy:\n%v", source, err)}
	}
	c, err := policy.Compile(p)
	if err != nil {
		return nil, &api.Error{Field: "policy", Message: fmt.Sprintf("%s: %v", source, err)}
	}
	return c, nil
}

// datapathEntries turns a compiled policy into rule entries.
func datapathEntries(c *policy.Compiled) []bpf.RuleEntry {
	out := make([]bpf.RuleEntry, 0, len(c.Entries))
	for _, e := range c.Entries {
		out = append(out, ruleEntry(c, e, 0))
	}
	return out
}

func ruleEntry(c *policy.Compiled, e policy.Entry, expires uint64) bpf.RuleEntry {
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

// linkLocal returns the first IPv6 link-local address of a link, reading it
// in the namespace at nsPath ("" = the daemon's own).
func linkLocal(nsPath, ifName string, mac net.HardwareAddr) netip.Addr {
	var found netip.Addr
	read := func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, unix.AF_INET6)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
				found = ip
				return nil
			}
		}
		return nil
	}
	if nsPath == "" {
		_ = read()
	} else {
		_ = netns.Do(nsPath, read)
	}
	if !found.IsValid() && len(mac) == 6 {
		// Not configured (yet): the EUI-64 address the kernel will assign.
		var b [16]byte
		b[0], b[1] = 0xfe, 0x80
		b[8] = mac[0] ^ 0x02
		b[9], b[10], b[11], b[12] = mac[1], mac[2], 0xff, 0xfe
		b[13], b[14], b[15] = mac[3], mac[4], mac[5]
		found = netip.AddrFrom16(b)
	}
	return found
}

// buildEntry computes the datapath entry of a sandbox from its request and
// the host side of its link.
func (d *Daemon) buildEntry(req *api.AddRequest, host netlink.Link, gateway netlink.Link) (bpf.Sandbox, storedEntry, error) {
	mac, _ := net.ParseMAC(req.MAC)
	sb := bpf.Sandbox{
		MAC:        mac,
		GatewayMAC: gateway.Attrs().HardwareAddr,
		Bridge:     req.Bridge != "",
		Name:       req.ContainerID,
	}
	if len(sb.GatewayMAC) != 6 {
		return sb, storedEntry{}, badRequest("hostInterface", "%s has no Ethernet address", gateway.Attrs().Name)
	}
	for _, ip := range req.IPs {
		if ip.Address.Addr().Is4() {
			sb.IPv4, sb.GatewayIPv4 = ip.Address.Addr(), ip.Gateway
		} else {
			sb.IPv6, sb.GatewayIPv6 = ip.Address.Addr(), ip.Gateway
		}
	}
	sb.IPv6LinkLocal = linkLocal(req.Netns, req.IfName, mac)
	sb.GatewayIPv6LinkLocal = linkLocal("", gateway.Attrs().Name, gateway.Attrs().HardwareAddr)
	str := func(a netip.Addr) string {
		if a.IsValid() {
			return a.String()
		}
		return ""
	}
	st := storedEntry{
		MAC: sb.MAC.String(), GatewayMAC: sb.GatewayMAC.String(),
		IPv4: str(sb.IPv4), GatewayIPv4: str(sb.GatewayIPv4),
		IPv6: str(sb.IPv6), GatewayIPv6: str(sb.GatewayIPv6),
		IPv6LinkLocal: str(sb.IPv6LinkLocal), GatewayIPv6LinkLocal: str(sb.GatewayIPv6LinkLocal),
	}
	return sb, st, nil
}

func (e storedEntry) decode(id uint32, slot uint32, bridge bool, name string) bpf.Sandbox {
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

func (r *record) datapathEntry(epoch uint64) bpf.Sandbox {
	e := r.Entry.decode(r.DatapathID, uint32(r.Generation%2), r.Bridge != "", r.ContainerID)
	e.Epoch = epoch
	return e
}

// nextEpoch is the rule epoch after prev: CLOCK_MONOTONIC, which only grows
// within a boot (across daemon restarts and sandbox id reuse alike), and
// at least prev+1.
func nextEpoch(prev uint64) uint64 { return max(monotonicNow(), prev+1) }

// bumpEpoch moves the sandbox's rule epoch forward after its rules changed
// outside a flip (a learnt fqdn entry, an expiry): verdicts the datapath
// cached under the old rules become unreachable. Called with s.mu held.
func (d *Daemon) bumpEpoch(s *sandbox) error {
	next := nextEpoch(s.epoch)
	if err := d.dp.PutSandbox(s.rec.HostIfindex, s.rec.datapathEntry(next)); err != nil {
		return err
	}
	s.epoch = next
	return nil
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

// Add attaches and programs a sandbox. It returns only once enforcement is
// in place; on any error nothing of the sandbox remains.
func (d *Daemon) Add(ctx context.Context, req api.AddRequest) (api.Sandbox, error) {
	if err := validateAdd(&req); err != nil {
		return api.Sandbox{}, err
	}
	doc, source, err := d.resolvePolicy(&req)
	if err != nil {
		return api.Sandbox{}, err
	}
	compiled, err := compilePolicy(doc, source)
	if err != nil {
		return api.Sandbox{}, err
	}
	// A sandbox whose secure rules have no key never starts.
	if err := d.ensureKeys(ctx, compiled); err != nil {
		return api.Sandbox{}, err
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	key := attachmentKey(req.ContainerID, req.IfName)
	if _, ok := d.sandboxes[key]; ok {
		return api.Sandbox{}, badRequest("containerID", "%s is already attached", key)
	}
	for _, ip := range req.IPs {
		if other, ok := d.byIP[ip.Address.Addr()]; ok {
			return api.Sandbox{}, badRequest("ips", "%v already belongs to sandbox %s", ip.Address.Addr(), other.rec.key())
		}
	}
	host, err := netlink.LinkByName(req.HostInterface)
	if err != nil {
		return api.Sandbox{}, badRequest("hostInterface", "%s: %v", req.HostInterface, err)
	}
	gateway := host
	var bridge netlink.Link
	if req.Bridge != "" {
		bridge, err = netlink.LinkByName(req.Bridge)
		if err != nil {
			return api.Sandbox{}, badRequest("bridge", "%s: %v", req.Bridge, err)
		}
		if bridge.Type() != "bridge" {
			return api.Sandbox{}, badRequest("bridge", "%s is a %s, not a bridge", req.Bridge, bridge.Type())
		}
		if host.Attrs().MasterIndex != bridge.Attrs().Index {
			return api.Sandbox{}, badRequest("hostInterface", "%s is not a port of bridge %s", req.HostInterface, req.Bridge)
		}
		gateway = bridge
	}
	entry, stored, err := d.buildEntry(&req, host, gateway)
	if err != nil {
		return api.Sandbox{}, err
	}
	id, err := d.allocateID()
	if err != nil {
		return api.Sandbox{}, err
	}
	entry.ID = id
	entry.Epoch = nextEpoch(0)

	rec := &record{
		ContainerID: req.ContainerID, IfName: req.IfName, Netns: req.Netns,
		HostInterface: req.HostInterface, HostIfindex: host.Attrs().Index,
		Bridge: req.Bridge, DatapathID: id, Entry: stored,
		IPs: req.IPs, MAC: entry.MAC.String(),
		Policy: doc, PolicyName: compiled.Name, PolicySource: source,
		Generation: 0, Created: time.Now().UTC(),
		Attachment: bpf.Attachment{Name: fmt.Sprintf("sandbox-%d-if%d", id, host.Attrs().Index), Ifindex: host.Attrs().Index},
	}
	if bridge != nil {
		rec.BridgeIfindex = bridge.Attrs().Index
	}

	var rollback undo
	defer rollback.run()

	// The second wall goes in first: from here on, whatever happens to the
	// programs, nothing unmarked leaves the sandbox's interface.
	if err := d.wall.addSandbox(rec.wallSandbox()); err != nil {
		return api.Sandbox{}, err
	}
	rollback.push(func() { _ = d.wall.removeSandbox(id) })
	if bridge != nil {
		if err := isolatePort(rec, host); err != nil {
			return api.Sandbox{}, err
		}
		rollback.push(func() { _ = netlink.LinkSetIsolated(host, false) })
	}

	entries := datapathEntries(compiled)
	if _, err := d.dp.DeleteRules(id, -1); err != nil { // leftovers of a crashed ADD
		return api.Sandbox{}, err
	}
	if err := d.dp.PutRules(id, 0, entries); err != nil {
		return api.Sandbox{}, fmt.Errorf("programming rules of %s: %w", rec.key(), err)
	}
	rollback.push(func() { _, _ = d.dp.DeleteRules(id, -1) })
	if err := d.dp.PutSandbox(rec.HostIfindex, entry); err != nil {
		return api.Sandbox{}, fmt.Errorf("programming sandbox %s: %w", rec.key(), err)
	}
	rollback.push(func() { d.deleteEntryIfOwned(rec.HostIfindex, id) })
	if err := d.writeBudgets(id, effectiveLimits(d.cfg.Limits, compiled)); err != nil {
		return api.Sandbox{}, err
	}
	rollback.push(func() { _ = d.dp.DeleteFlowRate(id) })
	if bridge != nil {
		if err := d.ensureBridge(req.Bridge, bridge.Attrs().Index); err != nil {
			return api.Sandbox{}, err
		}
	}
	att, err := d.dp.Attach(rec.Attachment, d.cfg.AttachMode == "tc")
	if err != nil {
		return api.Sandbox{}, fmt.Errorf("attaching to %s: %w", req.HostInterface, err)
	}
	if d.cfg.AttachMode == "tcx" && att.Mode != bpf.AttachTCX {
		_ = d.dp.Detach(att)
		return api.Sandbox{}, errors.New("attach mode tcx required but the kernel has no tcx")
	}
	rec.Attachment = att
	rollback.push(func() { _ = d.dp.Detach(att) })
	if err := d.dp.Check(att); err != nil {
		return api.Sandbox{}, fmt.Errorf("verifying attachment: %w", err)
	}
	if err := d.store.save(rec); err != nil {
		return api.Sandbox{}, err
	}
	rollback = nil // committed

	sb := newSandbox(rec, compiled, entries, entry.Epoch, d.cfg.Limits)
	d.register(sb)
	d.log.Info("sandbox attached", "sandbox", rec.key(), "interface", rec.HostInterface,
		"datapath_id", id, "policy", compiled.Name, "rules", len(entries), "attach", att.Mode)
	return d.view(sb, false), nil
}

func (d *Daemon) allocateID() (uint32, error) {
	used := map[uint32]bool{}
	for _, s := range d.sandboxes {
		used[s.rec.DatapathID] = true
	}
	for id := uint32(1); id < 1<<24; id++ {
		if !used[id] {
			return id, nil
		}
	}
	return 0, errors.New("no free sandbox id")
}

// deleteEntryIfOwned removes the datapath entry of ifindex only if it still
// belongs to sandbox id (ifindexes are reused once an interface is gone).
func (d *Daemon) deleteEntryIfOwned(ifindex int, id uint32) {
	if cur, err := d.dp.Sandbox(ifindex); err == nil && cur.ID == id {
		_ = d.dp.DeleteSandbox(ifindex)
	}
}

func (d *Daemon) register(s *sandbox) {
	d.sandboxes[s.rec.key()] = s
	for _, ip := range s.rec.IPs {
		d.byIP[ip.Address.Addr()] = s
	}
	if d.dns != nil {
		d.dns.SetSandbox(s.rec.key(), dnsConfig(s.compiled))
	}
	d.metrics.sandboxes.Set(float64(len(d.sandboxes)))
}

func (d *Daemon) unregister(s *sandbox) {
	delete(d.sandboxes, s.rec.key())
	if d.dns != nil {
		d.dns.SetSandbox(s.rec.key(), nil)
	}
	for _, ip := range s.rec.IPs {
		if d.byIP[ip.Address.Addr()] == s {
			delete(d.byIP, ip.Address.Addr())
		}
	}
	d.metrics.sandboxes.Set(float64(len(d.sandboxes)))
}

// find returns the attachments of a container (one interface when ifName
// is set).
func (d *Daemon) find(id, ifName string) []*sandbox {
	var out []*sandbox
	for _, s := range d.sandboxes {
		if s.rec.ContainerID == id && (ifName == "" || s.rec.IfName == ifName) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b *sandbox) int { return strings.Compare(a.rec.key(), b.rec.key()) })
	return out
}

// Delete detaches a container's sandbox(es). Unknown sandboxes are not an
// error: DEL is idempotent.
func (d *Daemon) Delete(id, ifName string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, s := range d.find(id, ifName) {
		if err := d.teardown(s); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// teardown removes everything of a sandbox. Called with d.mu held.
func (d *Daemon) teardown(s *sandbox) error {
	rec := s.rec
	var errs []error
	if err := d.dp.Detach(rec.Attachment); err != nil {
		errs = append(errs, err)
	}
	d.deleteEntryIfOwned(rec.HostIfindex, rec.DatapathID)
	if _, err := d.dp.DeleteRules(rec.DatapathID, -1); err != nil {
		errs = append(errs, err)
	}
	_ = d.dp.DeleteCounters(rec.DatapathID)
	if err := d.dp.DeleteFlowRate(rec.DatapathID); err != nil {
		errs = append(errs, err)
	}
	if err := d.wall.removeSandbox(rec.DatapathID); err != nil {
		errs = append(errs, err)
	}
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFlows(nil, errSandboxDeleted)
	if err := d.store.remove(rec.ContainerID, rec.IfName); err != nil {
		errs = append(errs, err)
	}
	d.unregister(s)
	if rec.Bridge != "" {
		d.releaseBridge(rec.Bridge)
	}
	d.log.Info("sandbox detached", "sandbox", rec.key())
	d.audit.record(auditSandboxDelete, map[string]any{"sandbox": rec.key(), "policy": rec.PolicyName})
	return errors.Join(errs...)
}

var errSandboxDeleted = errors.New("sandbox deleted")

// isolatePort turns on bridge port isolation for a sandbox's bridge port:
// the bridge then forwards nothing between two isolated ports, whatever
// the frame (a broadcast, a flood, another sandbox's MAC), with or without
// the datapath programs. A sandbox on a ptp link has no port to isolate.
func isolatePort(rec *record, host netlink.Link) error {
	if rec.Bridge == "" {
		return nil
	}
	if err := netlink.LinkSetIsolated(host, true); err != nil {
		return fmt.Errorf("isolating bridge port %s: %w", rec.HostInterface, err)
	}
	return nil
}

// checkIsolated verifies that a bridge sandbox's port is still isolated.
func checkIsolated(rec *record) error {
	if rec.Bridge == "" {
		return nil
	}
	l, err := netlink.LinkByIndex(rec.HostIfindex)
	if err != nil {
		return fmt.Errorf("bridge port %s: %w", rec.HostInterface, err)
	}
	pi, err := netlink.LinkGetProtinfo(l)
	if err != nil {
		return fmt.Errorf("reading bridge port flags of %s: %w", rec.HostInterface, err)
	}
	if !pi.Isolated {
		return fmt.Errorf("bridge port %s is not isolated", rec.HostInterface)
	}
	return nil
}

// ensureBridge attaches the bridge program to a bridge device once.
func (d *Daemon) ensureBridge(name string, ifindex int) error {
	att := d.bridgeAttachment(name, ifindex)
	if err := d.dp.Check(att); err == nil {
		return nil
	}
	if _, err := d.dp.Attach(att, d.cfg.AttachMode == "tc"); err != nil {
		return fmt.Errorf("attaching bridge program to %s: %w", name, err)
	}
	return nil
}

// bridgeAttachment is the attachment of a bridge device's program.
func (d *Daemon) bridgeAttachment(name string, ifindex int) bpf.Attachment {
	att := bpf.Attachment{Name: "bridge-" + name, Ifindex: ifindex, Bridge: true, Mode: bpf.AttachTCX}
	if d.cfg.AttachMode == "tc" {
		att.Mode = bpf.AttachLegacyTC
	}
	return att
}

// releaseBridge detaches the bridge program when no sandbox uses it.
func (d *Daemon) releaseBridge(name string) {
	for _, s := range d.sandboxes {
		if s.rec.Bridge == name {
			return
		}
	}
	mode := bpf.AttachTCX
	if d.cfg.AttachMode == "tc" {
		mode = bpf.AttachLegacyTC
	}
	if l, err := netlink.LinkByName(name); err == nil {
		_ = d.dp.Detach(bpf.Attachment{Name: "bridge-" + name, Ifindex: l.Attrs().Index, Bridge: true, Mode: mode})
	} else {
		_ = d.dp.Detach(bpf.Attachment{Name: "bridge-" + name, Bridge: true, Mode: bpf.AttachTCX})
	}
}

// Check verifies a sandbox: its attachment runs our program on its
// interface, its datapath entry is what we wrote, and the kernel's rules of
// the active generation are exactly the compiled policy's.
func (d *Daemon) Check(id, ifName string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	list := d.find(id, ifName)
	if len(list) == 0 {
		return &api.Error{Field: "containerID", Message: fmt.Sprintf("no sandbox %s/%s", id, ifName)}
	}
	for _, s := range list {
		if err := d.check(s); err != nil {
			return fmt.Errorf("%s: %w", s.rec.key(), err)
		}
	}
	return nil
}

func (d *Daemon) check(s *sandbox) error {
	rec := s.rec
	if err := d.dp.Check(rec.Attachment); err != nil {
		return fmt.Errorf("attachment: %w", err)
	}
	if err := d.wall.checkSandbox(rec.wallSandbox()); err != nil {
		return err
	}
	if err := checkIsolated(rec); err != nil {
		return err
	}
	if err := d.checkBudgets(rec.DatapathID, *s.limits.lim.Load()); err != nil {
		return err
	}
	got, err := d.dp.Sandbox(rec.HostIfindex)
	if err != nil {
		return fmt.Errorf("datapath entry: %w", err)
	}
	s.mu.Lock()
	want := rec.datapathEntry(s.epoch)
	s.mu.Unlock()
	if got.ID != want.ID || got.Generation != want.Generation || got.MAC.String() != want.MAC.String() ||
		got.IPv4 != want.IPv4 || got.IPv6 != want.IPv6 || got.GatewayMAC.String() != want.GatewayMAC.String() {
		return fmt.Errorf("datapath entry differs: have %+v, want %+v", got, want)
	}
	kernel, err := d.dp.SandboxRules(rec.DatapathID, uint8(rec.Generation%2))
	if err != nil {
		return err
	}
	s.mu.Lock()
	expected := append([]bpf.RuleEntry(nil), s.entries...)
	s.mu.Unlock()
	if diff := diffEntries(kernel, expected); diff != "" {
		return fmt.Errorf("rules differ from the policy: %s", diff)
	}
	return nil
}

func entryKey(e bpf.RuleEntry) string {
	return fmt.Sprintf("%v/%d/%d", e.Prefix.Masked(), e.Proto, e.Port)
}

// diffEntries compares the kernel's static entries with the expected ones.
func diffEntries(kernel, want []bpf.RuleEntry) string {
	have := map[string]bpf.RuleEntry{}
	for _, e := range kernel {
		if e.Expires == 0 {
			have[entryKey(e)] = e
		}
	}
	var missing, wrong []string
	for _, e := range want {
		k := entryKey(e)
		h, ok := have[k]
		switch {
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
