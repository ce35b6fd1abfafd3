package daemon

import (
	"errors"
	"fmt"

	"github.com/cleanwall/cleanwall/policy"
)

// errPolicyChanged closes flows the new policy no longer allows.
var errPolicyChanged = errors.New("policy no longer allows this flow")

// Apply replaces a sandbox's policy: the new rules are written into the
// inactive generation, one atomic update of the sandbox entry flips to it,
// then the old generation is removed. A failure before the flip leaves the
// old generation enforced, untouched. Established flows that the new
// policy does not allow under the same rule are closed.
func (d *Daemon) Apply(id, ifName string, doc []byte, source string) (int, *policy.Compiled, error) {
	if source == "" {
		source = "request"
	}
	compiled, err := compilePolicy(doc, source)
	if err != nil {
		return 0, nil, err
	}
	if err := d.ensureKeys(d.ctx, compiled); err != nil {
		return 0, nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	list := d.find(id, ifName)
	if len(list) == 0 {
		return 0, nil, &api404{fmt.Sprintf("no sandbox %s", attachmentKey(id, ifName))}
	}
	closed := 0
	for _, s := range list {
		n, err := d.apply(s, compiled, doc, source)
		if err != nil {
			return closed, nil, fmt.Errorf("%s: %w", s.rec.key(), err)
		}
		closed += n
	}
	return closed, compiled, nil
}

type api404 struct{ msg string }

func (e *api404) Error() string { return e.msg }

// apply flips one sandbox to a new policy. Called with d.mu held.
func (d *Daemon) apply(s *sandbox, compiled *policy.Compiled, doc []byte, source string) (int, error) {
	rec := s.rec
	next := rec.Generation + 1
	slot, old := uint8(next%2), uint8(rec.Generation%2)
	entries := datapathEntries(compiled)
	// The inactive slot is empty: every apply removes the generation it
	// replaces, a failed write removes what it wrote, and reconcile sweeps
	// both slots of a re-adopted sandbox once.
	if err := d.dp.PutRules(rec.DatapathID, slot, entries); err != nil {
		return 0, fmt.Errorf("writing generation %d: %w (generation %d stays enforced)", next, err, rec.Generation)
	}
	updated := *rec
	updated.Generation = next
	updated.Policy = doc
	updated.PolicyName = compiled.Name
	updated.PolicySource = source

	s.mu.Lock()
	// Rules of both slots stay resolvable through the flip.
	s.http = httpRulesOf(compiled, nil)
	if prev := s.slots[old]; prev != nil {
		httpRulesOf(prev, s.http)
	}
	s.slots[slot] = compiled
	prevStatic := s.static
	s.static = staticHosts(entries)
	d.relearn(s, slot) // fqdn addresses learnt so far, under the new policy
	epoch := nextEpoch(s.epoch)
	if err := d.dp.PutSandbox(rec.HostIfindex, updated.datapathEntry(epoch)); err != nil {
		s.static = prevStatic
		s.mu.Unlock()
		_, _ = d.dp.DeleteRules(rec.DatapathID, int(slot)) // rare: sweep what this attempt wrote
		return 0, fmt.Errorf("flipping to generation %d: %w (generation %d stays enforced)", next, err, rec.Generation)
	}
	// The flip happened: from here on the new policy is the truth. The old
	// generation is unreachable; remove exactly what it held.
	stale := s.entries
	if prev := s.slots[old]; prev != nil {
		for k, exp := range s.learned {
			stale = append(stale, s.learntEntriesUnder(prev, prevStatic, k.name, k.addr, exp)...)
		}
	}
	s.rec = &updated
	s.epoch = epoch
	s.compiled = compiled
	limits := effectiveLimits(d.cfg.Limits, compiled)
	s.limits.set(limits)
	s.entries = entries
	s.mu.Unlock()
	if d.dns != nil {
		d.dns.SetSandbox(rec.key(), dnsConfig(compiled))
	}
	if err := d.dp.DeleteRuleEntries(rec.DatapathID, old, stale); err != nil {
		d.log.Warn("removing the old generation", "sandbox", rec.key(), "error", err)
	}
	if err := d.writeBudgets(rec.DatapathID, limits); err != nil {
		d.log.Warn("writing the kernel budgets: the previous ones stay", "sandbox", rec.key(), "error", err)
	}
	if err := d.store.save(&updated); err != nil {
		d.log.Error("persisting the new generation failed; a restart re-applies the previous document", "sandbox", rec.key(), "error", err)
	}
	closed := s.closeFlows(func(f *flow) bool {
		r, _, refusal := d.kernelRule(s, f.dst, f.proto)
		return refusal == "" && r.Name == f.rule.Name && r.Mode == f.rule.Mode && d.proxyFor(r) == nil
	}, errPolicyChanged)
	d.log.Info("policy applied", "sandbox", rec.key(), "policy", compiled.Name, "generation", next,
		"rules", len(entries), "closed_flows", closed)
	return closed, nil
}
