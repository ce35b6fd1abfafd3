package harness

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestPKI is a certificate authority made for one test: it issues server
// and client certificates and writes PEM files into the test's directory.
type TestPKI struct {
	t      testing.TB
	dir    string
	CA     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	CAFile string
	serial int64
}

// NewPKI makes a CA named name and writes its certificate to <Dir>/<name>-ca.pem.
func (e *Env) NewPKI(name string) *TestPKI {
	e.T.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		e.T.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		e.T.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &TestPKI{t: e.T, dir: e.Dir, CA: ca, caKey: key, CAFile: filepath.Join(e.Dir, name+"-ca.pem"), serial: 1}
	writePEM(e.T, p.CAFile, "CERTIFICATE", der, 0o644)
	return p
}

// Issue makes a leaf certificate for names (DNS names or IPs), valid
// from notBefore to notAfter, for servers (client false) or clients.
func (p *TestPKI) Issue(cn string, names []string, client bool, notBefore, notAfter time.Time) tls.Certificate {
	p.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	p.serial++
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: notBefore, NotAfter: notAfter, KeyUsage: x509.KeyUsageDigitalSignature}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.CA, &key.PublicKey, p.caKey)
	if err != nil {
		p.t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// WriteKeyPair writes a certificate and its key as PEM files named
// <name>.pem and <name>.key (0600) and returns their paths.
func (p *TestPKI) WriteKeyPair(name string, c tls.Certificate) (certFile, keyFile string) {
	p.t.Helper()
	certFile, keyFile = filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+".key")
	writePEM(p.t, certFile, "CERTIFICATE", c.Certificate[0], 0o644)
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		p.t.Fatal(err)
	}
	writePEM(p.t, keyFile, "PRIVATE KEY", der, 0o600)
	return certFile, keyFile
}

// SPKIPin is the base64 SHA-256 of a certificate's SubjectPublicKeyInfo
// (the spkiSHA256 of a policy).
func SPKIPin(c tls.Certificate) string {
	sum := sha256.Sum256(c.Leaf.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

func writePEM(t testing.TB, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
}

// TLSServer is an HTTPS server in the remote namespace that records each
// handshake (version, key exchange group, SNI, client certificate) and
// each request its application received.
type TLSServer struct {
	Addr string
	mu   sync.Mutex
	hs   []Handshake
	reqs []RecordedRequest
}

// Handshake is what one TLS connection negotiated.
type Handshake struct {
	Version  uint16
	Curve    tls.CurveID
	SNI      string
	ClientCN string
	Resumed  bool
}

// TLSServer serves HTTPS at addr with cert; clientCAs, when set, requires
// a client certificate issued by it.
func (e *Env) TLSServer(addr string, cert tls.Certificate, clientCAs *x509.CertPool) *TLSServer {
	e.T.Helper()
	s := &TLSServer{}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCAs != nil {
		cfg.ClientCAs, cfg.ClientAuth = clientCAs, tls.RequireAndVerifyClientCert
	}
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		h := Handshake{Version: cs.Version, Curve: cs.CurveID, SNI: cs.ServerName, Resumed: cs.DidResume}
		if len(cs.PeerCertificates) > 0 {
			h.ClientCN = cs.PeerCertificates[0].Subject.CommonName
		}
		s.mu.Lock()
		s.hs = append(s.hs, h)
		s.mu.Unlock()
		return nil
	}
	var l net.Listener
	if err := e.InRemote(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	s.Addr = l.Addr().String()
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		s.mu.Lock()
		s.reqs = append(s.reqs, RecordedRequest{Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Header: r.Header.Clone(),
			Body: body, BodyLen: int64(len(body)), From: r.RemoteAddr})
		s.mu.Unlock()
		_, _ = io.WriteString(w, "tls ok "+r.URL.Path+"\n")
	}), ErrorLog: log.New(io.Discard, "", 0)} // refused handshakes are the point
	go func() { _ = srv.Serve(tls.NewListener(l, cfg)) }()
	e.onCleanup(func() { srv.Close() })
	return s
}

// Handshakes returns the handshakes so far.
func (s *TLSServer) Handshakes() []Handshake {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Handshake(nil), s.hs...)
}

// Requests returns the requests its application received.
func (s *TLSServer) Requests() []RecordedRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]RecordedRequest(nil), s.reqs...)
}
