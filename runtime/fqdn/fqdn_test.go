package fqdn_test

import (
	"fmt"
	"net/netip"
	"sync/atomic"
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

// These tests learn addresses into sandboxes the real enforcer admitted
// over the fake datapath. The learner runs on a clock of the test's (its
// Now): expiries are on that clock, and the fake datapath's lookups do not
// check them, so a test reads Expires where the kernel would compare it
// with bpf_ktime_get_ns. The rule epoch is not on that clock: it comes
// from sandbox.NextEpoch (the real CLOCK_MONOTONIC), so the tests only ask
// that it moves.

const tcp = 6

// policyF's rules, in order: a static host an fqdn address must not take
// over (1), the fqdn rule (2), a later wide cidr (3) and a later static
// host (4) that learnt addresses do take over while they live.
const policyF = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: f}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [api.example.test, other.example.test]}
  egress:
    - name: pinned
      to: [{cidr: 198.51.100.7/32}]
      ports: [{port: 443}]
      mode: open
    - name: api
      to: [{fqdn: api.example.test}]
      ports: [{port: 443}]
      mode: open
    - name: wide
      to: [{cidr: 203.0.113.0/24}]
      ports: [{port: 443}]
      mode: open
    - name: late-host
      to: [{cidr: 192.0.2.9/32}]
      ports: [{port: 443}]
      mode: open
`

// policyMoved keeps the fqdn rule, under another id (3).
const policyMoved = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: moved}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [api.example.test]}
  egress:
    - name: ssh
      to: [{cidr: 192.0.2.0/24}]
      ports: [{port: 22}]
      mode: open
    - name: wide
      to: [{cidr: 203.0.113.0/24}]
      ports: [{port: 443}]
      mode: open
    - name: api
      to: [{fqdn: api.example.test}]
      ports: [{port: 443}]
      mode: open
`

// policyNoFQDN drops the fqdn rule.
const policyNoFQDN = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: nofqdn}
spec:
  egress:
    - name: wide
      to: [{cidr: 203.0.113.0/24}]
      ports: [{port: 443}]
      mode: open
