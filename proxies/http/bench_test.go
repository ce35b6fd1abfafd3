package httpproxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// BenchmarkProxyRequest times a small GET through the proxy and the same
// GET direct to the same upstream, interleaved in every iteration so both
// see the same machine state, and reports both latencies and their ratio
// (proxy/direct). keepalive reuses one connection per path; newconn opens
// a connection per request (the proxy then also dials the upstream).
//
//	go test -run '^$' -bench BenchmarkProxyRequest -benchtime 5000x -count 5 ./proxies/http/
func BenchmarkProxyRequest(b *testing.B) {
	for _, mode := range []struct {
		name      string
		keepAlive bool
	}{{"keepalive", true}, {"newconn", false}} {
		b.Run(mode.name, func(b *testing.B) {
			h := newHarness(b, policyRules())
			h.up.quiet = true
			h.up.rawCap = 0
			client := func(addr string) *http.Client {
				return &http.Client{Transport: &http.Transport{
					DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
						return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
					},
					DisableKeepAlives:  !mode.keepAlive,
					DisableCompression: true,
				}}
			}
			direct, proxied := client(h.dst.String()), client(h.addr)
			url := h.url("/v1/results/bench")
			get := func(c *http.Client) time.Duration {
				start := time.Now()
				resp, err := c.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
				return time.Since(start)
			}
			for range 50 { // warm up connections, pools and caches
				get(direct)
				get(proxied)
			}
			var dDirect, dProxy time.Duration
			b.ResetTimer()
			for i := range b.N {
				if i%2 == 0 {
					dDirect += get(direct)
					dProxy += get(proxied)
				} else {
					dProxy += get(proxied)
					dDirect += get(direct)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(dDirect.Nanoseconds())/float64(b.N), "direct-ns/req")
			b.ReportMetric(float64(dProxy.Nanoseconds())/float64(b.N), "proxy-ns/req")
			b.ReportMetric(float64(dProxy)/float64(dDirect), "proxy/direct")
		})
	}
}
