// Package fqdn learns the addresses of fqdn rules: what the DNS proxy
// answers for a name an fqdn rule uses becomes host entries in the
// sandbox's active datapath generation, expiring with the (clamped) TTL,
// carried into every new generation while they live, and swept when they
// expire (restoring a static entry they had taken over: the lower rule id
// owns an identical key). Every change moves the sandbox's rule epoch, so
// no verdict the datapath cached under the old rules answers again.
package fqdn

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Datapath is what learning writes and reads (*bpf.Datapath).
type Datapath interface {
	PutRules(id uint32, generation uint8, entries []bpf.RuleEntry) error
	DeleteRuleEntries(id uint32, generation uint8, entries []bpf.RuleEntry) error
	LookupRule(id uint32, generation, proto uint8, addr netip.Addr, port uint16) (bpf.RuleEntry, bool, error)
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
	expires := l.now() + uint64(ttl)
	s.Lock()
	defer s.Unlock()
	slot := uint8(s.Rec.Generation % 2)
	changed := false
	for _, a := range addrs {
		// A shorter TTL does not cut short an address already learnt for
		// longer: the sandbox may still use the earlier answer.
		k := sandbox.LearnKey{Name: name, Addr: a}
		exp := max(expires, s.Learned[k])
		entries := sandbox.LearntEntries(s.Slots[slot], s.Static, name, a, exp)
		if len(entries) == 0 {
			continue
		}
		if err := l.DP.PutRules(s.ID, slot, entries); err != nil {
			l.log().Warn("learning an fqdn address failed: its flows drop", "sandbox", s.Name, "name", name, "addr", a, "error", err)
			continue
		}
		changed = true
		s.Learned[k] = exp
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
// slot's policy and static hosts (at a generation flip, before it). Call
// with s locked, s.Slots[slot] and s.Static already the new generation's.
// Expired ones stay in s.Learned for Sweep to forget: the flip removes
// their entries from the old generation through it, and an expired host
// entry left there would shadow a wider cidr once that slot is active.
func (l *Learner) Relearn(s *sandbox.Sandbox, slot uint8) {
	now := l.now()
	for k, exp := range s.Learned {
		if exp <= now {
			continue
		}
		if entries := sandbox.LearntEntries(s.Slots[slot], s.Static, k.Name, k.Addr, exp); len(entries) > 0 {
			if err := l.DP.PutRules(s.ID, slot, entries); err != nil {
				l.log().Warn("carrying a learnt address into the new generation failed: its flows drop", "sandbox", s.Name, "name", k.Name, "addr", k.Addr, "error", err)
			}
		}
	}
}

// Sweep removes s's expired learnt entries from the kernel, restoring a
// static entry a learnt one had taken over, and moves the epoch if
// anything changed. It reports how many learnt addresses expired.
func (l *Learner) Sweep(s *sandbox.Sandbox) int {
	now := l.now()
	s.Lock()
	defer s.Unlock()
	slot := uint8(s.Rec.Generation % 2)
	expired := 0
	for k, exp := range s.Learned {
		if exp > now {
			continue
		}
		expired++
		delete(s.Learned, k)
		for _, e := range s.Slots[slot].EntriesForName(k.Name, k.Addr) {
			got, ok, err := l.DP.LookupRule(s.ID, slot, uint8(e.Proto), k.Addr, e.Port)
			if err != nil || !ok || got.Expires == 0 || got.Expires > now || got.Prefix.Bits() != k.Addr.BitLen() {
				continue
			}
			if st, ok := s.Static[sandbox.HostKey{Addr: k.Addr, Proto: uint8(e.Proto), Port: e.Port}]; ok {
				_ = l.DP.PutRules(s.ID, slot, []bpf.RuleEntry{st})
			} else {
				_ = l.DP.DeleteRuleEntries(s.ID, slot, []bpf.RuleEntry{got})
			}
		}
	}
	if expired > 0 {
		_ = l.BumpEpoch(s) // a restored static entry must not hide behind a cached verdict
	}
	return expired
}
