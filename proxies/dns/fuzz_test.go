package dnsproxy

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The fuzz policy, and an allow check written independently of the proxy's
// matcher: a string that the proxy forwards must pass it.
var (
	fuzzAllow = []string{"api.example.test", "*.store.example.test", "www.example.test", "*.cdn.example.test"}
	fuzzFQDN  = []string{"api.example.test", "www.example.test"}
	fuzzUp    = netip.MustParseAddrPort("127.0.0.1:53")
)

func fuzzAllowed(name string) bool {
	for _, c := range []byte(name) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	switch {
	case name == "api.example.test." || name == "www.example.test.":
		return true
	case strings.HasSuffix(name, ".store.example.test.") && len(name) > len(".store.example.test."):
		return true
	case strings.HasSuffix(name, ".cdn.example.test.") && len(name) > len(".cdn.example.test."):
		return true
	}
	return false
}

// fuzzUpstream answers like a resolver would, or with the message that the
// fuzzer supplies (with its ID and question fixed up when fix is set, so that
// the sanitiser, not only the matcher, sees it).
func fuzzUpstream(t *testing.T, upstream []byte) func(context.Context, netip.AddrPort, *dns.Msg, bool) (*dns.Msg, error) {
	return func(_ context.Context, _ netip.AddrPort, m *dns.Msg, _ bool) (*dns.Msg, error) {
		if len(m.Question) != 1 {
			t.Fatalf("forwarded %d questions", len(m.Question))
		}
		q := m.Question[0]
		if !fuzzAllowed(q.Name) || q.Qclass != dns.ClassINET ||
			(q.Qtype != dns.TypeA && q.Qtype != dns.TypeAAAA && q.Qtype != dns.TypeCNAME) {
			t.Fatalf("forwarded a query outside the policy: %s %s %s", q.Name, dns.ClassToString[q.Qclass], dns.TypeToString[q.Qtype])
		}
		if m.Opcode != dns.OpcodeQuery || len(m.Answer)+len(m.Ns) != 0 || len(m.Extra) != 1 || len(m.IsEdns0().Option) != 0 {
			t.Fatalf("forwarded query carries more than the question: %v", m)
		}
		r := new(dns.Msg)
		if len(upstream) > 0 && r.Unpack(upstream[1:]) == nil {
			if upstream[0]&1 == 0 {
				r.Id, r.Response, r.Opcode, r.Question = m.Id, true, dns.OpcodeQuery, m.Question
			}
			return r, nil
		}
		r.SetReply(m)
		cname, _ := dns.NewRR(q.Name + " 60 IN CNAME edge.cdn.example.test.")
		a, _ := dns.NewRR("edge.cdn.example.test. 30 IN A 192.0.2.1")
		evil, _ := dns.NewRR("evil.attacker.test. 30 IN A 203.0.113.1")
		r.Answer = []dns.RR{cname, a, evil}
		r.Extra = []dns.RR{evil}
		return r, nil
	}
}

func FuzzHandle(f *testing.F) {
	// testdata/fuzz/FuzzHandle holds the seed corpus (see TestWriteFuzzSeeds).
	f.Fuzz(func(t *testing.T, msg, upstream []byte, tcp bool) {
		p := &Proxy{
			Exchange: fuzzUpstream(t, upstream),
			Logger:   slog.New(slog.DiscardHandler),
			Limits:   Limits{QueriesPerSecond: -1},
			OnLearn: func(_, name string, addrs []netip.Addr, ttl time.Duration) {
				if name != "api.example.test" && name != "www.example.test" {
					t.Fatalf("learnt for %q", name)
				}
				if len(addrs) == 0 || ttl < 30*time.Second || ttl > time.Hour {
					t.Fatalf("learnt %v for %v", addrs, ttl)
				}
			},
		}
		p.SetSandbox("fuzz", &Config{Upstream: fuzzUp, Allow: fuzzAllow, FQDNNames: fuzzFQDN})
		resp, ok := p.Handle(context.Background(), "fuzz", msg, tcp)
		if !ok {
			if len(msg) >= headerLen && msg[2]&0x80 == 0 {
				t.Fatalf("dropped a query with a header and QR clear")
			}
			return
		}
		if len(resp) < headerLen || resp[0] != msg[0] || resp[1] != msg[1] || resp[2]&0x80 == 0 {
			t.Fatalf("response %x does not answer %x", resp, msg)
		}
		if !tcp && len(resp) > 1232 {
			t.Fatalf("udp response of %d bytes", len(resp))
		}
		r := new(dns.Msg)
		if err := r.Unpack(resp); err != nil {
			t.Fatalf("response does not parse: %v", err)
		}
		for _, rr := range append(r.Answer, r.Extra...) {
			n := strings.ToLower(rr.Header().Name)
			if rr.Header().Rrtype != dns.TypeOPT && !fuzzAllowed(n) {
				t.Fatalf("response shows a record of a name outside the policy: %v", rr)
			}
		}
	})
}

