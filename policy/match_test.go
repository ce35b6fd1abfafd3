package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// matchReference is Match by brute force over the policy as written: the
// longest containing prefix among the rules' cidrs on proto/port, and the
// first rule in file order among equals.
func matchReference(p *Policy, dst netip.Addr, proto Protocol, port uint16) (id uint32) {
	best := -1
	for i, r := range p.Spec.Egress {
		for _, d := range r.To {
			if d.CIDR == "" {
				continue
			}
			pfx := netip.MustParsePrefix(d.CIDR)
			if !pfx.Contains(dst) || pfx.Bits() <= best {
				continue
			}
			for _, ps := range r.Ports {
				pr, _ := parseProtocol(ps.Protocol)
				if pr == proto && uint16(ps.Port) == port {
					best, id = pfx.Bits(), uint32(i+1)
					break
				}
			}
		}
	}
	return id
}

// randomPrefix draws from a small address space, so that prefixes nest,
// collide and repeat.
func randomPrefix(rng *rand.Rand) netip.Prefix {
	if rng.IntN(4) == 0 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, byte(rng.IntN(2)), byte(rng.IntN(4)), 14: byte(rng.IntN(4)), 15: byte(rng.IntN(256))})
		return netip.PrefixFrom(a, []int{0, 16, 32, 40, 48, 64, 120, 127, 128}[rng.IntN(9)]).Masked()
	}
	a := netip.AddrFrom4([4]byte{10, byte(rng.IntN(3)), byte(rng.IntN(4)), byte(rng.IntN(256))})
	return netip.PrefixFrom(a, []int{0, 1, 8, 9, 15, 16, 22, 24, 30, 31, 32}[rng.IntN(11)]).Masked()
}

func randomAddr(rng *rand.Rand) netip.Addr {
	p := randomPrefix(rng)
	b := p.Addr().AsSlice()
	for i := range b {
		// Randomise the host bits: the address stays inside p.
		bitsLeft := p.Bits() - 8*i
		var keep byte
		switch {
		case bitsLeft >= 8:
			keep = 0xff
		case bitsLeft > 0:
			keep = ^byte(0) << (8 - bitsLeft)
		}
		b[i] = b[i]&keep | byte(rng.IntN(256))&^keep
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

var testPorts = []PortSpec{{Port: 443}, {Port: 80}, {Port: 443, Protocol: "UDP"}, {Port: 8080}}

func randomPolicy(rng *rand.Rand) *Policy {
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "random"}}
	for i := range 1 + rng.IntN(12) {
		r := EgressRule{Name: fmt.Sprintf("r%d", i), Mode: "open"}
		for range 1 + rng.IntN(8) {
			r.To = append(r.To, Destination{CIDR: randomPrefix(rng).String()})
		}
		for _, k := range rng.Perm(len(testPorts))[:1+rng.IntN(len(testPorts))] {
			r.Ports = append(r.Ports, testPorts[k])
		}
		p.Spec.Egress = append(p.Spec.Egress, r)
	}
	return p
}

func TestMatchAgainstReference(t *testing.T) {
	for seed := range uint64(500) {
		rng := rand.New(rand.NewPCG(seed, 1))
		p := randomPolicy(rng)
		c, err := Compile(p)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for range 200 {
			dst := randomAddr(rng)
			pp := testPorts[rng.IntN(len(testPorts))]
			proto, _ := parseProtocol(pp.Protocol)
			want := matchReference(p, dst, proto, uint16(pp.Port))
			r, ok := c.Match(dst, proto, uint16(pp.Port))
			var got uint32
			if ok {
				got = r.ID
			}
			if got != want || ok != (want != 0) {
				t.Fatalf("seed %d: Match(%s, %d/%s) = rule %d, reference says %d", seed, dst, pp.Port, proto, got, want)
			}
		}
		// The entries are the datapath's view: every one must be matched
		// by its own rule at its own network address.
		for _, e := range c.Entries {
			if r, ok := c.Match(e.Prefix.Addr(), e.Proto, e.Port); !ok || r.ID != matchReference(p, e.Prefix.Addr(), e.Proto, e.Port) {
				t.Fatalf("seed %d: entry %v does not match as the reference does", seed, e)
			}
		}
	}
}
