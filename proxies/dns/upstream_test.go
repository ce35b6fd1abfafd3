package dnsproxy

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// sources lists the source address of every UDP query the upstream saw.
func (s *authServer) sources(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, q := range s.queries() {
		if !q.TCP {
			out = append(out, q.From)
		}
	}
	return out
}

// askMiss asks for a name the cache cannot hold, so that it is forwarded.
func askMiss(t *testing.T, f *fixture, name string) *dns.Msg {
	t.Helper()
	return exchange(t, f.fe.UDP, question(name, dns.TypeA), false)
}

func TestUpstreamSocketsRotate(t *testing.T) {
	t.Run("after UpstreamSocketUses", func(t *testing.T) {
		f := newFixture(t, func(p *Proxy) {
			p.Limits.UpstreamSocketUses = 3
			p.Limits.CacheEntries = -1
		})
		for range 7 {
			wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
		}
		src := f.up.sources(t)
		if len(src) != 7 || src[0] != src[1] || src[1] != src[2] || src[3] != src[4] || src[4] != src[5] ||
			src[2] == src[3] || src[5] == src[6] || src[0] == src[3] || src[3] == src[6] {
			t.Fatalf("source ports %v: want three queries per socket, a new one after that", src)
		}
	})
	t.Run("a socket per query", func(t *testing.T) {
		f := newFixture(t, func(p *Proxy) {
			p.Limits.UpstreamSocketUses = 1
			p.Limits.CacheEntries = -1
		})
		for range 5 {
			wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
		}
		src := f.up.sources(t)
		if slices.Sort(src); len(slices.Compact(src)) != 5 {
			t.Fatalf("source ports %v: want one per query", f.up.sources(t))
		}
	})
	t.Run("after UpstreamSocketMaxAge", func(t *testing.T) {
		f := newFixture(t, func(p *Proxy) {
			p.Limits.UpstreamSocketMaxAge = 150 * time.Millisecond
			p.Limits.CacheEntries = -1
		})
		askMiss(t, f, "api.example.test.")
		askMiss(t, f, "api.example.test.")
		time.Sleep(200 * time.Millisecond)
		askMiss(t, f, "api.example.test.")
		src := f.up.sources(t)
		if len(src) != 3 || src[0] != src[1] || src[1] == src[2] {
			t.Fatalf("source ports %v: want the socket retired after its age", src)
		}
	})
}

// A socket whose exchange did not end in a matching answer never carries
// another query: whatever is still on its way cannot reach a later one.
func TestUpstreamSocketRetiredAfterFailure(t *testing.T) {
	f := newFixture(t, func(p *Proxy) {
		p.Limits.UpstreamTimeout = 200 * time.Millisecond
		p.Limits.CacheEntries = -1
	})
	late := make(chan struct{})
	var once sync.Once
	f.up.mu.Lock()
	f.up.respond = func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
		m := f.up.answer(r)
		switch r.Question[0].Name {
		case "short.example.test.":
			// Answer after the proxy gave up, with an answer that would
			// pass for the next query's if it reached that query's socket.
			time.Sleep(400 * time.Millisecond)
			defer once.Do(func() { close(late) })
			m.Question[0].Name = "api.example.test."
			rr, _ := dns.NewRR("api.example.test. 300 IN A 203.0.113.66")
			m.Answer = []dns.RR{rr}
		case "long.example.test.":
			m.Question[0].Name = "bank.example.test."
		}
		return m
	}
	f.up.mu.Unlock()

	wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
	if r := askMiss(t, f, "short.example.test."); r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("timed-out query: %v", r)
	}
	wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
	<-late
	time.Sleep(20 * time.Millisecond) // the late answer is on its way
	wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
	if r := askMiss(t, f, "long.example.test."); r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("mismatched answer: %v", r)
	}
	wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")

	src := f.up.sources(t)
	if len(src) != 6 || src[0] != src[1] || src[1] == src[2] || src[2] != src[3] || src[3] != src[4] || src[4] == src[5] {
		t.Fatalf("source ports %v: want a new socket after the timeout and after the mismatch, the same otherwise", src)
	}
}

// Datagrams with another ID are not the answer: they are skipped, and the
// answer that follows is taken; the socket stays in use.
func TestUpstreamOtherIDIgnored(t *testing.T) {
	f := newFixture(t, func(p *Proxy) { p.Limits.CacheEntries = -1 })
	f.up.mu.Lock()
	f.up.respond = func(w dns.ResponseWriter, r *dns.Msg) *dns.Msg {
		bogus := f.up.answer(r)
		bogus.Id++
		rr, _ := dns.NewRR("api.example.test. 300 IN A 203.0.113.66")
		bogus.Answer = []dns.RR{rr}
		_ = w.WriteMsg(bogus)
		return f.up.answer(r)
	}
	f.up.mu.Unlock()
	for range 2 {
		wantAnswers(t, askMiss(t, f, "api.example.test."), "api.example.test. A 192.0.2.10")
	}
	if src := f.up.sources(t); len(src) != 2 || src[0] != src[1] {
		t.Fatalf("source ports %v: want one socket", src)
	}
}

