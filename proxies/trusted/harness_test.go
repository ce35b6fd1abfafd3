package trusted

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

const serverName = "partner.example.test"

// canary is what a test's sandbox sends: a server's recording must never
// hold it when the flow was refused.
const canary = "CANARY-7f3a9c"

// testLog routes the proxies' log lines to t.Log.
func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// authority is a test CA.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var serial int64 = 1

var serialMu sync.Mutex

func nextSerial() *big.Int {
	serialMu.Lock()
	defer serialMu.Unlock()
	serial++
	return big.NewInt(serial)
}

func newAuthority(t testing.TB, cn string) *authority {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &authority{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// leaf is an issued certificate with its key.
type leaf struct {
	tls     tls.Certificate
	cert    *x509.Certificate
	certPEM []byte
	keyPEM  []byte
}

// pin is the leaf's spkiSHA256 as a policy writes it.
func (l *leaf) pin() string {
	p := tlsconf.SPKIPin(l.cert)
	return base64.StdEncoding.EncodeToString(p[:])
}

type leafOpts struct {
	names     []string
	client    bool
	notBefore time.Time
	notAfter  time.Time
}

func (a *authority) issue(t testing.TB, cn string, o leafOpts) *leaf {
	t.Helper()
	key := newKey(t)
	if o.notBefore.IsZero() {
		o.notBefore = time.Now().Add(-time.Hour)
	}
	if o.notAfter.IsZero() {
		o.notAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: o.notBefore, NotAfter: o.notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if o.client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	for _, n := range o.names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	l := &leaf{cert: cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}
	l.tls, err = tls.X509KeyPair(l.certPEM, l.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// writeFile writes data to dir/name (replacing it by a rename, as a
// rotation would) and returns the path.
func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// conn is what a TLS server recorded of one connection.
type conn struct {
	hsErr      error
	version    uint16
	curve      tls.CurveID
	sni        string
	clientCN   string
	resumed    bool
	received   []byte // what its application read
	requestErr error
}

// tlsServer is a loopback TLS server standing for the customer's remote.
// It records each connection: the handshake's outcome, version, group,
// SNI, the client's certificate, and every byte its application read. In
// http mode it answers each request 200 with "ok:" and the request's
// body; otherwise it echoes until the client's end, then closes.
type tlsServer struct {
	ln   net.Listener
	cfg  *tls.Config
	http bool
	mu   sync.Mutex
	log  []*conn
	wg   sync.WaitGroup
}

func startTLSServer(t testing.TB, cfg *tls.Config, httpMode bool) *tlsServer {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsServer{ln: ln, cfg: cfg, http: httpMode}
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
			}()
		}
	}()
	return s
}

func (s *tlsServer) addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }

func (s *tlsServer) serve(raw net.Conn) {
	defer raw.Close()
	rec := &conn{}
	s.mu.Lock()
	s.log = append(s.log, rec)
	s.mu.Unlock()
	c := tls.Server(raw, s.cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	err := c.Handshake()
	st := c.ConnectionState()
	s.mu.Lock()
	rec.hsErr, rec.version, rec.curve, rec.sni, rec.resumed = err, st.Version, st.CurveID, st.ServerName, st.DidResume
	if len(st.PeerCertificates) > 0 {
		rec.clientCN = st.PeerCertificates[0].Subject.CommonName
	}
	s.mu.Unlock()
	if err != nil {
		return
	}
	record := func(b []byte) {
		s.mu.Lock()
		rec.received = append(rec.received, b...)
		s.mu.Unlock()
	}
	if !s.http {
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			record(buf[:n])
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				s.mu.Lock()
				if !errors.Is(err, io.EOF) {
					rec.requestErr = err
				}
				s.mu.Unlock()
				_ = c.CloseWrite()
				return
			}
		}
	}
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			s.mu.Lock()
			if !errors.Is(err, io.EOF) {
				rec.requestErr = err
			}
			s.mu.Unlock()
			return
		}
		body, err := io.ReadAll(req.Body)
		record([]byte(req.Method + " " + req.RequestURI + "\n"))
		record(body)
		if err != nil {
			return
		}
		resp := "ok:" + string(body)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(resp), resp)
	}
}

