package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// Log field names.
const (
	logSandbox  = "sandbox"
	logName     = "name"
	logQType    = "qtype"
	logReason   = "reason"
	logRcode    = "rcode"
	logUpstream = "upstream"
	logError    = "error"
	logTCP      = "tcp"
)

// Errors that callers may branch on.
var (
	// ErrUpstreamMismatch: the upstream's response does not answer the query
	// that was sent (ID, question, opcode or QR bit differ).
	ErrUpstreamMismatch = errors.New("response does not match the query")
	// ErrUpstreamRcode: the upstream answered with an rcode other than
	// NOERROR or NXDOMAIN.
	ErrUpstreamRcode = errors.New("upstream could not answer")
	// ErrTooManyConns: the sandbox already has Limits.TCPMaxConns TCP
	// connections open.
	ErrTooManyConns = errors.New("too many dns connections for the sandbox")
)

// maxChain bounds the CNAME hops followed in one answer.
const maxChain = 16

// Proxy answers the DNS queries of sandboxes. Set its fields before the
// first call and do not change them afterwards; the zero value is a working
// proxy that refuses everything until SetSandbox installs a Config. All
// methods are safe for concurrent use.
type Proxy struct {
	// Exchange sends m to the upstream and returns its response. nil means
	// the proxy's own: UDP over a pool of connected sockets (see the package
	// documentation, Upstream sockets), TCP over a new connection per
	// exchange, bounded by Limits.UpstreamTimeout. The proxy tries UDP first
	// and TCP when the UDP answer is truncated. Exchange may not keep m.
	Exchange func(ctx context.Context, upstream netip.AddrPort, m *dns.Msg, tcp bool) (*dns.Msg, error)

	// OnLearn, when set, is told the addresses that an answer gives to a name
	// of Config.FQDNNames, before the answer is returned to the sandbox, so
	// that the datapath can allow them before the sandbox connects. It runs
	// on the query's goroutine and must not call back into the proxy.
	//
	// Attribution: the proxy walks the answer's CNAME chain from the
	// question name, following a CNAME only when its target is itself on the
	// sandbox's allow list. The addresses (A or AAAA records owned by the
	// last name of that walk, matching the query type) are reported for
	// every name of the walk that FQDNNames lists, spelled as it is there:
	// each of these names resolves to exactly those addresses. Records owned
	// by any other name are never reported. A chain cut at a name that is
	// not allowed reports nothing. ttl is the smallest remaining TTL along
	// the walk (CNAME records and address records), clamped to
	// [Limits.LearnMinTTL, Limits.LearnMaxTTL]. Unspecified, loopback,
	// link-local, multicast and IPv4-mapped addresses are never reported:
	// an answer must not open the node itself to the sandbox.
	OnLearn func(sandbox string, name string, addrs []netip.Addr, ttl time.Duration)

	// OnDeny, when set, is told every query that was answered without being
	// forwarded, or dropped. It runs on the query's goroutine.
	OnDeny func(sandbox string, ev DenyEvent)

	// Logger receives debug records for denials and warnings for upstream
	// failures; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, when set, records the proxy's metrics; see NewMetrics.
	Metrics *Metrics
	// Limits bound the work of each sandbox; zero fields take defaults.
	Limits Limits
	// DenyRcode answers names that are not allowed: dns.RcodeRefused (the
	// default, also used for any value other than dns.RcodeNameError) or
	// dns.RcodeNameError (NXDOMAIN).
	DenyRcode int
	// Now is the clock for TTLs and the rate limit; nil means time.Now.
	Now func() time.Time

	once      sync.Once
	lim       Limits
	denyRcode int
	log       *slog.Logger
	cache     *answerCache
	udp       *upstreamPool
	tcp       *dns.Client

	mu        sync.RWMutex
	sandboxes map[string]*sandboxState
	// noPolicy limits the sandboxes without a Config, together.
	noPolicy      bucket
	noPolicyConns atomic.Int32
}

