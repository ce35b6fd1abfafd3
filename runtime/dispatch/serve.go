package dispatch

import (
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	"github.com/cleanwall/cleanwall/runtime/limits"
)

// MaxDNSInFlight bounds the UDP DNS queries being answered at once,
// node-wide (each may wait for the upstream); beyond it datagrams are
// dropped and clients retry. Each sandbox's own share is its limits'
// DNSInFlight.
const MaxDNSInFlight = 512

// ServeTCP serves one connection accepted on the proxy listener: the
// sandbox's limits first (a flood of flows over them costs one accept and
// a reset each, not a rule lookup), then the decision, then the proxy.
func (d *Dispatcher) ServeTCP(c *net.TCPConn) {
	src, dst := tproxy.OriginalDst(c)
	s := d.Sandboxes.ByIP(src.Addr())
	if s == nil {
		d.refuse(nil, nil, proxies.Key{}, "tcp", src, dst, string(RefuseUnknownSource))
		reset(c)
		return
	}
	done, over := s.Limits.Admit(limits.TCP, d.Node)
	if over != "" {
		d.refuse(s, nil, proxies.Key{}, "tcp", src, dst, over)
		reset(c)
		return
	}
	defer done()
	dec, fl, ctx := d.register(s, src, dst, policy.ProtoTCP)
	if dec.Refusal != "" {
		d.refuse(s, dec.Rule, dec.Key, "tcp", src, dst, string(dec.Refusal))
		reset(c)
		return
	}
	defer fl.Cancel(nil)
	defer s.RemoveFlow(fl)
	if !d.consentAdmits(ctx, &dec, dst) {
		d.refuse(s, dec.Rule, dec.Key, "tcp", src, dst, string(RefuseConsent))
		reset(c)
		return
	}
	p, ok := d.Proxies.Stream(dec.Key)
	if !ok { // Configure found one at policy check: a registry changed under us
		d.refuse(s, dec.Rule, dec.Key, "tcp", src, dst, string(RefuseNoProxy))
		reset(c)
		return
	}
	fs := d.Metrics.Flows(s.ContainerID, dec.Rule)
	fs.Accepted.Inc()
	fs.Active.Inc()
	defer fs.Active.Dec()
	info := FlowInfo{Sandbox: s.Name, Rule: dec.Rule, Proxy: dec.Key, Proto: "tcp", Src: src, Dst: dst}
	res := p.ServeStream(ctx, c, d.flowOf(&dec, src, dst, &reporter{d: d, fs: fs, info: info}))
	d.ended(fs, info, res)
}

// ServeDNSTCP serves one connection accepted on the DNS listener: every
// port-53 flow goes to the DNS proxy, which bounds each sandbox's
// connections itself.
func (d *Dispatcher) ServeDNSTCP(c *net.TCPConn) {
	src, dst := tproxy.OriginalDst(c)
	s := d.Sandboxes.ByIP(src.Addr())
	p, ok := d.Proxies.Stream(proxies.DNSKey)
	if s == nil || !ok {
		reset(c)
		return
	}
	f := &proxies.Flow{Sandbox: s.ContainerID, Attachment: s.Name, Src: src, Dst: dst, Report: nopReporter{}}
	go p.ServeStream(d.Ctx, c, f)
}

// nopReporter takes the reports of the DNS proxy, which counts queries,
// denials and learning in metrics of its own and reports denials to its
// OnDeny (with the query name).
type nopReporter struct{}

func (nopReporter) Bytes(int64, int64)  {}
func (nopReporter) Deny(proxies.Denial) {}

// udpFlows are the open UDP flows, by sandbox address and original
// destination.
type udpFlows struct {
	once   sync.Once
	mu     sync.Mutex
	m      map[[2]netip.AddrPort]proxies.PacketFlow
	dnsSem chan struct{}
}

func (u *udpFlows) init() {
	u.once.Do(func() {
		u.m = map[[2]netip.AddrPort]proxies.PacketFlow{}
		u.dnsSem = make(chan struct{}, MaxDNSInFlight)
	})
}

// Reply sends a datagram to a sandbox at to, from the address from (the
// flow's original destination).
type Reply func(from, to netip.AddrPort, p []byte) error

// HandleDatagram serves one datagram from the UDP proxy socket: it goes to
// its flow, opened at the flow's first datagram.
func (d *Dispatcher) HandleDatagram(dg tproxy.Datagram, reply Reply) {
	d.udp.init()
	k := [2]netip.AddrPort{dg.Src, dg.OrigDst}
	d.udp.mu.Lock()
	pf := d.udp.m[k]
	d.udp.mu.Unlock()
	if pf == nil {
		if pf = d.openUDP(dg, reply); pf == nil {
			return
		}
	}
	pf.Datagram(dg.Payload)
}

// UDPFlows is the number of open UDP flows.
func (d *Dispatcher) UDPFlows() int {
	d.udp.init()
	d.udp.mu.Lock()
	defer d.udp.mu.Unlock()
	return len(d.udp.m)
}

