package bpf

import (
	"testing"

	"github.com/google/gopacket/layers"
)

// TestFlowRateBudget: a sandbox's SYNs and new UDP flows beyond its
// budget's burst are dropped as flow-limit in the datapath; datagrams of a
// UDP flow already paid for pass; no budget means no limit.
func TestFlowRateBudget(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	sb, err := env.dp.Sandbox(env.ifindex)
	if err != nil {
		t.Fatal(err)
	}
	sb.Bridge = true // the port program decides without assigning: a pass is a redirect
	if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
		t.Fatal(err)
	}
	// 1 flow a second, 3 at once: the test runs well within a second.
	if err := env.dp.SetFlowRate(testSandboxID, FlowRate{PerSecond: 1, Burst: 3}); err != nil {
		t.Fatal(err)
	}
	if got, ok, err := env.dp.FlowRateOf(testSandboxID); err != nil || !ok || got.PerSecond != 1 || got.Burst != 3 {
		t.Fatalf("budget read back: %+v %v %v", got, ok, err)
	}
	verdicts := func(frames ...[]byte) (passed, limited int) {
		for _, f := range frames {
			before := env.counter(t, 0, VerdictDrop, ReasonFlowLimit).Packets
			ret, _ := env.run(t, f)
			switch {
			case ret == actOK:
				passed++
			case env.counter(t, 0, VerdictDrop, ReasonFlowLimit).Packets == before+1:
				limited++
			default:
				all, _ := env.dp.Counters()
				t.Fatalf("dropped for another reason (ret %d): %v", ret, all)
			}
		}
		return passed, limited
	}
	udp := func(sport uint16) []byte {
		return build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, sport: sport, dport: 9000, payload: []byte("x")})
	}
	// One UDP flow, many datagrams: one token.
	if p, l := verdicts(udp(5000), udp(5000), udp(5000), udp(5000)); p != 4 || l != 0 {
		t.Fatalf("datagrams of one flow: %d passed, %d limited", p, l)
	}
	// Two more flows (TCP) fit the burst, then nothing.
	syn := func(sport uint16) []byte {
		return build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, sport: sport, dport: 8080, syn: true})
	}
	if p, l := verdicts(syn(6001), syn(6002), syn(6003), syn(6004), udp(5001)); p != 2 || l != 3 {
		t.Fatalf("past the burst: %d passed, %d limited, want 2 and 3", p, l)
	}
	// The flow already paid for still passes.
	if p, _ := verdicts(udp(5000)); p != 1 {
		t.Fatal("a paid UDP flow was limited")
	}
	// DNS has budgets of its own (the DNS proxy's).
	dns := build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, sport: 7000, dport: 53, payload: []byte("q")})
	if p, _ := verdicts(dns); p != 1 {
		t.Fatal("a DNS query was limited by the flow budget")
	}
	// No budget: no limit.
	if err := env.dp.SetFlowRate(testSandboxID, FlowRate{}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := env.dp.FlowRateOf(testSandboxID); ok {
		t.Fatal("a zero rate left a budget")
	}
	if p, l := verdicts(syn(6010), syn(6011), syn(6012), syn(6013)); p != 4 || l != 0 {
		t.Fatalf("without a budget: %d passed, %d limited", p, l)
	}
}
