package daemon

import (
	"time"

	"github.com/vishvananda/netlink"

	"github.com/cleanwall/cleanwall/bpf"
)

// DefaultWatchdogInterval is how often the daemon verifies what keeps its
// sandboxes enforced. A program detached or a pin removed under the daemon
// is put back within one interval plus the time of one round (a few system
// calls per sandbox); meanwhile the nftables wall drops whatever the
// missing program would have decided.
const DefaultWatchdogInterval = time.Second

// What the watchdog repairs (the "what" label of cleanwall_repairs_total).
const (
	repairAttachment = "attachment"
	repairBridge     = "bridge-attachment"
	repairWall       = "wall"
	repairNodeWall   = "node-wall"
	repairIsolation  = "port-isolation"
	repairMapPin     = "map-pin"
)

// watch runs the watchdog until the daemon stops.
func (d *Daemon) watch() {
	t := time.NewTicker(d.cfg.WatchdogInterval)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			d.repair()
		}
	}
}

// repair verifies every layer of every sandbox and puts back what is
// missing: map pins, the node-wide wall, each sandbox's tcx link (and its
// bridge's), its nftables chain and its bridge port isolation. Checks run
// under the read lock; a repair takes the write lock and checks again, so
// it never races a DEL.
func (d *Daemon) repair() {
	if names, err := d.dp.RepinMaps(); len(names) > 0 || err != nil {
		d.repaired(repairMapPin, "", err, "maps", names)
	}
	if err := d.wall.checkNode(); err != nil {
		d.mu.Lock()
		ierr := d.wall.install()
		d.mu.Unlock()
		d.repaired(repairNodeWall, "", ierr, "found", err.Error())
	}
	chains, err := d.wall.sandboxChains()
	if err != nil {
		d.log.Warn("watchdog: listing the wall's chains", "error", err)
	}
	d.mu.RLock()
	list := make([]*sandbox, 0, len(d.sandboxes))
	for _, s := range d.sandboxes {
		list = append(list, s)
	}
	d.mu.RUnlock()
	bridges := map[string]bool{}
	for _, s := range list {
		rec := s.rec
		if rec.Bridge != "" && !bridges[rec.Bridge] {
			bridges[rec.Bridge] = true
			if err := d.dp.Check(d.bridgeAttachment(rec.Bridge, rec.BridgeIfindex)); err != nil {
				d.fix(s, repairBridge, err, func() error { return d.ensureBridge(rec.Bridge, rec.BridgeIfindex) })
			}
		}
		if err := d.dp.Check(rec.Attachment); err != nil {
			d.fix(s, repairAttachment, err, func() error {
				_, err := d.dp.Attach(rec.Attachment, rec.Attachment.Mode == bpf.AttachLegacyTC)
				return err
			})
		}
		if chains != nil {
			if _, ok := chains[rec.wallSandbox().chain()]; !ok {
				d.fix(s, repairWall, errMissingChain, func() error { return d.wall.addSandbox(s.rec.wallSandbox()) })
			}
		}
		if err := checkIsolated(rec); err != nil {
			d.fix(s, repairIsolation, err, func() error {
				l, err := netlink.LinkByIndex(s.rec.HostIfindex)
				if err != nil {
					return err
				}
				return isolatePort(s.rec, l)
			})
		}
	}
}

type watchdogError string

func (e watchdogError) Error() string { return string(e) }

const errMissingChain = watchdogError("the sandbox's nftables chain is gone")

// fix repairs one layer of a sandbox still registered, under the write lock.
func (d *Daemon) fix(s *sandbox, what string, found error, f func() error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sandboxes[s.rec.key()] != s {
		return // deleted meanwhile
	}
	if _, err := netlink.LinkByIndex(s.rec.HostIfindex); err != nil {
		return // the interface is gone: DEL or GC cleans up
	}
	d.repaired(what, s.rec.key(), f(), "found", found.Error())
}

// repaired logs, counts and audits one repair.
func (d *Daemon) repaired(what, sandbox string, err error, kv ...any) {
	d.metrics.repairs.WithLabelValues(what).Inc()
	fields := map[string]any{"what": what, "ok": err == nil}
	for i := 0; i+1 < len(kv); i += 2 {
		fields[kv[i].(string)] = kv[i+1]
	}
	if sandbox != "" {
		fields["sandbox"] = sandbox
	}
	if err != nil {
		fields["error"] = err.Error()
		d.log.Error("watchdog: repair failed (the nftables wall keeps dropping)", "what", what, "sandbox", sandbox, "error", err)
	} else {
		d.log.Warn("watchdog: repaired", append([]any{"what", what, "sandbox", sandbox}, kv...)...)
	}
	d.audit.record(auditRepair, fields)
}
