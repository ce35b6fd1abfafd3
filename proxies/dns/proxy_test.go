package dnsproxy

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

const sandboxID = "sb-1"

var testZone = []string{
	"api.example.test. 300 IN A 192.0.2.10",
	"api.example.test. 300 IN AAAA 2001:db8::10",
	"www.example.test. 120 IN CNAME edge.cdn.example.test.",
	"edge.cdn.example.test. 600 IN A 192.0.2.20",
	"edge.cdn.example.test. 600 IN A 192.0.2.21",
	"alias.example.test. 300 IN CNAME evil.attacker.test.",
	"evil.attacker.test. 300 IN A 203.0.113.66",
	"short.example.test. 5 IN A 192.0.2.30",
	"long.example.test. 86400 IN A 192.0.2.40",
	"local.example.test. 300 IN A 127.0.0.1",
	"local.example.test. 300 IN A 169.254.169.254",
	"local.example.test. 300 IN A 192.0.2.50",
	"api.example.test. 300 IN TXT \"not allowed\"",
}

var testAllow = []string{
	"api.example.test", "www.example.test", "*.cdn.example.test", "alias.example.test",
	"short.example.test", "long.example.test", "local.example.test", "big.example.test",
	"*.store.example.test",
}

var testFQDN = []string{"api.example.test", "www.example.test", "alias.example.test",
	"short.example.test", "long.example.test", "local.example.test"}

type fixture struct {
	p    *Proxy
	rec  *recorder
	up   *authServer
	fe   frontend
	reg  *prometheus.Registry
	clk  *fakeClock
	conf *Config
}

// newFixture runs an authoritative server, a proxy with the test policy for
// sandboxID, and a loopback frontend for it. tweak adjusts the proxy before
// its first use.
func newFixture(t *testing.T, tweak func(*Proxy)) *fixture {
	t.Helper()
	f := &fixture{rec: &recorder{}, reg: prometheus.NewRegistry(), clk: newFakeClock()}
	f.up = newAuthServer(t, testZone...)
	for i := range 120 {
		f.up.add(t, fmt.Sprintf("big.example.test. 300 IN A 198.18.%d.%d", i/200, i%200+1))
	}
	m, err := NewMetrics(f.reg)
	if err != nil {
		t.Fatal(err)
	}
	f.p = f.rec.hook(&Proxy{Logger: testutil.Logger(t), Metrics: m, Now: f.clk.Now})
	if tweak != nil {
		tweak(f.p)
	}
	f.conf = &Config{Upstream: f.up.Addr, Allow: testAllow, FQDNNames: testFQDN}
	if err := f.conf.Validate(); err != nil {
		t.Fatal(err)
	}
	f.p.SetSandbox(sandboxID, f.conf)
	f.fe = serveProxy(t, f.p, sandboxID)
	return f
}

func (f *fixture) queries(t *testing.T, decision Decision) float64 {
	t.Helper()
	return counterValue(t, f.reg, "cleanwall_dns_queries_total", map[string]string{"sandbox": sandboxID, "decision": string(decision)})
}

func counterValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

func answerStrings(m *dns.Msg) []string {
	var s []string
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			s = append(s, rr.Hdr.Name+" A "+rr.A.String())
		case *dns.AAAA:
			s = append(s, rr.Hdr.Name+" AAAA "+rr.AAAA.String())
		case *dns.CNAME:
			s = append(s, rr.Hdr.Name+" CNAME "+rr.Target)
		default:
			s = append(s, rr.String())
		}
	}
	return s
}

func wantAnswers(t *testing.T, m *dns.Msg, want ...string) {
	t.Helper()
	if m.Rcode != dns.RcodeSuccess {
		t.Fatalf("rcode %s, want NOERROR", dns.RcodeToString[m.Rcode])
	}
	got := answerStrings(m)
	if !slices.Equal(got, want) {
		t.Fatalf("answers\n got %q\nwant %q", got, want)
	}
}

