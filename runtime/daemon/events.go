package daemon

import (
	"errors"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/dispatch"
	"github.com/cleanwall/cleanwall/runtime/metrics"
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
		d.metrics.DenyEvents.WithLabelValues(ev.Reason.String()).Inc()
		name := d.sandboxName(ev.SandboxID)
		if d.observers.active() {
			d.observers.publish(api.DenyEvent{Time: now(), Sandbox: name, Source: "datapath",
				Reason: ev.Reason.String(), Proto: protoName(ev.Proto), Src: ev.Src.String(), Dst: ev.Dst.String()})
		}
		d.audit.deny(auditDenyDatapath, map[string]any{"sandbox": name, "reason": ev.Reason.String(),
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
		d.log.Info("denied", "sandbox", name, "reason", ev.Reason.String(),
			"proto", ev.Proto, "src", ev.Src, "dst", ev.Dst, "src_mac", ev.SrcMAC.String())
	}
}

func (d *Daemon) sandboxName(id uint32) string {
	if s := d.sandboxes.ByDatapathID(id); s != nil {
		return s.Name
	}
	return "unknown"
}

// flowEvents streams and audits what the dispatcher and the proxies
// report (dispatch.Events).
type flowEvents struct{ d *Daemon }

func (e flowEvents) Refused(f dispatch.FlowInfo, reason string) {
	d := e.d
	if d.observers.active() {
		d.observers.publish(api.DenyEvent{Time: now(), Sandbox: f.Sandbox, Source: "proxy", Reason: reason, Proto: strings.ToUpper(f.Proto),
			Src: f.Src.String(), Dst: f.Dst.String()})
	}
	fields := map[string]any{"sandbox": f.Sandbox, "reason": reason, "proto": f.Proto, "src": f.Src.String(), "dst": f.Dst.String()}
	if f.Rule != nil {
		fields["rule"] = f.Rule.Name
	}
	d.audit.deny(auditDenyProxy, fields)
}

// Denied: a proxy refused something inside a flow (an HTTP request, or an
// extension's refusal). The source is the proxy's protocol ("http", an
// extension's name).
func (e flowEvents) Denied(f dispatch.FlowInfo, den proxies.Denial) {
	d := e.d
	den = safeDenial(den)
	source := f.Proxy.Protocol
	d.log.Debug("refused in a flow", "sandbox", f.Sandbox, "proxy", f.Proxy.String(), "dst", f.Dst,
		"reason", den.Reason, "status", den.Status, "method", den.Method, "path", den.Path, "detail", den.Detail)
	if d.observers.active() {
		d.observers.publish(api.DenyEvent{Time: now(), Sandbox: f.Sandbox, Source: source, Reason: den.Reason,
			Dst: f.Dst.String(), Method: den.Method, Path: den.Path, Status: den.Status, Proto: strings.ToUpper(f.Proto)})
	}
	kind, fields := auditDenyProxy, map[string]any{"sandbox": f.Sandbox, "dst": f.Dst.String(), "reason": den.Reason, "proxy": f.Proxy.String()}
	if source == "http" {
		kind = auditDenyHTTP
	}
	if f.Rule != nil {
		fields["rule"] = f.Rule.Name
	}
	for k, v := range map[string]string{"method": den.Method, "path": den.Path, "detail": den.Detail} {
		if v != "" {
			fields[k] = v
		}
	}
	if den.Status != 0 {
		fields["status"] = den.Status
	}
	d.audit.deny(kind, fields)
}

// dnsDenied streams and audits a refused DNS query.
func (d *Daemon) dnsDenied(sandbox string, ev dnsproxy.DenyEvent) {
	ev = safeDNSDenial(ev)
	// Debug: a sandbox can make refusals as fast as it sends queries; the
	// metrics count them all and the audit trail records them (rate-limited).
	d.log.Debug("dns refused", "sandbox", sandbox, "reason", ev.Reason, "name", ev.Name, "qtype", ev.QType, "tcp", ev.TCP)
	d.observers.publish(api.DenyEvent{Time: now(), Sandbox: sandbox, Source: "dns", Reason: string(ev.Reason), Name: ev.Name,
		Proto: map[bool]string{true: "TCP", false: "UDP"}[ev.TCP]})
	d.audit.deny(auditDenyDNS, map[string]any{"sandbox": sandbox, "reason": string(ev.Reason), "name": ev.Name, "qtype": ev.QType, "tcp": ev.TCP})
}

// datapathSource is what the metrics' datapath collector reads at scrape
// time (metrics.DatapathSource).
type datapathSource struct{ d *Daemon }

func (s datapathSource) Counters() (map[bpf.CounterKey]bpf.CounterValue, error) {
	if s.d.kernel == nil {
		return nil, errors.New("no datapath")
	}
	return s.d.kernel.Counters()
}

func (s datapathSource) RuleCapacity() int {
	if s.d.dp == nil {
		return 0
	}
	return int(s.d.dp.RuleCapacity())
}

func (s datapathSource) Owners() map[uint32]metrics.Owner {
	out := map[uint32]metrics.Owner{}
	for _, sb := range s.d.sandboxes.Snapshot() {
		sb.Lock()
		out[sb.ID] = metrics.Owner{Name: sb.ContainerID, Compiled: sb.Compiled, Rules: len(sb.Entries)}
		sb.Unlock()
	}
	return out
}

func (s datapathSource) WallDrops() (map[uint32]uint64, uint64, bool) {
	wc, err := s.d.wall.Counts()
	if err != nil {
		return nil, 0, false
	}
	return wc.Sandboxes, wc.Unassigned, true
}
