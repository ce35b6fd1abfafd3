package limits

import (
	"testing"

	"github.com/cleanwall/cleanwall/policy"
)

func compiled(t *testing.T, limits string) *policy.Compiled {
	t.Helper()
	doc := "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: t}\nspec:\n" + limits +
		"  egress: [{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 80}], mode: open}]\n"
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

func TestEffectiveLimits(t *testing.T) {
	d := Limits{TCPFlows: 100, UDPFlows: 10, NewFlowsPerSecond: 50, DNSInFlight: 8}
	if got := Effective(d, compiled(t, "")); got != d {
		t.Errorf("no spec.limits: %+v", got)
	}
	got := Effective(d, compiled(t, "  limits: {tcpFlows: 5, udpFlows: 500, newFlowsPerSecond: 7}\n"))
	want := Limits{TCPFlows: 5, UDPFlows: 10, NewFlowsPerSecond: 7, DNSInFlight: 8}
	if got != want {
		t.Errorf("a policy lowers, never raises: got %+v, want %+v", got, want)
	}
	unlimited := Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1}
	got = Effective(unlimited, compiled(t, "  limits: {tcpFlows: 3, dnsQueriesInFlight: 2, newFlowsPerSecond: 9}\n"))
	if got.TCPFlows != 3 || got.DNSInFlight != 2 || got.NewFlowsPerSecond != 9 || got.UDPFlows != -1 {
		t.Errorf("a policy limits an unlimited daemon: %+v", got)
	}
	var l Limits
	l.SetDefaults()
	if l != Default {
		t.Errorf("defaults: %+v", l)
	}
}

func TestFlowLimiterConcurrency(t *testing.T) {
	f := NewLimiter(Limits{TCPFlows: 2, UDPFlows: 1, NewFlowsPerSecond: -1, DNSInFlight: 1})
	node := &Node{}
	d1, r1 := f.Admit(TCP, node)
	d2, r2 := f.Admit(TCP, node)
	_, r3 := f.Admit(TCP, node)
	if r1 != "" || r2 != "" || r3 != ReasonFlowLimit {
		t.Fatalf("refusals %q %q %q", r1, r2, r3)
	}
	if _, r := f.Admit(UDP, node); r != "" {
		t.Fatalf("UDP counts apart from TCP: %q", r)
	}
	d1()
	d1() // giving back twice gives back once
	if _, r := f.Admit(TCP, node); r != "" {
		t.Fatalf("a slot given back is not taken again: %q", r)
	}
	if _, r := f.Admit(TCP, node); r != ReasonFlowLimit {
		t.Fatalf("double done freed two slots: %q", r)
	}
	d2()
	// Lowering the limit keeps flows, refuses new ones until below it.
	f.Set(Limits{TCPFlows: 1, UDPFlows: 1, NewFlowsPerSecond: -1, DNSInFlight: 1})
	if _, r := f.Admit(TCP, node); r != ReasonFlowLimit {
		t.Fatalf("over a lowered limit: %q", r)
	}
}

func TestFlowRateOfLimits(t *testing.T) {
	// The new-flow rate goes to the datapath, with a burst of twice it.
	if r := FlowRate(Limits{NewFlowsPerSecond: 50}); r.PerSecond != 50 || r.Burst != 100 {
		t.Errorf("budget %+v", r)
	}
	if r := FlowRate(Limits{NewFlowsPerSecond: -1}); r.PerSecond != 0 {
		t.Errorf("an unlimited rate wrote a budget: %+v", r)
	}
	// The limiter itself never refuses for the rate: the kernel does.
	f := NewLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: 1, DNSInFlight: -1})
	for i := 0; i < 100; i++ {
		done, r := f.Admit(TCP, &Node{})
		if r != "" {
			t.Fatalf("flow %d refused: %q", i, r)
		}
		done()
	}
}

func TestNodeBudget(t *testing.T) {
	node := &Node{Max: 6}
	a := NewLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1})
	b := NewLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1})
	done, r := a.Admit(TCP, node) // 4 descriptors
	if r != "" {
		t.Fatal(r)
	}
	if _, r := b.Admit(TCP, node); r != ReasonNodeFlowLimit {
		t.Fatalf("over the node's budget: %q", r)
	}
	if _, r := b.Admit(UDP, node); r != "" { // 2 more fit
		t.Fatalf("UDP within the budget: %q", r)
	}
	done()
	if _, r := b.Admit(TCP, node); r != "" {
		t.Fatalf("after a flow ended: %q", r)
	}
	if got := b.active[TCP].Load(); got != 1 {
		t.Fatalf("a refused flow stays counted: %d", got)
	}
}

func TestRaiseNoFile(t *testing.T) {
	limit, budget, err := RaiseNoFile()
	if err != nil {
		t.Fatal(err)
	}
	if budget.Max <= 0 || budget.Max > int64(limit)-ReservedFDs && int64(limit) > 2*ReservedFDs {
		t.Fatalf("limit %d, budget %d: the reserve is not kept", limit, budget.Max)
	}
}

func TestDNSBudget(t *testing.T) {
	if b := DNSBudget(100); b.PerSecond != DNSShedFactor*100 || b.Burst != 2*DNSShedFactor*100 {
		t.Errorf("budget %+v", b)
	}
	if b := DNSBudget(-1); b.PerSecond != 0 {
		t.Errorf("an unlimited DNS rate wrote a budget: %+v", b)
	}
}