// sandboxState is one sandbox's live state. A policy update replaces pol
// and keeps the rate-limit bucket, so updates do not refill it.
type sandboxState struct {
	pol      atomic.Pointer[policy]
	bucket   bucket
	counters sandboxCounters
	tcpConns atomic.Int32
}

// policy is a compiled Config.
type policy struct {
	upstream netip.AddrPort
	allow    matcher
	qtypes   []uint16
	fqdn     map[string]string // canonical name -> as spelled in FQDNNames
}

func (p *Proxy) init() {
	p.once.Do(func() {
		p.lim = p.Limits.withDefaults()
		p.log = p.Logger
		if p.log == nil {
			p.log = slog.Default()
		}
		p.denyRcode = dns.RcodeRefused
		switch p.DenyRcode {
		case dns.RcodeNameError:
			p.denyRcode = dns.RcodeNameError
		case 0, dns.RcodeRefused:
		default:
			p.log.Warn("dns proxy: unsupported DenyRcode, using REFUSED", logRcode, p.DenyRcode)
		}
		p.cache = newAnswerCache(p.lim.CacheEntries, p.Metrics.cacheSize)
		p.udp = newUpstreamPool(p.lim)
		p.tcp = &dns.Client{Net: "tcp", Timeout: p.lim.UpstreamTimeout}
		p.sandboxes = make(map[string]*sandboxState)
		p.noPolicy.reset(p.lim, p.now())
	})
}

func (p *Proxy) now() time.Time {
	if p.Now != nil {
		return p.Now()
	}
	return time.Now()
}

// SetSandbox installs or replaces the DNS policy of a sandbox; a nil cfg
// removes the sandbox, whose queries are then refused. A replacement applies
// to the next query, including queries on open TCP connections. Allow and
// FQDNNames entries that Config.Validate would reject are logged and match
// nothing.
func (p *Proxy) SetSandbox(id string, cfg *Config) {
	p.init()
	if cfg == nil {
		p.mu.Lock()
		delete(p.sandboxes, id)
		p.mu.Unlock()
		p.Metrics.forget(id)
		return
	}
	pol := &policy{upstream: cfg.Upstream, fqdn: make(map[string]string, len(cfg.FQDNNames))}
	var errs []error
	pol.allow, errs = compileAllow(cfg.Allow)
	for _, t := range cfg.QueryTypes {
		if !metaQueryType(t) {
			pol.qtypes = append(pol.qtypes, t)
		}
	}
	if len(cfg.QueryTypes) == 0 {
		pol.qtypes = DefaultQueryTypes
	}
	for _, n := range cfg.FQDNNames {
		c, ok := canonicalHostname(n)
		if !ok || c == "." {
			errs = append(errs, fmt.Errorf("fqdn name %q is not a host name", n))
			continue
		}
		pol.fqdn[c] = n
	}
	for _, err := range errs {
		p.log.Error("dns policy entry ignored", logSandbox, id, logError, err)
	}

	p.mu.Lock()
	st := p.sandboxes[id]
	if st == nil {
		st = &sandboxState{counters: p.Metrics.countersFor(id)}
		st.bucket.reset(p.lim, p.now())
		p.sandboxes[id] = st
	}
	st.pol.Store(pol)
	p.mu.Unlock()
}

func (p *Proxy) sandbox(id string) *sandboxState {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.sandboxes[id]
}