`

var (
	learnt   = netip.MustParseAddr("198.51.100.44")
	learnt6  = netip.MustParseAddr("2001:db8::44")
	pinned   = netip.MustParseAddr("198.51.100.7")
	inWide   = netip.MustParseAddr("203.0.113.5")
	lateHost = netip.MustParseAddr("192.0.2.9")
)

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
	e     *enforce.Enforcer
	reg   *sandbox.Registry
	l     *fqdn.Learner
	// now is the learner's CLOCK_MONOTONIC, in ns.
	now atomic.Uint64
}

func newEnv(t *testing.T) *env {
	dp, links, wall := fake.NewDatapath(), fake.NewLinks(), fake.NewWall()
	reg := sandbox.NewRegistry()
	v := &env{t: t, dp: dp, links: links, reg: reg}
	v.now.Store(uint64(1000 * time.Second))
	v.l = &fqdn.Learner{DP: dp, Log: testutil.Logger(t), Now: v.now.Load}
	v.e = &enforce.Enforcer{DP: dp, Links: links, Wall: wall, Store: sandbox.Store{Dir: t.TempDir()}, Sandboxes: reg,
		Learner: v.l, AttachMode: "auto", DNSRate: 100, EventRate: 100, Log: testutil.Logger(t)}
	return v
}

func (v *env) advance(d time.Duration) { v.now.Add(uint64(d)) }

// admit attaches sandbox name (10.1.0.n) under doc, as an ADD does.
func (v *env) admit(name string, n int, doc string) *sandbox.Sandbox {
	v.t.Helper()
	host := v.links.Add("veth-"+name, "veth", 0)
	req := api.AddRequest{ContainerID: "c-" + name, IfName: "eth0", Netns: "/run/netns/" + name,
		HostInterface: host.Name, MAC: fmt.Sprintf("02:aa:00:00:00:%02x", n),
		IPs: []api.IPConfig{{Address: netip.MustParsePrefix(fmt.Sprintf("10.1.0.%d/24", n)), Gateway: netip.MustParseAddr("10.1.0.1")}}}
	c := compile(v.t, doc)
	v.reg.Lock()
	defer v.reg.Unlock()
	s, err := v.e.Admit(enforce.Admission{Req: req, Policy: []byte(doc), Source: "test", Compiled: c,
		Configs: proxies.RuleConfigs{}, Limits: limits.Effective(limits.Default, c)})
	if err != nil {
		v.t.Fatal(err)
	}
	return s
}

func (v *env) flip(s *sandbox.Sandbox, doc string) {
	v.t.Helper()
	c := compile(v.t, doc)
	v.reg.Lock()
	defer v.reg.Unlock()
	if err := v.e.Flip(s, enforce.Change{Policy: []byte(doc), Source: "test", Compiled: c,
		Configs: proxies.RuleConfigs{}, Limits: limits.Effective(limits.Default, c)}); err != nil {
		v.t.Fatal(err)
	}
}

// active is the sandbox's active generation slot.
func active(s *sandbox.Sandbox) uint8 { return uint8(s.Record().Generation % 2) }

// lookup is what the datapath finds for a TCP flow to a:443 in the
// sandbox's active generation.
func (v *env) lookup(s *sandbox.Sandbox, a netip.Addr) (bpf.RuleEntry, bool) {
	v.t.Helper()
	e, ok, err := v.dp.LookupRule(s.ID, active(s), tcp, a, 443)
	if err != nil {
		v.t.Fatal(err)
	}
	return e, ok
}

// epoch is the rule epoch in the sandbox's datapath entry, checked against
// the one the sandbox records.
func (v *env) epoch(s *sandbox.Sandbox) uint64 {
	v.t.Helper()
	entry, err := v.dp.Sandbox(s.Rec.HostIfindex)
	if err != nil {
		v.t.Fatal(err)
	}
	s.Lock()
	defer s.Unlock()
	if entry.Epoch != s.Epoch {
		v.t.Fatalf("the datapath entry has epoch %d, the sandbox %d", entry.Epoch, s.Epoch)
	}
	return s.Epoch
}

func (v *env) learned(s *sandbox.Sandbox) map[sandbox.LearnKey]uint64 {
	s.Lock()
	defer s.Unlock()
	out := map[sandbox.LearnKey]uint64{}
	for k, e := range s.Learned {
		out[k] = e
	}
	return out
}

func TestLearnWritesTheActiveGeneration(t *testing.T) {
	v := newEnv(t)
	s := v.admit("l", 2, policyF)
	before := v.epoch(s)
	if _, ok := v.lookup(s, learnt); ok {
		t.Fatal("the address is allowed before it was learnt")
	}
	if !v.l.Learn(s, "api.example.test", []netip.Addr{learnt, learnt6}, 30*time.Second) {
		t.Fatal("Learn wrote nothing")
	}
	expires := v.now.Load() + uint64(30*time.Second)
	for _, a := range []netip.Addr{learnt, learnt6} {
		e, ok := v.lookup(s, a)
		if !ok || e.RuleID != 2 || e.Expires != expires || e.Prefix != netip.PrefixFrom(a, a.BitLen()) ||
			e.Listener != bpf.ListenerTCP || e.Mode != uint8(policy.ModeOpen) {
			t.Fatalf("%v: %+v %v", a, e, ok)
		}
		if got := v.learned(s)[sandbox.LearnKey{Name: "api.example.test", Addr: a}]; got != expires {
			t.Fatalf("%v learned until %d, want %d", a, got, expires)
		}
	}
	if v.epoch(s) <= before {
		t.Fatal("the rule epoch did not move: verdicts cached before the learn still answer")
	}
	// Only the active generation is written.
	if other, _ := v.dp.SandboxRules(s.ID, 1); len(other) != 0 {
		t.Fatalf("the inactive generation got %v", other)
	}
	// The static entries are untouched: CHECK still passes.
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}
}

// A shorter TTL learnt later does not cut an address short: it stays
// allowed until the longest expiry it was learnt with, in the kernel as
// in the sandbox's own account.
func TestLearnAgainKeepsTheLaterExpiry(t *testing.T) {
	v := newEnv(t)
	s := v.admit("la", 3, policyF)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, time.Minute)
	long := v.now.Load() + uint64(time.Minute)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, 5*time.Second)
	if e, _ := v.lookup(s, learnt); e.Expires != long {
		t.Fatalf("the kernel entry expires at %d, want %d", e.Expires, long)
	}
	if got := v.learned(s)[sandbox.LearnKey{Name: "api.example.test", Addr: learnt}]; got != long {
		t.Fatalf("learned until %d, want %d", got, long)
	}
	// A longer one extends it.
	v.advance(10 * time.Second)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, 5*time.Minute)
	if e, _ := v.lookup(s, learnt); e.Expires != v.now.Load()+uint64(5*time.Minute) {
		t.Fatalf("not extended: %+v", e)
	}
}

// An address that an earlier rule's static host entry names stays that
// rule's: the datapath's first-match owner does not change.
func TestLearnDoesNotTakeAnEarlierRulesHost(t *testing.T) {
	v := newEnv(t)
	s := v.admit("p", 4, policyF)
	before := v.epoch(s)
	if v.l.Learn(s, "api.example.test", []netip.Addr{pinned}, time.Minute) {
		t.Fatal("Learn reported a write over an earlier rule's host")
	}
	if e, ok := v.lookup(s, pinned); !ok || e.RuleID != 1 || e.Expires != 0 {
		t.Fatalf("the earlier rule's entry: %+v %v", e, ok)
	}
	if v.epoch(s) != before {
		t.Fatal("the epoch moved with nothing changed")
	}
	if len(v.learned(s)) != 0 {
		t.Fatalf("learned %v", v.learned(s))
	}
}

// A name no rule uses (allowed by spec.dns only) opens nothing.
func TestLearnUnusedName(t *testing.T) {
	v := newEnv(t)
	s := v.admit("u", 5, policyF)
	before, _ := v.dp.SandboxRules(s.ID, 0)
	epoch := v.epoch(s)
	if v.l.Learn(s, "other.example.test", []netip.Addr{learnt}, time.Minute) {
		t.Fatal("Learn wrote for a name no rule uses")
	}
	if v.l.Learn(s, "api.example.test", nil, time.Minute) {
		t.Fatal("Learn wrote for no address")
	}
	after, _ := v.dp.SandboxRules(s.ID, 0)
	if len(after) != len(before) || v.epoch(s) != epoch || len(v.learned(s)) != 0 {
		t.Fatalf("entries %d -> %d, epoch %d -> %d, learned %v", len(before), len(after), epoch, v.epoch(s), v.learned(s))
	}
	if _, ok := v.lookup(s, learnt); ok {
		t.Fatal("the address is allowed")
	}
}

// A failed kernel write is not recorded as learnt (the address stays
// refused), and a failed epoch move does not undo the learn.
func TestLearnFailures(t *testing.T) {
	v := newEnv(t)
	s := v.admit("ff", 6, policyF)
	v.dp.FailNext("PutRules", 0)
	if v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, time.Minute) {
		t.Fatal("a failed write was reported as learnt")
	}
	if len(v.learned(s)) != 0 {
		t.Fatalf("learned %v after a failed write", v.learned(s))
	}
	epoch := v.epoch(s)
	v.dp.FailNext("PutSandbox", 0)
	if !v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, time.Minute) {
		t.Fatal("the write was not reported")
	}
	if _, ok := v.lookup(s, learnt); !ok {
		t.Fatal("the address was not written")
	}
	if v.epoch(s) != epoch {
		t.Fatal("the sandbox records an epoch the datapath does not have")
	}
}

// Sweep removes what expired, puts back a later rule's static entry a
// learnt address had taken over (and so the wider cidr behind a removed
// host entry answers again), leaves what is still valid, and moves the
// epoch only when something changed.
func TestSweep(t *testing.T) {
	v := newEnv(t)
	s := v.admit("s", 7, policyF)
	v.l.Learn(s, "api.example.test", []netip.Addr{inWide, lateHost}, 10*time.Second)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, time.Minute)
	for _, a := range []netip.Addr{inWide, lateHost, learnt} {
		if e, ok := v.lookup(s, a); !ok || e.RuleID != 2 || e.Expires == 0 {
			t.Fatalf("%v while learnt: %+v %v", a, e, ok)
		}
	}

	epoch := v.epoch(s)
	v.advance(5 * time.Second)
	if n := v.l.Sweep(s); n != 0 {
		t.Fatalf("swept %d before anything expired", n)
	}
	if v.epoch(s) != epoch {
		t.Fatal("an empty sweep moved the epoch")
	}

	v.advance(5 * time.Second) // exactly at the expiry of the first two
	if n := v.l.Sweep(s); n != 2 {
		t.Fatalf("swept %d, want 2", n)
	}
	if e, ok := v.lookup(s, lateHost); !ok || e.RuleID != 4 || e.Expires != 0 {
		t.Fatalf("the static host entry was not restored: %+v %v", e, ok)
	}
	if e, ok := v.lookup(s, inWide); !ok || e.RuleID != 3 || e.Prefix.Bits() != 24 {
		t.Fatalf("the wide cidr does not answer again: %+v %v", e, ok)
	}
	if e, ok := v.lookup(s, learnt); !ok || e.RuleID != 2 {
		t.Fatalf("an unexpired address was swept: %+v %v", e, ok)
	}
	if v.epoch(s) <= epoch {
		t.Fatal("the sweep did not move the epoch: a cached verdict of the learnt entry still answers")
	}
	if got := v.learned(s); len(got) != 1 {
		t.Fatalf("learned after the sweep: %v", got)
	}
	if err := v.e.Check(s); err != nil {
		t.Fatalf("the static entries after the sweep: %v", err)
	}

	v.advance(time.Minute)
	if n := v.l.Sweep(s); n != 1 {
		t.Fatalf("swept %d, want 1", n)
	}
	if e, ok := v.lookup(s, learnt); ok {
		t.Fatalf("an expired address is still allowed: %+v", e)
	}
	if len(v.learned(s)) != 0 {
		t.Fatalf("learned %v", v.learned(s))
	}
}

// An entry learnt again under a later expiry before the sweep is not
// removed by it.
func TestSweepKeepsARenewedEntry(t *testing.T) {
	v := newEnv(t)
	s := v.admit("r", 8, policyF)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, 10*time.Second)
	v.advance(5 * time.Second)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt}, 10*time.Second)
	v.advance(6 * time.Second) // past the first expiry, before the second
	if n := v.l.Sweep(s); n != 0 {
		t.Fatalf("swept %d", n)
	}
	if _, ok := v.lookup(s, learnt); !ok {
		t.Fatal("a renewed address was swept")
	}
}

// A flip carries learnt addresses into the new generation under the new
// policy: still allowed (under the rule's new id) where it keeps the
// fqdn rule, refused where it dropped it, and gone from the old one.
func TestFlipRelearns(t *testing.T) {
	v := newEnv(t)
	s := v.admit("f", 9, policyF)
	v.l.Learn(s, "api.example.test", []netip.Addr{learnt, inWide}, time.Minute)
	expires := v.now.Load() + uint64(time.Minute)

	v.flip(s, policyMoved)
	if active(s) != 1 {
		t.Fatalf("generation %d", s.Record().Generation)
	}
	if e, ok := v.lookup(s, learnt); !ok || e.RuleID != 3 || e.Expires != expires {
		t.Fatalf("the learnt address after the flip: %+v %v", e, ok)
	}
	// Under policyMoved the wide cidr (2) comes before the fqdn rule (3),
	// but the most specific prefix wins (docs/policy.md): the learnt host
	// entry still takes the address.
	if e, ok := v.lookup(s, inWide); !ok || e.RuleID != 3 || e.Expires != expires {
		t.Fatalf("an address inside an earlier cidr after the flip: %+v %v", e, ok)
	}
	if old, _ := v.dp.SandboxRules(s.ID, 0); len(old) != 0 {
		t.Fatalf("the old generation left %v", old)
	}

	v.flip(s, policyNoFQDN)
	if e, ok := v.lookup(s, learnt); ok {
		t.Fatalf("an address learnt for a rule the new policy dropped is allowed: %+v", e)
	}
	if e, ok := v.lookup(s, inWide); !ok || e.RuleID != 1 || e.Expires != 0 {
		t.Fatalf("the wide cidr under the new policy: %+v %v", e, ok)
	}
	if old, _ := v.dp.SandboxRules(s.ID, 1); len(old) != 0 {
		t.Fatalf("the old generation left %v", old)
	}

	// Back to a policy with the rule, while the address is still valid:
	// it is allowed again.
	v.flip(s, policyF)
	if e, ok := v.lookup(s, learnt); !ok || e.RuleID != 2 || e.Expires != expires {
		t.Fatalf("the learnt address back under policyF: %+v %v", e, ok)
	}
}

// An address that expired before a flip (the sweep had not run yet) is
// not carried over, and nothing of it stays in the old generation, which
// the next flip writes into: an expired host entry there would shadow the
// wider cidr behind it (the datapath drops a flow whose entry expired).
func TestFlipAfterExpiryLeavesNothing(t *testing.T) {
	v := newEnv(t)
	s := v.admit("x", 10, policyF)
	v.l.Learn(s, "api.example.test", []netip.Addr{inWide, learnt}, 10*time.Second)
	v.advance(time.Minute)

	v.flip(s, policyF)
	if e, ok := v.lookup(s, learnt); ok {
		t.Fatalf("an expired address was carried into the new generation: %+v", e)
	}
	if old, _ := v.dp.SandboxRules(s.ID, 0); len(old) != 0 {
		t.Fatalf("the old generation left %v", old)
	}
	v.flip(s, policyF)
	if e, ok := v.lookup(s, inWide); !ok || e.RuleID != 3 || e.Expires != 0 {
		t.Fatalf("the wide cidr two flips later: %+v %v", e, ok)
	}
	v.l.Sweep(s)
	if len(v.learned(s)) != 0 {
		t.Fatalf("learned %v", v.learned(s))
	}
}

// The learner writes on CLOCK_MONOTONIC unless told otherwise, as the
// datapath compares expiries with bpf_ktime_get_ns.
func TestDefaultClockIsMonotonic(t *testing.T) {
	v := newEnv(t)
	s := v.admit("m", 11, policyF)
	l := &fqdn.Learner{DP: v.dp}
	start := sandbox.MonotonicNow()
	l.Learn(s, "api.example.test", []netip.Addr{learnt}, time.Minute)
	e, _ := v.lookup(s, learnt)
	if e.Expires < start+uint64(time.Minute) || e.Expires > sandbox.MonotonicNow()+uint64(time.Minute) {
		t.Fatalf("expires %d, learnt at about %d", e.Expires, start)
	}
	if n := l.Sweep(s); n != 0 {
		t.Fatalf("swept %d", n)
	}
}

// policyShared has two fqdn rules on one port whose names a CDN answers
// with the same addresses (1: a, open; 2: b, trusted, so a flow under the
// wrong rule goes to another proxy), a rule naming two fqdns (3), and a
// later static host (4) on one of the shared addresses.
const policyShared = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: shared}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [a.example.test, b.example.test, c.example.test, d.example.test]}
  egress:
    - name: a
      to: [{fqdn: a.example.test}]
      ports: [{port: 443}]
      mode: open
    - name: b
      to: [{fqdn: b.example.test}]
      ports: [{port: 443}]
      mode: trusted
      trusted: {hpke: {publicKeyFile: /nonexistent}}
    - name: c-or-d
      to: [{fqdn: c.example.test}, {fqdn: d.example.test}]
      ports: [{port: 443}]
      mode: open
    - name: shared-host
      to: [{cidr: 192.0.2.7/32}]
      ports: [{port: 443}]
      mode: open
`

