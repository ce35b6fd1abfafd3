package enforce

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Resolver turns a stored record's policy into a Change (compiled,
// configured, its limits), as the daemon does for an ADD. An error means
// the document no longer compiles or configures under this daemon.
type Resolver func(rec *sandbox.Record) (Change, error)

// emptyPolicy is what a sandbox whose stored policy no longer compiles is
// re-adopted under: nothing allowed.
const emptyPolicy = "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: invalid-stored-policy}\nspec: {}\n"

// Reconcile re-adopts the persisted sandboxes after a restart: their
// interfaces still exist, so their pinned links are updated in place to
// the new program (atomically: no window) and their policy is re-applied
// as a fresh generation. Sandboxes whose interface is gone are cleaned up;
// kernel state no record owns is removed (RemoveOrphans), which leaves an
// orphan interface dropping everything (unknown sandbox) rather than open.
// Call with the registry locked; resolve must accept emptyPolicy.
func (e *Enforcer) Reconcile(resolve Resolver) error {
	recs, errs := e.Store.Load()
	for _, err := range errs {
		e.log().Error("unreadable sandbox state", "error", err)
	}
	for _, rec := range recs {
		link, err := e.Links.ByIndex(rec.HostIfindex)
		if err != nil || link.Name != rec.HostInterface {
			e.log().Info("sandbox interface gone, cleaning up", "sandbox", rec.Key(), "interface", rec.HostInterface)
			e.forget(rec)
			continue
		}
		change, err := resolve(rec)
		if err != nil {
			// The stored document no longer holds: enforce nothing-allowed.
			e.log().Error("stored policy no longer valid; the sandbox gets an empty policy (everything drops)", "sandbox", rec.Key(), "error", err)
			rec.Policy, rec.PolicySource = []byte(emptyPolicy), "reconcile"
			if change, err = resolve(rec); err != nil {
				return err
			}
		}
		// Both slots are swept once: the inactive one must be empty before
		// the re-apply writes into it (a crash may have left entries there).
		_, _ = e.DP.DeleteRules(rec.DatapathID, int((rec.Generation+1)%2))
		current, _ := e.DP.SandboxRules(rec.DatapathID, uint8(rec.Generation%2))
		var epoch uint64
		if cur, err := e.DP.Sandbox(rec.HostIfindex); err == nil && cur.ID == rec.DatapathID {
			epoch = cur.Epoch // continue from it: the re-apply moves it forward
		}
		s := sandbox.New(rec, change.Compiled, change.Configs, current, epoch, change.Limits)
		// The second wall first: it holds whatever happens to the programs.
		if err := e.Wall.AddSandbox(wallSandbox(rec)); err != nil {
			return fmt.Errorf("re-installing the wall of %s: %w", rec.Key(), err)
		}
		if err := e.isolate(rec); err != nil {
			return err
		}
		if rec.Bridge != "" {
			if err := e.ensureBridge(rec.Bridge, rec.BridgeIfindex); err != nil {
				return err
			}
		}
		att, err := e.DP.Attach(rec.Attachment, rec.Attachment.Mode == bpf.AttachLegacyTC)
		if err != nil {
			return fmt.Errorf("re-attaching %s: %w", rec.Key(), err)
		}
		rec.Attachment = att
		if err := e.writeBudgets(rec.DatapathID, change.Limits); err != nil {
			return err
		}
		e.Sandboxes.Add(s)
		if err := e.Flip(s, change); err != nil {
			return fmt.Errorf("re-applying the policy of %s: %w", rec.Key(), err)
		}
		e.log().Info("sandbox re-adopted", "sandbox", rec.Key(), "generation", s.Record().Generation)
	}
	e.RemoveOrphans()
	return nil
}

// forget removes the kernel state and the record of a sandbox whose
// interface is gone.
func (e *Enforcer) forget(rec *sandbox.Record) {
	_ = e.DP.Detach(rec.Attachment)
	_ = e.Wall.RemoveSandbox(rec.DatapathID)
	e.deleteEntryIfOwned(rec.HostIfindex, rec.DatapathID)
	_, _ = e.DP.DeleteRules(rec.DatapathID, -1)
	_ = e.DP.DeleteCounters(rec.DatapathID)
	_ = e.DP.DeleteFlowRate(rec.DatapathID)
	_ = e.Store.Remove(rec.ContainerID, rec.IfName)
}