// conns returns a copy of what the server recorded so far.
func (s *tlsServer) conns() []conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]conn, len(s.log))
	for i, c := range s.log {
		out[i] = *c
	}
	return out
}

// last waits for the server to have recorded n connections and returns
// the nth, once its handshake ended.
func (s *tlsServer) waitConn(t testing.TB, n int) conn {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		cs := s.conns()
		if len(cs) >= n && (cs[n-1].hsErr != nil || cs[n-1].version != 0) {
			return cs[n-1]
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("the server did not record connection %d (it has %d)", n, len(s.conns()))
	return conn{}
}

// received is every byte any connection's application read.
func (s *tlsServer) received() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, c := range s.log {
		b.Write(c.received)
	}
	return b.String()
}

// reporter records what a proxy reports.
type reporter struct {
	mu      sync.Mutex
	out, in int64
	denials []proxies.Denial
}

func (r *reporter) Bytes(out, in int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.out += out
	r.in += in
}

func (r *reporter) Deny(d proxies.Denial) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denials = append(r.denials, d)
}

func (r *reporter) get() ([]proxies.Denial, int64, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]proxies.Denial(nil), r.denials...), r.out, r.in
}

// compile compiles a one-rule trusted policy (trusted is the YAML of the
// rule's trusted block) and returns its rule.
func compile(t testing.TB, trusted string) *policy.Rule {
	t.Helper()
	doc := fmt.Sprintf(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: test}
spec:
  egress:
    - name: partner
      to: [{cidr: 127.0.0.1/32}]
      ports: [{port: 80}]
      mode: trusted
      trusted: %s
`, trusted)
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	return c.Rules[0]
}

// sandboxPair is a loopback connection: the sandbox's end, and the end the
// proxy is handed.
func sandboxPair(t testing.TB) (sandbox, proxied *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	s, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { s.Close(); r.Close() })
	return s.(*net.TCPConn), r.(*net.TCPConn)
}

// served is a flow a proxy serves in the background.
type served struct {
	done chan proxies.Result
	rep  *reporter
}

func (s *served) wait(t testing.TB) proxies.Result {
	t.Helper()
	select {
	case r := <-s.done:
		return r
	case <-time.After(15 * time.Second):
		t.Fatal("ServeStream did not return")
	}
	return proxies.Result{}
}

// serveFlow serves one flow of rule configured as cfg from a new sandbox
// connection to dst, resolved from hosts (none: a cidr rule's literal
// IP); it returns the sandbox's end.
func serveFlow(t testing.TB, ctx context.Context, p proxies.StreamProxy, rule *policy.Rule, cfg any, dst netip.AddrPort, hosts ...string) (*net.TCPConn, *served) {
	t.Helper()
	sb, proxied := sandboxPair(t)
	s := &served{done: make(chan proxies.Result, 1), rep: &reporter{}}
	f := &proxies.Flow{Sandbox: "sb-test", Rule: rule, Config: cfg, Src: sb.LocalAddr().(*net.TCPAddr).AddrPort(), Dst: dst,
		Hosts: hosts, Report: s.rep}
	if len(hosts) == 0 {
		f.Hosts = []string{dst.Addr().String()}
	}
	go func() { s.done <- p.ServeStream(ctx, proxied, f) }()
	return sb, s
}

func configureOK(t testing.TB, p proxies.StreamProxy, rule *policy.Rule) any {
	t.Helper()
	cfg, err := p.Configure(rule)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// get sends an HTTP request with canary in its body and reads the
// response (nil and the error when the connection did not answer one).
func get(t testing.TB, sb net.Conn) (*http.Response, string, error) {
	t.Helper()
	_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
	body := "hello " + canary
	if _, err := fmt.Fprintf(sb, "POST /v1/results?id=7 HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s", serverName, len(body), body); err != nil {
		return nil, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(sb), nil)
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }
