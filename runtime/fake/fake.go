// Package fake holds in-memory stand-ins for what the daemon's packages
// reach in the kernel: the datapath maps and attachments (Datapath), the
// node's interfaces (Links) and the nftables wall (Wall). They keep the
// same state the kernel would, answer lookups the way it does (longest
// prefix wins), and fail on demand, so admission with rollback, flips,
// learning, reconcile and GC are tested without root.
package fake

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/enforce"
)

// ErrInjected is what an injected failure returns (wrapped with the
// operation's name).
var ErrInjected = errors.New("injected failure")

// failures makes operations fail on demand.
type failures struct {
	mu   sync.Mutex
	next map[string]int // op -> calls to let through before failing (once)
	all  map[string]bool
}

// FailNext makes the call of op after skip successful ones fail once.
func (f *failures) FailNext(op string, skip int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.next == nil {
		f.next = map[string]int{}
	}
	f.next[op] = skip
}

// FailAlways makes every call of op fail (until Heal).
func (f *failures) FailAlways(op string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.all == nil {
		f.all = map[string]bool{}
	}
	f.all[op] = true
}

// Heal removes every injected failure.
func (f *failures) Heal() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next, f.all = nil, nil
}

func (f *failures) fail(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.all[op] {
		return fmt.Errorf("%s: %w", op, ErrInjected)
	}
	if n, ok := f.next[op]; ok {
		if n == 0 {
			delete(f.next, op)
			return fmt.Errorf("%s: %w", op, ErrInjected)
		}
		f.next[op] = n - 1
	}
	return nil
}

type ruleKey struct {
	id         uint32
	generation uint8
	proto      uint8
	port       uint16
	prefix     netip.Prefix
}

type budgetKey struct {
	id   uint32
	kind int
}

// Datapath is an in-memory enforce.Datapath.
type Datapath struct {
	failures
	mu          sync.Mutex
	rules       map[ruleKey]bpf.RuleEntry
	sandboxes   map[int]bpf.Sandbox
	counters    map[bpf.CounterKey]bpf.CounterValue
	attachments map[string]bpf.Attachment // by pin name
	detached    map[string]bool           // attached link whose program was detached under us
	budgets     map[budgetKey]bpf.FlowRate
	udpFlows    map[[2]netip.AddrPort]uint32
	repins      int
}

var _ enforce.Datapath = (*Datapath)(nil)

// NewDatapath returns an empty datapath.
func NewDatapath() *Datapath {
	return &Datapath{
		rules: map[ruleKey]bpf.RuleEntry{}, sandboxes: map[int]bpf.Sandbox{},
		counters: map[bpf.CounterKey]bpf.CounterValue{}, attachments: map[string]bpf.Attachment{},
		detached: map[string]bool{}, budgets: map[budgetKey]bpf.FlowRate{}, udpFlows: map[[2]netip.AddrPort]uint32{},
	}
}

func (d *Datapath) key(id uint32, gen uint8, e bpf.RuleEntry) ruleKey {
	return ruleKey{id, gen, e.Proto, e.Port, e.Prefix.Masked()}
}

func (d *Datapath) PutRules(id uint32, gen uint8, entries []bpf.RuleEntry) error {
	if err := d.fail("PutRules"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range entries {
		d.rules[d.key(id, gen, e)] = e
	}
	return nil
}

func (d *Datapath) DeleteRules(id uint32, gen int) (int, error) {
	if err := d.fail("DeleteRules"); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for k := range d.rules {
		if k.id == id && (gen < 0 || int(k.generation) == gen) {
			delete(d.rules, k)
			n++
		}
	}
	return n, nil
}

func (d *Datapath) DeleteRuleEntries(id uint32, gen uint8, entries []bpf.RuleEntry) error {
	if err := d.fail("DeleteRuleEntries"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range entries {
		delete(d.rules, d.key(id, gen, e))
	}
	return nil
}

func (d *Datapath) SandboxRules(id uint32, gen uint8) ([]bpf.RuleEntry, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []bpf.RuleEntry
	for k, e := range d.rules {
		if k.id == id && k.generation == gen {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Prefix.String()+fmt.Sprint(out[i].Port) < out[j].Prefix.String()+fmt.Sprint(out[j].Port)
	})
	return out, nil
}

// LookupRule answers as the LPM trie does: the longest prefix holding
// addr among the entries of (id, gen, proto, port).
func (d *Datapath) LookupRule(id uint32, gen, proto uint8, addr netip.Addr, port uint16) (bpf.RuleEntry, bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	best, found := bpf.RuleEntry{}, false
	for k, e := range d.rules {
		if k.id == id && k.generation == gen && k.proto == proto && k.port == port && k.prefix.Contains(addr.Unmap()) {
			if !found || k.prefix.Bits() > best.Prefix.Bits() {
				best, found = e, true
			}
		}
	}
	return best, found, nil
}

func (d *Datapath) RuleSandboxIDs() []uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[uint32]bool{}
	var out []uint32
	for k := range d.rules {
		if !seen[k.id] {
			seen[k.id] = true
			out = append(out, k.id)
		}
	}
	slices.Sort(out)
	return out
}

// Rules is the number of rule entries (every sandbox, both generations).
func (d *Datapath) Rules() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.rules)
}

