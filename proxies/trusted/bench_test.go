package trusted

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	tcpproxy "github.com/cleanwall/cleanwall/proxies/tcp"
)

// Benchmarks, over loopback, in one run and interleaved (each round runs
// every side once, rotating which goes first, so that a shared machine's
// noise falls on all of them):
//
//	go test ./proxies/trusted -run '^$' -bench Ratio -benchtime 2s -count 5
//
//   - keepalive: 100 small HTTP requests on one sandbox connection,
//     through trusted TLS origination (trusted.TCP to a TLS 1.3 remote),
//     against open mode's HTTP proxy (proxies/http) and open mode's TCP
//     relay (proxies/tcp) to the same remote in clear. Metrics: trusted's
//     requests/s over each ("trusted/open-http", "trusted/open-tcp").
//   - per-flow: one request per sandbox connection, so each one pays the
//     proxy's dial and, for trusted, a TLS handshake (resumed, as
//     deployed), against the same two.
//   - resumption: one request per flow through trusted, session
//     resumption on against off ("resumed/full": handshakes/s ratio;
//     "resumed-full-us": the time per flow resumption saves, negative).
//   - kex: full handshakes (no resumption) offering X25519MLKEM768 first,
//     as deployed, against X25519 alone ("mlkem/x25519": handshakes/s
//     ratio; "mlkem-x25519-us": the hybrid's extra time per flow).
//
// The remote's work is in the timings (it runs in this process): for TLS
// it is the server half of each handshake, which a real remote pays too.

// benchRemote is a minimal HTTP/1.1 server: every request gets a 2-byte
// answer.
func benchRemote(b *testing.B, cfg *tls.Config) netip.AddrPort {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	if cfg != nil {
		ln = tls.NewListener(ln, cfg)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Length", "2")
		w.Write([]byte("ok"))
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return addr
}

// benchProxy serves every connection to its listener as a flow of rule
// to dst.
func benchProxy(b *testing.B, p proxies.StreamProxy, rule *policy.Rule, dst netip.AddrPort) string {
	cfg, err := p.Configure(rule)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f := &proxies.Flow{Sandbox: "bench", Rule: rule, Config: cfg, Dst: dst, Hosts: []string{dst.Addr().String()}, Report: &reporter{}}
			go p.ServeStream(context.Background(), c, f)
		}
	}()
	return ln.Addr().String()
}

