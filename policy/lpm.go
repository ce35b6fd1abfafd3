package policy

import (
	"encoding/binary"
	"net/netip"
	"slices"
)

// lpmTable is the userspace twin of the datapath's LPM trie keyed by
// (proto, port, prefix): one group per (port, proto), and in each group a
// hash map per prefix length, probed from the longest length present to the
// shortest. A lookup costs one map probe per distinct length in the group,
// whatever the number of entries.
type lpmTable struct {
	groups map[PortProto]*lpmGroup
}

type lpmGroup struct {
	v4    [33]map[uint32]uint32 // by prefix length: masked address -> rule id
	v6    [129]map[[16]byte]uint32
	lens4 []int // lengths present, longest first
	lens6 []int
}

func newLPMTable() *lpmTable {
	return &lpmTable{groups: map[PortProto]*lpmGroup{}}
}

// group returns the group of pp, creating it.
func (t *lpmTable) group(pp PortProto) *lpmGroup {
	g := t.groups[pp]
	if g == nil {
		g = &lpmGroup{}
		t.groups[pp] = g
	}
	return g
}

// insert adds pfx (masked, unzoned) owned by rule id, unless the group has
// it already: then it returns the id of the rule that owns it and false.
func (g *lpmGroup) insert(pfx netip.Prefix, id uint32) (owner uint32, added bool) {
	bits := pfx.Bits()
	if pfx.Addr().Is4() {
		m := g.v4[bits]
		if m == nil {
			m = map[uint32]uint32{}
			g.v4[bits] = m
			g.lens4 = insertLen(g.lens4, bits)
		}
		k := v4Key(pfx.Addr(), bits)
		if owner, ok := m[k]; ok {
			return owner, false
		}
		m[k] = id
		return id, true
	}
	m := g.v6[bits]
	if m == nil {
		m = map[[16]byte]uint32{}
		g.v6[bits] = m
		g.lens6 = insertLen(g.lens6, bits)
	}
	k := v6Key(pfx.Addr(), bits)
	if owner, ok := m[k]; ok {
		return owner, false
	}
	m[k] = id
	return id, true
}

// insertLen keeps lens sorted longest first.
func insertLen(lens []int, bits int) []int {
	i, _ := slices.BinarySearchFunc(lens, bits, func(a, b int) int { return b - a })
	return slices.Insert(lens, i, bits)
}

// lookup returns the rule owning the longest prefix for pp that contains
// a, or 0.
func (t *lpmTable) lookup(a netip.Addr, pp PortProto) uint32 {
	if t == nil {
		return 0
	}
	g := t.groups[pp]
	if g == nil {
		return 0
	}
	if a.Is4() {
		for _, bits := range g.lens4 {
			if id, ok := g.v4[bits][v4Key(a, bits)]; ok {
				return id
			}
		}
		return 0
	}
	for _, bits := range g.lens6 {
		if id, ok := g.v6[bits][v6Key(a, bits)]; ok {
			return id
		}
	}
	return 0
}

// owner returns the rule that owns exactly pfx for pp, or 0.
func (t *lpmTable) owner(pfx netip.Prefix, pp PortProto) uint32 {
	g := t.groups[pp]
	if g == nil {
		return 0
	}
	a, bits := pfx.Addr(), pfx.Bits()
	if a.Is4() {
		return g.v4[bits][v4Key(a, bits)]
	}
	return g.v6[bits][v6Key(a, bits)]
}

// covering calls fn with the owner of every prefix for pp that strictly
// contains pfx, longest first.
func (t *lpmTable) covering(pfx netip.Prefix, pp PortProto, fn func(cover netip.Prefix, owner uint32)) {
	g := t.groups[pp]
	a := pfx.Addr()
	if a.Is4() {
		for _, bits := range g.lens4 {
			if bits >= pfx.Bits() {
				continue
			}
			if id, ok := g.v4[bits][v4Key(a, bits)]; ok {
				cover, _ := a.Prefix(bits)
				fn(cover, id)
			}
		}
		return
	}
	for _, bits := range g.lens6 {
		if bits >= pfx.Bits() {
			continue
		}
		if id, ok := g.v6[bits][v6Key(a, bits)]; ok {
			cover, _ := a.Prefix(bits)
			fn(cover, id)
		}
	}
}

func v4Key(a netip.Addr, bits int) uint32 {
	b := a.As4()
	// A shift by 32 yields 0 in Go, which is the mask of /0.
	return binary.BigEndian.Uint32(b[:]) & (^uint32(0) << (32 - bits))
}

func v6Key(a netip.Addr, bits int) [16]byte {
	b := a.As16()
	hi := binary.BigEndian.Uint64(b[:8])
	lo := binary.BigEndian.Uint64(b[8:])
	if bits <= 64 {
		hi &= ^uint64(0) << (64 - bits)
		lo = 0
	} else {
		lo &= ^uint64(0) << (128 - bits)
	}
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return b
}
