package policy

import (
	"strings"
	"testing"
)

func TestLimits(t *testing.T) {
	base := header + "spec:\n  egress:\n    - " + okOpen + "\n"
	t.Run("accepted", func(t *testing.T) {
		p, err := Parse([]byte(base + "  limits: {tcpFlows: 64, udpFlows: 8, newFlowsPerSecond: 20, dnsQueriesInFlight: 4}\n"))
		if err != nil {
			t.Fatal(err)
		}
		l := p.Spec.Limits
		if l == nil || *l.TCPFlows != 64 || *l.UDPFlows != 8 || *l.NewFlowsPerSecond != 20 || *l.DNSQueriesInFlight != 4 {
			t.Fatalf("limits %+v", l)
		}
		q := p.Clone()
		*q.Spec.Limits.TCPFlows = 1
		if *p.Spec.Limits.TCPFlows != 64 {
			t.Fatal("Clone shares the limits")
		}
	})
	t.Run("errors name the field", func(t *testing.T) {
		for field, val := range map[string]string{"tcpFlows": "0", "udpFlows": "-1", "newFlowsPerSecond": "0", "dnsQueriesInFlight": "-5"} {
			_, err := Parse([]byte(base + "  limits: {" + field + ": " + val + "}\n"))
			if err == nil || !strings.Contains(err.Error(), "spec.limits."+field+": "+val+": must be at least 1") {
				t.Errorf("%s: %v", field, err)
			}
		}
		_, err := Parse([]byte(base + "  limits: {tcpFlow: 3}\n"))
		if err == nil || !strings.Contains(err.Error(), "spec.limits.tcpFlow: unknown field (did you mean tcpFlows?)") {
			t.Errorf("unknown field: %v", err)
		}
	})
	t.Run("absent or empty keeps the hash", func(t *testing.T) {
		a, err := Parse([]byte(base))
		if err != nil {
			t.Fatal(err)
		}
		b, err := Parse([]byte(base + "  limits: {}\n"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := Parse([]byte(base + "  limits: {tcpFlows: 3}\n"))
		if err != nil {
			t.Fatal(err)
		}
		if a.Hash() != b.Hash() || a.Spec.Limits != nil || b.Spec.Limits != nil {
			t.Errorf("limits: {} changed the policy (%s vs %s)", a.Hash(), b.Hash())
		}
		if a.Hash() == c.Hash() {
			t.Error("a limit does not change the hash")
		}
	})
}
