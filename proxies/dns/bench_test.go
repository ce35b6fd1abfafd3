package dnsproxy

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// BenchmarkQuery compares, over loopback UDP, a client asking the test
// upstream directly with the same client asking through the proxy, on the
// cache-miss path (cache disabled: every query is forwarded) and on the
// cache-hit path. "serial" is one client waiting for each answer (latency
// bound); "parallel" is GOMAXPROCS clients, each on its own socket. Each
// result reports queries/s. Run with
//
//	go test -run '^$' -bench BenchmarkQuery -benchtime 2s ./proxies/dns/
func BenchmarkQuery(b *testing.B) {
	up := newAuthServer(b, "api.example.test. 300 IN A 192.0.2.10")
	cfg := &Config{Upstream: up.Addr, Allow: []string{"api.example.test"}}
	proxy := func(cacheEntries int) string {
		p := &Proxy{
			Logger: slog.New(slog.DiscardHandler),
			Limits: Limits{QueriesPerSecond: -1, CacheEntries: cacheEntries},
		}
		p.SetSandbox("bench", cfg)
		return serveProxy(b, p, "bench").UDP
	}
	targets := []struct {
		name string
		addr string
	}{
		{"direct", up.Addr.String()},
		{"proxy-miss", proxy(-1)},
		{"proxy-hit", proxy(0)},
	}
	for _, mode := range []string{"serial", "parallel"} {
		for _, tg := range targets {
			b.Run(mode+"/"+tg.name, func(b *testing.B) {
				if mode == "serial" {
					benchSerial(b, tg.addr)
				} else {
					benchParallel(b, tg.addr)
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
			})
		}
	}
}

func benchClient(b *testing.B, addr string) (*dns.Client, *dns.Conn) {
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	conn, err := c.Dial(addr)
	if err != nil {
		b.Fatal(err)
	}
	return c, conn
}

func benchOne(c *dns.Client, conn *dns.Conn, m *dns.Msg) error {
	m.Id = dns.Id()
	r, _, err := c.ExchangeWithConn(m, conn)
	if err == nil && (r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1) {
		err = fmt.Errorf("unexpected answer: %v", r)
	}
	return err
}

func benchSerial(b *testing.B, addr string) {
	c, conn := benchClient(b, addr)
	defer conn.Close()
	m := question("api.example.test.", dns.TypeA)
	if err := benchOne(c, conn, m); err != nil { // warms the cache on the hit path
		b.Fatal(err)
	}
	for b.Loop() {
		if err := benchOne(c, conn, m); err != nil {
			b.Fatal(err)
		}
	}
}

func benchParallel(b *testing.B, addr string) {
	c, conn := benchClient(b, addr)
	err := benchOne(c, conn, question("api.example.test.", dns.TypeA))
	conn.Close()
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, conn := benchClient(b, addr)
		defer conn.Close()
		m := question("api.example.test.", dns.TypeA)
		for pb.Next() {
			if err := benchOne(c, conn, m); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
