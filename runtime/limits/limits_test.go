package daemon

import (
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
)

func compiled(t *testing.T, limits string) *policy.Compiled {
	t.Helper()
	doc := "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: t}\nspec:\n" + limits +
		"  egress: [{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 80}], mode: open}]\n"
	c, err := compilePolicy([]byte(doc), "test")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestEffectiveLimits(t *testing.T) {
	daemon := Limits{TCPFlows: 100, UDPFlows: 10, NewFlowsPerSecond: 50, DNSInFlight: 8}
	if got := effectiveLimits(daemon, compiled(t, "")); got != daemon {
		t.Errorf("no spec.limits: %+v", got)
	}
	got := effectiveLimits(daemon, compiled(t, "  limits: {tcpFlows: 5, udpFlows: 500, newFlowsPerSecond: 7}\n"))
	want := Limits{TCPFlows: 5, UDPFlows: 10, NewFlowsPerSecond: 7, DNSInFlight: 8}
	if got != want {
		t.Errorf("a policy lowers, never raises: got %+v, want %+v", got, want)
	}
	unlimited := Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1}
	got = effectiveLimits(unlimited, compiled(t, "  limits: {tcpFlows: 3, dnsQueriesInFlight: 2, newFlowsPerSecond: 9}\n"))
	if got.TCPFlows != 3 || got.DNSInFlight != 2 || got.NewFlowsPerSecond != 9 || got.UDPFlows != -1 {
		t.Errorf("a policy limits an unlimited daemon: %+v", got)
	}
	var l Limits
	l.setDefaults()
	if l != DefaultLimits {
		t.Errorf("defaults: %+v", l)
	}
}

func TestFlowLimiterConcurrency(t *testing.T) {
	f := newFlowLimiter(Limits{TCPFlows: 2, UDPFlows: 1, NewFlowsPerSecond: -1, DNSInFlight: 1})
	node := &fdBudget{}
	d1, r1 := f.admit(flowTCP, node)
	d2, r2 := f.admit(flowTCP, node)
	_, r3 := f.admit(flowTCP, node)
	if r1 != "" || r2 != "" || r3 != reasonFlowLimit {
		t.Fatalf("refusals %q %q %q", r1, r2, r3)
	}
	if _, r := f.admit(flowUDP, node); r != "" {
		t.Fatalf("UDP counts apart from TCP: %q", r)
	}
	d1()
	d1() // giving back twice gives back once
	if _, r := f.admit(flowTCP, node); r != "" {
		t.Fatalf("a slot given back is not taken again: %q", r)
	}
	if _, r := f.admit(flowTCP, node); r != reasonFlowLimit {
		t.Fatalf("double done freed two slots: %q", r)
	}
	d2()
	// Lowering the limit keeps flows, refuses new ones until below it.
	f.set(Limits{TCPFlows: 1, UDPFlows: 1, NewFlowsPerSecond: -1, DNSInFlight: 1})
	if _, r := f.admit(flowTCP, node); r != reasonFlowLimit {
		t.Fatalf("over a lowered limit: %q", r)
	}
}

func TestFlowRateOfLimits(t *testing.T) {
	// The new-flow rate goes to the datapath, with a burst of twice it.
	if r := flowRate(Limits{NewFlowsPerSecond: 50}); r.PerSecond != 50 || r.Burst != 100 {
		t.Errorf("budget %+v", r)
	}
	if r := flowRate(Limits{NewFlowsPerSecond: -1}); r.PerSecond != 0 {
		t.Errorf("an unlimited rate wrote a budget: %+v", r)
	}
	// The limiter itself never refuses for the rate: the kernel does.
	f := newFlowLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: 1, DNSInFlight: -1})
	for i := 0; i < 100; i++ {
		done, r := f.admit(flowTCP, &fdBudget{})
		if r != "" {
			t.Fatalf("flow %d refused: %q", i, r)
		}
		done()
	}
}

func TestNodeBudget(t *testing.T) {
	node := &fdBudget{max: 6}
	a := newFlowLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1})
	b := newFlowLimiter(Limits{TCPFlows: -1, UDPFlows: -1, NewFlowsPerSecond: -1, DNSInFlight: -1})
	done, r := a.admit(flowTCP, node) // 4 descriptors
	if r != "" {
		t.Fatal(r)
	}
	if _, r := b.admit(flowTCP, node); r != reasonNodeFlowLimit {
		t.Fatalf("over the node's budget: %q", r)
	}
	if _, r := b.admit(flowUDP, node); r != "" { // 2 more fit
		t.Fatalf("UDP within the budget: %q", r)
	}
	done()
	if _, r := b.admit(flowTCP, node); r != "" {
		t.Fatalf("after a flow ended: %q", r)
	}
	if got := b.active[flowTCP].Load(); got != 1 {
		t.Fatalf("a refused flow stays counted: %d", got)
	}
}

func TestRaiseNoFile(t *testing.T) {
	limit, budget, err := raiseNoFile()
	if err != nil {
		t.Fatal(err)
	}
	if budget.max <= 0 || budget.max > int64(limit)-reservedFDs && int64(limit) > 2*reservedFDs {
		t.Fatalf("limit %d, budget %d: the reserve is not kept", limit, budget.max)
	}
}

func TestLogLimiter(t *testing.T) {
	l := newLogLimiter(3, time.Hour)
	for i := 0; i < 3; i++ {
		if ok, _ := l.allow("k"); !ok {
			t.Fatalf("line %d of the burst held back", i)
		}
	}
	for i := 0; i < 5; i++ {
		if ok, _ := l.allow("k"); ok {
			t.Fatal("past the burst a line got through")
		}
	}
	if ok, _ := l.allow("other"); !ok {
		t.Fatal("keys share a bucket")
	}
	l.keys["k"].last = time.Now().Add(-time.Hour)
	ok, suppressed := l.allow("k")
	if !ok || suppressed != 5 {
		t.Fatalf("after a refill: ok %v, suppressed %d, want 5", ok, suppressed)
	}
}

func TestAcceptBackoff(t *testing.T) {
	var b acceptBackoff
	want := []time.Duration{5, 10, 20, 40}
	for _, w := range want {
		if got := b.failed(); got != w*time.Millisecond {
			t.Fatalf("backoff %v, want %v", got, w*time.Millisecond)
		}
	}
	for i := 0; i < 20; i++ {
		b.failed()
	}
	if got := b.failed(); got != time.Second {
		t.Fatalf("capped at %v, want 1s", got)
	}
	b.ok()
	if got := b.failed(); got != 5*time.Millisecond {
		t.Fatalf("after a success: %v", got)
	}
}

func TestDNSBudget(t *testing.T) {
	if b := dnsBudget(100); b.PerSecond != dnsShedFactor*100 || b.Burst != 2*dnsShedFactor*100 {
		t.Errorf("budget %+v", b)
	}
	if b := dnsBudget(-1); b.PerSecond != 0 {
		t.Errorf("an unlimited DNS rate wrote a budget: %+v", b)
	}
}