func compileOpen(b *testing.B, protocol string) *policy.Rule {
	block := `{protocol: tcp}`
	if protocol == "http" {
		block = `{protocol: http, http: {rules: [{methods: [GET], paths: ["/**"]}]}}`
	}
	p, err := policy.Parse([]byte(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: bench}
spec:
  egress:
    - name: open
      to: [{cidr: 127.0.0.1/32}]
      ports: [{port: 80}]
      mode: open
      open: ` + block + `
`))
	if err != nil {
		b.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		b.Fatal(err)
	}
	return c.Rules[0]
}

// requests sends n GET requests on one new connection to addr, naming
// host, and reads every answer.
func requests(b *testing.B, addr, host string, n int) {
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	req := []byte("GET /v1/x HTTP/1.1\r\nHost: " + host + "\r\n\r\n")
	for range n {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != 200 {
			b.Fatalf("%d %v", resp.StatusCode, err)
		}
	}
}

// ratioRun times each side, rotating which goes first.
type ratioRun struct {
	wall []time.Duration
}

func (r *ratioRun) round(i int, sides []func()) {
	if r.wall == nil {
		r.wall = make([]time.Duration, len(sides))
	}
	for k := range sides {
		s := (i + k) % len(sides)
		t0 := time.Now()
		sides[s]()
		r.wall[s] += time.Since(t0)
	}
}

// ratio is side num's throughput over side den's.
func (r *ratioRun) ratio(num, den int) float64 { return float64(r.wall[den]) / float64(r.wall[num]) }

// perSecond is side i's operations per second, ops per round.
func (r *ratioRun) perSecond(i int, ops int, rounds int) float64 {
	return float64(ops*rounds) / r.wall[i].Seconds()
}

func BenchmarkRatio(b *testing.B) {
	k := newPKI(b)
	tlsRemote := benchRemote(b, serverConfig(k.server, nil))
	plainRemote := benchRemote(b, nil)
	trustedRule := compile(b, tlsBlock(`serverName: `+serverName+`, spkiSHA256: ["`+k.server.pin()+`"]`))
	plainHost := plainRemote.String()
	quiet := func(p *TCP) *TCP { p.Logger = testLog(b); return p }

	versus := func(b *testing.B, perFlow, flows int) {
		px := []string{
			benchProxy(b, quiet(&TCP{}), trustedRule, tlsRemote),
			benchProxy(b, &httpproxy.Proxy{}, compileOpen(b, "http"), plainRemote),
			benchProxy(b, &tcpproxy.Proxy{}, compileOpen(b, "tcp"), plainRemote),
		}
		hosts := []string{serverName, plainHost, plainHost}
		var run ratioRun
		rounds := 0
		for i := 0; b.Loop(); i++ {
			sides := make([]func(), 3)
			for s := range sides {
				sides[s] = func() {
					for range flows {
						requests(b, px[s], hosts[s], perFlow)
					}
				}
			}
			run.round(i, sides)
			rounds++
		}
		b.ReportMetric(run.ratio(0, 1), "trusted/open-http")
		b.ReportMetric(run.ratio(0, 2), "trusted/open-tcp")
		for s, name := range []string{"trusted", "open-http", "open-tcp"} {
			b.ReportMetric(run.perSecond(s, perFlow*flows, rounds), name+"-req/s")
		}
	}
	b.Run("keepalive", func(b *testing.B) { versus(b, 100, 1) })
	b.Run("per-flow", func(b *testing.B) { versus(b, 1, 20) })

	handshakes := func(b *testing.B, a, c *TCP, names [2]string, metric string) {
		px := []string{benchProxy(b, quiet(a), trustedRule, tlsRemote), benchProxy(b, quiet(c), trustedRule, tlsRemote)}
		const flows = 20
		var run ratioRun
		rounds := 0
		for i := 0; b.Loop(); i++ {
			run.round(i, []func(){
				func() {
					for range flows {
						requests(b, px[0], serverName, 1)
					}
				},
				func() {
					for range flows {
						requests(b, px[1], serverName, 1)
					}
				},
			})
			rounds++
		}
		b.ReportMetric(run.ratio(0, 1), metric)
		for s, name := range names {
			b.ReportMetric(run.perSecond(s, flows, rounds), name+"-hs/s")
		}
		per := func(s int) float64 { return run.wall[s].Seconds() / float64(flows*rounds) * 1e6 }
		b.ReportMetric(per(0)-per(1), names[0]+"-"+names[1]+"-us")
	}
	b.Run("resumption", func(b *testing.B) {
		handshakes(b, &TCP{}, &TCP{SessionCacheSize: -1}, [2]string{"resumed", "full"}, "resumed/full")
	})
	b.Run("kex", func(b *testing.B) {
		handshakes(b, &TCP{SessionCacheSize: -1}, &TCP{SessionCacheSize: -1, curves: []tls.CurveID{tls.X25519}},
			[2]string{"mlkem", "x25519"}, "mlkem/x25519")
	})
}

// TestBenchSides checks that the benchmark measures what it says: the
// kex sides negotiate the group they are named for, the resumption
// sides resume or not.
func TestBenchSides(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, nil), true)
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, spkiSHA256: ["`+k.server.pin()+`"]`))
	resuming := &TCP{}
	for i, tc := range []struct {
		p       *TCP
		curve   tls.CurveID
		resumed bool
	}{
		{&TCP{SessionCacheSize: -1}, tls.X25519MLKEM768, false},
		{&TCP{SessionCacheSize: -1}, tls.X25519MLKEM768, false},
		{&TCP{SessionCacheSize: -1, curves: []tls.CurveID{tls.X25519}}, tls.X25519, false},
		{resuming, tls.X25519MLKEM768, false},
		{resuming, tls.X25519MLKEM768, true},
	} {
		sb, s := serveFlow(t, context.Background(), tc.p, rule, configureOK(t, tc.p, rule), srv.addr())
		if _, _, err := get(t, sb); err != nil {
			t.Fatal(err)
		}
		sb.Close()
		s.wait(t)
		if c := srv.waitConn(t, i+1); c.curve != tc.curve || c.resumed != tc.resumed {
			t.Errorf("side %d: group %v, resumed %v; want %v, %v", i, c.curve, c.resumed, tc.curve, tc.resumed)
		}
	}
}
