package daemon

import (
	"context"
	"errors"
	"net"
	"regexp"
	"sort"
	"sync/atomic"

	"github.com/cleanwall/cleanwall/policy"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// httpRules translates an open-mode HTTP rule for the HTTP proxy. The policy
// was validated, so the translation only fails on a bug; such a rule's flows
// are refused, never passed uninspected.
func httpRules(r *policy.Rule) (*httpproxy.Rules, error) {
	o := r.Spec.Open
	if o == nil || o.HTTP == nil {
		return nil, errors.New("rule has no open.http block")
	}
	out := &httpproxy.Rules{MaxBodyBytes: policy.DefaultMaxBodyBytes}
	if o.HTTP.MaxBodyBytes != nil {
		out.MaxBodyBytes = *o.HTTP.MaxBodyBytes
	}
	for _, hr := range o.HTTP.Rules {
		out.Rules = append(out.Rules, httpproxy.RequestRule{Methods: hr.Methods, Paths: hr.Paths, ContentTypes: hr.ContentTypes})
	}
	for _, p := range o.HTTP.DenyBodyPatterns {
		re, err := regexp.Compile(p)
		if err != nil {
			return nil, err
		}
		out.DenyBodyPatterns = append(out.DenyBodyPatterns, re)
	}
	for _, p := range o.HTTP.DenyPatterns {
		re, err := regexp.Compile(p)
		if err != nil {
			return nil, err
		}
		out.DenyPatterns = append(out.DenyPatterns, re)
	}
	if err := out.Validate(); err != nil {
		return nil, err
	}
	return out, nil
}

// httpRulesOf compiles every open HTTP rule of a policy once, keyed by the
// compiled rule (rule ids of two generations never mix up).
func httpRulesOf(c *policy.Compiled, into map[*policy.Rule]*httpproxy.Rules) map[*policy.Rule]*httpproxy.Rules {
	if into == nil {
		into = map[*policy.Rule]*httpproxy.Rules{}
	}
	for _, r := range c.Rules {
		if r.Mode == policy.ModeOpen && r.Spec.Open != nil && r.Spec.Open.Protocol == "http" {
			if hr, err := httpRules(r); err == nil {
				into[r] = hr
			}
		}
	}
	return into
}

func (d *Daemon) startHTTP() error {
	m, err := httpproxy.NewMetrics(d.metrics.reg)
	if err != nil {
		return err
	}
	d.http = &httpproxy.Proxy{
		Dial:    d.dialUpstream,
		Logger:  d.log.With("proxy", "http"),
		Metrics: m,
		OnDeny: func(f httpproxy.Flow, den httpproxy.Denial) {
			d.log.Debug("http request refused", "sandbox", f.Sandbox, "rule", f.Rule, "dst", f.Dst,
				"reason", den.Reason, "status", den.Status, "method", den.Method, "path", den.Path)
			d.observers.publish(api.DenyEvent{Time: now(), Sandbox: f.Sandbox, Source: "http", Reason: string(den.Reason),
				Dst: f.Dst.String(), Method: den.Method, Path: den.Path, Status: den.Status, Proto: "TCP"})
			d.audit.deny(auditDenyHTTP, map[string]any{"sandbox": f.Sandbox, "rule": f.Rule, "dst": f.Dst.String(),
				"reason": string(den.Reason), "status": den.Status, "method": den.Method, "path": den.Path})
		},
	}
	return nil
}

// hostsFor lists the Host values a flow may carry: the fqdns that resolved
// to its destination (for an entry learnt through DNS), or the literal IP
// (for a cidr entry). POLICY.md: the Host header must name the destination
// the rule matched.
func (s *sandbox) hostsFor(f *flow, learnt bool) []string {
	if !learnt {
		return []string{f.dst.Addr().String()}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k := range s.learned {
		if k.addr == f.dst.Addr() {
			for _, n := range f.rule.FQDNs {
				if n == k.name {
					out = append(out, k.name)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// serveHTTP hands a flow to the HTTP inspection proxy.
func (d *Daemon) serveHTTP(ctx context.Context, c net.Conn, f *flow, learnt bool, budget int64) error {
	f.sb.mu.Lock()
	rules := f.sb.http[f.rule]
	f.sb.mu.Unlock()
	if rules == nil {
		return errModeUnavailable
	}
	hf := httpproxy.Flow{Sandbox: f.sb.rec.ContainerID, Rule: f.rule.Name, Dst: f.dst, Hosts: f.sb.hostsFor(f, learnt)}
	if budget > 0 {
		c = &budgetConn{Conn: c, left: budget}
	}
	return d.http.ServeConn(ctx, c, hf, rules)
}

// budgetConn cuts the sandbox's side of a connection once it has sent its
// byte budget (open.tcp.maxBytesOut on an HTTP rule).
type budgetConn struct {
	net.Conn
	left int64
	used atomic.Int64
}

var errBudget = errors.New("outbound byte budget exceeded")

func (b *budgetConn) Read(p []byte) (int, error) {
	left := b.left - b.used.Load()
	if left <= 0 {
		return 0, errBudget
	}
	if int64(len(p)) > left {
		p = p[:left]
	}
	n, err := b.Conn.Read(p)
	b.used.Add(int64(n))
	return n, err
}
