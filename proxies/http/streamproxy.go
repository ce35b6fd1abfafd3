package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"sync/atomic"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

var _ proxies.StreamProxy = (*Proxy)(nil)

// streamConfig is what Configure keeps of a rule.
type streamConfig struct {
	rules  *Rules
	budget int64 // open.tcp.maxBytesOut: bytes the sandbox may send, 0: no budget
}

// Configure translates an open-mode HTTP rule (open.http, and the
// open.tcp.maxBytesOut budget) into the proxy's Rules, validated.
func (p *Proxy) Configure(r *policy.Rule) (any, error) {
	rules, err := RulesFromPolicy(r)
	if err != nil {
		return nil, err
	}
	cfg := &streamConfig{rules: rules}
	if o := r.Spec.Open; o.TCP != nil && o.TCP.MaxBytesOut != nil {
		cfg.budget = *o.TCP.MaxBytesOut
	}
	return cfg, nil
}

// RulesFromPolicy translates a rule's open.http block.
func RulesFromPolicy(r *policy.Rule) (*Rules, error) {
	o := r.Spec.Open
	if o == nil || o.HTTP == nil {
		return nil, errors.New("open.http: required with open.protocol http")
	}
	out := &Rules{MaxBodyBytes: policy.DefaultMaxBodyBytes}
	if o.HTTP.MaxBodyBytes != nil {
		out.MaxBodyBytes = *o.HTTP.MaxBodyBytes
	}
	for _, hr := range o.HTTP.Rules {
		out.Rules = append(out.Rules, RequestRule{Methods: hr.Methods, Paths: hr.Paths, ContentTypes: hr.ContentTypes})
	}
	compile := func(field string, list []string) ([]*regexp.Regexp, error) {
		var res []*regexp.Regexp
		for i, p := range list {
			re, err := regexp.Compile(p)
			if err != nil {
				return nil, fmt.Errorf("open.http.%s[%d]: %w", field, i, err)
			}
			res = append(res, re)
		}
		return res, nil
	}
	var err error
	if out.DenyBodyPatterns, err = compile("denyBodyPatterns", o.HTTP.DenyBodyPatterns); err != nil {
		return nil, err
	}
	if out.DenyPatterns, err = compile("denyPatterns", o.HTTP.DenyPatterns); err != nil {
		return nil, err
	}
	if err := out.Validate(); err != nil {
		return nil, fmt.Errorf("open.http: %w", err)
	}
	return out, nil
}

// ServeStream inspects one flow's requests.
func (p *Proxy) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	cfg, ok := f.Config.(*streamConfig)
	if !ok {
		_ = c.Close()
		return proxies.Result{End: proxies.EndError, Err: errors.New("http proxy: the rule was not configured")}
	}
	hf := Flow{Sandbox: f.Sandbox, Rule: f.RuleName(), Dst: f.Dst, Hosts: f.Hosts, OnDeny: func(d Denial) {
		f.Report.Deny(proxies.Denial{Reason: string(d.Reason), Status: d.Status, Method: d.Method, Path: d.Path})
	}}
	var bc *budgetConn
	if cfg.budget > 0 {
		bc = &budgetConn{Conn: c, left: cfg.budget}
		c = bc
	}
	err := p.ServeConn(ctx, c, hf, cfg.rules)
	if bc != nil {
		f.Report.Bytes(bc.used.Load(), 0)
	}
	return proxies.ResultOf(ctx, err, proxies.EndFor{Err: errBudget, End: proxies.EndBudget})
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
