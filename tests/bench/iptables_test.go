//go:build bench

package bench

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// benchIptables compares connection setup latency behind an iptables
// egress filter of N rules with cleanwall enforcing a policy of the same N
// destinations, N = 1, 1,000, 10,000, in a topology of its own (the
// filter rules live in its node namespace).
//
// The iptables side is a direct sandbox whose forwarded packets enter a
// chain of its own: N "-d <cidr> -p tcp --dport 8080 -j ACCEPT" rules, the
// remote server's rule last (so a flow walks all of them), then DROP. The
// chain is stateless, as written: every packet the sandbox sends walks
// it, not only the SYN.
func benchIptables(t *testing.T, rep *Report) {
	ensureTools(t, map[string]string{"iptables-restore": "iptables"})
	sizes := []int{1, 1000, 10_000}
	env := harness.New(t)
	startDaemon(env)
	startConnectServer(t, env, netip.AddrPortFrom(remoteServer, connectPort))

	ref, err := env.AddSandbox("nofw", harness.SandboxOptions{Direct: true, NoIPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	ipt := map[int]*harness.Sandbox{}
	cw := map[int]*harness.Sandbox{}
	var rules strings.Builder
	rules.WriteString("*filter\n:FORWARD ACCEPT [0:0]\n")
	for _, n := range sizes {
		set := withRemoteLast(uint64(200+n), n)
		s, err := env.AddSandbox(fmt.Sprintf("ipt%d", n), harness.SandboxOptions{Direct: true, NoIPv6: true})
		if err != nil {
			t.Fatal(err)
		}
		ipt[n] = s
		rules.WriteString(iptablesChain(fmt.Sprintf("CWBENCH%d", n), s.HostVeth(), set, connectPort))
		cw[n] = env.MustAddSandbox(fmt.Sprintf("cw%d", n), harness.SandboxOptions{NoIPv6: true, Policy: string(policyYAML("bench", set, connectPort))})
	}
	rules.WriteString("COMMIT\n")
	restore := nsCommand(env.Node, "iptables-restore")
	restore.Stdin = strings.NewReader(rules.String())
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("iptables-restore: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = nsCommand(env.Node, "iptables", "-F").Run() })
	if out, _ := nsCommand(env.Node, "iptables", "-S").Output(); strings.Count(string(out), "-j ACCEPT") < 11_001 {
		t.Fatalf("iptables holds %d accept rules, want 11001", strings.Count(string(out), "-j ACCEPT"))
	}

	all := []*harness.Sandbox{ref}
	for _, n := range sizes {
		all = append(all, ipt[n], cw[n])
	}
	for _, s := range all {
		if err := setSysctls(s.NS, clientSysctls); err != nil {
			t.Fatal(err)
		}
	}
	if err := setSysctls(env.Node, clientSysctls); err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(remoteServer, connectPort)
	for _, s := range all {
		if err := checkPath(s, dst); err != nil {
			t.Fatalf("sandbox %s cannot reach the connect server: %v", s.Name, err)
		}
	}
	// The filter must really filter: a port no rule accepts is dropped
	// (a timeout), not refused by the remote (which would mean it passed).
	if _, err := ipt[1].Dial("tcp4", netip.AddrPortFrom(remoteServer, connectPort+1).String(), time.Second); !isTimeout(err) {
		t.Fatalf("iptables did not drop a flow to port %d: %v", connectPort+1, err)
	}
	rep.note("iptables: %s; one chain per sandbox reached from FORWARD by -i <host veth>, N ACCEPT rules (remote's last) then DROP, no conntrack rule: every packet of the sandbox walks the chain",
		firstLine("iptables", "-V"))

	n := *flagConns
	p50ref := rep.addRow(&Comparison{Scenario: "connect p50, no firewall (reference)", Unit: "µs", Baseline: "direct, no rules", Reference: true})
	p99ref := rep.addRow(&Comparison{Scenario: "connect p99, no firewall (reference)", Unit: "µs", Baseline: "direct, no rules", Reference: true})
	p50 := map[int]*Comparison{}
	p99 := map[int]*Comparison{}
	for _, size := range sizes {
		p50[size] = rep.addRow(&Comparison{Scenario: fmt.Sprintf("connect p50, iptables vs cleanwall, %s", rulesLabel(size)), Unit: "µs", LowerBetter: true,
			Baseline: "iptables", Cleanwall: "cleanwall", ShowAdded: true})
		p99[size] = rep.addRow(&Comparison{Scenario: fmt.Sprintf("connect p99, iptables vs cleanwall, %s", rulesLabel(size)), Unit: "µs", LowerBetter: true,
			Baseline: "iptables", Cleanwall: "cleanwall", ShowAdded: true})
	}
	for _, s := range all {
		if res, err := connectRound(s.NS, dst, 200, 1); err != nil || res.Errors > 0 {
			t.Fatalf("warm-up %s: %v %v", s.Name, err, res.FirstErr)
		}
	}
	measure := func(s *harness.Sandbox) connectResult {
		res, err := connectRound(s.NS, dst, n, 1)
		if err != nil {
			t.Fatal(err)
		}
		if res.Errors > 0 {
			t.Errorf("%s: %d of %d connections failed (first: %v)", s.Name, res.Errors, n, res.FirstErr)
		}
		t.Logf("%-6s p50 %5.0f µs p99 %5.0f µs (%0.f conn/s)", s.Name, res.p(50), res.p(99), res.rate())
		return res
	}
	for r := range rounds(3) {
		res := measure(ref)
		p50ref.Add(r, "baseline", res.p(50), nil)
		p99ref.Add(r, "baseline", res.p(99), nil)
		for i := range sizes {
			size := sizes[(i+r)%len(sizes)]
			for _, side := range order(r) {
				s := ipt[size]
				if side == "cleanwall" {
					s = cw[size]
				}
				res := measure(s)
				extra := map[string]float64{"connPerSecond": res.rate(), "errors": float64(res.Errors), "p90us": res.p(90), "maxus": res.p(100)}
				p50[size].Add(r, side, res.p(50), extra)
				p99[size].Add(r, side, res.p(99), nil)
			}
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
