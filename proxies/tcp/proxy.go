package tcpproxy

import (
	"context"
	"net"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Proxy is the open-mode L4 proxy as the firewall's privacy proxy for
// (open, tcp): each flow is forwarded to its original destination under
// its rule's open.tcp.maxBytesOut budget.
type Proxy struct {
	Forwarder Forwarder
}

var _ proxies.StreamProxy = (*Proxy)(nil)

// ruleConfig is what Configure keeps of a rule.
type ruleConfig struct{ maxBytesOut int64 }

// Configure reads the rule's byte budget (open.tcp.maxBytesOut).
func (p *Proxy) Configure(r *policy.Rule) (any, error) {
	return ruleConfig{maxBytesOut: MaxBytesOut(r)}, nil
}

// MaxBytesOut is a rule's open.tcp.maxBytesOut, 0 when it sets none.
func MaxBytesOut(r *policy.Rule) int64 {
	if o := r.Spec.Open; o != nil && o.TCP != nil && o.TCP.MaxBytesOut != nil {
		return *o.TCP.MaxBytesOut
	}
	return 0
}

// ServeStream forwards one flow.
func (p *Proxy) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	cfg, _ := f.Config.(ruleConfig)
	var st Stats
	err := p.Forwarder.Forward(ctx, c, Flow{Dst: f.Dst, MaxBytesOut: cfg.maxBytesOut}, &st)
	f.Report.Bytes(st.BytesOut.Load(), st.BytesIn.Load())
	return Result(ctx, err)
}

// Result maps how a flow ended to the firewall's result: a canceled
// context is a revocation whatever error it caused.
func Result(ctx context.Context, err error) proxies.Result {
	return proxies.ResultOf(ctx, err, proxies.EndFor{Err: ErrBudgetExceeded, End: proxies.EndBudget}, proxies.EndFor{Err: ErrIdle, End: proxies.EndIdle})
}
