package daemon

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"

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
		name, rule := d.datapathOwner(ev.SandboxID, ev.RuleID)
		if d.observers.active() {
			d.observers.publish(datapathEvent(ev, name, rule))
		}
		fields := map[string]any{"sandbox": name, "reason": ev.Reason.String(),
			"proto": ev.Proto, "src": ev.Src.String(), "dst": ev.Dst.String()}
		if rule != "" {
			fields["rule"] = rule
		}
		d.audit.deny(auditDenyDatapath, fields)
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

// datapathOwner names the sandbox of a datapath id and, when ruleID is
// set, the rule of its active policy with that id.
func (d *Daemon) datapathOwner(id, ruleID uint32) (name, rule string) {
	s := d.sandboxes.ByDatapathID(id)
	if s == nil {
		return "unknown", ""
	}
	if ruleID != 0 {
		s.Lock()
		if s.Compiled != nil {
			if r := s.Compiled.Rule(ruleID); r != nil {
				rule = r.Name
			}
		}
		s.Unlock()
	}
	return s.Name, rule
}

// The datapath's sample and the API's header length are the same.
var _ = [1]struct{}{}[bpf.DenySampleLen-api.DenyHeaderLen]

// datapathEvent is the observers' view of a dropped packet: its time on
// the wall clock, its protocol by name, and its sampled headers (from the
// Ethernet header: the datapath runs at tc of Ethernet devices).
func datapathEvent(ev bpf.DenyEvent, sandbox, rule string) api.DenyEvent {
	out := api.DenyEvent{Time: monotonicToWall(ev.Time), Sandbox: sandbox, Source: "datapath", Verdict: api.VerdictDrop,
		Reason: ev.Reason.String(), Rule: rule, Proto: eventProto(ev), Length: int(ev.Len)}
	if len(ev.Sample) > 0 {
		out.Header, out.Link = headersOnly(ev.Sample), api.LinkEthernet // never payload (docs/telemetry.md)
	}
	switch {
	case !ev.Src.IsValid():
	case ev.Proto == 6 || ev.Proto == 17:
		out.Src, out.Dst = ev.Src.String(), ev.Dst.String()
	default: // no ports
		out.Src, out.Dst = ev.Src.Addr().String(), ev.Dst.Addr().String()
	}
	return out
}

// eventProto names a dropped packet's protocol: the transport protocol of
// an IP packet, else what its Ethernet type says.
func eventProto(ev bpf.DenyEvent) string {
	if ev.Family == 4 || ev.Family == 6 {
		switch ev.Proto {
		case 6:
			return "TCP"
		case 17:
			return "UDP"
		case 1:
			return "ICMP"
		case 58:
			return "ICMPv6"
		}
		if name, ok := ipv6ExtNames[ev.Proto]; ok && ev.Family == 6 {
			return name
		}
		return fmt.Sprint(ev.Proto)
	}
	switch ev.Ethertype {
	case 0:
		return ""
	case 0x0806:
		return "ARP"
	}
	return fmt.Sprintf("0x%04x", ev.Ethertype)
}

// ipv6ExtNames are IANA's keywords of the IPv6 extension headers the
// datapath drops (ipv6-extension-header).
var ipv6ExtNames = map[uint8]string{0: "HOPOPT", 43: "IPv6-Route", 44: "IPv6-Frag", 50: "ESP", 51: "AH", 59: "IPv6-NoNxt", 60: "IPv6-Opts"}

// monotonicToWall turns a CLOCK_MONOTONIC reading (bpf_ktime_get_ns) into
// wall-clock time.
func monotonicToWall(mono time.Duration) time.Time {
	var ts unix.Timespec
	wall := time.Now()
	if mono <= 0 || unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) != nil {
		return wall.UTC()
	}
	return wall.Add(mono - time.Duration(ts.Nano())).UTC()
}

// flowEvents streams and audits what the dispatcher and the proxies
// report (dispatch.Events).
type flowEvents struct{ d *Daemon }

func (e flowEvents) Refused(f dispatch.FlowInfo, reason string) {
	d := e.d
	if d.observers.active() {
		ev := api.DenyEvent{Time: now(), Sandbox: f.Sandbox, Source: "proxy", Verdict: api.VerdictRefuse, Reason: reason,
			Proto: strings.ToUpper(f.Proto), Src: f.Src.String(), Dst: f.Dst.String()}
		if f.Rule != nil {
			ev.Rule = f.Rule.Name
		}
		d.observers.publish(ev)
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
		ev := api.DenyEvent{Time: now(), Sandbox: f.Sandbox, Source: source, Verdict: api.VerdictRefuse, Reason: den.Reason,
			Dst: f.Dst.String(), Method: den.Method, Path: den.Path, Status: den.Status, Proto: strings.ToUpper(f.Proto)}
		if f.Rule != nil {
			ev.Rule = f.Rule.Name
		}
		d.observers.publish(ev)
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
	d.observers.publish(api.DenyEvent{Time: now(), Sandbox: sandbox, Source: "dns", Verdict: api.VerdictRefuse, Reason: string(ev.Reason), Name: ev.Name,
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
