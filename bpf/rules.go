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

// batchSize bounds one batch syscall (the kernel copies the batch in).
const batchSize = 8192

// PutRules writes entries for one sandbox generation, in batches. On error,
// the entries already written by this call are removed again and the error
// says why: a full map wraps ErrMapFull. Never partially applied.
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
	for off := 0; off < len(keys); off += batchSize {
		end := min(off+batchSize, len(keys))
		n, err := d.objs.CwRules.BatchUpdate(keys[off:end], vals[off:end], nil)
		if err != nil {
			d.deleteKeys(keys[:off+n])
			if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM) {
				return fmt.Errorf("writing rule entry %d of %d: %w (capacity %d entries for all sandboxes and both generations)", off+n+1, len(keys), ErrMapFull, d.objs.CwRules.MaxEntries())
			}
			return fmt.Errorf("writing rule entry %d of %d: %w", off+n+1, len(keys), err)
		}
	}
	return nil
}

// deleteKeys removes keys in batches; a key that is already gone stops a
// batch in the kernel, so the rest of that batch is deleted one by one.
func (d *Datapath) deleteKeys(keys []datapathRuleKey) (deleted int) {
	for off := 0; off < len(keys); off += batchSize {
		chunk := keys[off:min(off+batchSize, len(keys))]
		n, err := d.objs.CwRules.BatchDelete(chunk, nil)
		deleted += n
		if err == nil {
			continue
		}
		for i := n; i < len(chunk); i++ {
			if d.objs.CwRules.Delete(&chunk[i]) == nil {
				deleted++
			}
		}
	}
	return deleted
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

// allRules reads the whole rule map in batches, calling fn per entry.
func (d *Datapath) allRules(fn func(k *datapathRuleKey, v *datapathRule)) error {
	var cursor ebpf.MapBatchCursor
	keys := make([]datapathRuleKey, batchSize)
	vals := make([]datapathRule, batchSize)
	for {
		n, err := d.objs.CwRules.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			fn(&keys[i], &vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // the end of the map
		}
		if err != nil {
			return fmt.Errorf("reading rules: %w", err)
		}
	}
}

// DeleteRules removes every entry of a sandbox, or of one of its
// generations when generation >= 0, by scanning the map.
func (d *Datapath) DeleteRules(sandboxID uint32, generation int) (int, error) {
	var keys []datapathRuleKey
	err := d.allRules(func(k *datapathRuleKey, _ *datapathRule) {
		if k.SandboxId == sandboxID && (generation < 0 || int(k.Generation) == generation) {
			keys = append(keys, *k)
		}
	})
	if err != nil {
		return 0, fmt.Errorf("scanning rules: %w", err)
	}
	return d.deleteKeys(keys), nil
}

// SandboxRules reads back what the kernel holds for a sandbox generation.
func (d *Datapath) SandboxRules(sandboxID uint32, generation uint8) ([]RuleEntry, error) {
	var out []RuleEntry
	err := d.allRules(func(k *datapathRuleKey, v *datapathRule) {
		if k.SandboxId != sandboxID || k.Generation != generation {
			return
		}
		if p, ok := decodeRuleKey(k); ok {
			out = append(out, RuleEntry{Prefix: p, Proto: k.Proto, Port: k.Port, RuleID: v.RuleId, Mode: v.Mode, Listener: v.Listener, Expires: v.ExpiresNs})
		}
	})
	return out, err
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
	_ = d.allRules(func(k *datapathRuleKey, _ *datapathRule) {
		if !seen[k.SandboxId] {
			seen[k.SandboxId] = true
			out = append(out, k.SandboxId)
		}
	})
	return out
}