func (d *Datapath) PutSandbox(ifindex int, s bpf.Sandbox) error {
	if err := d.fail("PutSandbox"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sandboxes[ifindex] = s
	return nil
}

func (d *Datapath) Sandbox(ifindex int) (bpf.Sandbox, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.sandboxes[ifindex]
	if !ok {
		return bpf.Sandbox{}, fmt.Errorf("reading sandbox entry of ifindex %d: key does not exist", ifindex)
	}
	return s, nil
}

func (d *Datapath) Sandboxes() (map[int]bpf.Sandbox, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[int]bpf.Sandbox{}
	for k, v := range d.sandboxes {
		out[k] = v
	}
	return out, nil
}

func (d *Datapath) DeleteSandbox(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.sandboxes, ifindex)
	return nil
}

// Count adds to a counter (what the datapath does per packet).
func (d *Datapath) Count(k bpf.CounterKey, packets uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.counters[k]
	v.Packets += packets
	v.Flows += packets
	d.counters[k] = v
}

func (d *Datapath) Counters() (map[bpf.CounterKey]bpf.CounterValue, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[bpf.CounterKey]bpf.CounterValue{}
	for k, v := range d.counters {
		out[k] = v
	}
	return out, nil
}

func (d *Datapath) DeleteCounters(id uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k := range d.counters {
		if k.SandboxID == id {
			delete(d.counters, k)
		}
	}
	return nil
}

func (d *Datapath) Attach(a bpf.Attachment, preferLegacy bool) (bpf.Attachment, error) {
	if err := d.fail("Attach"); err != nil {
		return a, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	a.Mode = bpf.AttachTCX
	if preferLegacy {
		a.Mode = bpf.AttachLegacyTC
	}
	d.attachments[a.Name] = a
	delete(d.detached, a.Name)
	return a, nil
}

func (d *Datapath) Detach(a bpf.Attachment) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.attachments, a.Name)
	delete(d.detached, a.Name)
	return nil
}

func (d *Datapath) Check(a bpf.Attachment) error {
	if err := d.fail("Check"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	got, ok := d.attachments[a.Name]
	switch {
	case !ok:
		return fmt.Errorf("loading link pin %s: no such file or directory", a.Name)
	case d.detached[a.Name]:
		return bpf.ErrLinkGone
	case got.Ifindex != a.Ifindex:
		return fmt.Errorf("link %s is attached to ifindex %d, want %d", a.Name, got.Ifindex, a.Ifindex)
	}
	return nil
}

// Attachments lists the attached pin names, sorted.
func (d *Datapath) Attachments() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for n := range d.attachments {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// DetachUnder detaches a link's program the way `bpftool link detach`
// does: the pin stays, the link is defunct.
func (d *Datapath) DetachUnder(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.detached[name] = true
}

func (d *Datapath) PinnedLinks() ([]string, error) { return d.Attachments(), nil }

func (d *Datapath) RepinMaps() ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.repins++
	return nil, nil
}

func (d *Datapath) setBudget(id uint32, kind int, r bpf.FlowRate) error {
	if err := d.fail("SetBudget"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if r.PerSecond <= 0 {
		delete(d.budgets, budgetKey{id, kind})
		return nil
	}
	d.budgets[budgetKey{id, kind}] = r
	return nil
}

func (d *Datapath) budget(id uint32, kind int) (bpf.FlowRate, bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	r, ok := d.budgets[budgetKey{id, kind}]
	return r, ok, nil
}

func (d *Datapath) SetFlowRate(id uint32, r bpf.FlowRate) error       { return d.setBudget(id, 0, r) }
func (d *Datapath) SetDNSRate(id uint32, r bpf.FlowRate) error        { return d.setBudget(id, 1, r) }
func (d *Datapath) SetEventRate(id uint32, r bpf.FlowRate) error      { return d.setBudget(id, 2, r) }
func (d *Datapath) FlowRateOf(id uint32) (bpf.FlowRate, bool, error)  { return d.budget(id, 0) }
func (d *Datapath) DNSRateOf(id uint32) (bpf.FlowRate, bool, error)   { return d.budget(id, 1) }
func (d *Datapath) EventRateOf(id uint32) (bpf.FlowRate, bool, error) { return d.budget(id, 2) }

func (d *Datapath) DeleteFlowRate(id uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k := range d.budgets {
		if k.id == id {
			delete(d.budgets, k)
		}
	}
	return nil
}

func (d *Datapath) FlowRateIDs() []uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[uint32]bool{}
	var out []uint32
	for k := range d.budgets {
		if !seen[k.id] {
			seen[k.id] = true
			out = append(out, k.id)
		}
	}
	return out
}

// NoteUDPFlow and ForgetUDPFlow keep the UDP flows a relay holds.
func (d *Datapath) NoteUDPFlow(id uint32, src, dst netip.AddrPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.udpFlows[[2]netip.AddrPort{src, dst}] = id
	return nil
}

func (d *Datapath) ForgetUDPFlow(id uint32, src, dst netip.AddrPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.udpFlows, [2]netip.AddrPort{src, dst})
	return nil
}

