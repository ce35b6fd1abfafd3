package harness

import (
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
)

// DNSServerAddr is where the remote namespace's authoritative server listens.
const DNSServerAddr = "198.51.100.53:53"

// DNSServer is a real authoritative server (miekg/dns) in the remote
// namespace that logs every query it receives.
type DNSServer struct {
	mu      sync.Mutex
	queries []string // lower-cased names, as received
	records map[string][]dns.RR
}

// DNSServer starts the authoritative server for zone records ("name. TTL IN A x"
// lines) on DNSServerAddr over UDP and TCP. Names ending in a wildcard
// parent "*.x." answer for any name under x.
func (e *Env) DNSServer(zone ...string) *DNSServer {
	e.T.Helper()
	s := &DNSServer{records: map[string][]dns.RR{}}
	for _, line := range zone {
		rr, err := dns.NewRR(line)
		if err != nil {
			e.T.Fatal(err)
		}
		name := strings.ToLower(rr.Header().Name)
		s.records[name] = append(s.records[name], rr)
	}
	if err := e.InRemote(func() error {
		l, err := netlink.LinkByName("to-node")
		if err != nil {
			return err
		}
		return addAddr(l, netip.MustParseAddr("198.51.100.53"), 24)
	}); err != nil {
		e.T.Fatal(err)
	}
	var pc net.PacketConn
	var l net.Listener
	if err := e.InRemote(func() (err error) {
		if pc, err = net.ListenPacket("udp", DNSServerAddr); err != nil {
			return err
		}
		l, err = net.Listen("tcp", DNSServerAddr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	udp := &dns.Server{PacketConn: pc, Handler: s}
	tcp := &dns.Server{Listener: l, Handler: s}
	go func() { _ = udp.ActivateAndServe() }()
	go func() { _ = tcp.ActivateAndServe() }()
	e.onCleanup(func() { _ = udp.Shutdown(); _ = tcp.Shutdown() })
	return s
}

// ServeDNS answers from the zone and logs the query.
func (s *DNSServer) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	if len(r.Question) == 1 {
		q := r.Question[0]
		name := strings.ToLower(q.Name)
		s.mu.Lock()
		s.queries = append(s.queries, name)
		rrs := s.records[name]
		if rrs == nil {
			if i := strings.Index(name, "."); i >= 0 {
				rrs = s.records["*"+name[i:]]
			}
		}
		s.mu.Unlock()
		for _, rr := range rrs {
			if rr.Header().Rrtype == q.Qtype || rr.Header().Rrtype == dns.TypeCNAME {
				c := dns.Copy(rr)
				c.Header().Name = q.Name
				m.Answer = append(m.Answer, c)
			}
		}
		// follow one CNAME inside the zone
		for _, rr := range m.Answer {
			if cn, ok := rr.(*dns.CNAME); ok {
				s.mu.Lock()
				for _, t := range s.records[strings.ToLower(cn.Target)] {
					if t.Header().Rrtype == q.Qtype {
						m.Answer = append(m.Answer, dns.Copy(t))
					}
				}
				s.mu.Unlock()
			}
		}
		if len(rrs) == 0 {
			m.Rcode = dns.RcodeNameError
		}
	}
	_ = w.WriteMsg(m)
}

// Queries returns every name asked so far.
func (s *DNSServer) Queries() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.queries...)
}

// QueriesUnder counts the queries for names at or under suffix.
func (s *DNSServer) QueriesUnder(suffix string) int {
	suffix = strings.ToLower(strings.TrimSuffix(suffix, ".")) + "."
	n := 0
	for _, q := range s.Queries() {
		if q == suffix || strings.HasSuffix(q, "."+suffix) {
			n++
		}
	}
	return n
}