func TestAllowedNamesResolve(t *testing.T) {
	f := newFixture(t, nil)
	for _, tcp := range []bool{false, true} {
		t.Run(fmt.Sprintf("tcp=%v", tcp), func(t *testing.T) {
			addr := f.fe.UDP
			if tcp {
				addr = f.fe.TCP
			}
			wantAnswers(t, exchange(t, addr, question("api.example.test.", dns.TypeA), tcp),
				"api.example.test. A 192.0.2.10")
			wantAnswers(t, exchange(t, addr, question("api.example.test.", dns.TypeAAAA), tcp),
				"api.example.test. AAAA 2001:db8::10")
			wantAnswers(t, exchange(t, addr, question("www.example.test.", dns.TypeA), tcp),
				"www.example.test. CNAME edge.cdn.example.test.",
				"edge.cdn.example.test. A 192.0.2.20", "edge.cdn.example.test. A 192.0.2.21")
			wantAnswers(t, exchange(t, addr, question("www.example.test.", dns.TypeCNAME), tcp),
				"www.example.test. CNAME edge.cdn.example.test.")
			nx := exchange(t, addr, question("nothing.store.example.test.", dns.TypeA), tcp)
			if nx.Rcode != dns.RcodeNameError || len(nx.Answer) != 0 || len(nx.Ns) != 1 {
				t.Fatalf("missing allowed name: got %v", nx)
			}
		})
	}
	// The second round came from the cache: one upstream query per question.
	got := map[string]int{}
	for _, q := range f.up.queries() {
		got[fmt.Sprintf("%s/%s", q.Name, dns.TypeToString[q.QType])]++
	}
	want := map[string]int{"api.example.test./A": 1, "api.example.test./AAAA": 1, "www.example.test./A": 1,
		"www.example.test./CNAME": 1, "nothing.store.example.test./A": 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("upstream saw %v, want %v", got, want)
	}
	if v := f.queries(t, DecisionForwarded); v != 5 {
		t.Errorf("forwarded = %v, want 5", v)
	}
	if v := f.queries(t, DecisionCached); v != 5 {
		t.Errorf("cached = %v, want 5", v)
	}
}

func TestDisallowedNameRefusedNeverForwarded(t *testing.T) {
	for _, rcode := range []int{dns.RcodeRefused, dns.RcodeNameError} {
		t.Run(dns.RcodeToString[rcode], func(t *testing.T) {
			f := newFixture(t, func(p *Proxy) { p.DenyRcode = rcode })
			for _, tcp := range []bool{false, true} {
				addr := f.fe.UDP
				if tcp {
					addr = f.fe.TCP
				}
				for _, n := range []string{"evil.attacker.test.", "example.test.", "cdn.example.test.",
					"store.example.test.", "xapi.example.test.", "api.example.test.evil.test."} {
					r := exchange(t, addr, question(n, dns.TypeA), tcp)
					if r.Rcode != rcode || len(r.Answer) != 0 || r.Question[0].Name != n {
						t.Fatalf("%s over tcp=%v: got %v", n, tcp, r)
					}
				}
			}
			if n := f.up.received.Load(); n != 0 {
				t.Fatalf("upstream received %d messages, want 0: %v", n, f.up.queries())
			}
			ev := f.rec.denied()
			if len(ev) != 12 || ev[0].Reason != ReasonNotAllowed || ev[0].Name != "evil.attacker.test." || ev[0].Rcode != rcode {
				t.Fatalf("deny events: %+v", ev)
			}
			if v := f.queries(t, DecisionRefused); v != 12 {
				t.Fatalf("refused = %v, want 12", v)
			}
			if v := counterValue(t, f.reg, "cleanwall_dns_denies_total", map[string]string{"sandbox": sandboxID, "reason": "not_allowed"}); v != 12 {
				t.Fatalf("denies{not_allowed} = %v, want 12", v)
			}
		})
	}
}

func TestTunnellingAttemptNeverReachesUpstream(t *testing.T) {
	f := newFixture(t, func(p *Proxy) { p.Now = nil }) // real clock: real rate limit
	const n = 500
	rnd := rand.New(rand.NewPCG(1, 2))
	refused := 0
	for i := range n {
		label := make([]byte, 40)
		for j := range label {
			label[j] = "abcdefghijklmnopqrstuvwxyz0123456789"[rnd.IntN(36)]
		}
		qt := []uint16{dns.TypeA, dns.TypeTXT, dns.TypeAAAA, dns.TypeNULL}[i%4]
		r := exchange(t, f.fe.UDP, question(string(label)+".exfil.attacker.test.", qt), false)
		if r.Rcode == dns.RcodeRefused && len(r.Answer) == 0 {
			refused++
		}
	}
	if refused != n {
		t.Fatalf("%d of %d answered REFUSED", refused, n)
	}
	if got := f.up.received.Load(); got != 0 {
		t.Fatalf("upstream received %d messages", got)
	}
	ref, rl := f.queries(t, DecisionRefused), f.queries(t, DecisionRateLimited)
	if ref+rl != n || ref < 200 {
		t.Fatalf("refused %v + rate_limited %v, want %d with the burst (200) refused", ref, rl, n)
	}
	t.Logf("refused %v, rate limited %v", ref, rl)
}

