package trusted

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// pki is a test's certificates and their files.
type pki struct {
	dir                string
	ca, other, clients *authority
	server, expired    *leaf
	client             *leaf
	caFile, otherFile  string
	certFile, keyFile  string
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	p := &pki{dir: t.TempDir()}
	p.ca = newAuthority(t, "partner CA")
	p.other = newAuthority(t, "someone else's CA")
	p.clients = newAuthority(t, "clean room clients")
	p.server = p.ca.issue(t, "partner", leafOpts{names: []string{serverName, "127.0.0.1"}})
	p.expired = p.ca.issue(t, "partner", leafOpts{names: []string{serverName, "127.0.0.1"},
		notBefore: time.Now().Add(-48 * time.Hour), notAfter: time.Now().Add(-24 * time.Hour)})
	p.client = p.clients.issue(t, "clean-room-1", leafOpts{client: true})
	p.caFile = writeFile(t, p.dir, "ca.pem", p.ca.pem)
	p.otherFile = writeFile(t, p.dir, "other-ca.pem", p.other.pem)
	p.certFile = writeFile(t, p.dir, "client.pem", p.client.certPEM)
	p.keyFile = writeFile(t, p.dir, "client.key", p.client.keyPEM)
	return p
}

// serverConfig is a remote presenting cert; clientCAs, when set, makes it
// require a client certificate issued by them.
func serverConfig(cert *leaf, clientCAs *authority) *tls.Config {
	c := &tls.Config{Certificates: []tls.Certificate{cert.tls}}
	if clientCAs != nil {
		pool := x509.NewCertPool()
		pool.AddCert(clientCAs.cert)
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return c
}

func tlsBlock(fields string) string { return `{tls: {` + fields + `}}` }

// TestTCPVerifiedRemote: a remote that passes trusted.tls gets the
// sandbox's plain HTTP request over TLS 1.3 with the hybrid group and the
// rule's SNI, and the sandbox gets its answer in plain.
func TestTCPVerifiedRemote(t *testing.T) {
	k := newPKI(t)
	for _, tc := range []struct {
		name, tls string
	}{
		{"ca", `serverName: ` + serverName + `, caFile: ` + k.caFile},
		{"spki pin", `serverName: ` + serverName + `, spkiSHA256: ["` + k.server.pin() + `"]`},
		{"ca and pin of the CA", `serverName: ` + serverName + `, caFile: ` + k.caFile + `, spkiSHA256: ["` + (&leaf{cert: k.ca.cert}).pin() + `"]`},
		{"mTLS", `serverName: ` + serverName + `, caFile: ` + k.caFile + `, clientCertFile: ` + k.certFile + `, clientKeyFile: ` + k.keyFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var clients *authority
			if strings.Contains(tc.tls, "clientCertFile") {
				clients = k.clients
			}
			srv := startTLSServer(t, serverConfig(k.server, clients), true)
			p := &TCP{Logger: testLog(t)}
			rule := compile(t, tlsBlock(tc.tls))
			sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
			resp, body, err := get(t, sb)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 200 || body != "ok:hello "+canary {
				t.Fatalf("got %d %q", resp.StatusCode, body)
			}
			sb.Close()
			res := s.wait(t)
			if res.End != proxies.EndClosed {
				t.Errorf("result %+v, want closed", res)
			}
			c := srv.waitConn(t, 1)
			if c.version != tls.VersionTLS13 || c.curve != tls.X25519MLKEM768 || c.sni != serverName {
				t.Errorf("negotiated version %x, group %v, SNI %q; want TLS 1.3, X25519MLKEM768, %s", c.version, c.curve, c.sni, serverName)
			}
			if clients != nil && c.clientCN != "clean-room-1" {
				t.Errorf("client certificate %q, want clean-room-1", c.clientCN)
			}
			d, out, in := s.rep.get()
			if len(d) != 0 || out == 0 || in == 0 {
				t.Errorf("denials %+v, bytes %d out %d in", d, out, in)
			}
		})
	}
}

