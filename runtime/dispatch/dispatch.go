package dispatch

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/metrics"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Events receives what flows report for the deny-event stream and the
// audit trail; calls must not block for long (a sandbox can make them as
// fast as it opens flows: counting is the metrics', rate-limiting the
// receiver's).
type Events interface {
	// Refused: the firewall refused (reset) a flow.
	Refused(f FlowInfo, reason string)
	// Denied: a proxy refused something inside a flow.
	Denied(f FlowInfo, d proxies.Denial)
}

// FlowInfo names a flow in events.
type FlowInfo struct {
	// Sandbox is the attachment key ("unknown" for an unknown source).
	Sandbox string
	Rule    *policy.Rule // nil when the flow was refused before a rule
	// Proxy is the key of the proxy that served it (zero when none).
	Proxy    proxies.Key
	Proto    string // "tcp" or "udp"
	Src, Dst netip.AddrPort
}

// Dispatcher hands flows to proxies. Set the fields, then serve.
type Dispatcher struct {
	Sandboxes *sandbox.Registry
	DP        Datapath
	Proxies   *proxies.Registry
	// Keys gives a secure rule's flows the data keys released for the
	// sandbox's policy (nil: none are).
	Keys    func(c *policy.Compiled) proxies.KeySource
	Metrics *metrics.Metrics
	// Node bounds the descriptors flows may hold, node-wide.
	Node   *limits.Node
	Events Events
	Log    *slog.Logger
	// Logs rate-limits the hot path's log lines.
	Logs *LogLimiter
	// Ctx is canceled when the daemon stops: every flow ends.
	Ctx context.Context
	// Consent, when set, is asked about every decided flow (consent.go).
	Consent Consent

	udp udpFlows
}

// ErrRevoked is the cause a flow is canceled with when a new policy no
// longer allows it under the same rule.
var ErrRevoked = errors.New("policy no longer allows this flow")

func (d *Dispatcher) log() *slog.Logger {
	if d.Log != nil {
		return d.Log
	}
	return slog.Default()
}

// register decides a flow and registers it with its sandbox, deciding
// again when an apply replaced the sandbox's record meanwhile (a flow
// decided before a flip and registered after it would escape the
// revocation of the flip).
func (d *Dispatcher) register(s *sandbox.Sandbox, src, dst netip.AddrPort, proto policy.Protocol) (Decision, *sandbox.Flow, context.Context) {
	ctx, cancel := context.WithCancelCause(d.Ctx)
	for {
		dec := d.Decide(s, dst, proto)
		if dec.Refusal != "" {
			if s.RecordChanged(dec.Record) {
				continue // decided under a replaced record: decide again
			}
			cancel(nil)
			return dec, nil, nil
		}
		f := &sandbox.Flow{Rule: dec.Rule, Proto: proto, Src: src, Dst: dst, Cancel: cancel}
		ok, err := s.AddFlowDecidedAt(f, dec.Record)
		if err != nil {
			cancel(nil)
			dec.Refusal = RefuseDeleted
			return dec, nil, nil
		}
		if ok {
			return dec, f, ctx
		}
	}
}

// Revoke closes the flows of s that its current policy no longer allows
// under the same rule (after a flip), and returns how many.
func (d *Dispatcher) Revoke(s *sandbox.Sandbox) int {
	return s.CloseFlows(func(f *sandbox.Flow) bool {
		dec := d.Decide(s, f.Dst, f.Proto)
		return dec.Refusal == "" && dec.Rule.Name == f.Rule.Name && dec.Rule.Mode == f.Rule.Mode
	}, ErrRevoked)
}

// flowOf builds what a proxy receives for a decided flow.
func (d *Dispatcher) flowOf(dec *Decision, src, dst netip.AddrPort, rep proxies.Reporter) *proxies.Flow {
	f := &proxies.Flow{Sandbox: dec.Sandbox.ContainerID, Attachment: dec.Sandbox.Name, Rule: dec.Rule, Config: dec.Config,
		Src: src, Dst: dst, Report: rep}
	if dec.Key.Protocol != "tcp" && dec.Key.Protocol != "udp" { // http, and extensions (the L4 proxies need none)
		f.Hosts = hosts(dec, dst.Addr())
	}
	if dec.Rule.Mode == policy.ModeSecure && d.Keys != nil {
		f.Keys = d.Keys(dec.Compiled)
	}
	return f
}

// refuse counts, logs (rate-limited) and reports a refused flow.
func (d *Dispatcher) refuse(s *sandbox.Sandbox, rule *policy.Rule, key proxies.Key, proto string, src, dst netip.AddrPort, reason string) {
	name, id := "unknown", ""
	if s != nil {
		name, id = s.Name, s.ContainerID
	}
	d.Metrics.Refusal(id, rule, reason).Inc()
	if ok, suppressed := d.Logs.allow("refused:" + reason); ok { // the arguments alone cost allocations
		d.log().Warn("flow refused", "sandbox", name, "proto", proto, "src", src, "dst", dst, "reason", reason, "suppressed", suppressed)
	}
	if d.Events != nil {
		d.Events.Refused(FlowInfo{Sandbox: name, Rule: rule, Proxy: key, Proto: proto, Src: src, Dst: dst}, reason)
	}
}

// reporter is a flow's proxies.Reporter.
type reporter struct {
	d    *Dispatcher
	fs   *metrics.FlowSet
	info FlowInfo
}

func (r *reporter) Bytes(out, in int64) {
	if out > 0 {
		r.fs.BytesOut.Add(float64(out))
	}
	if in > 0 {
		r.fs.BytesIn.Add(float64(in))
	}
}

func (r *reporter) Deny(den proxies.Denial) {
	if r.d.Events != nil {
		r.d.Events.Denied(r.info, den)
	}
}

// ended counts how a flow ended: a flow the proxy refused as a whole
// (proxies.Refused) counts under its reason, like the firewall's own
// refusals; the proxy reported its denial already.
func (d *Dispatcher) ended(fs *metrics.FlowSet, info FlowInfo, res proxies.Result) {
	if reason, ok := proxies.RefusalOf(res.Err); ok {
		sandboxID, _, _ := strings.Cut(info.Sandbox, "/")
		d.Metrics.Refusal(sandboxID, info.Rule, reason).Inc()
		if ok, suppressed := d.Logs.allow("refused:" + reason); ok {
			d.log().Warn("flow refused by its proxy", "sandbox", info.Sandbox, "proxy", info.Proxy.String(), "dst", info.Dst,
				"reason", reason, "error", res.Err, "suppressed", suppressed)
		}
		return
	}
	fs.Ended(res.End)
	if d.log().Enabled(context.Background(), slog.LevelDebug) { // the arguments alone cost allocations per flow
		d.log().Debug("flow ended", "sandbox", info.Sandbox, "rule", info.Rule.Name, "dst", info.Dst, "result", string(res.End), "error", res.Err)
	}
}

// reset closes c so that the sandbox learns at once that the flow is
// refused.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}
