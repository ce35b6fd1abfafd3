package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	tcpproxy "github.com/cleanwall/cleanwall/proxies/tcp"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// flow is one proxied connection (TCP) or datagram flow (UDP).
type flow struct {
	sb     *sandbox
	rule   *policy.Rule
	proto  policy.Protocol
	src    netip.AddrPort
	dst    netip.AddrPort
	cancel context.CancelCauseFunc
}

// addFlowDecidedAt registers a flow whose rule was decided under record
// rec, unless an apply replaced the record since: apply closes the flows
// its new policy does not allow, from a list taken after the flip, so a
// flow decided before the flip and registered after it would escape. The
// caller decides again.
// A sandbox being deleted takes no new flows: teardown closes the flows it
// knows of, so a flow registered after that would escape (errSandboxDeleted).
func (s *sandbox) addFlowDecidedAt(f *flow, rec *record) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false, errSandboxDeleted
	}
	if s.rec != rec {
		return false, nil
	}
	s.flows[f] = struct{}{}
	return true, nil
}

// recordChanged reports whether an apply replaced the record a decision was
// taken under: the old generation's entries may have been removed between
// reading the record and looking the rule up, so a refusal taken under it
// is not to be trusted either way.
func (s *sandbox) recordChanged(rec *record) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return rec != nil && s.rec != rec
}

func (s *sandbox) removeFlow(f *flow) {
	s.mu.Lock()
	delete(s.flows, f)
	s.mu.Unlock()
}

// closeFlows cancels every flow for which keep returns false (nil: all).
// keep runs without s.mu held (it may look rules up).
func (s *sandbox) closeFlows(keep func(*flow) bool, cause error) int {
	s.mu.Lock()
	flows := make([]*flow, 0, len(s.flows))
	for f := range s.flows {
		flows = append(flows, f)
	}
	s.mu.Unlock()
	closed := 0
	for _, f := range flows {
		if keep == nil || !keep(f) {
			f.cancel(cause)
			closed++
		}
	}
	return closed
}

// errModeUnavailable closes flows whose rule asks for a proxy this build
// does not provide: never fall back to anything less.
var errModeUnavailable = errors.New("proxy mode not available in this runtime")

// proxyFor reports whether this runtime can proxy flows of rule r.
func (d *Daemon) proxyFor(r *policy.Rule) error {
	if r.Mode != policy.ModeOpen {
		return fmt.Errorf("%w: mode %s", errModeUnavailable, r.Mode)
	}
	return nil
}

// sandboxByIP finds the sandbox a proxied flow came from.
func (d *Daemon) sandboxByIP(a netip.Addr) *sandbox {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.byIP[a.Unmap()]
}

// resolveFlow finds the sandbox and rule of a redirected flow by
// asking the kernel's own rule map (the active generation), so the proxy
// decides exactly what the datapath decided: cidr and learnt fqdn entries
// alike, expiry included. If the policy flipped since the packet was
// classified, the newer policy decides, which can only close flows. It
// also says whether the kernel entry was learnt through DNS (an fqdn
// destination) rather than written from a cidr, and under which record of
// the sandbox the rule was decided (for addFlowDecidedAt).
func (d *Daemon) resolveFlow(src, dst netip.AddrPort, proto policy.Protocol) (*sandbox, *policy.Rule, bool, string, *record) {
	sb := d.sandboxByIP(src.Addr())
	if sb == nil {
		return nil, nil, false, "unknown-source", nil
	}
	rule, learnt, refusal, rec := d.kernelRuleAt(sb, dst, proto)
	if refusal != "" {
		return sb, rule, learnt, refusal, rec
	}
	if err := d.proxyFor(rule); err != nil {
		return sb, rule, learnt, "mode-unavailable", rec
	}
	return sb, rule, learnt, "", rec
}

// kernelRule looks a destination up in the sandbox's active generation.
func (d *Daemon) kernelRule(sb *sandbox, dst netip.AddrPort, proto policy.Protocol) (*policy.Rule, bool, string) {
	rule, learnt, refusal, _ := d.kernelRuleAt(sb, dst, proto)
	return rule, learnt, refusal
}

