package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// hostPrefix returns the i-th /32 in 10.0.0.0/8.
func hostPrefix(i int) string {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String() + "/32"
}

// oneRule100k is one rule with 100,000 cidr destinations.
func oneRule100k() *Policy {
	r := EgressRule{Name: "big", Mode: "open", Ports: []PortSpec{{Port: 443}}}
	for i := range 100_000 {
		r.To = append(r.To, Destination{CIDR: hostPrefix(i)})
	}
	return &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "big"}, Spec: Spec{Egress: []EgressRule{r}}}
}

// thousandRules is 1,000 rules of 100 cidrs each: /24s of their own, and
// in every rule the same /12 (so that later rules overlap the first) and,
// in the first rule, 10.0.0.0/8 (so that every later rule is more
// specific than it).
func thousandRules() *Policy {
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "many"}}
	for r := range 1000 {
		rule := EgressRule{Name: fmt.Sprintf("r%d", r), Mode: "open", Ports: []PortSpec{{Port: 443}, {Port: 80}}}
		rule.To = append(rule.To, Destination{CIDR: "172.16.0.0/12"})
		if r == 0 {
			rule.To = append(rule.To, Destination{CIDR: "10.0.0.0/8"})
		}
		for len(rule.To) < 100 {
			i := r*100 + len(rule.To)
			rule.To = append(rule.To, Destination{CIDR: netip.AddrFrom4([4]byte{byte(10 + i>>16), byte(i >> 8), byte(i), 0}).String() + "/24"})
		}
		p.Spec.Egress = append(p.Spec.Egress, rule)
	}
	return p
}

func yaml100k() []byte {
	var b strings.Builder
	b.WriteString(header + "spec:\n  egress:\n    - name: big\n      mode: open\n      ports: [{port: 443}]\n      to:\n")
	for i := range 100_000 {
		b.WriteString("        - cidr: " + hostPrefix(i) + "\n")
	}
	return []byte(b.String())
}

func BenchmarkCompile100k(b *testing.B) {
	for _, bc := range []struct {
		name string
		p    *Policy
	}{{"1rule", oneRule100k()}, {"1000rules", thousandRules()}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := Compile(bc.p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkParse100k(b *testing.B) {
	data := yaml100k()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMatch(b *testing.B) {
	for _, n := range []int{1, 1000, 100_000} {
		p := oneRule100k()
		p.Spec.Egress[0].To = p.Spec.Egress[0].To[:n]
		c, err := Compile(p)
		if err != nil {
			b.Fatal(err)
		}
		dsts := make([]netip.Addr, 1024)
		for i := range dsts {
			// Half hit an entry, half miss.
			dsts[i] = netip.MustParsePrefix(hostPrefix(i * 7919 % (2 * n))).Addr()
		}
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				c.Match(dsts[i&1023], ProtoTCP, 443)
				i++
			}
		})
	}
	b.Run("entries=100k/1000rules", func(b *testing.B) {
		c, err := Compile(thousandRules())
		if err != nil {
			b.Fatal(err)
		}
		dst := netip.MustParseAddr("10.1.2.3")
		for b.Loop() {
			c.Match(dst, ProtoTCP, 443)
		}
	})
}

// Compile handles the sizes the daemon promises and produces every entry.
// How fast it does so is BenchmarkCompile100k's business (make bench):
// timings are never asserted in unit tests on shared machines.
func TestCompileLargePolicies(t *testing.T) {
	for _, tc := range []struct {
		name    string
		p       *Policy
		entries int
	}{{"1 rule x 100k", oneRule100k(), 100_000}, {"1000 rules x 100", thousandRules(), 2 * (100 + 999*99)}} {
		c, err := Compile(tc.p)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Entries) != tc.entries {
			t.Fatalf("%s: %d entries, want %d", tc.name, len(c.Entries), tc.entries)
		}
	}
}
