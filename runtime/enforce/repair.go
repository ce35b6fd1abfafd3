package enforce

import (
	"fmt"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// What the watchdog repairs (the "what" label of cleanwall_repairs_total).
const (
	RepairAttachment = "attachment"
	RepairBridge     = "bridge-attachment"
	RepairWall       = "wall"
	RepairNodeWall   = "node-wall"
	RepairIsolation  = "port-isolation"
	RepairMapPin     = "map-pin"
)

// Repaired reports one repair: what was found missing (found) and whether
// putting it back failed (err).
type Repaired func(what, sandbox string, found, err error)

// Repair verifies every layer of every sandbox and puts back what is
// missing: map pins, the node-wide wall, each sandbox's tcx link (and its
// bridge's), its nftables chain and its bridge port isolation. Checks run
// under the registry's read lock; a repair takes the write lock and checks
// the sandbox is still there, so it never races a DEL.
func (e *Enforcer) Repair(report Repaired) {
	if names, err := e.DP.RepinMaps(); len(names) > 0 || err != nil {
		report(RepairMapPin, "", fmt.Errorf("map pins removed: %v", names), err)
	}
	if found := e.Wall.CheckNode(); found != nil {
		e.Sandboxes.Lock()
		err := e.Wall.Install()
		e.Sandboxes.Unlock()
		report(RepairNodeWall, "", found, err)
	}
	e.Sandboxes.Lock()
	if len(e.retired) > 0 {
		e.reapRetired()
	}
	e.Sandboxes.Unlock()
	chains, err := e.Wall.SandboxChains()
	if err != nil {
		e.log().Warn("watchdog: listing the wall's chains", "error", err)
	}
	bridges := map[string]bool{}
	for _, s := range e.Sandboxes.Snapshot() {
		rec := s.Record()
		if rec.Bridge != "" && !bridges[rec.Bridge] {
			bridges[rec.Bridge] = true
			if found := e.DP.Check(e.bridgeAttachment(rec.Bridge, rec.BridgeIfindex)); found != nil {
				e.fix(s, RepairBridge, found, report, func() error { return e.ensureBridge(rec.Bridge, rec.BridgeIfindex) })
			}
		}
		if found := e.DP.Check(rec.Attachment); found != nil {
			e.fix(s, RepairAttachment, found, report, func() error {
				_, err := e.DP.Attach(rec.Attachment, rec.Attachment.Mode == bpf.AttachLegacyTC)
				return err
			})
		}
		if chains != nil {
			if _, ok := chains[ChainName(wallSandbox(rec))]; !ok {
				e.fix(s, RepairWall, errMissingChain, report, func() error { return e.Wall.AddSandbox(wallSandbox(rec)) })
			}
		}
		if found := e.checkIsolated(rec); found != nil {
			e.fix(s, RepairIsolation, found, report, func() error { return e.isolate(rec) })
		}
	}
}

type watchdogError string

func (e watchdogError) Error() string { return string(e) }

const errMissingChain = watchdogError("the sandbox's nftables chain is gone")

// fix repairs one layer of a sandbox still registered, under the write lock.
func (e *Enforcer) fix(s *sandbox.Sandbox, what string, found error, report Repaired, f func() error) {
	e.Sandboxes.Lock()
	defer e.Sandboxes.Unlock()
	if e.Sandboxes.Get(s.Name) != s {
		return // deleted meanwhile
	}
	if _, err := e.Links.ByIndex(s.Rec.HostIfindex); err != nil {
		return // the interface is gone: DEL or GC cleans up
	}
	report(what, s.Name, found, f())
}
