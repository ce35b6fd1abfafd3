package dnsproxy

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	cwpolicy "github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

type countingReport struct{ out, in atomic.Int64 }

func (r *countingReport) Bytes(out, in int64) { r.out.Add(out); r.in.Add(in) }
func (r *countingReport) Deny(proxies.Denial) {}

// The proxy as the firewall calls it: a UDP query is a packet flow of its
// own, answered through reply; a TCP connection is a stream.
func TestAsPrivacyProxy(t *testing.T) {
	f := newFixture(t, nil)
	rep := &countingReport{}
	flow := &proxies.Flow{Sandbox: "c", Attachment: sandboxID, Report: rep}
	q, err := question("api.example.test.", dns.TypeA).Pack()
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 1)
	pf, err := f.p.OpenPacketFlow(context.Background(), flow, func(b []byte) error {
		got <- append([]byte(nil), b...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pf.Datagram(q)
	select {
	case <-pf.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the query flow did not end")
	}
	if res := pf.Result(); res.End != proxies.EndClosed {
		t.Fatalf("result %+v", res)
	}
	var m dns.Msg
	if err := m.Unpack(<-got); err != nil {
		t.Fatal(err)
	}
	wantAnswers(t, &m, "api.example.test. A 192.0.2.10")
	if rep.out.Load() != int64(len(q)) || rep.in.Load() == 0 {
		t.Fatalf("bytes out %d in %d", rep.out.Load(), rep.in.Load())
	}

	// TCP: ServeStream answers until the client closes.
	client, server := net.Pipe()
	done := make(chan proxies.Result, 1)
	go func() { done <- f.p.ServeStream(context.Background(), server, flow) }()
	c := &dns.Conn{Conn: client}
	if err := c.WriteMsg(question("api.example.test.", dns.TypeAAAA)); err != nil {
		t.Fatal(err)
	}
	r, err := c.ReadMsg()
	if err != nil {
		t.Fatal(err)
	}
	wantAnswers(t, r, "api.example.test. AAAA 2001:db8::10")
	client.Close()
	if res := <-done; res.End != proxies.EndClosed {
		t.Fatalf("stream result %+v", res)
	}
	if _, err := f.p.Configure(&cwpolicy.Rule{}); err == nil {
		t.Fatal("the DNS proxy configured an egress rule")
	}
}

func TestConfigFromPolicy(t *testing.T) {
	doc := `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: t}
spec:
  dns: {upstream: 198.51.100.53:53, allow: [api.example.test, "*.cdn.example.test"], queryTypes: [A]}
  egress:
    - {name: a, to: [{fqdn: api.example.test}], ports: [{port: 443}], mode: open}
    - {name: b, to: [{fqdn: api.example.test}, {fqdn: x.cdn.example.test}], ports: [{port: 80}], mode: open}
`
	p, err := cwpolicy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := cwpolicy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	cfg := ConfigFromPolicy(c)
	if cfg == nil || cfg.Upstream != netip.MustParseAddrPort("198.51.100.53:53") || len(cfg.Allow) != 2 ||
		len(cfg.QueryTypes) != 1 || cfg.QueryTypes[0] != dns.TypeA {
		t.Fatalf("config %+v", cfg)
	}
	if len(cfg.FQDNNames) != 2 || cfg.FQDNNames[0] != "api.example.test" || cfg.FQDNNames[1] != "x.cdn.example.test" {
		t.Fatalf("fqdn names %v: each once, sorted", cfg.FQDNNames)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	p.Spec.DNS = nil
	p.Spec.Egress = nil
	if c, err = cwpolicy.Compile(p); err != nil {
		t.Fatal(err)
	}
	if ConfigFromPolicy(c) != nil {
		t.Fatal("a policy without spec.dns got a DNS config")
	}
}