// TestTCPRefusals: each way a remote fails trusted.tls refuses the flow
// with its reason: an HTTP sandbox gets a 502 naming it, any other a
// reset; the denial is reported, the flow counted under the reason, and
// the remote's application never read a byte.
func TestTCPRefusals(t *testing.T) {
	k := newPKI(t)
	for _, tc := range []struct {
		name    string
		server  *tls.Config
		tls     string
		reason  string
		options func(*TCP)
	}{
		{"wrong pin", serverConfig(k.server, nil), `serverName: ` + serverName + `, spkiSHA256: ["` + k.client.pin() + `"]`, ReasonPin, nil},
		{"ca and wrong pin", serverConfig(k.server, nil), `serverName: ` + serverName + `, caFile: ` + k.caFile + `, spkiSHA256: ["` + k.client.pin() + `"]`, ReasonPin, nil},
		{"wrong ca", serverConfig(k.server, nil), `serverName: ` + serverName + `, caFile: ` + k.otherFile, ReasonCA, nil},
		{"wrong name", serverConfig(k.server, nil), `serverName: other.example.test, caFile: ` + k.caFile, ReasonName, nil},
		{"wrong name, pin only", serverConfig(k.server, nil), `serverName: other.example.test, spkiSHA256: ["` + k.server.pin() + `"]`, ReasonName, nil},
		{"expired", serverConfig(k.expired, nil), `serverName: ` + serverName + `, caFile: ` + k.caFile, ReasonExpired, nil},
		{"expired, pin only", serverConfig(k.expired, nil), `serverName: ` + serverName + `, spkiSHA256: ["` + k.expired.pin() + `"]`, ReasonExpired, nil},
		{"no client certificate", serverConfig(k.server, k.clients), `serverName: ` + serverName + `, caFile: ` + k.caFile, ReasonClientCert, nil},
		{"client certificate of another CA", serverConfig(k.server, k.other), `serverName: ` + serverName + `, caFile: ` + k.caFile + `, clientCertFile: ` + k.certFile + `, clientKeyFile: ` + k.keyFile, ReasonClientCert, nil},
		{"tls 1.2 remote", func() *tls.Config { c := serverConfig(k.server, nil); c.MaxVersion = tls.VersionTLS12; return c }(), `serverName: ` + serverName + `, caFile: ` + k.caFile, ReasonTLS, nil},
	} {
		for _, sandbox := range []string{"http", "tcp"} {
			t.Run(tc.name+"/"+sandbox, func(t *testing.T) {
				srv := startTLSServer(t, tc.server, sandbox == "http")
				p := &TCP{Logger: testLog(t)}
				rule := compile(t, tlsBlock(tc.tls))
				sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
				if sandbox == "http" {
					resp, _, err := get(t, sb)
					if err != nil {
						t.Fatalf("the HTTP sandbox got no answer: %v", err)
					}
					if resp.StatusCode != 502 || resp.Header.Get("Cleanwall-Reason") != tc.reason {
						t.Fatalf("got %d, Cleanwall-Reason %q; want 502 %s", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), tc.reason)
					}
				} else {
					_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
					sb.Write([]byte("\x16\x03binary " + canary))
					_, err := io.ReadAll(sb)
					if !isReset(err) {
						t.Fatalf("the TCP sandbox read %v, want a reset", err)
					}
				}
				res := s.wait(t)
				if reason, ok := proxies.RefusalOf(res.Err); !ok || reason != tc.reason || res.End != proxies.EndError {
					t.Errorf("result %+v, want a refusal %s", res, tc.reason)
				}
				d, _, _ := s.rep.get()
				if len(d) != 1 || d[0].Reason != tc.reason {
					t.Fatalf("denials %+v, want one %s", d, tc.reason)
				}
				if sandbox == "http" && (d[0].Status != 502 || d[0].Method != "POST" || d[0].Path != "/v1/results") {
					t.Errorf("denial %+v, want status 502, POST /v1/results", d[0])
				}
				if sandbox == "tcp" && d[0].Status != 0 {
					t.Errorf("denial %+v, want no status", d[0])
				}
				srv.waitConn(t, 1)
				if got := srv.received(); got != "" {
					t.Errorf("the remote's application read %q", got)
				}
			})
		}
	}
}