// openUDP opens a UDP flow: the sandbox's limits first (a flood of
// datagrams from ever new source ports costs a map lookup each, not a rule
// lookup), then the decision, then the proxy.
func (d *Dispatcher) openUDP(dg tproxy.Datagram, reply Reply) proxies.PacketFlow {
	src, dst := dg.Src, dg.OrigDst
	s := d.Sandboxes.ByIP(src.Addr())
	if s == nil {
		d.refuse(nil, nil, proxies.Key{}, "udp", src, dst, string(RefuseUnknownSource))
		return nil
	}
	done, over := s.Limits.Admit(limits.UDP, d.Node)
	if over != "" {
		d.refuse(s, nil, proxies.Key{}, "udp", src, dst, over)
		return nil
	}
	dec, fl, ctx := d.register(s, src, dst, policy.ProtoUDP)
	if dec.Refusal != "" {
		done()
		d.refuse(s, dec.Rule, dec.Key, "udp", src, dst, string(dec.Refusal))
		return nil
	}
	if refusal := d.consentRefusal(&dec, dst); refusal != "" {
		s.RemoveFlow(fl)
		fl.Cancel(nil)
		done()
		d.refuse(s, dec.Rule, dec.Key, "udp", src, dst, string(refusal))
		return nil
	}
	p, ok := d.Proxies.Packet(dec.Key)
	if !ok {
		s.RemoveFlow(fl)
		fl.Cancel(nil)
		done()
		d.refuse(s, dec.Rule, dec.Key, "udp", src, dst, string(RefuseNoProxy))
		return nil
	}
	fs := d.Metrics.Flows(s.ContainerID, dec.Rule)
	info := FlowInfo{Sandbox: s.Name, Rule: dec.Rule, Proxy: dec.Key, Proto: "udp", Src: src, Dst: dst}
	pf, err := p.OpenPacketFlow(ctx, d.flowOf(&dec, src, dst, &reporter{d: d, fs: fs, info: info}),
		func(b []byte) error { return reply(dst, src, b) })
	if err != nil {
		s.RemoveFlow(fl)
		fl.Cancel(err)
		done()
		d.Logs.Log(d.log(), slog.LevelWarn, "udp-open", "opening a UDP flow failed", "sandbox", s.Name, "dst", dst, "error", err)
		return nil
	}
	fs.Accepted.Inc()
	fs.Active.Inc()
	// The datapath lets the flow's datagrams through without taking from
	// the sandbox's budget of new flows while the relay holds it.
	if err := d.DP.NoteUDPFlow(s.ID, src, dst); err != nil {
		d.Logs.Log(d.log(), slog.LevelWarn, "udp-note", "noting a UDP flow: its datagrams pay the new-flow budget", "error", err)
	}
	k := [2]netip.AddrPort{src, dst}
	d.udp.mu.Lock()
	d.udp.m[k] = pf
	d.udp.mu.Unlock()
	go func() {
		<-pf.Done() // a proxy ends its flow when ctx is done
		_ = d.DP.ForgetUDPFlow(s.ID, src, dst)
		d.udp.mu.Lock()
		if d.udp.m[k] == pf {
			delete(d.udp.m, k)
		}
		d.udp.mu.Unlock()
		s.RemoveFlow(fl)
		fl.Cancel(nil)
		done()
		fs.Active.Dec()
		d.ended(fs, info, pf.Result())
	}()
	return pf
}

// HandleDNSDatagram serves one query from the DNS socket: the sandbox's
// share of queries in flight first, then the node's, so a sandbox flooding
// queries fills only its own.
func (d *Dispatcher) HandleDNSDatagram(dg tproxy.Datagram, reply Reply) {
	d.udp.init()
	s := d.Sandboxes.ByIP(dg.Src.Addr())
	p, ok := d.Proxies.Packet(proxies.DNSKey)
	if s == nil || !ok {
		return
	}
	done, over := s.Limits.Admit(limits.DNS, d.Node)
	if over != "" {
		d.Metrics.Refusal(s.ContainerID, nil, over).Inc()
		d.Logs.Log(d.log(), slog.LevelWarn, "refused-dns:"+over, "dns query dropped", "sandbox", s.Name, "reason", over)
		return
	}
	select {
	case d.udp.dnsSem <- struct{}{}:
	default:
		done()
		return
	}
	src, dst := dg.Src, dg.OrigDst
	f := &proxies.Flow{Sandbox: s.ContainerID, Attachment: s.Name, Src: src, Dst: dst, Report: nopReporter{}}
	pf, err := p.OpenPacketFlow(d.Ctx, f, func(b []byte) error { return reply(dst, src, b) })
	if err != nil {
		<-d.udp.dnsSem
		done()
		return
	}
	pf.Datagram(dg.Payload)
	go func() {
		<-pf.Done()
		<-d.udp.dnsSem
		done()
	}()
}
