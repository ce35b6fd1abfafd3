package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// RuleEntry is one datapath rule: flows of Proto to Prefix:Port are
// redirected to the listener of kind Listener and counted under RuleID.
type RuleEntry struct {
	Prefix   netip.Prefix
	Proto    uint8 // 6 TCP, 17 UDP
	Port     uint16
	RuleID   uint32
	Mode     uint8
	Listener uint8
	// Expires is a CLOCK_MONOTONIC deadline in ns (fqdn entries); 0 = static.
	// The program checks it, so an entry the daemon failed to remove in time
	// still stops admitting flows.
	Expires uint64
}

func ruleKey(sandboxID uint32, generation uint8, e *RuleEntry) (datapathRuleKey, error) {
	k := datapathRuleKey{SandboxId: sandboxID, Generation: generation, Proto: e.Proto, Port: e.Port}
	p := e.Prefix.Masked()
	if !p.IsValid() {
		return k, fmt.Errorf("invalid prefix %v", e.Prefix)
	}
	switch {
	case p.Addr().Is4():
		k.Family = 4
		a := p.Addr().As4()
		copy(k.Addr[:], a[:])
	case p.Addr().Is4In6():
		return k, fmt.Errorf("prefix %v: IPv4-mapped IPv6 is not allowed", p)
	default:
		k.Family = 6
		k.Addr = p.Addr().As16()
	}
	if e.Proto != unix.IPPROTO_TCP && e.Proto != unix.IPPROTO_UDP {
		return k, fmt.Errorf("protocol %d: only TCP and UDP rules exist", e.Proto)
	}
	if e.Port == 0 {
		return k, errors.New("port 0")
	}
	k.Prefixlen = uint32(RuleKeyFixedBits + p.Bits())
	return k, nil
}

func decodeRuleKey(k *datapathRuleKey) (netip.Prefix, bool) {
	bits := int(k.Prefixlen) - RuleKeyFixedBits
	switch k.Family {
	case 4:
		return netip.PrefixFrom(netip.AddrFrom4([4]byte(k.Addr[:4])), bits), bits >= 0 && bits <= 32
	case 6:
		return netip.PrefixFrom(netip.AddrFrom16(k.Addr), bits), bits >= 0 && bits <= 128
	}
	return netip.Prefix{}, false
}

// PutRules writes entries for one sandbox generation. On error, the entries
// already written by this call are removed again and the error says why: a
// full map wraps ErrMapFull. Never partially applied.
func (d *Datapath) PutRules(sandboxID uint32, generation uint8, entries []RuleEntry) error {
	keys := make([]datapathRuleKey, len(entries))
	vals := make([]datapathRule, len(entries))
	for i := range entries {
		k, err := ruleKey(sandboxID, generation, &entries[i])
		if err != nil {
			return fmt.Errorf("rule entry %d: %w", i, err)
		}
		keys[i] = k
		vals[i] = datapathRule{RuleId: entries[i].RuleID, Mode: entries[i].Mode, Listener: entries[i].Listener, ExpiresNs: entries[i].Expires}
	}
	for i := range keys {
		if err := d.objs.CwRules.Put(&keys[i], &vals[i]); err != nil {
			d.deleteKeys(keys[:i])
			if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM) {
				return fmt.Errorf("writing rule entry %d of %d: %w (capacity %d entries for all sandboxes)", i+1, len(keys), ErrMapFull, d.objs.CwRules.MaxEntries())
			}
			return fmt.Errorf("writing rule entry %d of %d: %w", i+1, len(keys), err)
		}
	}
	return nil
}

func (d *Datapath) deleteKeys(keys []datapathRuleKey) (n int) {
	for i := range keys {
		if err := d.objs.CwRules.Delete(&keys[i]); err == nil {
			n++
		}
	}
	return n
}

// DeleteRuleEntries removes the given entries of a sandbox generation.
func (d *Datapath) DeleteRuleEntries(sandboxID uint32, generation uint8, entries []RuleEntry) error {
	keys := make([]datapathRuleKey, 0, len(entries))
	for i := range entries {
		k, err := ruleKey(sandboxID, generation, &entries[i])
		if err != nil {
			return fmt.Errorf("rule entry %d: %w", i, err)
		}
		keys = append(keys, k)
	}
	d.deleteKeys(keys)
	return nil
}

// DeleteRules removes every entry of a sandbox, or of one of its
// generations when generation >= 0, by scanning the map.
func (d *Datapath) DeleteRules(sandboxID uint32, generation int) (int, error) {
	var keys []datapathRuleKey
	var k datapathRuleKey
	var v datapathRule
	it := d.objs.CwRules.Iterate()
	for it.Next(&k, &v) {
		if k.SandboxId == sandboxID && (generation < 0 || int(k.Generation) == generation) {
			keys = append(keys, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("scanning rules: %w", err)
	}
	return d.deleteKeys(keys), nil
}

// SandboxRules reads back what the kernel holds for a sandbox generation.
func (d *Datapath) SandboxRules(sandboxID uint32, generation uint8) ([]RuleEntry, error) {
	var out []RuleEntry
	var k datapathRuleKey
	var v datapathRule
	it := d.objs.CwRules.Iterate()
	for it.Next(&k, &v) {
		if k.SandboxId != sandboxID || k.Generation != generation {
			continue
		}
		p, ok := decodeRuleKey(&k)
		if !ok {
			continue
		}
		out = append(out, RuleEntry{Prefix: p, Proto: k.Proto, Port: k.Port, RuleID: v.RuleId, Mode: v.Mode, Listener: v.Listener, Expires: v.ExpiresNs})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading rules: %w", err)
	}
	return out, nil
}

// RuleCapacity is the rule map's size (entries across all sandboxes).
func (d *Datapath) RuleCapacity() uint32 { return d.objs.CwRules.MaxEntries() }

// LookupRule does the kernel's lookup for one destination.
func (d *Datapath) LookupRule(sandboxID uint32, generation uint8, proto uint8, dst netip.Addr, port uint16) (RuleEntry, bool, error) {
	bits := 32
	if !dst.Is4() {
		bits = 128
	}
	e := RuleEntry{Prefix: netip.PrefixFrom(dst, bits), Proto: proto, Port: port}
	k, err := ruleKey(sandboxID, generation, &e)
	if err != nil {
		return RuleEntry{}, false, err
	}
	var v datapathRule
	if err := d.objs.CwRules.Lookup(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return RuleEntry{}, false, nil
		}
		return RuleEntry{}, false, err
	}
	e.RuleID, e.Mode, e.Listener, e.Expires = v.RuleId, v.Mode, v.Listener, v.ExpiresNs
	return e, true, nil
}

// RuleSandboxIDs lists the sandbox ids that have rule entries.
func (d *Datapath) RuleSandboxIDs() []uint32 {
	seen := map[uint32]bool{}
	var out []uint32
	var k datapathRuleKey
	var v datapathRule
	it := d.objs.CwRules.Iterate()
	for it.Next(&k, &v) {
		if !seen[k.SandboxId] {
			seen[k.SandboxId] = true
			out = append(out, k.SandboxId)
		}
	}
	return out
}