func TestPipelinedTCP(t *testing.T) {
	f := newFixture(t, nil)
	c, err := dns.Dial("tcp", f.fe.TCP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q1, q2, q3 := question("api.example.test.", dns.TypeA), question("www.example.test.", dns.TypeA),
		question("evil.attacker.test.", dns.TypeA)
	q1.Id, q2.Id, q3.Id = 1, 2, 3
	// All three in one write: the proxy reads them back to back.
	var buf []byte
	for _, q := range []*dns.Msg{q1, q2, q3} {
		b, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		buf = append(buf, byte(len(b)>>8), byte(len(b)))
		buf = append(buf, b...)
	}
	if _, err := c.Conn.Write(buf); err != nil {
		t.Fatal(err)
	}
	got := map[uint16]*dns.Msg{}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	for range 3 {
		r, err := c.ReadMsg()
		if err != nil {
			t.Fatal(err)
		}
		got[r.Id] = r
	}
	wantAnswers(t, got[1], "api.example.test. A 192.0.2.10")
	wantAnswers(t, got[2], "www.example.test. CNAME edge.cdn.example.test.",
		"edge.cdn.example.test. A 192.0.2.20", "edge.cdn.example.test. A 192.0.2.21")
	if got[3].Rcode != dns.RcodeRefused {
		t.Fatalf("disallowed over tcp: %v", got[3])
	}
	for _, q := range f.up.queries() {
		if strings.Contains(q.Name, "attacker") {
			t.Fatalf("forwarded %s", q.Name)
		}
	}
}

func TestTCPLimits(t *testing.T) {
	f := newFixture(t, func(p *Proxy) {
		p.Limits.TCPIdleTimeout = 200 * time.Millisecond
		p.Limits.TCPMaxConns = 1
	})
	c1, err := dns.Dial("tcp", f.fe.TCP)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	if err := c1.WriteMsg(question("api.example.test.", dns.TypeA)); err != nil {
		t.Fatal(err)
	}
	if r, err := c1.ReadMsg(); err != nil || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("first connection: %v %v", r, err)
	}
	// A second connection of the same sandbox is closed at once.
	c2, err := dns.Dial("tcp", f.fe.TCP)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_ = c2.WriteMsg(question("api.example.test.", dns.TypeA))
	_ = c2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if r, err := c2.ReadMsg(); err == nil {
		t.Fatalf("second connection answered: %v", r)
	}
	// The first one is closed after the idle timeout.
	_ = c1.SetReadDeadline(time.Now().Add(2 * time.Second))
	start := time.Now()
	if _, err := c1.ReadMsg(); err == nil {
		t.Fatal("idle connection still open")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("idle connection closed after %v", d)
	}
	if ev := f.rec.denied(); len(ev) != 1 || ev[0].Reason != ReasonTooManyConns {
		t.Fatalf("deny events: %+v", ev)
	}
}

func TestCacheRespectsTTL(t *testing.T) {
	f := newFixture(t, nil)
	ask := func() *dns.Msg {
		r := exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false)
		if len(r.Answer) != 1 {
			t.Fatalf("answer: %v", r)
		}
		return r
	}
	upstream := func() int { return len(f.up.queries()) }

	if ttl := ask().Answer[0].Header().Ttl; ttl != 300 || upstream() != 1 {
		t.Fatalf("first: ttl %d, upstream %d", ttl, upstream())
	}
	f.clk.Advance(100 * time.Second)
	if ttl := ask().Answer[0].Header().Ttl; ttl != 200 || upstream() != 1 {
		t.Fatalf("after 100s: ttl %d, upstream %d (want 200 from the cache)", ttl, upstream())
	}
	f.clk.Advance(199 * time.Second)
	if ttl := ask().Answer[0].Header().Ttl; ttl != 1 || upstream() != 1 {
		t.Fatalf("after 299s: ttl %d, upstream %d", ttl, upstream())
	}
	f.clk.Advance(time.Second)
	if ttl := ask().Answer[0].Header().Ttl; ttl != 300 || upstream() != 2 {
		t.Fatalf("after 300s: ttl %d, upstream %d (want a fresh upstream answer)", ttl, upstream())
	}
	// Negative answers are cached for the SOA's negative TTL (60s).
	nx := func() { exchange(t, f.fe.UDP, question("gone.store.example.test.", dns.TypeA), false) }
	nx()
	f.clk.Advance(59 * time.Second)
	nx()
	if upstream() != 3 {
		t.Fatalf("negative answer not cached: upstream %d", upstream())
	}
	f.clk.Advance(time.Second)
	nx()
	if upstream() != 4 {
		t.Fatalf("negative answer outlived its TTL: upstream %d", upstream())
	}
}