// kernelRuleAt is kernelRule, also returning the sandbox record it read.
//
// The active generation's slot comes from the sandbox's record, read under
// s.mu, rather than from a second system call reading the sandbox's
// kernel entry: they are the same value. Only the daemon writes that
// entry, and every write of a registered sandbox's entry happens under
// s.mu with the record's generation: apply's flip (PutSandbox and the new
// record in one critical section; a failed update changes neither) and
// the rule-epoch bumps (bumpEpoch, which rewrites the record's own
// generation). Add writes the entry before the sandbox is registered (no
// flow can find it before), reconcile re-applies with d.mu held (flows
// wait in sandboxByIP), and teardown deletes the entry and then the rules
// of both slots, so a flow looked up after that finds no rule. Whatever
// writes the entry in another way must keep this true or read it here
// again. The rule itself is always the kernel's own entry.
func (d *Daemon) kernelRuleAt(sb *sandbox, dst netip.AddrPort, proto policy.Protocol) (*policy.Rule, bool, string, *record) {
	sb.mu.Lock()
	rec := sb.rec
	slot := uint8(rec.Generation % 2)
	compiled := sb.slots[slot]
	sb.mu.Unlock()
	e, ok, err := d.dp.LookupRule(rec.DatapathID, slot, uint8(proto), dst.Addr().Unmap(), dst.Port())
	if err != nil || !ok {
		return nil, false, "no-rule", rec
	}
	learnt := e.Expires != 0
	if learnt && e.Expires <= monotonicNow() {
		return nil, learnt, "expired", rec
	}
	if compiled == nil {
		return nil, learnt, "no-rule", rec
	}
	rule := compiled.Rule(e.RuleID)
	if rule == nil {
		return nil, learnt, "no-rule", rec
	}
	return rule, learnt, "", rec
}

func (d *Daemon) handleTCP(c *net.TCPConn) {
	src, dst := tproxy.OriginalDst(c)
	var (
		sb     *sandbox
		rule   *policy.Rule
		learnt bool
		f      *flow
		ctx    context.Context
		cancel context.CancelCauseFunc
		done   func() // gives back what the flow took of the sandbox's limits
	)
	// The sandbox's limits first: a flood of flows over them costs one
	// accept and a reset each, not a rule lookup.
	if sb = d.sandboxByIP(src.Addr()); sb != nil {
		var over string
		if done, over = sb.limits.admit(flowTCP, d.fds); over != "" {
			d.refuseFlow(sb, nil, "tcp", src, dst, over)
			c.SetLinger(0)
			c.Close()
			return
		}
		defer done()
	}
	for {
		var refusal string
		var rec *record
		sb, rule, learnt, refusal, rec = d.resolveFlow(src, dst, policy.ProtoTCP)
		if refusal != "" && sb != nil && sb.recordChanged(rec) {
			continue // decided under a record an apply replaced meanwhile: decide again
		}
		if refusal != "" {
			d.refuseFlow(sb, rule, "tcp", src, dst, refusal)
			c.SetLinger(0) // reset: the sandbox learns at once that the flow is refused
			c.Close()
			return
		}
		if ctx == nil {
			ctx, cancel = context.WithCancelCause(d.ctx)
			defer cancel(nil)
		}
		f = &flow{sb: sb, rule: rule, proto: policy.ProtoTCP, src: src, dst: dst, cancel: cancel}
		ok, gone := sb.addFlowDecidedAt(f, rec)
		if gone != nil {
			d.refuseFlow(sb, rule, "tcp", src, dst, "sandbox-deleted")
			c.SetLinger(0)
			c.Close()
			return
		}
		if ok {
			break
		}
		// An apply flipped the policy since the decision: decide again.
	}
	defer sb.removeFlow(f)

	m := d.metrics.flowSet(sb, rule)
	m.accepted.Inc()
	m.active.Inc()
	defer m.active.Dec()

	var budget int64
	if o := rule.Spec.Open; o != nil && o.TCP != nil && o.TCP.MaxBytesOut != nil {
		budget = *o.TCP.MaxBytesOut
	}
	var st tcpproxy.Stats
	var err error
	if o := rule.Spec.Open; o != nil && o.Protocol == "http" {
		err = d.serveHTTP(ctx, c, f, learnt, budget)
	} else {
		fwd := tcpproxy.Forwarder{IdleTimeout: d.cfg.IdleTimeout, Dial: d.dialUpstreamTCP}
		err = fwd.Forward(ctx, c, tcpproxy.Flow{Dst: dst, MaxBytesOut: budget}, &st)
	}
	m.bytesOut.Add(float64(st.BytesOut.Load()))
	m.bytesIn.Add(float64(st.BytesIn.Load()))
	result := resultClosed
	switch {
	case err == nil:
	case errors.Is(err, tcpproxy.ErrBudgetExceeded), errors.Is(err, errBudget):
		result = resultBudgetExceeded
	case errors.Is(err, tcpproxy.ErrIdle):
		result = resultIdle
	case errors.Is(err, errPolicyChanged), errors.Is(err, errSandboxDeleted):
		result = resultPolicyClosed
	default:
		result = resultError
	}
	m.ended(result)
	if d.log.Enabled(ctx, slog.LevelDebug) { // the arguments alone cost allocations per flow
		d.log.Debug("flow ended", "sandbox", sb.rec.key(), "rule", rule.Name, "dst", dst,
			"bytes_out", st.BytesOut.Load(), "bytes_in", st.BytesIn.Load(), "result", result.String(), "error", err)
	}
}