// Concurrent queries, answered out of order, each get their own answer.
func TestUpstreamConcurrentQueriesKeepTheirAnswers(t *testing.T) {
	f := newFixture(t, func(p *Proxy) {
		p.Limits.QueriesPerSecond = -1
		p.Limits.CacheEntries = -1
	})
	const n = 32
	for i := range n {
		f.up.add(t, fmt.Sprintf("c%d.store.example.test. 300 IN A 198.51.100.%d", i, i))
	}
	f.up.mu.Lock()
	f.up.respond = func(_ dns.ResponseWriter, r *dns.Msg) *dns.Msg {
		var i int
		_, _ = fmt.Sscanf(r.Question[0].Name, "c%d.", &i)
		time.Sleep(time.Duration(n-i) * time.Millisecond) // the last asked, the first answered
		return f.up.answer(r)
	}
	f.up.mu.Unlock()
	for round := range 3 {
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				name := fmt.Sprintf("c%d.store.example.test.", i)
				r := askMiss(t, f, name)
				if got := answerStrings(r); len(got) != 1 || got[0] != fmt.Sprintf("%s A 198.51.100.%d", name, i) {
					t.Errorf("round %d %s: %v", round, name, got)
				}
			})
		}
		wg.Wait()
	}
}

// The query written without miekg is the one miekg packs for the same
// message.
func TestAppendQueryIsMiekgsQuery(t *testing.T) {
	for _, tc := range []struct {
		name  string
		qtype uint16
		size  int
	}{
		{"api.example.test.", dns.TypeA, 1232},
		{"a.", dns.TypeAAAA, 512},
		{"x-y_z.0.store.example.test.", dns.TypeCNAME, 65535},
		{longName(), dns.TypeA, 4096},
	} {
		m := &dns.Msg{
			MsgHdr:   dns.MsgHdr{Id: 0xbeef, Opcode: dns.OpcodeQuery, RecursionDesired: true},
			Question: []dns.Question{{Name: tc.name, Qtype: tc.qtype, Qclass: dns.ClassINET}},
		}
		m.SetEdns0(uint16(tc.size), false)
		want, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		if got := appendQuery(nil, 0xbeef, tc.name, tc.qtype, tc.size); !slices.Equal(got, want) {
			t.Errorf("%s:\n got %x\nwant %x", tc.name, got, want)
		}
	}
}

// longName is a 253-character host name.
func longName() string {
	var b []byte
	for len(b) < 240 {
		b = append(b, "abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz."...)
	}
	b = b[:240]
	b = append(b, "0123456789ab."...)
	return string(b)
}