func TestCacheIsSharedButFilteredPerSandbox(t *testing.T) {
	f := newFixture(t, nil)
	// sb-2 shares the upstream but does not allow the CNAME target.
	f.p.SetSandbox("sb-2", &Config{Upstream: f.up.Addr, Allow: []string{"www.example.test"}, FQDNNames: []string{"www.example.test"}})
	fe2 := serveProxy(t, f.p, "sb-2")
	wantAnswers(t, exchange(t, f.fe.UDP, question("www.example.test.", dns.TypeA), false),
		"www.example.test. CNAME edge.cdn.example.test.",
		"edge.cdn.example.test. A 192.0.2.20", "edge.cdn.example.test. A 192.0.2.21")
	wantAnswers(t, exchange(t, fe2.UDP, question("www.example.test.", dns.TypeA), false),
		"www.example.test. CNAME edge.cdn.example.test.")
	if n := len(f.up.queries()); n != 1 {
		t.Fatalf("upstream saw %d queries, want 1 (shared cache)", n)
	}
	for _, l := range f.rec.learns() {
		if l.Sandbox == "sb-2" {
			t.Fatalf("sb-2 learnt through a name it does not allow: %+v", l)
		}
	}
}

func TestLearn(t *testing.T) {
	f := newFixture(t, nil)
	f.up.injectFor(t, "api.example.test.",
		"bank.example.test. 300 IN A 203.0.113.99",     // another owner: not the question's
		"api.example.test. 300 IN TXT \"injected\"",    // another type
		"edge.cdn.example.test. 300 IN A 203.0.113.98", // allowed name, but not on the chain
	)
	f.up.injectFor(t, "www.example.test.", "bank.example.test. 300 IN A 203.0.113.97")

	wantAnswers(t, exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false),
		"api.example.test. A 192.0.2.10")
	r := exchange(t, f.fe.UDP, question("www.example.test.", dns.TypeA), false)
	wantAnswers(t, r, "www.example.test. CNAME edge.cdn.example.test.",
		"edge.cdn.example.test. A 192.0.2.20", "edge.cdn.example.test. A 192.0.2.21")
	if len(r.Extra) != 0 || len(r.Ns) != 0 {
		t.Fatalf("glue or authority kept: %v", r)
	}
	exchange(t, f.fe.UDP, question("short.example.test.", dns.TypeA), false)
	exchange(t, f.fe.UDP, question("long.example.test.", dns.TypeA), false)
	exchange(t, f.fe.UDP, question("local.example.test.", dns.TypeA), false)
	exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeAAAA), false)

	a := netip.MustParseAddr
	want := []learnt{
		{sandboxID, "api.example.test", []netip.Addr{a("192.0.2.10")}, 300 * time.Second},
		// The chain's smallest TTL is the CNAME's (120s); the addresses are
		// the target's, attributed to the name the sandbox asked for.
		{sandboxID, "www.example.test", []netip.Addr{a("192.0.2.20"), a("192.0.2.21")}, 120 * time.Second},
		{sandboxID, "short.example.test", []netip.Addr{a("192.0.2.30")}, 30 * time.Second}, // 5s clamped up
		{sandboxID, "long.example.test", []netip.Addr{a("192.0.2.40")}, time.Hour},         // 1d clamped down
		{sandboxID, "local.example.test", []netip.Addr{a("192.0.2.50")}, 300 * time.Second},
		{sandboxID, "api.example.test", []netip.Addr{a("2001:db8::10")}, 300 * time.Second},
	}
	if got := f.rec.learns(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("learnt\n got %v\nwant %v", got, want)
	}
	// Served TTLs are capped at the learn maximum, so clients ask again
	// before the datapath forgets.
	if ttl := exchange(t, f.fe.UDP, question("long.example.test.", dns.TypeA), false).Answer[0].Header().Ttl; ttl != 3600 {
		t.Fatalf("served ttl %d, want 3600", ttl)
	}
	// A cache hit learns again, with the remaining TTL.
	f.clk.Advance(100 * time.Second)
	exchange(t, f.fe.UDP, question("www.example.test.", dns.TypeA), false)
	if l := f.rec.learns(); l[len(l)-1].Name != "www.example.test" || l[len(l)-1].TTL != 30*time.Second {
		t.Fatalf("cache hit learnt %+v, want www.example.test for 30s (20s left, clamped)", l[len(l)-1])
	}
}