// UDPFlows is the number of UDP flows noted.
func (d *Datapath) UDPFlows() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.udpFlows)
}

// Links is an in-memory enforce.Links.
type Links struct {
	failures
	mu       sync.Mutex
	byName   map[string]*enforce.Link
	isolated map[int]bool
	ll       map[string]netip.Addr // nsPath + "/" + ifname
	next     int
}

var _ enforce.Links = (*Links)(nil)

// NewLinks returns a node with only loopback.
func NewLinks() *Links {
	l := &Links{byName: map[string]*enforce.Link{}, isolated: map[int]bool{}, ll: map[string]netip.Addr{}, next: 1}
	l.Add("lo", "loopback", 0)
	return l
}

// Add creates an interface and returns it (its MAC derived from its index).
func (l *Links) Add(name, typ string, master int) enforce.Link {
	l.mu.Lock()
	defer l.mu.Unlock()
	idx := l.next
	l.next++
	link := &enforce.Link{Name: name, Index: idx, Type: typ, MasterIndex: master,
		MAC: net.HardwareAddr{0x02, 0, 0, 0, byte(idx >> 8), byte(idx)}}
	l.byName[name] = link
	return *link
}

// Remove deletes an interface (as a runtime's CNI DEL does).
func (l *Links) Remove(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if link, ok := l.byName[name]; ok {
		delete(l.isolated, link.Index)
		delete(l.byName, name)
	}
}

func (l *Links) ByName(name string) (enforce.Link, error) {
	if err := l.fail("ByName"); err != nil {
		return enforce.Link{}, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if link, ok := l.byName[name]; ok {
		return *link, nil
	}
	return enforce.Link{}, fmt.Errorf("Link not found")
}

func (l *Links) ByIndex(index int) (enforce.Link, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, link := range l.byName {
		if link.Index == index {
			return *link, nil
		}
	}
	return enforce.Link{}, fmt.Errorf("Link not found")
}

func (l *Links) SetIsolated(index int, on bool) error {
	if err := l.fail("SetIsolated"); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.isolated[index] = on
	return nil
}

func (l *Links) Isolated(index int) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.isolated[index], nil
}

// SetLinkLocal gives an interface of a namespace a link-local address.
func (l *Links) SetLinkLocal(nsPath, ifName string, a netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ll[nsPath+"/"+ifName] = a
}

func (l *Links) LinkLocal(nsPath, ifName string) (netip.Addr, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a, ok := l.ll[nsPath+"/"+ifName]
	return a, ok
}

// Wall is an in-memory enforce.Wall.
type Wall struct {
	failures
	mu        sync.Mutex
	installed bool
	chains    map[uint32]enforce.WallSandbox
	drops     map[uint32]uint64
}

var _ enforce.Wall = (*Wall)(nil)

// NewWall returns a wall not yet installed.
func NewWall() *Wall {
	return &Wall{chains: map[uint32]enforce.WallSandbox{}, drops: map[uint32]uint64{}}
}

func (w *Wall) Install() error {
	if err := w.fail("Install"); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.installed = true
	return nil
}

func (w *Wall) CheckNode() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.installed {
		return errors.New("nftables wall: no node chains")
	}
	return nil
}

// Uninstall removes the node chains (as `nft delete` would).
func (w *Wall) Uninstall() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.installed = false
}

func (w *Wall) AddSandbox(s enforce.WallSandbox) error {
	if err := w.fail("AddSandbox"); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.chains[s.ID] = s
	return nil
}

func (w *Wall) RemoveSandbox(id uint32) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.chains, id)
	return nil
}

func (w *Wall) CheckSandbox(s enforce.WallSandbox) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	got, ok := w.chains[s.ID]
	if !ok || got.Ifname != s.Ifname {
		return fmt.Errorf("nftables wall: no chain for sandbox %d on %s", s.ID, s.Ifname)
	}
	return nil
}

func (w *Wall) SandboxChains() (map[string]uint32, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]uint32{}
	for id, s := range w.chains {
		out[fmt.Sprintf("sb_%d_%s", id, s.Ifname)] = id
	}
	return out, nil
}

// Drop counts packets the wall dropped for a sandbox.
func (w *Wall) Drop(id uint32, n uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.drops[id] += n
}

func (w *Wall) Counts() (enforce.WallCounts, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := enforce.WallCounts{Sandboxes: map[uint32]uint64{}}
	for id, n := range w.drops {
		out.Sandboxes[id] = n
	}
	return out, nil
}

func (w *Wall) Remove() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.installed = false
	w.chains = map[uint32]enforce.WallSandbox{}
	return nil
}

func (w *Wall) Present() (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.installed || len(w.chains) > 0, nil
}

// Chains is the number of sandbox chains.
func (w *Wall) Chains() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.chains)
}