// upstreamDialer opens the proxy's own connections to destinations, from
// the node namespace, without the proxy socket mark. No TCP keepalive:
// the proxies have idle timeouts of their own, and the probe settings
// cost four system calls per connection.
var upstreamDialer = net.Dialer{Timeout: tcpproxy.DefaultDialTimeout, KeepAlive: -1}

// dialUpstream is upstreamDialer for proxies that dial by address string.
func (d *Daemon) dialUpstream(ctx context.Context, network, addr string) (net.Conn, error) {
	return upstreamDialer.DialContext(ctx, network, addr)
}

// dialUpstreamTCP dials a flow's original destination. Not through
// Dialer.DialTCP: it binds the socket to the zero local address it is
// given (go.dev/issue/81620), an extra system call that also takes the
// ephemeral port at bind time.
func (d *Daemon) dialUpstreamTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	return upstreamDialer.DialContext(ctx, "tcp", dst.String())
}

func (d *Daemon) refuseFlow(sb *sandbox, rule *policy.Rule, proto string, src, dst netip.AddrPort, reason string) {
	d.metrics.refusal(sb, rule, reason).Inc()
	key := "unknown"
	if sb != nil {
		key = sb.rec.key()
	}
	if ok, suppressed := d.logs.allow("refused:" + reason); ok { // the arguments alone cost allocations
		d.log.Warn("flow refused by proxy", "sandbox", key, "proto", proto, "src", src, "dst", dst, "reason", reason, "suppressed", suppressed)
	}
	if d.observers.active() {
		d.observers.publish(api.DenyEvent{Time: now(), Sandbox: key, Source: "proxy", Reason: reason, Proto: strings.ToUpper(proto),
			Src: src.String(), Dst: dst.String()})
	}
	d.audit.deny(auditDenyProxy, map[string]any{"sandbox": key, "reason": reason, "proto": proto, "src": src.String(), "dst": dst.String()})
}

// udpFlows relays UDP flows of open-mode rules: one upstream socket per
// (sandbox address, original destination), replies sent from the original
// destination.
type udpFlows struct {
	d    *Daemon
	sock *tproxy.UDPSocket
	mu   sync.Mutex
	m    map[[2]netip.AddrPort]*udpFlow
}

type udpFlow struct {
	f    *flow
	m    *flowMetrics
	up   *net.UDPConn
	last time.Time
}

func (u *udpFlows) handle(dg tproxy.Datagram) {
	k := [2]netip.AddrPort{dg.Src, dg.OrigDst}
	u.mu.Lock()
	uf := u.m[k]
	if uf != nil {
		uf.last = time.Now()
	}
	u.mu.Unlock()
	if uf == nil {
		var err error
		if uf, err = u.open(dg); err != nil { // a new flow starts with last = now
			return
		}
	}
	if _, err := uf.up.Write(dg.Payload); err == nil {
		uf.m.bytesOut.Add(float64(len(dg.Payload)))
	}
}