func TestLearnEveryChainNameThatRulesUse(t *testing.T) {
	f := newFixture(t, nil)
	f.conf.FQDNNames = []string{"WWW.example.test.", "edge.cdn.example.test"}
	f.p.SetSandbox(sandboxID, f.conf)
	exchange(t, f.fe.UDP, question("www.example.test.", dns.TypeA), false)
	a := netip.MustParseAddr
	addrs := []netip.Addr{a("192.0.2.20"), a("192.0.2.21")}
	want := []learnt{
		{sandboxID, "WWW.example.test.", addrs, 120 * time.Second},
		{sandboxID, "edge.cdn.example.test", addrs, 120 * time.Second},
	}
	if got := f.rec.learns(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("learnt\n got %v\nwant %v", got, want)
	}
}

func TestCNAMEToDisallowedNameEndsTheChain(t *testing.T) {
	f := newFixture(t, nil)
	f.conf.FQDNNames = append(f.conf.FQDNNames, "evil.attacker.test")
	f.p.SetSandbox(sandboxID, f.conf)
	for _, tcp := range []bool{false, true} {
		addr := f.fe.UDP
		if tcp {
			addr = f.fe.TCP
		}
		wantAnswers(t, exchange(t, addr, question("alias.example.test.", dns.TypeA), tcp),
			"alias.example.test. CNAME evil.attacker.test.")
	}
	if l := f.rec.learns(); len(l) != 0 {
		t.Fatalf("learnt through a disallowed CNAME target: %+v", l)
	}
	// The sandbox following the CNAME itself is refused.
	if r := exchange(t, f.fe.UDP, question("evil.attacker.test.", dns.TypeA), false); r.Rcode != dns.RcodeRefused {
		t.Fatalf("target: %v", r)
	}
}

func TestUDPTruncation(t *testing.T) {
	f := newFixture(t, nil)
	// No EDNS: 512 bytes.
	b := rawUDP(t, f.fe.UDP, mustPack(t, question("big.example.test.", dns.TypeA)), 3*time.Second)
	r := new(dns.Msg)
	if err := r.Unpack(b); err != nil {
		t.Fatal(err)
	}
	if !r.Truncated || len(b) > 512 || r.IsEdns0() != nil {
		t.Fatalf("no edns: tc=%v len=%d", r.Truncated, len(b))
	}
	// An oversized advertised size is clamped to 1232.
	m := question("big.example.test.", dns.TypeA)
	m.SetEdns0(65000, false)
	b = rawUDP(t, f.fe.UDP, mustPack(t, m), 3*time.Second)
	r = new(dns.Msg)
	if err := r.Unpack(b); err != nil {
		t.Fatal(err)
	}
	if !r.Truncated || len(b) > 1232 || r.IsEdns0() == nil || r.IsEdns0().UDPSize() != 1232 {
		t.Fatalf("edns 65000: tc=%v len=%d opt=%v", r.Truncated, len(b), r.IsEdns0())
	}
	// TCP gets everything. The upstream's UDP answer to the proxy was
	// truncated too, so the proxy asked again over TCP.
	r = exchange(t, f.fe.TCP, question("big.example.test.", dns.TypeA), true)
	if r.Truncated || len(r.Answer) != 120 {
		t.Fatalf("tcp: tc=%v answers=%d", r.Truncated, len(r.Answer))
	}
	var udp, tcp int
	for _, q := range f.up.queries() {
		if q.TCP {
			tcp++
		} else {
			udp++
		}
	}
	if udp != 1 || tcp != 1 {
		t.Fatalf("upstream saw %d udp and %d tcp queries, want 1 and 1 (then the cache)", udp, tcp)
	}
}

