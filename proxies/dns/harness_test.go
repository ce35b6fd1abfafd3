package dnsproxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// upstreamQuery is one query that the test authoritative server received.
type upstreamQuery struct {
	Name  string
	QType uint16
	TCP   bool
	EDNS  bool
	Opts  []uint16 // EDNS option codes
	From  string   // the proxy's source address and port
}

// authServer is a real DNS server on loopback (UDP and TCP on one port) that
// answers from a small zone the way a recursive resolver would (following
// CNAMEs inside the zone) and logs every message it receives.
type authServer struct {
	Addr netip.AddrPort

	received atomic.Int64 // every message of at least a header, parsed or not

	mu      sync.Mutex
	log     []upstreamQuery
	records map[string][]dns.RR // by canonical owner name
	// inject adds records to the answer (and glue to the additional section)
	// of any response whose question is the key.
	inject map[string][]dns.RR
	// respond, when set, replaces the zone logic.
	respond func(w dns.ResponseWriter, r *dns.Msg) *dns.Msg
}

const soaRR = "example.test. 300 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60"

func newAuthServer(t testing.TB, zone ...string) *authServer {
	t.Helper()
	return newAuthServerOn(t, "127.0.0.1", zone...)
}

// newAuthServerOn is newAuthServer on another loopback address (::1).
func newAuthServerOn(t testing.TB, host string, zone ...string) *authServer {
	t.Helper()
	s := &authServer{records: map[string][]dns.RR{}, inject: map[string][]dns.RR{}}
	for _, z := range append(zone, soaRR) {
		s.add(t, z)
	}
	var (
		pc  net.PacketConn
		ln  net.Listener
		err error
	)
	// UDP and TCP must share the port: a Config names one upstream.
	for range 20 {
		pc, err = net.ListenPacket("udp", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatalf("listening udp: %v", err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		t.Fatalf("listening tcp beside udp: %v", err)
	}
	s.Addr = netip.MustParseAddrPort(pc.LocalAddr().String())
	accept := func(dh dns.Header) dns.MsgAcceptAction {
		s.received.Add(1)
		return dns.MsgAccept
	}
	for _, srv := range []*dns.Server{
		{PacketConn: pc, Handler: s, MsgAcceptFunc: accept},
		{Listener: ln, Handler: s, MsgAcceptFunc: accept},
	} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return s
}

func (s *authServer) add(t testing.TB, rr string) {
	t.Helper()
	r, err := dns.NewRR(rr)
	if err != nil {
		t.Fatalf("bad test record %q: %v", rr, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := strings.ToLower(r.Header().Name)
	s.records[n] = append(s.records[n], r)
}

func (s *authServer) injectFor(t testing.TB, qname string, rrs ...string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rr := range rrs {
		r, err := dns.NewRR(rr)
		if err != nil {
			t.Fatalf("bad test record %q: %v", rr, err)
		}
		s.inject[qname] = append(s.inject[qname], r)
	}
}

// queries returns the log of parsed queries.
func (s *authServer) queries() []upstreamQuery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]upstreamQuery(nil), s.log...)
}

func (s *authServer) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	_, tcp := w.LocalAddr().(*net.TCPAddr)
	e := upstreamQuery{TCP: tcp, From: w.RemoteAddr().String()}
	if len(r.Question) > 0 {
		e.Name, e.QType = r.Question[0].Name, r.Question[0].Qtype
	}
	if opt := r.IsEdns0(); opt != nil {
		e.EDNS = true
		for _, o := range opt.Option {
			e.Opts = append(e.Opts, o.Option())
		}
	}
	s.mu.Lock()
	s.log = append(s.log, e)
	respond := s.respond
	s.mu.Unlock()

	var m *dns.Msg
	if respond != nil {
		m = respond(w, r)
	} else {
		m = s.answer(r)
	}
	if m == nil {
		return
	}
	if !tcp {
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		m.Truncate(size)
	}
	_ = w.WriteMsg(m)
}