func (u *udpFlows) open(dg tproxy.Datagram) (*udpFlow, error) {
	d := u.d
	var (
		sb     *sandbox
		rule   *policy.Rule
		f      *flow
		ctx    context.Context
		cancel context.CancelCauseFunc
		done   func() // gives back what the flow took of the sandbox's limits
	)
	fail := func(err error) (*udpFlow, error) {
		if done != nil {
			done()
		}
		return nil, err
	}
	// The sandbox's limits first: a flood of datagrams from ever new
	// source ports costs a map lookup each, not a rule lookup.
	if sb = d.sandboxByIP(dg.Src.Addr()); sb != nil {
		var over string
		if done, over = sb.limits.admit(flowUDP, d.fds); over != "" {
			d.refuseFlow(sb, nil, "udp", dg.Src, dg.OrigDst, over)
			return nil, errors.New(over)
		}
	}
	for {
		var refusal string
		var rec *record
		sb, rule, _, refusal, rec = d.resolveFlow(dg.Src, dg.OrigDst, policy.ProtoUDP)
		if refusal != "" && sb != nil && sb.recordChanged(rec) {
			continue // decided under a replaced record: decide again
		}
		if refusal != "" {
			if cancel != nil {
				cancel(nil)
			}
			d.refuseFlow(sb, rule, "udp", dg.Src, dg.OrigDst, refusal)
			return fail(errors.New(refusal))
		}
		if ctx == nil {
			ctx, cancel = context.WithCancelCause(d.ctx)
		}
		f = &flow{sb: sb, rule: rule, proto: policy.ProtoUDP, src: dg.Src, dst: dg.OrigDst, cancel: cancel}
		ok, gone := sb.addFlowDecidedAt(f, rec)
		if gone != nil {
			cancel(nil)
			d.refuseFlow(sb, rule, "udp", dg.Src, dg.OrigDst, "sandbox-deleted")
			return fail(gone)
		}
		if ok {
			break
		}
		// An apply flipped the policy since the decision: decide again.
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dg.OrigDst))
	if err != nil {
		sb.removeFlow(f)
		cancel(err)
		d.logs.log(d.log, slog.LevelWarn, "udp-upstream", "udp upstream failed", "dst", dg.OrigDst, "error", err)
		return fail(err)
	}
	m := d.metrics.flowSet(sb, rule)
	uf := &udpFlow{f: f, m: m, up: conn, last: time.Now()}
	k := [2]netip.AddrPort{dg.Src, dg.OrigDst}
	u.mu.Lock()
	u.m[k] = uf
	u.mu.Unlock()
	m.accepted.Inc()
	// The datapath lets the flow's datagrams through without taking from
	// the sandbox's budget of new flows while the relay holds it.
	if err := d.dp.NoteUDPFlow(sb.rec.DatapathID, dg.Src, dg.OrigDst); err != nil {
		d.logs.log(d.log, slog.LevelWarn, "udp-note", "noting a UDP flow: its datagrams pay the new-flow budget", "error", err)
	}
	context.AfterFunc(ctx, func() {
		_ = d.dp.ForgetUDPFlow(sb.rec.DatapathID, dg.Src, dg.OrigDst)
		done()
		conn.Close()
		u.mu.Lock()
		if u.m[k] == uf {
			delete(u.m, k)
		}
		u.mu.Unlock()
		sb.removeFlow(f)
	})
	go func() {
		buf := make([]byte, 65535)
		for {
			_ = conn.SetReadDeadline(time.Now().Add(d.cfg.UDPIdleTimeout))
			n, err := conn.Read(buf)
			if err != nil {
				u.mu.Lock()
				idle := time.Since(uf.last) >= d.cfg.UDPIdleTimeout
				u.mu.Unlock()
				if errors.Is(err, net.ErrClosed) || !isTimeout(err) || idle {
					cancel(err)
					return
				}
				continue
			}
			if err := u.sock.Reply(dg.OrigDst, dg.Src, buf[:n]); err == nil {
				m.bytesIn.Add(float64(n))
			}
		}
	}()
	return uf, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