// Handle answers one query message of a sandbox. tcp says whether it came
// over TCP (no truncation below Limits.MaxTCPSize) or UDP (truncated to the
// client's EDNS size, or 512 bytes, with TC set). It returns the response to
// send, or ok=false when nothing must be sent: a message shorter than a DNS
// header, or one with the QR bit set (see the package documentation for
// every other case). Handle blocks while the upstream is asked (at most
// Limits.UpstreamTimeout, and ctx bounds it too), so call it off a socket's
// read loop; it does not keep query after it returns.
func (p *Proxy) Handle(ctx context.Context, sandbox string, query []byte, tcp bool) (resp []byte, ok bool) {
	p.init()
	now := p.now()
	st := p.sandbox(sandbox)
	q, v := parseQuery(query)
	r := request{sandbox: sandbox, st: st, msg: query, q: &q, tcp: tcp}

	if v != nil && v.drop {
		p.deny(&r, DecisionMalformed, v.reason, -1)
		return nil, false
	}
	// Every answered message costs a token, malformed ones included, so
	// that no kind of message escapes the limit.
	if !p.takeToken(st, now) {
		return p.deny(&r, DecisionRateLimited, ReasonRateLimited, dns.RcodeRefused), true
	}
	if v != nil {
		d := DecisionMalformed
		if v.reason == ReasonOpcode {
			d = DecisionRefused
		}
		return p.deny(&r, d, v.reason, v.rcode), true
	}
	var pol *policy
	if st != nil {
		pol = st.pol.Load()
	}
	switch {
	case pol == nil:
		return p.deny(&r, DecisionRefused, ReasonNoPolicy, p.denyRcode), true
	case q.canon == "":
		return p.deny(&r, DecisionRefused, ReasonInvalidName, p.denyRcode), true
	case !pol.allow.allows(q.canon):
		return p.deny(&r, DecisionRefused, ReasonNotAllowed, p.denyRcode), true
	case q.qclass != dns.ClassINET:
		return p.deny(&r, DecisionRefused, ReasonClass, dns.RcodeRefused), true
	case metaQueryType(q.qtype) || !slices.Contains(pol.qtypes, q.qtype):
		return p.deny(&r, DecisionRefused, ReasonQueryType, dns.RcodeRefused), true
	}
	return p.resolve(ctx, &r, pol, now), true
}

// request is one query being answered.
type request struct {
	sandbox string
	st      *sandboxState
	msg     []byte
	q       *query
	tcp     bool
}

func (p *Proxy) count(r *request, d Decision) {
	var c sandboxCounters
	if r.st != nil {
		c = r.st.counters
	}
	p.Metrics.query(c, r.sandbox, d)
}

// deny answers r with rcode (nothing when rcode < 0) and reports it.
func (p *Proxy) deny(r *request, d Decision, reason Reason, rcode int) []byte {
	var resp []byte
	if rcode >= 0 {
		resp = echoResponse(r.msg, r.q, rcode, r.q.edns, p.lim.MaxUDPSize)
	}
	p.count(r, d)
	p.Metrics.deny(r.sandbox, reason)
	ev := DenyEvent{Reason: reason, Name: eventName(r.q.name), QType: r.q.qtype, Rcode: rcode, TCP: r.tcp}
	if r.st != nil && r.q.canon != "" {
		if pol := r.st.pol.Load(); pol != nil {
			ev.Listed = pol.allow.listed(r.q.canon)
		}
	}
	if p.OnDeny != nil {
		p.OnDeny(r.sandbox, ev)
	}
	// The log names the policy's entry, never the question: a name the
	// policy does not list is the sandbox's data (docs/telemetry.md).
	p.log.Debug("dns query denied", logSandbox, r.sandbox, logReason, string(reason),
		logName, ev.Listed, logQType, ev.QType, logRcode, rcode, logTCP, r.tcp)
	return resp
}

func (p *Proxy) takeToken(st *sandboxState, now time.Time) bool {
	if p.lim.QueriesPerSecond < 0 {
		return true
	}
	if st == nil {
		return p.noPolicy.take(now)
	}
	return st.bucket.take(now)
}