// TestTCPLateClientCertRefusal: a remote that refuses the client
// certificate after the proxy stopped waiting (no session tickets, a wait
// of 1 ns) still refuses the flow, seen by the relay's first read: the
// sandbox is reset and the remote's application read nothing.
func TestTCPLateClientCertRefusal(t *testing.T) {
	k := newPKI(t)
	cfg := serverConfig(k.server, k.clients)
	cfg.SessionTicketsDisabled = true
	srv := startTLSServer(t, cfg, false)
	p := &TCP{Logger: testLog(t), ClientAuthWait: time.Nanosecond}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
	_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
	sb.Write([]byte(canary))
	_, err := io.ReadAll(sb)
	if !isReset(err) {
		t.Fatalf("the sandbox read %v, want a reset", err)
	}
	res := s.wait(t)
	if reason, _ := proxies.RefusalOf(res.Err); reason != ReasonClientCert {
		t.Errorf("result %+v, want a refusal %s", res, ReasonClientCert)
	}
	if d, _, _ := s.rep.get(); len(d) != 1 || d[0].Reason != ReasonClientCert {
		t.Errorf("denials %+v", d)
	}
	if got := srv.received(); got != "" {
		t.Errorf("the remote's application read %q", got)
	}
}

// TestTCPRelay: plain bytes both ways, the sandbox's half-close passed on
// (the remote reads its end and still answers), bytes reported; and
// trusted.upstreamPort replaces the port the sandbox used.
func TestTCPRelay(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, nil), false)
	p := &TCP{Logger: testLog(t)}
	rule := compile(t, fmt.Sprintf(`{upstreamPort: %d, tls: {serverName: %s, caFile: %s}}`, srv.addr().Port(), serverName, k.caFile))
	dst := netip.AddrPortFrom(srv.addr().Addr(), 80) // the sandbox's port
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), dst)
	_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
	payload := strings.Repeat("0123456789abcdef", 64<<10) // 1 MiB
	go func() {
		io.WriteString(sb, payload)
		sb.CloseWrite()
	}()
	got, err := io.ReadAll(sb)
	if err != nil || string(got) != payload {
		t.Fatalf("read %d bytes (%v), want the %d echoed", len(got), err, len(payload))
	}
	res := s.wait(t)
	if res.End != proxies.EndClosed {
		t.Errorf("result %+v", res)
	}
	if _, out, in := s.rep.get(); out != int64(len(payload)) || in != int64(len(payload)) {
		t.Errorf("bytes %d out, %d in; want %d each", out, in, len(payload))
	}
}

// TestTCPRevocation: a done ctx closes both connections.
func TestTCPRevocation(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, nil), false)
	p := &TCP{Logger: testLog(t)}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile))
	ctx, cancel := context.WithCancelCause(context.Background())
	sb, s := serveFlow(t, ctx, p, rule, configureOK(t, p, rule), srv.addr())
	_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(sb, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(sb, buf); err != nil {
		t.Fatal(err)
	}
	revoked := errors.New("policy no longer allows it")
	cancel(revoked)
	res := s.wait(t)
	if res.End != proxies.EndRevoked || !errors.Is(res.Err, revoked) {
		t.Errorf("result %+v, want revoked", res)
	}
	if _, err := sb.Read(buf); err == nil {
		t.Error("the sandbox's connection is still open")
	}
}

// TestTCPIdle: a flow on which nothing moves ends as idle.
func TestTCPIdle(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, nil), false)
	p := &TCP{Logger: testLog(t), IdleTimeout: 200 * time.Millisecond}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile))
	_, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
	if res := s.wait(t); res.End != proxies.EndIdle {
		t.Errorf("result %+v, want idle", res)
	}
}

// TestTCPClassicalRemote: a remote without the hybrid group gets X25519.
func TestTCPClassicalRemote(t *testing.T) {
	k := newPKI(t)
	cfg := serverConfig(k.server, nil)
	cfg.CurvePreferences = []tls.CurveID{tls.X25519}
	srv := startTLSServer(t, cfg, true)
	p := &TCP{Logger: testLog(t)}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
	if resp, _, err := get(t, sb); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	sb.Close()
	s.wait(t)
	if c := srv.waitConn(t, 1); c.curve != tls.X25519 {
		t.Errorf("group %v, want X25519", c.curve)
	}
}