func TestForwardedQueryCarriesNothingOfTheClients(t *testing.T) {
	f := newFixture(t, nil)
	m := question("ApI.ExAmPlE.TeSt.", dns.TypeA)
	m.CheckingDisabled = true
	m.AuthenticatedData = true
	m.SetEdns0(4096, true)
	opt := m.IsEdns0()
	opt.Option = append(opt.Option,
		&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: []byte{10, 1, 2, 0}},
		&dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "0102030405060708"},
		&dns.EDNS0_PADDING{Padding: make([]byte, 64)},
		&dns.EDNS0_LOCAL{Code: 65001, Data: []byte("exfiltrated secret")},
	)
	r := exchange(t, f.fe.UDP, m, false)
	if r.Question[0].Name != "ApI.ExAmPlE.TeSt." {
		t.Fatalf("question not echoed as asked: %v", r.Question)
	}
	wantAnswers(t, r, "api.example.test. A 192.0.2.10")
	if o := r.IsEdns0(); o == nil || len(o.Option) != 0 || o.Do() {
		t.Fatalf("response OPT: %v", o)
	}
	q := f.up.queries()
	if len(q) != 1 || q[0].Name != "api.example.test." || len(q[0].Opts) != 0 {
		t.Fatalf("upstream saw %+v: want the lower-cased name and no EDNS options", q)
	}
}

func TestSpoofingUpstream(t *testing.T) {
	f := newFixture(t, func(p *Proxy) { p.Limits.UpstreamTimeout = 300 * time.Millisecond })
	cases := map[string]func(w dns.ResponseWriter, r *dns.Msg) *dns.Msg{
		"other question": func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
			m := new(dns.Msg)
			m.SetReply(r)
			m.Question[0].Name = "bank.example.test."
			rr, _ := dns.NewRR("bank.example.test. 300 IN A 203.0.113.1")
			m.Answer = []dns.RR{rr}
			return m
		},
		"other id": func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
			m := new(dns.Msg)
			m.SetReply(r)
			m.Id++
			rr, _ := dns.NewRR("api.example.test. 300 IN A 203.0.113.1")
			m.Answer = []dns.RR{rr}
			return m
		},
		"not a response": func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
			m := r.Copy()
			rr, _ := dns.NewRR("api.example.test. 300 IN A 203.0.113.1")
			m.Answer = []dns.RR{rr}
			return m
		},
		"servfail": func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeServerFailure)
			return m
		},
	}
	for name, respond := range cases {
		t.Run(name, func(t *testing.T) {
			f.up.mu.Lock()
			f.up.respond = respond
			f.up.mu.Unlock()
			r := exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false)
			if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
				t.Fatalf("got %v", r)
			}
		})
	}
	if l := f.rec.learns(); len(l) != 0 {
		t.Fatalf("learnt from a spoofed answer: %+v", l)
	}
	if v := f.queries(t, DecisionUpstreamError); v != float64(len(cases)) {
		t.Fatalf("upstream_error = %v", v)
	}
}

func TestRateLimit(t *testing.T) {
	f := newFixture(t, func(p *Proxy) {
		p.Limits.QueriesPerSecond = 10
		p.Limits.Burst = 5
		p.Limits.CacheEntries = -1 // every allowed query goes upstream
	})
	ask := func() int {
		return exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false).Rcode
	}
	for i := range 5 {
		if rc := ask(); rc != dns.RcodeSuccess {
			t.Fatalf("query %d within the burst: %s", i, dns.RcodeToString[rc])
		}
	}
	if rc := ask(); rc != dns.RcodeRefused {
		t.Fatalf("query over the burst: %s", dns.RcodeToString[rc])
	}
	f.clk.Advance(100 * time.Millisecond) // one token at 10/s
	if rc := ask(); rc != dns.RcodeSuccess {
		t.Fatalf("after 100ms: %s", dns.RcodeToString[rc])
	}
	if rc := ask(); rc != dns.RcodeRefused {
		t.Fatalf("second after 100ms: %s", dns.RcodeToString[rc])
	}
	f.clk.Advance(time.Hour) // refills to the burst, no more
	for range 5 {
		ask()
	}
	if rc := ask(); rc != dns.RcodeRefused {
		t.Fatalf("bucket holds more than the burst")
	}
	if n := len(f.up.queries()); n != 11 {
		t.Fatalf("upstream saw %d queries, want 11: rate-limited queries are never forwarded", n)
	}
	if v := f.queries(t, DecisionRateLimited); v != 3 {
		t.Fatalf("rate_limited = %v, want 3", v)
	}
	// A policy update keeps the bucket: it is empty now.
	f.p.SetSandbox(sandboxID, f.conf)
	if rc := ask(); rc != dns.RcodeRefused {
		t.Fatalf("policy update refilled the bucket")
	}
}