// resolve answers an allowed query from the cache or the upstream.
func (p *Proxy) resolve(ctx context.Context, r *request, pol *policy, now time.Time) []byte {
	key := cacheKey{upstream: pol.upstream, name: r.q.canon, qtype: r.q.qtype}
	d := DecisionCached
	ans, hit := p.cache.get(key, now)
	if !hit {
		d = DecisionForwarded
		var err error
		ans, err = p.forward(ctx, pol.upstream, r.q)
		if err != nil {
			p.log.Warn("dns upstream failed", logSandbox, r.sandbox, logUpstream, pol.upstream.String(),
				logName, pol.allow.listed(r.q.canon), logQType, r.q.qtype, logError, err)
			p.count(r, DecisionUpstreamError)
			return echoResponse(r.msg, r.q, dns.RcodeServerFailure, r.q.edns, p.lim.MaxUDPSize)
		}
		p.cache.put(key, ans, cacheTTL(ans, p.lim.CacheMaxTTL))
		now = ans.stored
	}
	v := p.view(pol, r.q, ans, now)
	resp, err := p.pack(r, v)
	if err != nil {
		p.log.Warn("dns answer not packed", logSandbox, r.sandbox, logName, pol.allow.listed(r.q.canon), logError, err)
		p.count(r, DecisionUpstreamError)
		return echoResponse(r.msg, r.q, dns.RcodeServerFailure, r.q.edns, p.lim.MaxUDPSize)
	}
	p.learn(r.sandbox, pol, v)
	p.count(r, d)
	return resp
}

