package dnsproxy

import (
	"context"
	"errors"
	"net"
	"sort"

	cwpolicy "github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// The DNS proxy as a privacy proxy of the firewall (proxies.DNSKey): every
// port-53 flow of a sandbox comes here, whatever its destination. It has
// no per-rule configuration: a sandbox's DNS policy is its policy's
// spec.dns (ConfigFromPolicy, installed with SetSandbox), and flows are
// keyed by Flow.Attachment. Refused queries go to OnDeny (with the name
// and query type, which proxies.Denial carries too), learnt addresses to
// OnLearn; Reporter gets the bytes.
var (
	_ proxies.StreamProxy = (*Proxy)(nil)
	_ proxies.PacketProxy = (*Proxy)(nil)
)

// ConfigFromPolicy translates a compiled policy's spec.dns for the proxy:
// nil when the policy has no spec.dns (every query refused).
func ConfigFromPolicy(c *cwpolicy.Compiled) *Config {
	if c.DNS == nil || c.Policy.Spec.DNS == nil {
		return nil
	}
	cfg := &Config{
		Upstream:   c.DNS.Upstream,
		Allow:      append([]string(nil), c.Policy.Spec.DNS.Allow...),
		QueryTypes: append([]uint16(nil), c.DNS.QueryTypes...),
	}
	seen := map[string]bool{}
	for _, r := range c.Rules {
		for _, n := range r.FQDNs {
			if !seen[n] {
				seen[n] = true
				cfg.FQDNNames = append(cfg.FQDNNames, n)
			}
		}
	}
	sort.Strings(cfg.FQDNNames)
	return cfg
}

// Configure is never asked for a rule (no rule's flows are DNS flows):
// it refuses, so a registry that maps a rule here says so at policy check.
func (p *Proxy) Configure(r *cwpolicy.Rule) (any, error) {
	return nil, errors.New("the DNS proxy serves spec.dns, not egress rules")
}

// ServeStream answers a sandbox's DNS over TCP (ServeTCP).
func (p *Proxy) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	err := p.ServeTCP(ctx, f.Attachment, c)
	return proxies.ResultOf(ctx, err)
}

// OpenPacketFlow answers one query over UDP: a DNS datagram is a flow of
// its own (the firewall's in-flight limit counts queries). The flow ends
// when the answer was sent, or nothing is to be sent.
func (p *Proxy) OpenPacketFlow(ctx context.Context, f *proxies.Flow, reply func([]byte) error) (proxies.PacketFlow, error) {
	return &udpQuery{p: p, ctx: ctx, f: f, reply: reply, done: make(chan struct{})}, nil
}

// udpQuery is the flow of one UDP query.
type udpQuery struct {
	p      *Proxy
	ctx    context.Context
	f      *proxies.Flow
	reply  func([]byte) error
	done   chan struct{}
	result proxies.Result
	once   bool
}

// Datagram answers the query off the caller's goroutine (the upstream may
// take its time); a second datagram is ignored.
func (q *udpQuery) Datagram(msg []byte) {
	if q.once {
		return
	}
	q.once = true
	go func() {
		defer close(q.done)
		resp, ok := q.p.Handle(q.ctx, q.f.Attachment, msg, false)
		q.f.Report.Bytes(int64(len(msg)), 0)
		if !ok {
			q.result = proxies.Result{End: proxies.EndClosed}
			return
		}
		if err := q.reply(resp); err != nil {
			q.result = proxies.Result{End: proxies.EndError, Err: err}
			return
		}
		q.f.Report.Bytes(0, int64(len(resp)))
		q.result = proxies.Result{End: proxies.EndClosed}
	}()
}

func (q *udpQuery) Done() <-chan struct{}  { return q.done }
func (q *udpQuery) Result() proxies.Result { return q.result }
