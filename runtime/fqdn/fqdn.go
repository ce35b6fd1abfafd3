// Package fqdn learns the addresses of fqdn rules: what the DNS proxy
// answers for a name an fqdn rule uses becomes host entries in the
// sandbox's active datapath generation, expiring with the (clamped) TTL,
// carried into every new generation while they live, and swept when they
// expire. Where entries share a key (names a CDN answers with the same
// address, or a later rule's static host), the lower rule id owns it
// whatever the order of learning, and when its name expires the key falls
// back to the next live name's entry, else the static one, else nothing.
// Every change moves the sandbox's rule epoch, so no verdict the datapath
// cached under the old rules answers again.
package fqdn

import (
	"cmp"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Datapath is what learning writes and reads (*bpf.Datapath).
type Datapath interface {
	PutRules(id uint32, generation uint8, entries []bpf.RuleEntry) error
	DeleteRuleEntries(id uint32, generation uint8, entries []bpf.RuleEntry) error
	PutSandbox(ifindex int, s bpf.Sandbox) error
}

// Learner writes learnt addresses into the datapath.
type Learner struct {
	DP  Datapath
	Log *slog.Logger
	// Now is CLOCK_MONOTONIC in ns; nil: sandbox.MonotonicNow.
	Now func() uint64
}

func (l *Learner) now() uint64 {
	if l.Now != nil {
		return l.Now()
	}
	return sandbox.MonotonicNow()
}

func (l *Learner) log() *slog.Logger {
	if l.Log != nil {
		return l.Log
	}
	return slog.Default()
}

// Learn writes addrs, learnt for name, into s's active generation, expiring
// after ttl. The datapath checks the expiry itself, so an entry the sweep
// has not removed yet still stops admitting flows on time. It reports
// whether anything was written.
func (l *Learner) Learn(s *sandbox.Sandbox, name string, addrs []netip.Addr, ttl time.Duration) bool {
	now := l.now()
	expires := now + uint64(ttl)
	s.Lock()
	defer s.Unlock()
	slot := uint8(s.Rec.Generation % 2)
	c := s.Slots[slot]
	live := liveNames(s.Learned, now, addrSet(addrs))
	changed := false
	for _, a := range addrs {
		k := sandbox.LearnKey{Name: name, Addr: a}
		prev, had := s.Learned[k]
		// A shorter TTL does not cut short an address already learnt for
		// longer: the sandbox may still use the earlier answer.
		exp := max(expires, prev)
		if exp <= now || len(sandbox.LearntEntries(c, s.Static, name, a, exp)) == 0 {
			continue // already expired, or no rule of the name opens a
		}
		// Another name may hold a's keys already: the kernel gets the
		// winner of all of them, not whichever was learnt last.
		if live[a] == nil {
			live[a] = map[string]uint64{}
		}
		s.Learned[k], live[a][name] = exp, exp
		if err := l.DP.PutRules(s.ID, slot, arbitrated(c, s.Static, a, live[a])); err != nil {
			delete(live[a], name)
			if had {
				s.Learned[k] = prev
				if prev > now {
					live[a][name] = prev
				}
			} else {
				delete(s.Learned, k)
			}
			l.log().Warn("learning an fqdn address failed: its flows drop", "sandbox", s.Name, "addr", a, "error", err) // no name: it may be the sandbox's (a pattern's label)
			continue
		}
		changed = true
	}
	// Cached verdicts ("no rule" for this address, or a broader rule's)
	// are stale now.
	if changed {
		if err := l.BumpEpoch(s); err != nil {
			l.log().Warn("moving the rule epoch failed: the learnt address may stay refused until the next change", "sandbox", s.Name, "error", err)
		}
	}
	return changed
}

// liveNames groups the unexpired names of learned by address, with their
// expiries: of the addresses in only (nil: of all).
func liveNames(learned map[sandbox.LearnKey]uint64, now uint64, only map[netip.Addr]bool) map[netip.Addr]map[string]uint64 {
	out := map[netip.Addr]map[string]uint64{}
	for k, exp := range learned {
		if exp <= now || only != nil && !only[k.Addr] {
			continue
		}
		if out[k.Addr] == nil {
			out[k.Addr] = map[string]uint64{}
		}
		out[k.Addr][k.Name] = exp
	}
	return out
}

func addrSet(addrs []netip.Addr) map[netip.Addr]bool {
	m := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		m[a] = true
	}
	return m
}