// forward asks the upstream, over UDP and then TCP if the answer was
// truncated, and reduces its answer to what may be cached.
func (p *Proxy) forward(ctx context.Context, up netip.AddrPort, q *query) (*upstreamAnswer, error) {
	deadline := time.Now().Add(p.lim.UpstreamTimeout)
	if p.Exchange == nil {
		a, truncated, err := p.exchangeUDP(ctx, up, q, deadline)
		if err != nil || !truncated {
			return a, err
		}
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	var (
		resp *dns.Msg
		err  error
	)
	if p.Exchange != nil {
		resp, err = p.exchangeOnce(ctx, up, q, false)
	}
	if p.Exchange == nil || (err == nil && resp.Truncated) {
		resp, err = p.exchangeOnce(ctx, up, q, true)
	}
	if err != nil {
		return nil, err
	}
	a := &upstreamAnswer{rcode: resp.Rcode, stored: p.now()}
	for _, rr := range resp.Answer {
		h := rr.Header()
		if keepAnswer(h.Rrtype, h.Class, q.qtype) {
			a.answer = append(a.answer, rr)
		}
	}
	for _, rr := range resp.Ns {
		if h := rr.Header(); keepAuthority(h.Rrtype, h.Class) {
			a.ns = append(a.ns, rr)
		}
	}
	return a, nil
}

// keepAnswer and keepAuthority say which records of an upstream answer are
// kept: IN records of the question's type or CNAME in the answer section,
// IN SOA records in the authority section.
func keepAnswer(rrtype, class, qtype uint16) bool {
	return class == dns.ClassINET && (rrtype == qtype || rrtype == dns.TypeCNAME)
}

func keepAuthority(rrtype, class uint16) bool {
	return class == dns.ClassINET && rrtype == dns.TypeSOA
}

// exchangeOnce sends a query that the proxy builds itself through the
// Exchange hook or over TCP (exchangeUDP builds the same query): a fresh
// random ID, the canonical (lower-case) name, no client flags and no client
// EDNS options, so nothing but the allowed name and type leaves the
// sandbox.
func (p *Proxy) exchangeOnce(ctx context.Context, up netip.AddrPort, q *query, tcp bool) (*dns.Msg, error) {
	id := randomID()
	m := &dns.Msg{
		MsgHdr:   dns.MsgHdr{Id: id, Opcode: dns.OpcodeQuery, RecursionDesired: true},
		Question: []dns.Question{{Name: q.canon, Qtype: q.qtype, Qclass: dns.ClassINET}},
	}
	m.SetEdns0(uint16(p.lim.MaxUDPSize), false)
	start := time.Now()
	var (
		resp *dns.Msg
		err  error
	)
	if p.Exchange != nil {
		resp, err = p.Exchange(ctx, up, m, tcp)
	} else {
		resp, _, err = p.tcp.ExchangeContext(ctx, m, up.String())
	}
	p.Metrics.observeUpstream(tcp, time.Since(start).Seconds())
	if err != nil {
		return nil, fmt.Errorf("exchanging with %s: %w", up, err)
	}
	switch {
	case resp == nil, !resp.Response, resp.Id != id, resp.Opcode != dns.OpcodeQuery,
		len(resp.Question) != 1, !asciiEqualFold(resp.Question[0].Name, q.canon),
		resp.Question[0].Qtype != q.qtype, resp.Question[0].Qclass != dns.ClassINET:
		return nil, fmt.Errorf("exchanging with %s: %w", up, ErrUpstreamMismatch)
	case resp.Rcode != dns.RcodeSuccess && resp.Rcode != dns.RcodeNameError:
		return nil, fmt.Errorf("exchanging with %s: %w: %s", up, ErrUpstreamRcode, dns.RcodeToString[resp.Rcode])
	}
	return resp, nil
}

// exchangeUDP asks the upstream over a pooled UDP socket the query that
// exchangeOnce would send, and reads its answer with readAnswer. truncated
// reports an answer with TC set, to be asked again over TCP.
func (p *Proxy) exchangeUDP(ctx context.Context, up netip.AddrPort, q *query, deadline time.Time) (a *upstreamAnswer, truncated bool, err error) {
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	start := time.Now()
	s, err := p.udp.get(up, start)
	if err != nil {
		return nil, false, fmt.Errorf("exchanging with %s: %w", up, err)
	}
	id := randomID()
	bp := p.udp.buffer()
	defer p.udp.putBuffer(bp)
	msg, err := s.exchange(appendQuery((*bp)[:0], id, q.canon, q.qtype, p.lim.MaxUDPSize), id, deadline, *bp)
	if err == nil {
		a, truncated, err = readAnswer(msg, q)
	}
	p.Metrics.observeUpstream(false, time.Since(start).Seconds())
	// The socket carries another query only after an answer that matched
	// this one: anything else may mean that datagrams are on their way.
	if err == nil || errors.Is(err, ErrUpstreamRcode) {
		p.udp.put(up, s, time.Now())
	} else {
		_ = s.conn.Close()
	}
	if err != nil {
		return nil, false, fmt.Errorf("exchanging with %s: %w", up, err)
	}
	a.stored = p.now()
	return a, truncated, nil
}

// view is a sandbox's view of an upstream answer.
type view struct {
	rcode  int
	answer []dns.RR
	ns     []dns.RR
	// walk holds the canonical names from the question name to the last
	// allowed name of the CNAME chain; nil when the chain was cut.
	walk  []string
	addrs []netip.Addr
	ttl   uint32 // smallest remaining TTL along the walk, in seconds
}

// view filters an upstream answer for one sandbox: only records owned by
// the question name or by an allowed name that a CNAME chain from it
// reaches; a CNAME whose target is not allowed is kept and ends the chain,
// and the target's records are removed. Remaining TTLs are aged by the time
// the answer spent in the cache and capped at Limits.LearnMaxTTL.
func (p *Proxy) view(pol *policy, q *query, a *upstreamAnswer, now time.Time) view {
	age := uint32(max(now.Sub(a.stored), 0) / time.Second)
	maxTTL := uint32(p.lim.LearnMaxTTL / time.Second)
	v := view{rcode: a.rcode, ttl: maxTTL}
	take := func(rr dns.RR) {
		c := dns.Copy(rr)
		h := c.Header()
		h.Ttl = min(h.Ttl-min(h.Ttl, age), maxTTL)
		v.ttl = min(v.ttl, h.Ttl)
		v.answer = append(v.answer, c)
	}
	cur := q.canon
	walk := []string{cur}
	if q.qtype != dns.TypeCNAME {
		for range maxChain {
			cn := findCNAME(a.answer, cur)
			if cn == nil {
				break
			}
			take(cn)
			t, ok := canonicalHostname(cn.Target)
			if !ok || !pol.allow.allows(t) || slices.Contains(walk, t) {
				// The target's records, and its rcode, are not the sandbox's
				// to see.
				v.rcode = dns.RcodeSuccess
				v.ttl = 0
				return v
			}
			walk = append(walk, t)
			cur = t
		}
	}
	final := 0
	for _, rr := range a.answer {
		h := rr.Header()
		if h.Rrtype != q.qtype || !asciiEqualFold(h.Name, cur) {
			continue
		}
		take(rr)
		final++
		var ip netip.Addr
		switch rr := rr.(type) {
		case *dns.A:
			ip, _ = netip.AddrFromSlice(rr.A.To4())
		case *dns.AAAA:
			ip, _ = netip.AddrFromSlice(rr.AAAA)
		}
		if learnable(ip) && !slices.Contains(v.addrs, ip) {
			v.addrs = append(v.addrs, ip)
		}
	}
	if final == 0 {
		// A negative answer keeps the SOA of the zone that holds the last
		// name, for the client's negative caching.
		for _, rr := range a.ns {
			if dns.IsSubDomain(rr.Header().Name, cur) {
				c := dns.Copy(rr)
				c.Header().Ttl = min(c.Header().Ttl-min(c.Header().Ttl, age), maxTTL)
				v.ns = append(v.ns, c)
				break
			}
		}
	}
	v.walk = walk
	return v
}

func findCNAME(rrs []dns.RR, owner string) *dns.CNAME {
	for _, rr := range rrs {
		if c, ok := rr.(*dns.CNAME); ok && asciiEqualFold(c.Hdr.Name, owner) {
			return c
		}
	}
	return nil
}

// learnable reports whether an answered address may be reported to OnLearn.
func learnable(ip netip.Addr) bool {
	return ip.IsValid() && !ip.IsUnspecified() && !ip.IsLoopback() && !ip.IsMulticast() &&
		!ip.IsLinkLocalUnicast() && !ip.IsLinkLocalMulticast() && !ip.IsInterfaceLocalMulticast() && !ip.Is4In6()
}

func (p *Proxy) learn(sandbox string, pol *policy, v view) {
	if p.OnLearn == nil || len(v.addrs) == 0 {
		return
	}
	ttl := min(max(time.Duration(v.ttl)*time.Second, p.lim.LearnMinTTL), p.lim.LearnMaxTTL)
	for _, n := range v.walk {
		if spelled, ok := pol.fqdn[n]; ok {
			p.OnLearn(sandbox, spelled, slices.Clone(v.addrs), ttl)
			p.Metrics.learn(sandbox)
		}
	}
}

// pack builds the response to the sandbox: its ID and question (as it spelled
// it), the filtered records, an OPT record when it sent one, truncated to the
// size its transport allows.
func (p *Proxy) pack(r *request, v view) ([]byte, error) {
	q := r.q
	m := &dns.Msg{
		MsgHdr: dns.MsgHdr{
			Id:                 q.id,
			Response:           true,
			Opcode:             dns.OpcodeQuery,
			RecursionDesired:   q.flags&flagRD != 0,
			RecursionAvailable: true,
			Rcode:              v.rcode,
		},
		Question: []dns.Question{{Name: q.name, Qtype: q.qtype, Qclass: q.qclass}},
		Answer:   v.answer,
		Ns:       v.ns,
	}
	size := p.lim.MaxTCPSize
	if !r.tcp {
		size = dns.MinMsgSize
		if q.edns {
			size = min(max(int(q.udpSize), dns.MinMsgSize), p.lim.MaxUDPSize)
		}
	}
	if q.edns {
		m.SetEdns0(uint16(p.lim.MaxUDPSize), false)
	}
	m.Truncate(size)
	b, err := m.Pack()
	if err != nil {
		return nil, fmt.Errorf("packing answer: %w", err)
	}
	return b, nil
}

// asciiEqualFold compares DNS names case-insensitively in ASCII only (RFC
// 4343); presentation names escape every non-ASCII byte, so nothing else
// needs folding.
func asciiEqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// bucket is a token bucket: rate tokens per second, up to burst.
type bucket struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
	rate   float64
	burst  float64
}

func (b *bucket) reset(l Limits, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rate, b.burst = l.QueriesPerSecond, float64(l.Burst)
	b.tokens, b.last = b.burst, now
}

func (b *bucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(b.burst, b.tokens+dt.Seconds()*b.rate)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