// FuzzReadAnswer checks the proxy's own reading of upstream answers against
// miekg's: whatever readAnswer accepts, miekg reads as an answer to the
// same question, and when miekg reads the whole message, readAnswer keeps
// exactly the records that the miekg path (exchangeOnce, forward) keeps,
// with the same rcode.
func FuzzReadAnswer(f *testing.F) {
	q := func(name string, qtype uint16) *query {
		qq, v := parseQuery(appendQuery(nil, 1, name, qtype, 1232))
		if v != nil {
			f.Fatalf("%s: %+v", name, v)
		}
		return &qq
	}
	questions := []*query{q("api.example.test.", dns.TypeA), q("www.example.test.", dns.TypeAAAA), q("x.store.example.test.", dns.TypeCNAME)}
	seed := func(qi byte, rrs []string, ns []string, extra []string, mod func(*dns.Msg)) {
		qq := questions[qi]
		m := new(dns.Msg)
		m.SetQuestion(qq.canon, qq.qtype)
		m.Response = true
		for _, list := range []struct {
			dst *[]dns.RR
			src []string
		}{{&m.Answer, rrs}, {&m.Ns, ns}, {&m.Extra, extra}} {
			for _, s := range list.src {
				rr, err := dns.NewRR(s)
				if err != nil {
					f.Fatal(err)
				}
				*list.dst = append(*list.dst, rr)
			}
		}
		if mod != nil {
			mod(m)
		}
		for _, compress := range []bool{false, true} {
			m.Compress = compress
			b, err := m.Pack()
			if err != nil {
				f.Fatal(err)
			}
			f.Add(qi, b)
		}
	}
	seed(0, []string{"api.example.test. 300 IN A 192.0.2.10", "api.example.test. 300 IN TXT \"x\""}, nil, nil, nil)
	seed(0, []string{"api.example.test. 60 IN CNAME a.cdn.example.test.", "a.cdn.example.test. 30 IN A 192.0.2.1",
		"evil.attacker.test. 30 IN A 203.0.113.1"}, nil, []string{"evil.attacker.test. 30 IN A 203.0.113.1"}, nil)
	seed(1, []string{"WWW.Example.Test. 300 IN AAAA 2001:db8::1", `odd\.name\000.example.test. 1 IN AAAA ::1`}, nil, nil,
		func(m *dns.Msg) { m.SetEdns0(1232, true) })
	seed(1, nil, []string{"example.test. 300 IN SOA ns.example.test. h.example.test. 1 2 3 4 60", "example.test. 300 IN NS ns.example.test."}, nil,
		func(m *dns.Msg) { m.Rcode = dns.RcodeNameError })
	seed(2, []string{"x.store.example.test. 60 IN CNAME y.store.example.test."}, nil, nil, func(m *dns.Msg) { m.Truncated = true })
	seed(0, nil, nil, nil, func(m *dns.Msg) { m.SetEdns0(1232, false); m.Rcode = dns.RcodeBadVers })
	seed(0, nil, nil, nil, func(m *dns.Msg) { m.Rcode = dns.RcodeRefused })
	seed(0, nil, nil, nil, func(m *dns.Msg) { m.Question[0].Name = "bank.example.test." })

	f.Fuzz(func(t *testing.T, qi byte, msg []byte) {
		if len(msg) < headerLen {
			return // exchange never passes these on
		}
		qq := questions[int(qi)%len(questions)]
		got, truncated, err := readAnswer(msg, qq)

		ref := new(dns.Msg)
		refErr := ref.Unpack(msg)
		refMatch := ref.Response && ref.Opcode == dns.OpcodeQuery && len(ref.Question) == 1 &&
			asciiEqualFold(ref.Question[0].Name, qq.canon) && ref.Question[0].Qtype == qq.qtype && ref.Question[0].Qclass == dns.ClassINET
		if err == nil && refErr == nil && !refMatch {
			t.Fatalf("accepted an answer to another question: %v", ref)
		}
		if refErr != nil || !refMatch || truncated || ref.Truncated {
			return
		}
		refOK := ref.Rcode == dns.RcodeSuccess || ref.Rcode == dns.RcodeNameError
		if (err == nil) != refOK {
			t.Fatalf("readAnswer: %v; miekg reads rcode %s", err, dns.RcodeToString[ref.Rcode])
		}
		if err != nil {
			return
		}
		var want, wantNS []string
		for _, rr := range ref.Answer {
			if h := rr.Header(); keepAnswer(h.Rrtype, h.Class, qq.qtype) {
				want = append(want, rr.String())
			}
		}
		for _, rr := range ref.Ns {
			if h := rr.Header(); keepAuthority(h.Rrtype, h.Class) {
				wantNS = append(wantNS, rr.String())
			}
		}
		var have, haveNS []string
		for _, rr := range got.answer {
			have = append(have, rr.String())
		}
		for _, rr := range got.ns {
			haveNS = append(haveNS, rr.String())
		}
		if got.rcode != ref.Rcode || !slices.Equal(have, want) || !slices.Equal(haveNS, wantNS) {
			t.Fatalf("readAnswer: rcode %d answer %q ns %q\nmiekg:      rcode %d answer %q ns %q", got.rcode, have, haveNS, ref.Rcode, want, wantNS)
		}
		for i, rr := range got.answer {
			if *rr.Header() != *ref.Answer[slices.IndexFunc(ref.Answer, func(r dns.RR) bool { return r.String() == want[i] })].Header() {
				t.Fatalf("header of %v differs from miekg's", rr)
			}
		}
	})
}

// The pool keeps sockets per upstream: two upstreams never share one.
func TestUpstreamPoolPerUpstream(t *testing.T) {
	p := newUpstreamPool(Limits{}.withDefaults())
	a, b := netip.MustParseAddrPort("127.0.0.1:1053"), netip.MustParseAddrPort("127.0.0.1:2053")
	now := time.Now()
	sa, err := p.get(a, now)
	if err != nil {
		t.Fatal(err)
	}
	p.put(a, sa, now)
	sb, err := p.get(b, now)
	if err != nil {
		t.Fatal(err)
	}
	defer sb.conn.Close()
	if sb == sa || sb.conn.RemoteAddr().String() != b.String() {
		t.Fatalf("socket for %v is connected to %v", b, sb.conn.RemoteAddr())
	}
	if again, _ := p.get(a, now); again != sa {
		t.Fatal("the idle socket of the first upstream was not reused")
	} else {
		again.conn.Close()
	}
}
