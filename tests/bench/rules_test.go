package bench

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/policy"
)

// Addresses of the topology that generated rule sets must keep clear of:
// no random prefix may contain the remote server or the address the
// no-rule frames go to, so that the rule a flow hits is always the one the
// scenario means.
var (
	remoteServer = netip.MustParseAddr("198.51.100.10")
	noRuleDst    = netip.MustParseAddr("192.0.2.1")
)

// reserved are ranges random prefixes never fall in: this-network,
// private and loopback (the topology's own ranges live there), the
// documentation nets of the topology, multicast and above.
var reserved = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("224.0.0.0/3"),
}

// randomPrefixes returns n distinct canonical IPv4 prefixes of length
// 24-32, deterministic for a seed.
func randomPrefixes(seed uint64, n int) []netip.Prefix {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	seen := make(map[netip.Prefix]bool, n)
	out := make([]netip.Prefix, 0, n)
	for len(out) < n {
		v := rng.Uint32()
		a := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		p := netip.PrefixFrom(a, 24+rng.IntN(9)).Masked()
		if seen[p] || overlapsReserved(p) {
			continue
		}
		seen[p] = true
		out = append(out, p)
	}
	return out
}

func overlapsReserved(p netip.Prefix) bool {
	for _, r := range reserved {
		if r.Overlaps(p) {
			return true
		}
	}
	return false
}

// hostIn returns an address inside p (its last address but one for
// prefixes shorter than /31, so never the network or broadcast address).
func hostIn(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	if host > 2 {
		host--
	}
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// policyYAML is one open-mode rule allowing TCP ports to the prefixes, in
// order.
func policyYAML(name string, prefixes []netip.Prefix, ports ...int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: %s\nkind: %s\nmetadata:\n  name: %s\nspec:\n  egress:\n    - name: bench\n      mode: open\n      ports: [", policy.APIVersion, policy.Kind, name)
	for i, p := range ports {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "{port: %d}", p)
	}
	b.WriteString("]\n      to:\n")
	for _, p := range prefixes {
		b.WriteString("        - cidr: " + p.String() + "\n")
	}
	return []byte(b.String())
}

// iptablesChain is an iptables-restore fragment (no table header) for one
// sandbox: FORWARD sends what arrives from its host interface to a chain
// of its own that accepts TCP port to each prefix in order, then drops.
func iptablesChain(chain, hostIf string, prefixes []netip.Prefix, port int) string {
	var b strings.Builder
	fmt.Fprintf(&b, ":%s - [0:0]\n", chain)
	fmt.Fprintf(&b, "-A FORWARD -i %s -j %s\n", hostIf, chain)
	for _, p := range prefixes {
		fmt.Fprintf(&b, "-A %s -d %s -p tcp -m tcp --dport %d -j ACCEPT\n", chain, p, port)
	}
	fmt.Fprintf(&b, "-A %s -j DROP\n", chain)
	return b.String()
}

// withRemoteLast is n−1 random prefixes followed by the remote server's
// /32: the rule a benchmark flow hits is the last one in file order.
func withRemoteLast(seed uint64, n int) []netip.Prefix {
	return append(randomPrefixes(seed, n-1), netip.PrefixFrom(remoteServer, 32))
}

func TestRandomPrefixes(t *testing.T) {
	ps := randomPrefixes(1, 5000)
	if len(ps) != 5000 {
		t.Fatalf("got %d prefixes", len(ps))
	}
	seen := map[netip.Prefix]bool{}
	for _, p := range ps {
		if p != p.Masked() || p.Bits() < 24 || p.Bits() > 32 || !p.Addr().Is4() {
			t.Fatalf("bad prefix %v", p)
		}
		if p.Contains(remoteServer) || p.Contains(noRuleDst) || overlapsReserved(p) {
			t.Fatalf("%v overlaps a topology range", p)
		}
		if seen[p] {
			t.Fatalf("duplicate %v", p)
		}
		seen[p] = true
		if h := hostIn(p); !p.Contains(h) {
			t.Fatalf("hostIn(%v) = %v", p, h)
		}
	}
	if again := randomPrefixes(1, 5000); again[4999] != ps[4999] {
		t.Fatal("not deterministic for a seed")
	}
}

func TestPolicyYAMLCompiles(t *testing.T) {
	ps := withRemoteLast(2, 1000)
	p, err := policy.Parse(policyYAML("bench", ps, 8080, 5201))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Entries) != 2*len(ps) {
		t.Fatalf("%d entries, want %d", len(c.Entries), 2*len(ps))
	}
	if r, ok := c.Match(remoteServer, policy.ProtoTCP, 8080); !ok || r.Name != "bench" {
		t.Fatalf("remote server not allowed: %v %v", r, ok)
	}
}

func TestIptablesChain(t *testing.T) {
	out := iptablesChain("CWB1", "veth1234", withRemoteLast(3, 3), 8080)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 6 || lines[0] != ":CWB1 - [0:0]" || lines[1] != "-A FORWARD -i veth1234 -j CWB1" ||
		lines[4] != "-A CWB1 -d 198.51.100.10/32 -p tcp -m tcp --dport 8080 -j ACCEPT" || lines[5] != "-A CWB1 -j DROP" {
		t.Fatalf("unexpected chain:\n%s", out)
	}
}