func TestLivePolicyUpdate(t *testing.T) {
	f := newFixture(t, nil)
	wantAnswers(t, exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false), "api.example.test. A 192.0.2.10")
	f.p.SetSandbox(sandboxID, &Config{Upstream: f.up.Addr, Allow: []string{"www.example.test"}})
	if r := exchange(t, f.fe.UDP, question("api.example.test.", dns.TypeA), false); r.Rcode != dns.RcodeRefused {
		t.Fatalf("after update: %v", r)
	}
	f.p.SetSandbox(sandboxID, nil)
	if r := exchange(t, f.fe.UDP, question("www.example.test.", dns.TypeA), false); r.Rcode != dns.RcodeRefused {
		t.Fatalf("after removal: %v", r)
	}
	ev := f.rec.denied()
	if len(ev) != 2 || ev[0].Reason != ReasonNotAllowed || ev[1].Reason != ReasonNoPolicy {
		t.Fatalf("deny events: %+v", ev)
	}
	if n := len(f.up.queries()); n != 1 {
		t.Fatalf("upstream saw %d queries", n)
	}
}

func TestAllowMatching(t *testing.T) {
	m, errs := compileAllow([]string{"API.example.test.", "*.store.example.test", "*.", "a..b", "*.*.x", "sp ace.test"})
	if len(errs) != 4 {
		t.Fatalf("errors: %v", errs)
	}
	for name, want := range map[string]bool{
		"api.example.test.":       true,
		"API.EXAMPLE.TEST":        true,
		"x.api.example.test.":     false,
		"store.example.test.":     false,
		"a.store.example.test.":   true,
		"a.b.store.example.test.": true,
		"astore.example.test.":    false,
		"a.store.example.test.x.": false,
		"a\\.store.example.test.": false,
	} {
		c, ok := canonicalHostname(name)
		if got := ok && m.allows(c); got != want {
			t.Errorf("%q: allowed=%v, want %v", name, got, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	up := netip.MustParseAddrPort("127.0.0.1:53")
	for _, c := range []Config{
		{},
		{Upstream: up, Allow: []string{"*"}},
		{Upstream: up, QueryTypes: []uint16{dns.TypeANY}},
		{Upstream: up, QueryTypes: []uint16{dns.TypeAXFR}},
		{Upstream: up, FQDNNames: []string{"bad name"}},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
	ok := Config{Upstream: up, Allow: testAllow, QueryTypes: []uint16{dns.TypeA, dns.TypeTXT}, FQDNNames: testFQDN}
	if err := ok.Validate(); err != nil {
		t.Error(err)
	}
}

func mustPack(t testing.TB, m *dns.Msg) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestIPv6Loopback(t *testing.T) {
	if ln, err := net.ListenPacket("udp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		ln.Close()
	}
	up := newAuthServerOn(t, "::1", testZone...)
	rec := &recorder{}
	p := rec.hook(&Proxy{Logger: testutil.Logger(t)})
	p.SetSandbox(sandboxID, &Config{Upstream: up.Addr, Allow: testAllow, FQDNNames: testFQDN})
	fe := serveProxyOn(t, p, sandboxID, "::1")
	for _, tcp := range []bool{false, true} {
		addr := fe.UDP
		if tcp {
			addr = fe.TCP
		}
		wantAnswers(t, exchange(t, addr, question("api.example.test.", dns.TypeAAAA), tcp), "api.example.test. AAAA 2001:db8::10")
		if r := exchange(t, addr, question("evil.attacker.test.", dns.TypeAAAA), tcp); r.Rcode != dns.RcodeRefused {
			t.Fatalf("disallowed over ::1: %v", r)
		}
	}
	if q := up.queries(); len(q) != 1 || !strings.HasPrefix(up.Addr.String(), "[::1]:") {
		t.Fatalf("upstream %s saw %+v", up.Addr, q)
	}
	if l := rec.learns(); len(l) != 2 || l[0].Addrs[0] != netip.MustParseAddr("2001:db8::10") {
		t.Fatalf("learnt %+v", l)
	}
}