func (s *authServer) answer(r *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	if len(r.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return m
	}
	q := r.Question[0]
	s.mu.Lock()
	defer s.mu.Unlock()
	name := strings.ToLower(q.Name)
	for range 10 {
		rrs, ok := s.records[name]
		if !ok {
			m.Rcode = dns.RcodeNameError
			break
		}
		var next string
		for _, rr := range rrs {
			if rr.Header().Rrtype == q.Qtype {
				m.Answer = append(m.Answer, rr)
			} else if c, ok := rr.(*dns.CNAME); ok && q.Qtype != dns.TypeCNAME {
				m.Answer = append(m.Answer, rr)
				next = strings.ToLower(c.Target)
			}
		}
		if next == "" {
			break
		}
		name = next
	}
	if len(m.Answer) == 0 {
		m.Ns = append(m.Ns, s.records["example.test."][0])
	}
	for _, rr := range s.inject[strings.ToLower(q.Name)] {
		m.Answer = append(m.Answer, rr)
		m.Extra = append(m.Extra, rr)
	}
	if r.IsEdns0() != nil {
		m.SetEdns0(1232, false)
	}
	return m
}

// frontend serves a Proxy for one sandbox on plain loopback sockets, as the
// daemon's transparent sockets would: UDP datagrams to Handle, TCP
// connections to ServeTCP.
type frontend struct {
	UDP, TCP string
}

func serveProxy(t testing.TB, p *Proxy, sandbox string) frontend {
	t.Helper()
	return serveProxyOn(t, p, sandbox, "127.0.0.1")
}

func serveProxyOn(t testing.TB, p *Proxy, sandbox, host string) frontend {
	t.Helper()
	pc, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatalf("listening udp: %v", err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatalf("listening tcp: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pkt := append([]byte(nil), buf[:n]...)
			wg.Go(func() {
				if resp, ok := p.Handle(ctx, sandbox, pkt, false); ok {
					_, _ = pc.WriteTo(resp, from)
				}
			})
		}
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				if err := p.ServeTCP(ctx, sandbox, c); err != nil && !errors.Is(err, context.Canceled) {
					t.Logf("ServeTCP: %v", err)
				}
			})
		}
	})
	t.Cleanup(func() {
		cancel()
		pc.Close()
		ln.Close()
		wg.Wait()
	})
	return frontend{UDP: pc.LocalAddr().String(), TCP: ln.Addr().String()}
}

// exchange sends m over UDP (or TCP) with a miekg client and returns the
// response.
func exchange(t testing.TB, addr string, m *dns.Msg, tcp bool) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: "udp", Timeout: 3 * time.Second, UDPSize: 65535}
	if tcp {
		c.Net = "tcp"
	}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("exchange %s over %s: %v", m.Question[0].Name, c.Net, err)
	}
	return r
}

// rawUDP sends b and returns the reply, or nil when none came within wait.
func rawUDP(t testing.TB, addr string, b []byte, wait time.Duration) []byte {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if _, err := c.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return nil
	}
	return buf[:n]
}

func question(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// recorder collects what the proxy reports through its hooks.
type recorder struct {
	mu     sync.Mutex
	learnt []learnt
	denies []DenyEvent
}

type learnt struct {
	Sandbox, Name string
	Addrs         []netip.Addr
	TTL           time.Duration
}

func (r *recorder) hook(p *Proxy) *Proxy {
	p.OnLearn = func(sandbox, name string, addrs []netip.Addr, ttl time.Duration) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.learnt = append(r.learnt, learnt{sandbox, name, addrs, ttl})
	}
	p.OnDeny = func(sandbox string, ev DenyEvent) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.denies = append(r.denies, ev)
	}
	return p
}

func (r *recorder) learns() []learnt {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]learnt(nil), r.learnt...)
}

func (r *recorder) denied() []DenyEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]DenyEvent(nil), r.denies...)
}
