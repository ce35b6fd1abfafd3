package enforce_test

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/enforce"
	"github.com/cleanwall/cleanwall/runtime/fake"
	"github.com/cleanwall/cleanwall/runtime/fqdn"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

const policyA = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: a}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [api.example.test]}
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
    - name: api
      to: [{fqdn: api.example.test}]
      ports: [{port: 443}]
      mode: open
`

const policyB = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: b}
spec:
  limits: {newFlowsPerSecond: 10}
  egress:
    - name: other
      to: [{cidr: 203.0.113.0/24}]
      ports: [{port: 9000, protocol: UDP}]
      mode: open
`

func compile(t *testing.T, doc string) *policy.Compiled {
	t.Helper()
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type env struct {
	t     *testing.T
	dp    *fake.Datapath
	links *fake.Links
	wall  *fake.Wall
	e     *enforce.Enforcer
	reg   *sandbox.Registry
	dir   string
}

func newEnv(t *testing.T) *env {
	dp, links, wall := fake.NewDatapath(), fake.NewLinks(), fake.NewWall()
	reg := sandbox.NewRegistry()
	dir := t.TempDir()
	e := &enforce.Enforcer{DP: dp, Links: links, Wall: wall, Store: sandbox.Store{Dir: dir}, Sandboxes: reg,
		Learner: &fqdn.Learner{DP: dp, Log: testutil.Logger(t)}, AttachMode: "auto", DNSRate: 100, EventRate: 100, Log: testutil.Logger(t)}
	return &env{t: t, dp: dp, links: links, wall: wall, e: e, reg: reg, dir: dir}
}

// request is an ADD for a sandbox on a new host veth (or bridge port).
func (v *env) request(name string, n int, bridge string) api.AddRequest {
	master := 0
	if bridge != "" {
		br, err := v.links.ByName(bridge)
		if err != nil {
			br = v.links.Add(bridge, "bridge", 0)
		}
		master = br.Index
	}
	host := v.links.Add("veth-"+name, "veth", master)
	return api.AddRequest{ContainerID: "c-" + name, IfName: "eth0", Netns: "/run/netns/" + name,
		HostInterface: host.Name, Bridge: bridge, MAC: fmt.Sprintf("02:aa:00:00:00:%02x", n),
		IPs: []api.IPConfig{{Address: netip.MustParsePrefix(fmt.Sprintf("10.1.0.%d/24", n)), Gateway: netip.MustParseAddr("10.1.0.1")},
			{Address: netip.MustParsePrefix(fmt.Sprintf("fd00::%d/64", n)), Gateway: netip.MustParseAddr("fd00::1")}}}
}

func (v *env) admission(req api.AddRequest, doc string) enforce.Admission {
	c := compile(v.t, doc)
	return enforce.Admission{Req: req, Policy: []byte(doc), Source: "test", Compiled: c, Configs: proxies.RuleConfigs{},
		Limits: limits.Effective(limits.Default, c)}
}

func (v *env) admit(name string, n int, doc string) *sandbox.Sandbox {
	v.t.Helper()
	v.reg.Lock()
	defer v.reg.Unlock()
	s, err := v.e.Admit(v.admission(v.request(name, n, ""), doc))
	if err != nil {
		v.t.Fatal(err)
	}
	return s
}

// wallRetired proves a torn-down sandbox's wall chain stays while its
// interface is there, dropping, with its datapath id kept from new
// sandboxes, and goes with the interface (at the watchdog's next round).
func (v *env) wallRetired(id uint32, host string) {
	v.t.Helper()
	ws := enforce.WallSandbox{ID: id, Ifname: host}
	if _, err := v.links.ByName(host); err == nil {
		if err := v.wall.CheckSandbox(ws); err != nil {
			v.t.Errorf("the wall chain of sandbox %d went before its interface %s: %v", id, host, err)
		}
		v.reg.Lock()
		next, err := v.reg.AllocateID()
		v.reg.Unlock()
		if err != nil || next == id {
			v.t.Errorf("datapath id %d handed out while its wall chain is kept (%v)", id, err)
		}
		v.links.Remove(host)
		v.e.Repair(func(what, sandbox string, found, err error) {})
	}
	if err := v.wall.CheckSandbox(ws); err == nil {
		v.t.Errorf("wall chain of sandbox %d left after its interface went", id)
	}
	v.reg.Lock()
	left := v.e.Retired()
	v.reg.Unlock()
	if left != 0 {
		v.t.Errorf("%d retired wall chains left", left)
	}
}

// nothingAfterTeardown is nothingOf for a torn-down sandbox: its wall
// chain goes with its interface (wallRetired), everything else at once.
func (v *env) nothingAfterTeardown(id uint32, host string) {
	v.t.Helper()
	v.wallRetired(id, host)
	v.nothingOf(id, host)
}

// nothingOf proves no trace of datapath id is left anywhere.
func (v *env) nothingOf(id uint32, host string) {
	v.t.Helper()
	for _, rid := range v.dp.RuleSandboxIDs() {
		if rid == id {
			v.t.Errorf("rules of sandbox %d left", id)
		}
	}
	sbs, _ := v.dp.Sandboxes()
	for _, s := range sbs {
		if s.ID == id {
			v.t.Errorf("datapath entry of sandbox %d left", id)
		}
	}
	for _, a := range v.dp.Attachments() {
		if strings.HasPrefix(a, fmt.Sprintf("sandbox-%d-", id)) {
			v.t.Errorf("attachment %s left", a)
		}
	}
	if err := v.wall.CheckSandbox(enforce.WallSandbox{ID: id, Ifname: host}); err == nil {
		v.t.Errorf("wall chain of sandbox %d left", id)
	}
	if _, ok, _ := v.dp.FlowRateOf(id); ok {
		v.t.Errorf("budget of sandbox %d left", id)
	}
	recs, _ := sandbox.Store{Dir: v.dir}.Load()
	for _, r := range recs {
		if r.DatapathID == id {
			v.t.Errorf("record of sandbox %d left", id)
		}
	}
}

func TestAdmitProgramsEveryLayer(t *testing.T) {
	v := newEnv(t)
	s := v.admit("a", 2, policyA)
	if err := v.e.Check(s); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
	rec := s.Record()
	if rec.Attachment.Mode != bpf.AttachTCX || s.ID != 1 {
		t.Fatalf("record %+v", rec)
	}
	if e, ok, _ := v.dp.LookupRule(s.ID, 0, 6, netip.MustParseAddr("198.51.100.10"), 8080); !ok || e.RuleID != 1 {
		t.Fatalf("the rule's entry: %+v %v", e, ok)
	}
	if r, ok, _ := v.dp.FlowRateOf(s.ID); !ok || r.PerSecond != limits.Default.NewFlowsPerSecond {
		t.Fatalf("flow budget %+v %v", r, ok)
	}
	if err := v.wall.CheckSandbox(enforce.WallSandbox{ID: s.ID, Ifname: rec.HostInterface}); err != nil {
		t.Fatal(err)
	}
	entry, _ := v.dp.Sandbox(rec.HostIfindex)
	if entry.IPv4 != netip.MustParseAddr("10.1.0.2") || !entry.IPv6LinkLocal.IsLinkLocalUnicast() {
		t.Fatalf("entry %+v", entry)
	}
	recs, _ := v.e.Store.Load()
	if len(recs) != 1 || recs[0].Key() != "c-a/eth0" {
		t.Fatalf("records %+v", recs)
	}
	// The same attachment or an address already taken is refused.
	v.reg.Lock()
	_, err := v.e.Admit(v.admission(v.request("a2", 2, ""), policyA))
	v.reg.Unlock()
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Field != "ips" {
		t.Fatalf("a second sandbox with the same address: %v", err)
	}
}

// Every step of ADD failing leaves nothing behind.
func TestAdmitRollsBack(t *testing.T) {
	for _, op := range []struct {
		name string
		arm  func(v *env)
	}{
		{"wall", func(v *env) { v.wall.FailNext("AddSandbox", 0) }},
		{"isolation", func(v *env) { v.links.FailNext("SetIsolated", 0) }},
		{"rules", func(v *env) { v.dp.FailNext("PutRules", 0) }},
		{"entry", func(v *env) { v.dp.FailNext("PutSandbox", 0) }},
		{"budgets", func(v *env) { v.dp.FailNext("SetBudget", 1) }},
		{"attach", func(v *env) { v.dp.FailNext("Attach", 1) }}, // the bridge's attach passes, the port's fails
		{"verify", func(v *env) { v.dp.FailNext("Check", 1) }},
	} {
		t.Run(op.name, func(t *testing.T) {
			v := newEnv(t)
			req := v.request("x", 3, "cwbr0")
			op.arm(v)
			v.reg.Lock()
			_, err := v.e.Admit(v.admission(req, policyA))
			v.reg.Unlock()
			if !errors.Is(err, fake.ErrInjected) {
				t.Fatalf("ADD did not fail with the injected failure: %v", err)
			}
			v.nothingOf(1, req.HostInterface)
			if v.reg.Len() != 0 {
				t.Fatal("a failed ADD registered the sandbox")
			}
			host, _ := v.links.ByName(req.HostInterface)
			if on, _ := v.links.Isolated(host.Index); on {
				t.Error("port isolation left on")
			}
			// The next ADD of the same sandbox works.
			v.dp.Heal()
			v.links.Heal()
			v.wall.Heal()
			v.reg.Lock()
			s, err := v.e.Admit(v.admission(req, policyA))
			v.reg.Unlock()
			if err != nil {
				t.Fatalf("ADD after the failure: %v", err)
			}
			if err := v.e.Check(s); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	v := newEnv(t)
	req := v.request("bad", 4, "")
	req.HostInterface = "nope"
	v.reg.Lock()
	defer v.reg.Unlock()
	_, err := v.e.Admit(v.admission(req, policyA))
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Field != "hostInterface" {
		t.Fatalf("unknown host interface: %v", err)
	}
	req = v.request("br", 5, "")
	req.Bridge = req.HostInterface // not a bridge
	_, err = v.e.Admit(v.admission(req, policyA))
	if !errors.As(err, &ae) || ae.Field != "bridge" {
		t.Fatalf("a bridge that is not one: %v", err)
	}
	other := v.links.Add("br-other", "bridge", 0)
	req = v.request("port", 6, "")
	req.Bridge = other.Name // the port is not on it
	_, err = v.e.Admit(v.admission(req, policyA))
	if !errors.As(err, &ae) || ae.Field != "hostInterface" {
		t.Fatalf("a port of another bridge: %v", err)
	}
}

func TestBridgeSandboxes(t *testing.T) {
	v := newEnv(t)
	v.reg.Lock()
	a, err := v.e.Admit(v.admission(v.request("ba", 7, "cwbr1"), policyA))
	if err != nil {
		t.Fatal(err)
	}
	b, err := v.e.Admit(v.admission(v.request("bb", 8, "cwbr1"), policyA))
	v.reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*sandbox.Sandbox{a, b} {
		if on, _ := v.links.Isolated(s.Rec.HostIfindex); !on {
			t.Fatalf("%s: port not isolated", s.Name)
		}
		if err := v.e.Check(s); err != nil {
			t.Fatal(err)
		}
	}
	if !contains(v.dp.Attachments(), "bridge-cwbr1") {
		t.Fatal("no bridge program")
	}
	// The bridge program stays while one sandbox uses it.
	v.reg.Lock()
	_ = v.e.Teardown(a)
	v.reg.Unlock()
	if !contains(v.dp.Attachments(), "bridge-cwbr1") {
		t.Fatal("bridge program removed with a sandbox still on the bridge")
	}
	v.reg.Lock()
	_ = v.e.Teardown(b)
	v.reg.Unlock()
	if contains(v.dp.Attachments(), "bridge-cwbr1") {
		t.Fatal("bridge program left with no sandbox on the bridge")
	}
	// Port isolation lost is seen by CHECK.
	v.reg.Lock()
	c, err := v.e.Admit(v.admission(v.request("bc", 9, "cwbr1"), policyA))
	v.reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	_ = v.links.SetIsolated(c.Rec.HostIfindex, false)
	if err := v.e.Check(c); err == nil || !strings.Contains(err.Error(), "not isolated") {
		t.Fatalf("CHECK with isolation off: %v", err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestTeardownLeavesNothing(t *testing.T) {
	v := newEnv(t)
	s := v.admit("t", 10, policyA)
	closed := make(chan error, 1)
	f := &sandbox.Flow{Cancel: func(cause error) { closed <- cause }}
	if ok, err := s.AddFlowDecidedAt(f, s.Record()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	v.reg.Lock()
	if err := v.e.Teardown(s); err != nil {
		t.Fatal(err)
	}
	v.reg.Unlock()
	v.nothingAfterTeardown(s.ID, s.Rec.HostInterface)
	if cause := <-closed; !errors.Is(cause, enforce.ErrDeleted) {
		t.Fatalf("the flow was closed with %v", cause)
	}
	if ok, err := s.AddFlowDecidedAt(&sandbox.Flow{Cancel: func(error) {}}, s.Record()); ok || !errors.Is(err, sandbox.ErrDeleted) {
		t.Fatal("a deleted sandbox took a new flow")
	}
}

// A flip writes the new generation, flips the entry, removes the old one,
// carries learnt addresses over and sets the new limits.
func TestFlip(t *testing.T) {
	v := newEnv(t)
	s := v.admit("f", 11, policyA)
	// An address learnt for api.example.test under generation 0.
	v.e.Learner.Learn(s, "api.example.test", []netip.Addr{netip.MustParseAddr("198.51.100.44")}, 300e9)
	if _, ok, _ := v.dp.LookupRule(s.ID, 0, 6, netip.MustParseAddr("198.51.100.44"), 443); !ok {
		t.Fatal("learnt address not in generation 0")
	}
	c := compile(t, policyA+"    - name: extra\n      to: [{cidr: 192.0.2.0/24}]\n      ports: [{port: 22}]\n      mode: open\n")
	v.reg.Lock()
	err := v.e.Flip(s, enforce.Change{Policy: []byte("x"), Source: "t", Compiled: c, Configs: proxies.RuleConfigs{}, Limits: limits.Effective(limits.Default, c)})
	v.reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	rec := s.Record()
	if rec.Generation != 1 {
		t.Fatalf("generation %d", rec.Generation)
	}
	entry, _ := v.dp.Sandbox(rec.HostIfindex)
	if entry.Generation != 1 {
		t.Fatal("the entry did not flip")
	}
	if old, _ := v.dp.SandboxRules(s.ID, 0); len(old) != 0 {
		t.Fatalf("generation 0 left: %v", old)
	}
	if _, ok, _ := v.dp.LookupRule(s.ID, 1, 6, netip.MustParseAddr("192.0.2.7"), 22); !ok {
		t.Fatal("the new rule is not in generation 1")
	}
	if _, ok, _ := v.dp.LookupRule(s.ID, 1, 6, netip.MustParseAddr("198.51.100.44"), 443); !ok {
		t.Fatal("the learnt address was not carried into generation 1")
	}
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}
	// To a policy with lower limits: the budget follows.
	cb := compile(t, policyB)
	v.reg.Lock()
	err = v.e.Flip(s, enforce.Change{Policy: []byte(policyB), Source: "t", Compiled: cb, Limits: limits.Effective(limits.Default, cb)})
	v.reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if r, _, _ := v.dp.FlowRateOf(s.ID); r.PerSecond != 10 {
		t.Fatalf("budget after the flip: %+v", r)
	}
	if _, ok, _ := v.dp.LookupRule(s.ID, 0, 6, netip.MustParseAddr("198.51.100.44"), 443); ok {
		t.Fatal("an address learnt for a rule the new policy lacks stayed")
	}
}

// A flip that fails before the flip leaves the old generation enforced.
func TestFlipFailureKeepsTheOldGeneration(t *testing.T) {
	for _, op := range []string{"PutRules", "PutSandbox"} {
		t.Run(op, func(t *testing.T) {
			v := newEnv(t)
			s := v.admit("g", 12, policyA)
			v.dp.FailNext(op, 0)
			cb := compile(t, policyB)
			v.reg.Lock()
			err := v.e.Flip(s, enforce.Change{Compiled: cb, Limits: limits.Effective(limits.Default, cb)})
			v.reg.Unlock()
			if !errors.Is(err, fake.ErrInjected) {
				t.Fatal(err)
			}
			if s.Record().Generation != 0 {
				t.Fatal("the record moved on")
			}
			if rules, _ := v.dp.SandboxRules(s.ID, 1); len(rules) != 0 {
				t.Fatalf("the failed generation left %d entries", len(rules))
			}
			if err := v.e.Check(s); err != nil {
				t.Fatalf("the old generation is not intact: %v", err)
			}
		})
	}
}

// After a restart: a live sandbox is re-adopted under a fresh generation,
// one whose interface is gone is cleaned up, and what no record owns goes.
func TestReconcile(t *testing.T) {
	v := newEnv(t)
	live := v.admit("live", 13, policyA)
	gone := v.admit("gone", 14, policyA)
	goneIf := gone.Rec.HostInterface
	v.links.Remove(goneIf)
	// Leftovers no record owns: rules, a budget, a link on a gone interface.
	_ = v.dp.PutRules(99, 0, []bpf.RuleEntry{{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Proto: 6, Port: 1, RuleID: 1}})
	_ = v.dp.SetFlowRate(99, bpf.FlowRate{PerSecond: 1, Burst: 1})
	_, _ = v.dp.Attach(bpf.Attachment{Name: "sandbox-99-if999", Ifindex: 999}, false)

	// A new daemon: fresh registry over the same kernel state and records.
	reg := sandbox.NewRegistry()
	e2 := *v.e
	e2.Sandboxes = reg
	reg.Lock()
	err := e2.Reconcile(func(rec *sandbox.Record) (enforce.Change, error) {
		c := compile(t, string(rec.Policy))
		return enforce.Change{Policy: rec.Policy, Source: rec.PolicySource, Compiled: c, Limits: limits.Effective(limits.Default, c)}, nil
	})
	reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	s := reg.Lookup(live.Name)
	if s == nil || reg.Len() != 1 {
		t.Fatalf("re-adopted %d sandboxes", reg.Len())
	}
	if s.Record().Generation != 1 {
		t.Fatalf("not re-applied as a fresh generation: %d", s.Record().Generation)
	}
	if err := e2.Check(s); err != nil {
		t.Fatal(err)
	}
	v.nothingOf(gone.ID, goneIf)
	for _, id := range v.dp.RuleSandboxIDs() {
		if id == 99 {
			t.Error("orphan rules left")
		}
	}
	if _, ok, _ := v.dp.FlowRateOf(99); ok {
		t.Error("orphan budget left")
	}
	if contains(v.dp.Attachments(), "sandbox-99-if999") {
		t.Error("orphan link on a gone interface left")
	}
}

// A stored policy that no longer resolves is re-adopted as nothing-allowed.
func TestReconcileInvalidStoredPolicy(t *testing.T) {
	v := newEnv(t)
	s := v.admit("inv", 15, policyA)
	reg := sandbox.NewRegistry()
	e2 := *v.e
	e2.Sandboxes = reg
	reg.Lock()
	err := e2.Reconcile(func(rec *sandbox.Record) (enforce.Change, error) {
		if !strings.Contains(string(rec.Policy), "invalid-stored-policy") {
			return enforce.Change{}, errors.New("no longer valid")
		}
		c := compile(t, string(rec.Policy))
		return enforce.Change{Policy: rec.Policy, Compiled: c, Limits: limits.Effective(limits.Default, c)}, nil
	})
	reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	got := reg.Lookup(s.Name)
	if got == nil || len(got.Entries) != 0 {
		t.Fatalf("re-adopted with %v", got)
	}
	if rules, _ := v.dp.SandboxRules(s.ID, 1); len(rules) != 0 {
		t.Fatalf("the nothing-allowed generation has %d rules", len(rules))
	}
}

func TestGC(t *testing.T) {
	v := newEnv(t)
	a := v.admit("ga", 16, policyA)
	b := v.admit("gb", 17, policyA)
	v.reg.Lock()
	removed := v.e.GC([]api.AttachmentRef{{ContainerID: a.ContainerID, IfName: "eth0"}})
	v.reg.Unlock()
	if len(removed) != 1 || removed[0].ContainerID != b.ContainerID {
		t.Fatalf("removed %+v", removed)
	}
	v.nothingAfterTeardown(b.ID, b.Rec.HostInterface)
	if err := v.e.Check(a); err != nil {
		t.Fatal(err)
	}
}

// The watchdog puts back what was removed under the daemon.
func TestRepair(t *testing.T) {
	v := newEnv(t)
	if err := v.wall.Install(); err != nil {
		t.Fatal(err)
	}
	v.reg.Lock()
	s, err := v.e.Admit(v.admission(v.request("r", 18, "cwbr2"), policyA))
	v.reg.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	rec := s.Record()
	v.dp.DetachUnder(rec.Attachment.Name)
	_ = v.wall.RemoveSandbox(s.ID)
	_ = v.links.SetIsolated(rec.HostIfindex, false)
	v.wall.Uninstall()
	if err := v.e.Check(s); err == nil {
		t.Fatal("CHECK passes with the program detached")
	}
	repaired := map[string]int{}
	v.e.Repair(func(what, sb string, found, err error) {
		if err != nil {
			t.Errorf("repair of %s failed: %v", what, err)
		}
		repaired[what]++
	})
	for _, what := range []string{enforce.RepairAttachment, enforce.RepairWall, enforce.RepairIsolation, enforce.RepairNodeWall} {
		if repaired[what] != 1 {
			t.Errorf("%s repaired %d times: %v", what, repaired[what], repaired)
		}
	}
	if err := v.e.Check(s); err != nil {
		t.Fatalf("CHECK after the repair: %v", err)
	}
	// Nothing missing: nothing done.
	n := 0
	v.e.Repair(func(string, string, error, error) { n++ })
	if n != 0 {
		t.Fatalf("%d repairs of an intact sandbox", n)
	}
	// A sandbox whose interface is gone is left to DEL or GC.
	v.dp.DetachUnder(rec.Attachment.Name)
	v.links.Remove(rec.HostInterface)
	v.e.Repair(func(what, sb string, found, err error) {
		t.Errorf("repaired %s of a sandbox whose interface is gone", what)
	})
}

// Attach mode tcx is refused where the kernel falls back to tc.
func TestAttachModes(t *testing.T) {
	v := newEnv(t)
	v.e.AttachMode = "tc"
	s := v.admit("tc", 19, policyA)
	if s.Record().Attachment.Mode != bpf.AttachLegacyTC {
		t.Fatalf("mode %s", s.Record().Attachment.Mode)
	}
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}
}

// A learnt address of an earlier fqdn rule holds a later rule's static
// host entry (the lower rule id owns the key): CHECK must not call the
// static entry missing.
func TestCheckWithALearntAddressOverAStaticHost(t *testing.T) {
	v := newEnv(t)
	doc := `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: over}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [api.example.test]}
  egress:
    - name: api
      to: [{fqdn: api.example.test}]
      ports: [{port: 443}]
      mode: open
    - name: host
      to: [{cidr: 198.51.100.30/32}]
      ports: [{port: 443}]
      mode: open
`
	s := v.admit("l", 2, doc)
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}
	if !v.e.Learner.Learn(s, "api.example.test", []netip.Addr{netip.MustParseAddr("198.51.100.30")}, time.Minute) {
		t.Fatal("nothing learnt")
	}
	got, ok, err := v.dp.LookupRule(s.ID, 0, 6, netip.MustParseAddr("198.51.100.30"), 443)
	if err != nil || !ok || got.Expires == 0 || got.RuleID != s.Compiled.Rules[0].ID {
		t.Fatalf("the learnt entry of the earlier rule does not hold the address: %+v %v %v", got, ok, err)
	}
	if err := v.e.Check(s); err != nil {
		t.Fatalf("check with the learnt entry holding the static one's key: %v", err)
	}
	// A static entry really missing is still found.
	if err := v.dp.DeleteRuleEntries(s.ID, 0, []bpf.RuleEntry{sandbox.DatapathEntries(s.Compiled)[0]}); err != nil {
		t.Fatal(err)
	}
	if err := v.e.Check(s); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("check after deleting a static entry: %v", err)
	}
}

// Every part of an admission and of a teardown is timed, once each, in
// order: what make bench's admission breakdown reads.
func TestPhasesTimed(t *testing.T) {
	v := newEnv(t)
	var got []string
	v.e.Phase = func(op, phase string, d time.Duration) {
		if d < 0 {
			t.Errorf("%s %s took %v", op, phase, d)
		}
		got = append(got, op+"/"+phase)
	}
	s := v.admit("ph", 11, policyA)
	v.reg.Lock()
	if err := v.e.Teardown(s); err != nil {
		t.Fatal(err)
	}
	v.reg.Unlock()
	want := []string{"add/links", "add/wall", "add/maps", "add/attach", "add/check", "add/save", "del/maps", "del/wall", "del/attach", "del/save"}
	if !slices.Equal(got, want) {
		t.Fatalf("phases %v, want %v", got, want)
	}
}