// policySwapped lists b's rule before a's.
const policySwapped = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: swapped}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [a.example.test, b.example.test]}
  egress:
    - name: b
      to: [{fqdn: b.example.test}]
      ports: [{port: 443}]
      mode: trusted
      trusted: {hpke: {publicKeyFile: /nonexistent}}
    - name: a
      to: [{fqdn: a.example.test}]
      ports: [{port: 443}]
      mode: open
`

var (
	// cdnStatic is shared by a and b and is rule 4's static host;
	// cdn is shared by a and b only.
	cdnStatic = netip.MustParseAddr("192.0.2.7")
	cdn       = netip.MustParseAddr("192.0.2.8")
)

// wantRule fails unless a TCP flow to a:443 in the active generation is
// classified under rule id with mode, expiring at expires (0: static).
func (v *env) wantRule(s *sandbox.Sandbox, a netip.Addr, id uint32, mode policy.Mode, expires uint64) {
	v.t.Helper()
	e, ok := v.lookup(s, a)
	if !ok || e.RuleID != id || e.Mode != uint8(mode) || e.Expires != expires {
		v.t.Fatalf("%v: %+v %v, want rule %d (%v) expiring at %d", a, e, ok, id, mode, expires)
	}
}

// Two names answering the same address on the same port: the flow goes
// to the lower rule id (docs/policy.md), whichever name was learnt last.
func TestLowerRuleWinsWhicheverNameIsLearntLast(t *testing.T) {
	for i, order := range [][]string{{"a.example.test", "b.example.test"}, {"b.example.test", "a.example.test"}} {
		t.Run(order[0]+" first", func(t *testing.T) {
			v := newEnv(t)
			s := v.admit(fmt.Sprintf("o%d", i), 20+i, policyShared)
			expires := map[string]uint64{}
			for j, name := range order {
				ttl := time.Duration(j+1) * time.Minute // the later name lives longer
				if !v.l.Learn(s, name, []netip.Addr{cdnStatic, cdn}, ttl) {
					t.Fatalf("learning %s wrote nothing", name)
				}
				expires[name] = v.now.Load() + uint64(ttl)
			}
			for _, a := range []netip.Addr{cdnStatic, cdn} {
				v.wantRule(s, a, 1, policy.ModeOpen, expires["a.example.test"])
			}
			if got := v.learned(s); len(got) != 4 {
				t.Fatalf("learned %v, want both names for both addresses", got)
			}
			if err := v.e.Check(s); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// When the lower rule's name expires first, the address falls back to
// the other name's rule until that expires too, then to the static entry
// behind it, or to nothing.
func TestSweepFallsBackToTheOtherName(t *testing.T) {
	v := newEnv(t)
	s := v.admit("fb", 22, policyShared)
	v.l.Learn(s, "b.example.test", []netip.Addr{cdnStatic, cdn}, time.Minute)
	bExpires := v.now.Load() + uint64(time.Minute)
	v.l.Learn(s, "a.example.test", []netip.Addr{cdnStatic, cdn}, 10*time.Second)
	aExpires := v.now.Load() + uint64(10*time.Second)
	for _, a := range []netip.Addr{cdnStatic, cdn} {
		v.wantRule(s, a, 1, policy.ModeOpen, aExpires)
	}

	epoch := v.epoch(s)
	v.advance(10 * time.Second)
	if n := v.l.Sweep(s); n != 2 {
		t.Fatalf("swept %d, want a's 2", n)
	}
	for _, a := range []netip.Addr{cdnStatic, cdn} {
		v.wantRule(s, a, 2, policy.ModeTrusted, bExpires)
	}
	if v.epoch(s) <= epoch {
		t.Fatal("the sweep did not move the epoch: a cached verdict of rule 1 still answers")
	}
	if got := v.learned(s); len(got) != 2 || got[sandbox.LearnKey{Name: "b.example.test", Addr: cdn}] != bExpires {
		t.Fatalf("learned %v, want b's", got)
	}
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}

	v.advance(time.Minute)
	if n := v.l.Sweep(s); n != 2 {
		t.Fatalf("swept %d, want b's 2", n)
	}
	v.wantRule(s, cdnStatic, 4, policy.ModeOpen, 0)
	if e, ok := v.lookup(s, cdn); ok {
		t.Fatalf("an address whose names all expired is still allowed: %+v", e)
	}
	if got := v.learned(s); len(got) != 0 {
		t.Fatalf("learned %v", got)
	}
	if err := v.e.Check(s); err != nil {
		t.Fatal(err)
	}
}

// One rule learnt through two of its names keeps the later expiry: the
// shorter-lived name neither cuts the entry short nor takes it with it.
func TestSameRuleThroughTwoNamesKeepsTheLaterExpiry(t *testing.T) {
	v := newEnv(t)
	s := v.admit("cd", 23, policyShared)
	v.l.Learn(s, "c.example.test", []netip.Addr{cdn}, time.Minute)
	long := v.now.Load() + uint64(time.Minute)
	v.l.Learn(s, "d.example.test", []netip.Addr{cdn}, 10*time.Second)
	v.wantRule(s, cdn, 3, policy.ModeOpen, long)

	v.advance(10 * time.Second)
	if n := v.l.Sweep(s); n != 1 {
		t.Fatalf("swept %d, want d's", n)
	}
	v.wantRule(s, cdn, 3, policy.ModeOpen, long)

	v.advance(time.Minute)
	v.l.Sweep(s)
	if e, ok := v.lookup(s, cdn); ok {
		t.Fatalf("still allowed after both names expired: %+v", e)
	}
}

// A flip writes the arbitrated winner into the new generation, under the
// new policy's rule ids: the same one every time while they stay, the
// other name's rule once the new policy lists it first.
func TestFlipKeepsTheLowerRule(t *testing.T) {
	v := newEnv(t)
	s := v.admit("fk", 24, policyShared)
	v.l.Learn(s, "b.example.test", []netip.Addr{cdnStatic, cdn}, 2*time.Minute)
	bExpires := v.now.Load() + uint64(2*time.Minute)
	v.l.Learn(s, "a.example.test", []netip.Addr{cdnStatic, cdn}, time.Minute)
	aExpires := v.now.Load() + uint64(time.Minute)

	// Map order is random: several flips would catch a winner picked by it.
	for range 8 {
		v.flip(s, policyShared)
		for _, a := range []netip.Addr{cdnStatic, cdn} {
			v.wantRule(s, a, 1, policy.ModeOpen, aExpires)
		}
	}
	v.flip(s, policySwapped)
	for _, a := range []netip.Addr{cdnStatic, cdn} {
		v.wantRule(s, a, 1, policy.ModeTrusted, bExpires)
	}
	v.flip(s, policyShared)
	for _, a := range []netip.Addr{cdnStatic, cdn} {
		v.wantRule(s, a, 1, policy.ModeOpen, aExpires)
	}
	// The new generation sweeps as the first did.
	v.advance(time.Minute)
	v.l.Sweep(s)
	for _, a := range []netip.Addr{cdnStatic, cdn} {
		v.wantRule(s, a, 2, policy.ModeTrusted, bExpires)
	}
}

// A failed write forgets the name it was learning: the address stays
// with the name that held it, and the sandbox records only what the
// kernel has.
func TestLearnFailureKeepsTheOtherName(t *testing.T) {
	v := newEnv(t)
	s := v.admit("lf", 25, policyShared)
	v.l.Learn(s, "b.example.test", []netip.Addr{cdn}, time.Minute)
	bExpires := v.now.Load() + uint64(time.Minute)
	v.dp.FailNext("PutRules", 0)
	if v.l.Learn(s, "a.example.test", []netip.Addr{cdn}, time.Minute) {
		t.Fatal("a failed write was reported as learnt")
	}
	v.wantRule(s, cdn, 2, policy.ModeTrusted, bExpires)
	if got := v.learned(s); len(got) != 1 || got[sandbox.LearnKey{Name: "b.example.test", Addr: cdn}] != bExpires {
		t.Fatalf("learned %v, want b's only", got)
	}
}

// A sweep whose kernel write fails keeps the expired name, so the next
// sweep moves the key on: otherwise the expired entry would stay and
// refuse the address the other name still allows.
func TestSweepRetriesAFailedWrite(t *testing.T) {
	v := newEnv(t)
	s := v.admit("sr", 26, policyShared)
	v.l.Learn(s, "b.example.test", []netip.Addr{cdn}, time.Minute)
	bExpires := v.now.Load() + uint64(time.Minute)
	v.l.Learn(s, "a.example.test", []netip.Addr{cdn}, 10*time.Second)
	v.advance(10 * time.Second)
	v.dp.FailNext("PutRules", 0)
	if n := v.l.Sweep(s); n != 0 {
		t.Fatalf("swept %d with the write failing", n)
	}
	if n := v.l.Sweep(s); n != 1 {
		t.Fatalf("the retry swept %d, want a's", n)
	}
	v.wantRule(s, cdn, 2, policy.ModeTrusted, bExpires)
}
