package bpf

import (
	"net/netip"
	"testing"
	"time"

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
	// A UDP flow a proxy holds: its datagrams take nothing.
	src, dst := netip.AddrPortFrom(sbxIP, 5000), netip.AddrPortFrom(remote, 9000)
	if err := env.dp.NoteUDPFlow(testSandboxID, src, dst); err != nil {
		t.Fatal(err)
	}
	if p, l := verdicts(udp(5000), udp(5000), udp(5000), udp(5000)); p != 4 || l != 0 {
		t.Fatalf("datagrams of a held flow: %d passed, %d limited", p, l)
	}
	// One that no proxy holds pays per datagram: the first takes a token.
	if p, l := verdicts(udp(4999)); p != 1 || l != 0 {
		t.Fatalf("a new UDP flow: %d passed, %d limited", p, l)
	}
	// One more flow fits the burst of 3, then nothing.
	syn := func(sport uint16) []byte {
		return build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, sport: sport, dport: 8080, syn: true})
	}
	if p, l := verdicts(syn(6001), syn(6002), syn(6003), syn(6004), udp(5001)); p != 2 || l != 3 {
		t.Fatalf("past the burst: %d passed, %d limited, want 2 and 3", p, l)
	}
	// The held flow still passes; forgotten, it pays like any other.
	if p, _ := verdicts(udp(5000)); p != 1 {
		t.Fatal("a held UDP flow was limited")
	}
	if err := env.dp.ForgetUDPFlow(testSandboxID, src, dst); err != nil {
		t.Fatal(err)
	}
	if _, l := verdicts(udp(5000)); l != 1 {
		t.Fatal("a forgotten UDP flow passed an empty budget")
	}
	// DNS datagrams have a budget of their own.
	dns := build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolUDP, sport: 7000, dport: 53, payload: []byte("q")})
	if p, _ := verdicts(dns); p != 1 {
		t.Fatal("a DNS query was limited by the flow budget")
	}
	if err := env.dp.SetDNSRate(testSandboxID, FlowRate{PerSecond: 1, Burst: 2}); err != nil {
		t.Fatal(err)
	}
	dnsLimited := func() uint64 { return env.counter(t, 0, VerdictDrop, ReasonDNSLimit).Packets }
	before := dnsLimited()
	passed := 0
	for i := 0; i < 5; i++ {
		if ret, _ := env.run(t, dns); ret == actOK {
			passed++
		}
	}
	if passed != 2 || dnsLimited()-before != 3 {
		t.Fatalf("DNS budget of 2: %d passed, %d counted as dns-limit", passed, dnsLimited()-before)
	}
	if err := env.dp.DeleteFlowRate(testSandboxID); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := env.dp.DNSRateOf(testSandboxID); ok {
		t.Fatal("DeleteFlowRate left the DNS budget")
	}
	if err := env.dp.SetFlowRate(testSandboxID, FlowRate{PerSecond: 1, Burst: 3}); err != nil {
		t.Fatal(err)
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

// TestEventBudget: drops beyond a sandbox's event budget are all counted,
// but only the budget's worth are reported on the ring buffer.
func TestEventBudget(t *testing.T) {
	env := newTestEnv(t)
	rd, err := env.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	if err := env.dp.SetEventRate(testSandboxID, FlowRate{PerSecond: 1, Burst: 2}); err != nil {
		t.Fatal(err)
	}
	before := env.counter(t, 0, VerdictDrop, ReasonNoRule).Packets
	for i := 0; i < 5; i++ {
		if ret, _ := env.run(t, build(t, syn4(remote, 8081))); ret != actShot {
			t.Fatalf("a denied SYN passed (%d)", ret)
		}
	}
	if n := env.counter(t, 0, VerdictDrop, ReasonNoRule).Packets - before; n != 5 {
		t.Fatalf("%d drops counted, want 5", n)
	}
	events := 0
	for {
		rd.SetDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := rd.Read(); err != nil {
			break
		}
		events++
	}
	if events != 2 {
		t.Fatalf("%d deny events reported, want the budget's 2", events)
	}
}
