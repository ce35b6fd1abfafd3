package daemon

import (
	"errors"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// readEvents drains the deny-event ring buffer: every event is counted;
// logging is rate-limited so a sandbox flooding dropped packets cannot
// flood the log. A full ring buffer loses events, never verdicts: the
// datapath counters stay exact.
func (d *Daemon) readEvents() {
	const perSecond = 20
	var window time.Time
	var logged, suppressed int
	for {
		ev, err := d.events.Read()
		if err != nil {
			if errors.Is(err, bpf.ErrClosed) {
				return
			}
			continue
		}
		d.metrics.denyEvents.WithLabelValues(ev.Reason.String()).Inc()
		if d.observers.active() {
			d.observers.publish(api.DenyEvent{Time: now(), Sandbox: d.sandboxName(ev.SandboxID), Source: "datapath",
				Reason: ev.Reason.String(), Proto: protoName(ev.Proto), Src: ev.Src.String(), Dst: ev.Dst.String()})
		}
		d.audit.deny(auditDenyDatapath, map[string]any{"sandbox": d.sandboxName(ev.SandboxID), "reason": ev.Reason.String(),
			"proto": ev.Proto, "src": ev.Src.String(), "dst": ev.Dst.String()})
		if now := time.Now(); now.Sub(window) >= time.Second {
			if suppressed > 0 {
				d.log.Info("deny events suppressed", "count", suppressed)
			}
			window, logged, suppressed = now, 0, 0
		}
		if logged >= perSecond {
			suppressed++
			continue
		}
		logged++
		d.log.Info("denied", "sandbox", d.sandboxName(ev.SandboxID), "reason", ev.Reason.String(),
			"proto", ev.Proto, "src", ev.Src, "dst", ev.Dst, "src_mac", ev.SrcMAC.String())
	}
}

func (d *Daemon) sandboxName(id uint32) string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	for _, s := range d.sandboxes {
		if s.rec.DatapathID == id {
			return s.rec.key()
		}
	}
	return "unknown"
}
