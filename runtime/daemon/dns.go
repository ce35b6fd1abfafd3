package daemon

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"time"

	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// maxDNSInflight bounds the UDP queries being answered at once (each may
// wait for the upstream); beyond it datagrams are dropped and clients retry.
const maxDNSInflight = 512

// learnKey is one address learnt for one name.
type learnKey struct {
	name string
	addr netip.Addr
}

// dnsConfig translates a compiled policy's spec.dns for the DNS proxy: nil
// when the policy has no spec.dns (every query refused).
func dnsConfig(c *policy.Compiled) *dnsproxy.Config {
	if c.DNS == nil || c.Policy.Spec.DNS == nil {
		return nil
	}
	cfg := &dnsproxy.Config{
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

func (d *Daemon) startDNS(ctx context.Context) error {
	metrics, err := dnsproxy.NewMetrics(d.metrics.reg)
	if err != nil {
		return err
	}
	d.dns = &dnsproxy.Proxy{
		OnLearn: d.learn,
		OnDeny:  d.dnsDenied,
		Logger:  d.log.With("proxy", "dns"),
		Metrics: metrics,
		Limits: dnsproxy.Limits{
			LearnMinTTL:      d.cfg.FQDNMinTTL,
			LearnMaxTTL:      d.cfg.FQDNMaxTTL,
			QueriesPerSecond: d.cfg.DNSQueriesPerSecond,
		},
	}
	if d.cfg.DNSRefuseNXDomain {
		d.dns.DenyRcode = 3 // NXDOMAIN
	}
	if d.dnsUDP, err = tproxy.ListenUDP(ctx, d.cfg.DNSPort, d.cfg.SocketMark); err != nil {
		return err
	}
	if d.dnsTCP, err = tproxy.ListenTCP(ctx, d.cfg.DNSPort, 1, d.cfg.SocketMark); err != nil {
		return err
	}
	return nil
}

func (d *Daemon) serveDNS() {
	sem := make(chan struct{}, maxDNSInflight)
	for _, l := range d.dnsTCP.Listeners() {
		d.goBackground(func() { d.acceptLoop(l, "dns-tcp", d.serveDNSTCP) })
	}
	d.goBackground(func() {
		_ = d.dnsUDP.Serve(func(dg tproxy.Datagram) {
			sb := d.sandboxByIP(dg.Src.Addr())
			if sb == nil {
				return
			}
			// The sandbox's own share first, then the node's: a sandbox
			// flooding queries fills only its own.
			done, over := sb.limits.admit(flowDNS, d.fds)
			if over != "" {
				d.metrics.refusal(sb, nil, over).Inc()
				d.logs.log(d.log, slog.LevelWarn, "refused-dns:"+over, "dns query dropped", "sandbox", sb.rec.key(), "reason", over)
				return
			}
			select {
			case sem <- struct{}{}:
			default:
				done()
				return
			}
			go func() {
				defer func() { <-sem }()
				defer done()
				resp, ok := d.dns.Handle(d.ctx, sb.rec.key(), dg.Payload, false)
				if ok {
					_ = d.dnsUDP.Reply(dg.OrigDst, dg.Src, resp)
				}
			}()
		})
	})
}

// serveDNSTCP hands a DNS-over-TCP connection to the DNS proxy, which
// bounds the connections of each sandbox (dnsproxy.Limits.TCPMaxConns).
// dnsRate is the DNS proxy's per-sandbox query rate (negative: none).
func (d *Daemon) dnsRate() float64 {
	switch r := d.cfg.DNSQueriesPerSecond; {
	case r < 0:
		return -1
	case r == 0:
		return 100 // the DNS proxy's default
	default:
		return r
	}
}

func (d *Daemon) serveDNSTCP(c *net.TCPConn) {
	src, _ := tproxy.OriginalDst(c)
	sb := d.sandboxByIP(src.Addr())
	if sb == nil {
		c.SetLinger(0)
		c.Close()
		return
	}
	go func() { _ = d.dns.ServeTCP(d.ctx, sb.rec.key(), c) }()
}

func (d *Daemon) dnsDenied(sandbox string, ev dnsproxy.DenyEvent) {
	// Debug: a sandbox can make refusals as fast as it sends queries; the
	// metrics count them all and the audit trail records them (rate-limited).
	d.log.Debug("dns refused", "sandbox", sandbox, "reason", ev.Reason, "name", ev.Name, "qtype", ev.QType, "tcp", ev.TCP)
	d.observers.publish(api.DenyEvent{Time: now(), Sandbox: sandbox, Source: "dns", Reason: string(ev.Reason), Name: ev.Name,
		Proto: map[bool]string{true: "TCP", false: "UDP"}[ev.TCP]})
	d.audit.deny(auditDenyDNS, map[string]any{"sandbox": sandbox, "reason": string(ev.Reason), "name": ev.Name, "qtype": ev.QType, "tcp": ev.TCP})
}

// hostKey identifies a host entry (an address as /32 or /128, proto, port).
type hostKey struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

// staticHosts indexes the policy's host-prefix entries: a learnt address
// that collides with one of them obeys the datapath's rule (the lower rule
// id owns the key).
func staticHosts(entries []bpf.RuleEntry) map[hostKey]bpf.RuleEntry {
	m := map[hostKey]bpf.RuleEntry{}
	for _, e := range entries {
		if e.Prefix.Bits() == e.Prefix.Addr().BitLen() {
			m[hostKey{e.Prefix.Addr(), e.Proto, e.Port}] = e
		}
	}
	return m
}

// learn writes addresses the DNS proxy learnt for a name into the
// sandbox's active generation, expiring with the (clamped) TTL. The
// datapath checks the expiry itself, so an entry the sweeper has not
// removed yet still stops admitting flows on time.
func (d *Daemon) learn(sandboxKey, name string, addrs []netip.Addr, ttl time.Duration) {
	d.mu.RLock()
	s := d.sandboxes[sandboxKey]
	d.mu.RUnlock()
	if s == nil {
		return
	}
	expires := monotonicNow() + uint64(ttl)
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := uint8(s.rec.Generation % 2)
	changed := false
	for _, a := range addrs {
		entries := s.learntEntries(slot, name, a, expires)
		if len(entries) == 0 {
			continue
		}
		if err := d.dp.PutRules(s.rec.DatapathID, slot, entries); err != nil {
			d.log.Warn("learning an fqdn address failed: its flows drop", "sandbox", sandboxKey, "name", name, "addr", a, "error", err)
			continue
		}
		changed = true
		k := learnKey{name, a}
		if exp, ok := s.learned[k]; !ok || exp < expires {
			s.learned[k] = expires
		}
	}
	// Cached verdicts ("no rule" for this address, or a broader rule's)
	// are stale now.
	if changed {
		if err := d.bumpEpoch(s); err != nil {
			d.log.Warn("moving the rule epoch failed: the learnt address may stay refused until the next change", "sandbox", sandboxKey, "error", err)
		}
	}
}

// learntEntries are the datapath entries an address learnt for name opens
// under the policy of slot. Called with s.mu held.
func (s *sandbox) learntEntries(slot uint8, name string, a netip.Addr, expires uint64) []bpf.RuleEntry {
	return s.learntEntriesUnder(s.slots[slot], s.static, name, a, expires)
}

// learntEntriesUnder computes them for a given policy and its static hosts.
func (s *sandbox) learntEntriesUnder(c *policy.Compiled, static map[hostKey]bpf.RuleEntry, name string, a netip.Addr, expires uint64) []bpf.RuleEntry {
	var out []bpf.RuleEntry
	for _, e := range c.EntriesForName(name, a) {
		if st, ok := static[hostKey{a, uint8(e.Proto), e.Port}]; ok && st.RuleID < e.RuleID {
			continue // an earlier rule's identical static entry stands
		}
		out = append(out, ruleEntry(c, e, expires))
	}
	return out
}

// relearn rewrites a sandbox's unexpired learnt addresses into a slot under
// that slot's policy (at a generation flip). Called with s.mu held.
func (d *Daemon) relearn(s *sandbox, slot uint8) {
	now := monotonicNow()
	for k, exp := range s.learned {
		if exp <= now {
			delete(s.learned, k)
			continue
		}
		if entries := s.learntEntries(slot, k.name, k.addr, exp); len(entries) > 0 {
			_ = d.dp.PutRules(s.rec.DatapathID, slot, entries)
		}
	}
}

// sweepLearnt removes expired learnt entries from the kernel, restoring a
// static entry a learnt one had taken over.
func (d *Daemon) sweepLearnt() {
	now := monotonicNow()
	d.mu.RLock()
	list := make([]*sandbox, 0, len(d.sandboxes))
	for _, s := range d.sandboxes {
		list = append(list, s)
	}
	d.mu.RUnlock()
	for _, s := range list {
		s.mu.Lock()
		slot := uint8(s.rec.Generation % 2)
		changed := false
		for k, exp := range s.learned {
			if exp > now {
				continue
			}
			changed = true
			delete(s.learned, k)
			for _, e := range s.slots[slot].EntriesForName(k.name, k.addr) {
				got, ok, err := d.dp.LookupRule(s.rec.DatapathID, slot, uint8(e.Proto), k.addr, e.Port)
				if err != nil || !ok || got.Expires == 0 || got.Expires > now || got.Prefix.Bits() != k.addr.BitLen() {
					continue
				}
				if st, ok := s.static[hostKey{k.addr, uint8(e.Proto), e.Port}]; ok {
					_ = d.dp.PutRules(s.rec.DatapathID, slot, []bpf.RuleEntry{st})
				} else {
					_ = d.dp.DeleteRuleEntries(s.rec.DatapathID, slot, []bpf.RuleEntry{got})
				}
			}
		}
		if changed {
			_ = d.bumpEpoch(s) // a restored static entry must not hide behind a cached verdict
		}
		s.mu.Unlock()
	}
}