// arbitrated is what the names learnt for a (with their expiries) open
// together under policy c, whose static hosts are static: per (proto,
// port) the lowest rule id's entry, as policy.Compiled.EntriesForName
// arbitrates names (docs/policy.md: the first rule in file order wins),
// and of one rule the latest expiry. The result does not depend on the
// order names were learnt in, nor on map order; it is sorted by key.
func arbitrated(c *policy.Compiled, static map[sandbox.HostKey]bpf.RuleEntry, a netip.Addr, names map[string]uint64) []bpf.RuleEntry {
	best := map[sandbox.HostKey]bpf.RuleEntry{}
	for name, exp := range names {
		for _, e := range sandbox.LearntEntries(c, static, name, a, exp) {
			k := sandbox.HostKey{Addr: a, Proto: e.Proto, Port: e.Port}
			if b, ok := best[k]; !ok || e.RuleID < b.RuleID || e.RuleID == b.RuleID && e.Expires > b.Expires {
				best[k] = e
			}
		}
	}
	out := slices.Collect(maps.Values(best))
	slices.SortFunc(out, func(x, y bpf.RuleEntry) int {
		return cmp.Or(cmp.Compare(x.Proto, y.Proto), cmp.Compare(x.Port, y.Port))
	})
	return out
}

// BumpEpoch moves s's rule epoch forward after its rules changed outside a
// flip: verdicts the datapath cached under the old rules become
// unreachable. Call with s locked.
func (l *Learner) BumpEpoch(s *sandbox.Sandbox) error {
	next := sandbox.NextEpoch(s.Epoch)
	if err := l.DP.PutSandbox(s.Rec.HostIfindex, s.Rec.DatapathEntry(next)); err != nil {
		return err
	}
	s.Epoch = next
	return nil
}

// Relearn writes s's unexpired learnt addresses into slot under that
// slot's policy and static hosts (at a generation flip, before it), each
// address's names arbitrated under the new rule ids. Call with s locked,
// s.Slots[slot] and s.Static already the new generation's.
// Expired ones stay in s.Learned for Sweep to forget: the flip removes
// their entries from the old generation through it, and an expired host
// entry left there would shadow a wider cidr once that slot is active.
func (l *Learner) Relearn(s *sandbox.Sandbox, slot uint8) {
	for a, names := range liveNames(s.Learned, l.now(), nil) {
		if entries := arbitrated(s.Slots[slot], s.Static, a, names); len(entries) > 0 {
			if err := l.DP.PutRules(s.ID, slot, entries); err != nil {
				l.log().Warn("carrying a learnt address into the new generation failed: its flows drop", "sandbox", s.Name, "addr", a, "error", err)
			}
		}
	}
}

// Sweep forgets s's expired learnt names and rewrites each key of the
// active generation they opened: with the winner of the names still
// learnt for its address, else the static entry a learnt one had taken
// over, else without an entry. It moves the epoch if anything changed and
// reports how many learnt addresses expired. Where the kernel write
// fails, the expired names stay for the next sweep to retry: the kernel
// would otherwise keep an expired entry, which refuses the address and
// shadows a wider cidr behind it.
func (l *Learner) Sweep(s *sandbox.Sandbox) int {
	now := l.now()
	s.Lock()
	defer s.Unlock()
	slot := uint8(s.Rec.Generation % 2)
	c := s.Slots[slot]
	expired := map[netip.Addr][]sandbox.LearnKey{}
	for k, exp := range s.Learned {
		if exp <= now {
			expired[k.Addr] = append(expired[k.Addr], k)
		}
	}
	if len(expired) == 0 {
		return 0
	}
	live := liveNames(s.Learned, now, addrSet(slices.Collect(maps.Keys(expired))))
	forgotten, changed := 0, false
	for a, keys := range expired {
		held := map[sandbox.HostKey]bool{}
		for _, k := range keys {
			for _, e := range sandbox.LearntEntries(c, s.Static, k.Name, a, s.Learned[k]) {
				held[sandbox.HostKey{Addr: a, Proto: e.Proto, Port: e.Port}] = true
			}
		}
		winners := map[sandbox.HostKey]bpf.RuleEntry{}
		for _, e := range arbitrated(c, s.Static, a, live[a]) {
			winners[sandbox.HostKey{Addr: a, Proto: e.Proto, Port: e.Port}] = e
		}
		var put, del []bpf.RuleEntry
		for hk := range held {
			if e, ok := winners[hk]; ok {
				put = append(put, e)
			} else if st, ok := s.Static[hk]; ok {
				put = append(put, st)
			} else {
				del = append(del, bpf.RuleEntry{Prefix: netip.PrefixFrom(a, a.BitLen()), Proto: hk.Proto, Port: hk.Port})
			}
		}
		var err error
		if len(put) > 0 {
			if err = l.DP.PutRules(s.ID, slot, put); err == nil {
				changed = true
			}
		}
		if err == nil && len(del) > 0 {
			if err = l.DP.DeleteRuleEntries(s.ID, slot, del); err == nil {
				changed = true
			}
		}
		if err != nil {
			l.log().Warn("removing an expired fqdn address failed: it stays refused until the next sweep", "sandbox", s.Name, "addr", a, "error", err)
			continue
		}
		for _, k := range keys {
			delete(s.Learned, k)
		}
		forgotten += len(keys)
	}
	if changed {
		// A restored entry must not hide behind a cached verdict.
		if err := l.BumpEpoch(s); err != nil {
			l.log().Warn("moving the rule epoch failed: a swept address may keep its cached verdict until the next change", "sandbox", s.Name, "error", err)
		}
	}
	return forgotten
}