// TestTCPResumption: the second flow resumes the first's session; a pin
// changed in between refuses the resumed session (VerifyConnection runs on
// resumption); another sandbox never resumes it; with the cache off,
// nothing resumes.
func TestTCPResumption(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, nil), true)
	p := &TCP{Logger: testLog(t)}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, spkiSHA256: ["`+k.server.pin()+`"]`))
	cfg := configureOK(t, p, rule)
	flow := func(cfg any, sandbox string) (*served, int) {
		t.Helper()
		sb, proxied := sandboxPair(t)
		s := &served{done: make(chan proxies.Result, 1), rep: &reporter{}}
		f := &proxies.Flow{Sandbox: sandbox, Rule: rule, Config: cfg, Dst: srv.addr(), Report: s.rep}
		go func() { s.done <- p.ServeStream(context.Background(), proxied, f) }()
		resp, _, err := get(t, sb)
		sb.Close()
		s.wait(t)
		if err != nil {
			t.Fatal(err)
		}
		return s, resp.StatusCode
	}
	if _, st := flow(cfg, "a"); st != 200 {
		t.Fatalf("first flow: %d", st)
	}
	if _, st := flow(cfg, "a"); st != 200 || !srv.waitConn(t, 2).resumed {
		t.Fatalf("second flow: %d, resumed %v", st, srv.waitConn(t, 2).resumed)
	}
	if _, st := flow(cfg, "b"); st != 200 || srv.waitConn(t, 3).resumed {
		t.Fatalf("another sandbox's flow: %d, resumed %v", st, srv.waitConn(t, 3).resumed)
	}

	repinned := compile(t, tlsBlock(`serverName: `+serverName+`, spkiSHA256: ["`+k.client.pin()+`"]`))
	s, st := flow(configureOK(t, p, repinned), "a")
	d, _, _ := s.rep.get()
	if st != 502 || len(d) != 1 || d[0].Reason != ReasonPin || !strings.Contains(d[0].Detail, "resumed") {
		t.Fatalf("repinned flow: %d, denials %+v; want 502 and a pin refusal of the resumed session", st, d)
	}
	// The refused session was dropped: the original pin does a full
	// handshake.
	if _, st := flow(cfg, "a"); st != 200 || srv.waitConn(t, 5).resumed {
		t.Fatalf("after the refusal: %d, resumed %v", st, srv.waitConn(t, 5).resumed)
	}

	off := &TCP{Logger: testLog(t), SessionCacheSize: -1}
	cfgOff := configureOK(t, off, rule)
	for i := range 2 {
		sb, s := serveFlow(t, context.Background(), off, rule, cfgOff, srv.addr())
		if _, _, err := get(t, sb); err != nil {
			t.Fatal(err)
		}
		sb.Close()
		s.wait(t)
		if c := srv.waitConn(t, 6+i); c.resumed {
			t.Fatal("a flow resumed with the session cache off")
		}
	}
}

// TestTCPReload: a client certificate replaced on disk is presented by
// the next flow; a caFile replaced by another CA's refuses the next flow;
// a caFile that no longer parses refuses flows as tls-config; a client
// certificate that no longer parses keeps the previous one in use.
func TestTCPReload(t *testing.T) {
	k := newPKI(t)
	srv := startTLSServer(t, serverConfig(k.server, k.clients), true)
	p := &TCP{Logger: testLog(t), ReloadInterval: time.Nanosecond}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile+`, clientCertFile: `+k.certFile+`, clientKeyFile: `+k.keyFile))
	cfg := configureOK(t, p, rule)
	n := 0
	flow := func() (int, string, []proxies.Denial) {
		t.Helper()
		sb, s := serveFlow(t, context.Background(), p, rule, cfg, srv.addr())
		resp, _, err := get(t, sb)
		sb.Close()
		s.wait(t)
		if err != nil {
			t.Fatal(err)
		}
		d, _, _ := s.rep.get()
		cn := ""
		if resp.StatusCode == 200 {
			n++
			cn = srv.waitConn(t, n).clientCN
		} else if len(srv.conns()) > n {
			n = len(srv.conns())
		}
		return resp.StatusCode, cn, d
	}
	if st, cn, _ := flow(); st != 200 || cn != "clean-room-1" {
		t.Fatalf("first flow: %d, client %q", st, cn)
	}
	rotated := k.clients.issue(t, "clean-room-2", leafOpts{client: true})
	writeFile(t, k.dir, "client.pem", rotated.certPEM)
	writeFile(t, k.dir, "client.key", rotated.keyPEM)
	if st, cn, _ := flow(); st != 200 || cn != "clean-room-2" {
		t.Fatalf("after the rotation: %d, client %q; want the new certificate", st, cn)
	}
	writeFile(t, k.dir, "client.pem", []byte("not a certificate"))
	if st, cn, _ := flow(); st != 200 || cn != "clean-room-2" {
		t.Fatalf("with a broken client certificate file: %d, client %q; want the previous one", st, cn)
	}

	writeFile(t, k.dir, "ca.pem", k.other.pem)
	if st, _, d := flow(); st != 502 || len(d) != 1 || d[0].Reason != ReasonCA {
		t.Fatalf("after the CA changed: %d %+v, want a refusal %s", st, d, ReasonCA)
	}
	conns := len(srv.conns())
	writeFile(t, k.dir, "ca.pem", []byte("garbage"))
	if st, _, d := flow(); st != 502 || len(d) != 1 || d[0].Reason != ReasonTLSConfig {
		t.Fatalf("with a broken caFile: %d %+v, want a refusal %s", st, d, ReasonTLSConfig)
	}
	if len(srv.conns()) != conns {
		t.Error("a flow whose caFile does not load dialed the remote")
	}
	writeFile(t, k.dir, "ca.pem", k.ca.pem)
	if st, _, _ := flow(); st != 200 {
		t.Fatalf("with the CA back: %d", st)
	}
}

// TestConfigure: what the policy check refuses, each naming its field.
func TestConfigure(t *testing.T) {
	k := newPKI(t)
	notPEM := writeFile(t, k.dir, "not.pem", []byte("hello"))
	missing := k.dir + "/missing.pem"
	tcp, httpProxy := &TCP{}, &HTTP{}
	for _, tc := range []struct {
		name    string
		p       proxies.StreamProxy
		rule    func() *policy.Rule
		wantErr string
	}{
		{"ca", tcp, func() *policy.Rule { return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile)) }, ""},
		{"not trusted", tcp, func() *policy.Rule {
			r := compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile))
			r.Mode = policy.ModeOpen
			return r
		}, "mode: open, this proxy serves mode trusted"},
		{"neither pin nor ca", tcp, func() *policy.Rule {
			r := compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile))
			r.Spec.Trusted.TLS.CAFile = ""
			return r
		}, "trusted.tls.caFile: trusted.tls needs caFile and/or spkiSHA256"},
		{"missing caFile", tcp, func() *policy.Rule { return compile(t, tlsBlock(`serverName: a.test, caFile: `+missing)) }, "trusted.tls.caFile: open " + missing},
		{"caFile not PEM", tcp, func() *policy.Rule { return compile(t, tlsBlock(`serverName: a.test, caFile: `+notPEM)) }, "trusted.tls.caFile: " + notPEM + " holds no PEM certificate"},
		{"malformed pin", tcp, func() *policy.Rule { return compile(t, tlsBlock(`serverName: a.test, spkiSHA256: ["abc"]`)) }, "trusted.tls.spkiSHA256[0]: "},
		{"missing client cert", tcp, func() *policy.Rule {
			return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile+`, clientCertFile: `+missing+`, clientKeyFile: `+k.keyFile))
		}, "trusted.tls.clientCertFile: open " + missing},
		{"client cert not PEM", tcp, func() *policy.Rule {
			return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile+`, clientCertFile: `+notPEM+`, clientKeyFile: `+k.keyFile))
		}, "trusted.tls.clientCertFile: " + notPEM + ": holds no PEM certificate"},
		{"missing client key", tcp, func() *policy.Rule {
			return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile+`, clientCertFile: `+k.certFile+`, clientKeyFile: `+missing))
		}, "trusted.tls.clientKeyFile: open " + missing},
		{"key of another certificate", tcp, func() *policy.Rule {
			other := writeFile(t, k.dir, "other.key", k.server.keyPEM)
			return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile+`, clientCertFile: `+k.certFile+`, clientKeyFile: `+other))
		}, "trusted.tls.clientKeyFile: " + k.dir + "/other.key: tls: private key does not match public key"},
		{"hpke on the tcp proxy", tcp, func() *policy.Rule {
			return compile(t, `{hpke: {publicKeyFile: /x}, tls: {serverName: a.test, caFile: `+k.caFile+`}}`)
		}, "trusted.hpke: a rule with hpke is served by the trusted HTTP proxy"},
		{"no hpke on the http proxy", httpProxy, func() *policy.Rule { return compile(t, tlsBlock(`serverName: a.test, caFile: `+k.caFile)) }, "trusted.hpke: required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.rule()
			reg := proxies.NewRegistry()
			reg.AddStream(proxies.KeyOf(r, "tcp"), tc.p)
			_, err := reg.Configure(&policy.Compiled{Rules: []*policy.Rule{r}})
			want := "spec.egress[0]: " + tc.wantErr
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.HasPrefix(err.Error(), want)):
				t.Fatalf("error %v, want %q...", err, want)
			}
		})
	}
}

// TestRequestLine: what counts as an HTTP sandbox for a refusal's answer.
func TestRequestLine(t *testing.T) {
	for _, tc := range []struct {
		head, method, path string
		ok                 bool
	}{
		{"GET / HTTP/1.1\r\n", "GET", "/", true},
		{"POST /v1/x?ssn=1 HTTP/1.0\r\nHost: a\r\n", "POST", "/v1/x", true},
		{"GET http://a.test/p HTTP/1.1\r\n", "GET", "http://a.test/p", true},
		{"OPTIONS * HTTP/1.1\r\n", "OPTIONS", "*", true},
		{"GET /partial", "GET", "/partial", true},
		{"GET ", "GET", "", true},
		{"GET / HTTP/2.0\r\n", "", "", false},
		{"PRI * HTTP/2.0\r\n", "", "", false},
		{"get / HTTP/1.1\r\n", "", "", false},
		{"\x16\x03\x01\x00", "", "", false},
		{"SSH-2.0-OpenSSH\r\n", "", "", false},
		{"", "", "", false},
		{"GET  HTTP/1.1\r\n", "", "", false},
	} {
		m, p, ok := requestLine([]byte(tc.head))
		if m != tc.method || p != tc.path || ok != tc.ok {
			t.Errorf("%q: %q %q %v, want %q %q %v", tc.head, m, p, ok, tc.method, tc.path, tc.ok)
		}
	}
}

// TestTCPMinVersion12: a remote that speaks only TLS 1.2 is refused by
// default (above) and served when the rule says minVersion: "1.2".
func TestTCPMinVersion12(t *testing.T) {
	k := newPKI(t)
	cfg := serverConfig(k.server, nil)
	cfg.MaxVersion = tls.VersionTLS12
	srv := startTLSServer(t, cfg, true)
	p := &TCP{Logger: testLog(t)}
	rule := compile(t, tlsBlock(`serverName: `+serverName+`, caFile: `+k.caFile+`, minVersion: "1.2"`))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), srv.addr())
	resp, body, err := get(t, sb)
	if err != nil || resp.StatusCode != 200 || body != "ok:hello "+canary {
		t.Fatalf("got %v %q %v", resp, body, err)
	}
	sb.Close()
	if res := s.wait(t); res.End != proxies.EndClosed {
		t.Errorf("result %+v, want closed", res)
	}
	if c := srv.waitConn(t, 1); c.version != tls.VersionTLS12 {
		t.Errorf("negotiated %x, want TLS 1.2", c.version)
	}
}