// RemoveOrphans deletes kernel state that no registered sandbox owns. Call
// with the registry locked.
func (e *Enforcer) RemoveOrphans() {
	owned := map[uint32]bool{}
	ifOwner := map[int]uint32{}
	links := map[string]bool{}
	for _, s := range e.Sandboxes.All() {
		owned[s.ID] = true
		ifOwner[s.Rec.HostIfindex] = s.ID
		links[s.Rec.Attachment.Name] = true
		if s.Rec.Bridge != "" {
			links["bridge-"+s.Rec.Bridge] = true
		}
	}
	if entries, err := e.DP.Sandboxes(); err == nil {
		for ifindex, en := range entries {
			if ifOwner[ifindex] != en.ID {
				e.log().Warn("removing orphan sandbox entry (its interface now drops everything)", "ifindex", ifindex, "datapath_id", en.ID)
				_ = e.DP.DeleteSandbox(ifindex)
			}
		}
	}
	if names, err := e.DP.PinnedLinks(); err == nil {
		for _, name := range names {
			if links[name] {
				continue
			}
			var ifindex int
			if _, err := fmt.Sscanf(name[strings.LastIndex(name, "-if")+1:], "if%d", &ifindex); err == nil && strings.HasPrefix(name, "sandbox-") {
				if _, lerr := e.Links.ByIndex(ifindex); lerr == nil {
					continue // keep the program on a live interface: it drops everything
				}
			}
			e.log().Info("removing orphan link pin", "link", name)
			_ = e.DP.Detach(bpf.Attachment{Name: name, Mode: bpf.AttachTCX})
		}
	}
	if chains, err := e.Wall.SandboxChains(); err == nil {
		for name, id := range chains {
			if owned[id] {
				continue
			}
			// Like an orphan link: on a live interface the chain stays and
			// drops everything unmarked; on a gone one it is removed.
			if _, ifname, _ := ChainParts(name); ifname != "" {
				if _, lerr := e.Links.ByName(ifname); lerr == nil {
					continue
				}
			}
			e.log().Info("removing orphan wall chain", "chain", name)
			_ = e.Wall.RemoveSandbox(id)
		}
	}
	for _, id := range e.DP.FlowRateIDs() {
		if !owned[id] {
			_ = e.DP.DeleteFlowRate(id)
		}
	}
	for id := range e.orphanRuleIDs(owned) {
		_, _ = e.DP.DeleteRules(id, -1)
		_ = e.DP.DeleteCounters(id)
	}
}

func (e *Enforcer) orphanRuleIDs(owned map[uint32]bool) map[uint32]bool {
	out := map[uint32]bool{}
	if counters, err := e.DP.Counters(); err == nil {
		for k := range counters {
			if k.SandboxID != 0 && !owned[k.SandboxID] {
				out[k.SandboxID] = true
			}
		}
	}
	for _, id := range e.DP.RuleSandboxIDs() {
		if !owned[id] {
			out[id] = true
		}
	}
	return out
}

// GC removes every attachment not in valid (CNI GC), then the orphans.
// Call with the registry locked.
func (e *Enforcer) GC(valid []api.AttachmentRef) []api.AttachmentRef {
	keep := map[string]bool{}
	for _, v := range valid {
		keep[sandbox.AttachmentKey(v.ContainerID, v.IfName)] = true
	}
	var removed []api.AttachmentRef
	for _, s := range e.Sandboxes.All() {
		if !keep[s.Name] {
			if err := e.Teardown(s); err != nil {
				e.log().Warn("gc", "sandbox", s.Name, "error", err)
			}
			removed = append(removed, api.AttachmentRef{ContainerID: s.ContainerID, IfName: s.Rec.IfName})
		}
	}
	e.RemoveOrphans()
	return removed
}

// TeardownAll removes every sandbox (a runtime that owns its node
// namespace alone, at its end). Call with the registry locked.
func (e *Enforcer) TeardownAll() error {
	var errs []error
	for _, s := range e.Sandboxes.All() {
		if err := e.Teardown(s); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