// TestWriteFuzzSeeds regenerates testdata/fuzz/FuzzHandle from the hardening
// cases and a few well-formed exchanges when CLEANWALL_WRITE_FUZZ_SEEDS=1.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("CLEANWALL_WRITE_FUZZ_SEEDS") != "1" {
		t.Skip("set CLEANWALL_WRITE_FUZZ_SEEDS=1 to regenerate the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzHandle")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, msg, upstream []byte, tcp bool) {
		if len(msg) >= 2 {
			msg = append([]byte{0x12, 0x34}, msg[2:]...) // stable IDs: stable files
		}
		s := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n[]byte(%q)\nbool(%v)\n", msg, upstream, tcp)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	slug := strings.NewReplacer(" ", "-", "/", "-").Replace
	for _, tc := range hardeningCases() {
		write("harden-"+slug(tc.name), tc.msg, nil, false)
	}
	withEDNS := func(m *dns.Msg) *dns.Msg { m.SetEdns0(4096, false); return m }
	up := func(fix byte, rrs ...string) []byte {
		m := new(dns.Msg)
		m.Response = true
		for _, s := range rrs {
			rr, err := dns.NewRR(s)
			if err != nil {
				t.Fatal(err)
			}
			m.Answer = append(m.Answer, rr)
		}
		return append([]byte{fix}, mustPack(t, m)...)
	}
	write("ok-api-a", mustPack(t, question("api.example.test.", dns.TypeA)), nil, false)
	write("ok-www-a-edns-tcp", mustPack(t, withEDNS(question("WWW.example.test.", dns.TypeA))), nil, true)
	write("ok-store-aaaa", mustPack(t, question("x.y.store.example.test.", dns.TypeAAAA)), nil, false)
	write("ok-cname", mustPack(t, question("www.example.test.", dns.TypeCNAME)), nil, false)
	write("denied-txt-tunnel", mustPack(t, question("6578666c.attacker.test.", dns.TypeTXT)), nil, false)
	write("upstream-chain-to-disallowed", mustPack(t, question("api.example.test.", dns.TypeA)),
		up(0, "api.example.test. 60 IN CNAME a.cdn.example.test.", "a.cdn.example.test. 60 IN CNAME evil.attacker.test.",
			"evil.attacker.test. 60 IN A 203.0.113.1"), false)
	write("upstream-loop", mustPack(t, question("api.example.test.", dns.TypeA)),
		up(0, "api.example.test. 60 IN CNAME a.cdn.example.test.", "a.cdn.example.test. 60 IN CNAME api.example.test."), false)
	write("upstream-spoofed", mustPack(t, question("api.example.test.", dns.TypeA)),
		up(1, "api.example.test. 60 IN A 203.0.113.1"), false)
	write("upstream-odd-names", mustPack(t, withEDNS(question("api.example.test.", dns.TypeA))),
		up(0, `api.example.test. 60 IN CNAME a\.b.cdn.example.test.`, `a\.b.cdn.example.test. 60 IN A 203.0.113.1`,
			"api.example.test. 0 IN A 0.0.0.0", "API.EXAMPLE.TEST. 4294967295 IN A 192.0.2.9"), false)
}
