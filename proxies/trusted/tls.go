package trusted

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

// Refusals of a flow whose remote failed trusted.tls (proxies.Denial.Reason,
// the Cleanwall-Reason of the 502 an HTTP sandbox gets, and the reason the
// firewall counts the flow under). The sandbox's bytes never reach the
// remote's application: they are read only after the handshake verified.
const (
	// ReasonPin: no public key of the remote's (verified) chain matches a
	// spkiSHA256 pin.
	ReasonPin = "upstream-tls-pin"
	// ReasonCA: the remote's chain does not verify to caFile.
	ReasonCA = "upstream-tls-ca"
	// ReasonName: the remote's certificate is not valid for the server
	// name (tls.serverName, which is also the SNI).
	ReasonName = "upstream-tls-name"
	// ReasonExpired: a certificate of the remote's is expired or not yet
	// valid (checked on resumed sessions too).
	ReasonExpired = "upstream-tls-expired"
	// ReasonClientCert: the remote refused the proxy's client certificate,
	// or its absence (a certificate alert).
	ReasonClientCert = "upstream-tls-client-cert"
	// ReasonTLS: any other failure of the handshake that is not the
	// network's: no common version or group, a remote that does not speak
	// TLS, any other alert.
	ReasonTLS = "upstream-tls"
	// ReasonTLSConfig: the rule's caFile no longer loads (changed since
	// policy check): nothing is trusted, nothing is dialed.
	ReasonTLSConfig = "tls-config"
)

// reasonUnreachable is a failure, not a refusal: the remote could not be
// reached (dial, timeout, a connection cut during the handshake). An HTTP
// sandbox gets a 502 naming it; the flow is counted as an error.
const reasonUnreachable = "upstream-unreachable"

// Defaults of a zero proxy.
const (
	DefaultDialTimeout      = 10 * time.Second
	DefaultIdleTimeout      = 5 * time.Minute
	DefaultSessionCacheSize = 1024
	DefaultClientAuthWait   = 250 * time.Millisecond
	DefaultFirstBytesWait   = time.Second
)

// curves are the key exchanges offered, the post-quantum hybrid first. Go
// 1.26 offers X25519MLKEM768 first by default too, but a GODEBUG
// (tlsmlkem=0) turns that default off; set explicitly, only the same
// GODEBUG can (Go treats the list as a filter of its own order).
var curves = []tls.CurveID{tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.X25519, tls.CurveP256, tls.CurveP384}

// DialFunc connects to a flow's destination (network "tcp"). The daemon
// supplies one whose traffic the datapath does not redirect again.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// origin is how a proxy reaches a trusted rule's remote: the dial, the TLS
// it originates and its session cache. The TCP and HTTP proxies each hold
// one.
type origin struct {
	dial           DialFunc
	log            *slog.Logger
	dialTimeout    time.Duration
	clientAuthWait time.Duration
	sessions       tls.ClientSessionCache // nil: no resumption
	curves         []tls.CurveID
	nextProtos     []string
}

// failure is why a flow's remote connection did not come up: a refusal
// (deny) or a failure to reach it.
type failure struct {
	reason  string
	deny    bool
	resumed bool // the refused handshake resumed a session
	err     error
}

func (e *failure) Error() string { return e.reason + ": " + e.err.Error() }
func (e *failure) Unwrap() error { return e.err }

// upstream is a flow's verified connection to its remote.
type upstream struct {
	conn net.Conn // *tls.Conn, or raw without trusted.tls
	raw  net.Conn
	tls  *tls.ConnectionState
	// early is what the remote sent while the proxy waited for it to
	// accept the client certificate, and the error that read ended in (a
	// close): the relay reads them first.
	early    []byte
	earlyErr error
}

// connect dials f's remote and, with trusted.tls, runs and verifies the
// handshake. Its error is a *failure.
func (o *origin) connect(ctx context.Context, f *proxies.Flow, cfg *ruleConfig) (*upstream, error) {
	timeout := o.dialTimeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var tc *tls.Config
	var fs *flowSessions
	var name string
	if cfg.tls != nil {
		var err error
		if tc, fs, err = o.clientConfig(f, cfg.tls); err != nil {
			return nil, &failure{reason: ReasonTLSConfig, deny: true, err: err}
		}
		name = tc.ServerName
	}
	dial := o.dial
	if dial == nil {
		d := net.Dialer{KeepAlive: -1}
		dial = d.DialContext
	}
	addr := cfg.upstream(f.Dst)
	raw, err := dial(dctx, "tcp", addr.String())
	if err != nil {
		return nil, &failure{reason: reasonUnreachable, err: fmt.Errorf("dialing %s: %w", addr, err)}
	}
	if tc == nil {
		return &upstream{conn: raw, raw: raw}, nil
	}
	c := tls.Client(raw, tc)
	if err := c.HandshakeContext(dctx); err != nil {
		reset(raw)
		fl := classify(err)
		fl.resumed = fs.resumed
		fl.err = fmt.Errorf("TLS with %s (%s): %w", name, addr, err)
		if fl.deny {
			fs.forget(name)
		}
		return nil, fl
	}
	st := c.ConnectionState()
	up := &upstream{conn: c, raw: raw, tls: &st}
	if fs.askedCert && st.Version >= tls.VersionTLS13 && !st.DidResume {
		if err := o.awaitClientAuth(dctx, c, fs, up); err != nil {
			reset(raw)
			fl := classify(err)
			fl.err = fmt.Errorf("TLS with %s (%s): the remote refused the client certificate: %w", name, addr, err)
			if !fl.deny {
				fl.err = fmt.Errorf("TLS with %s (%s): after the handshake: %w", name, addr, err)
			}
			fs.forget(name)
			return nil, fl
		}
	}
	return up, nil
}

// awaitClientAuth waits, after a TLS 1.3 handshake in which the remote
// asked for a client certificate, for the remote's verdict on it: in TLS
// 1.3 the client's handshake ends before the server has read the
// certificate, and a refusal arrives as an alert afterwards. A session
// ticket (servers send them once they accepted the client's flight) or
// any data accepts; an alert refuses; after clientAuthWait the remote is
// taken to have accepted (a late alert still refuses the flow, seen by the
// relay's first read). The sandbox's bytes wait meanwhile, so that a
// refusal reaches it before any of them left.
func (o *origin) awaitClientAuth(ctx context.Context, c *tls.Conn, fs *flowSessions, up *upstream) error {
	wait := o.clientAuthWait
	if wait <= 0 {
		wait = DefaultClientAuthWait
	}
	deadline := time.Now().Add(wait)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetReadDeadline(deadline)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-fs.ticket:
			_ = c.SetReadDeadline(time.Now()) // ends the Read below
		case <-ctx.Done():
			_ = c.SetReadDeadline(time.Now())
		case <-stop:
		}
	}()
	buf := make([]byte, 16<<10)
	n, err := c.Read(buf)
	close(stop)
	<-done
	_ = c.SetReadDeadline(time.Time{})
	var ne net.Error
	switch {
	case n > 0:
		up.early = buf[:n]
		return nil
	case err == nil, errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil:
		return nil // a ticket, or no word within the wait
	case ctx.Err() != nil:
		return ctx.Err()
	}
	if fl := classify(err); fl.deny {
		return err
	}
	up.earlyErr = err // a close: the relay passes it on
	return nil
}

// clientConfig is the TLS configuration of one flow to a remote of rule t:
// TLS 1.3, the SNI and name of the rule, the current client certificate
// and CA, and every handshake (resumed ones too) verified by verify.
func (o *origin) clientConfig(f *proxies.Flow, t *tlsRule) (*tls.Config, *flowSessions, error) {
	v := &verifier{name: t.serverNameFor(f), pins: t.pins}
	if t.ca != nil {
		roots, err := t.ca.get(o.log, "caFile")
		if err != nil {
			return nil, nil, err
		}
		v.roots = roots
	}
	var pair clientPair
	if t.client != nil {
		pair, _ = t.client.get(o.log, "client certificate") // the last good one when a reload failed
	}
	fs := &flowSessions{cache: o.sessions, ticket: make(chan struct{}),
		// Sessions are kept per sandbox, rule and client certificate: a
		// session resumes the identity it was made with, and another
		// sandbox's session would link the two sandboxes for the remote.
		prefix: f.Sandbox + "\x00" + f.RuleName() + "\x00" + hex.EncodeToString(pair.id[:8]) + "\x00"}
	c := &tls.Config{
		ServerName:       v.name,
		MinVersion:       t.minVersion,
		CurvePreferences: o.curves,
		NextProtos:       o.nextProtos,
		// Chain, name and pins are verified by VerifyConnection, which
		// crypto/tls runs on every handshake, resumed ones included (its own
		// verification runs on full handshakes only): nothing is accepted
		// that verify did not check.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			fs.resumed = cs.DidResume
			return v.verify(cs)
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			fs.askedCert = true
			if pair.cert != nil {
				return pair.cert, nil
			}
			return &tls.Certificate{}, nil // none: the remote decides
		},
	}
	if c.CurvePreferences == nil {
		c.CurvePreferences = curves
	}
	if o.sessions != nil {
		c.ClientSessionCache = fs
	}
	return c, fs, nil
}

// flowSessions is one flow's view of the proxy's session cache: its keys
// carry the flow's sandbox, rule and client certificate, and it tells the
// flow when a session ticket arrived.
type flowSessions struct {
	cache     tls.ClientSessionCache
	prefix    string
	ticket    chan struct{}
	once      sync.Once
	askedCert bool // the remote asked for a client certificate
	resumed   bool // the handshake resumed a session
}

func (s *flowSessions) Get(key string) (*tls.ClientSessionState, bool) {
	return s.cache.Get(s.prefix + key)
}

func (s *flowSessions) Put(key string, cs *tls.ClientSessionState) {
	s.cache.Put(s.prefix+key, cs)
	if cs != nil {
		s.once.Do(func() { close(s.ticket) })
	}
}

// forget drops the session of a refused remote, so that it is never
// offered again.
func (s *flowSessions) forget(serverName string) {
	if s != nil && s.cache != nil {
		s.cache.Put(s.prefix+serverName, nil)
	}
}

// verifier checks a remote's certificates against a trusted.tls rule.
// With a caFile the chain must verify to it for the server name, and pins,
// if any, must match a key of the verified chain. With pins alone the
// leaf's key must match one, and the leaf must still be valid for the
// server name and at this time: policy says the name is verified in the
// certificate, and a pinned key does not make an expired certificate
// current.
type verifier struct {
	name  string
	roots *x509.CertPool
	pins  [][sha256.Size]byte
}

// verifyError is a remote's certificate failing verify, with its reason.
type verifyError struct {
	reason string
	err    error
}

func (e *verifyError) Error() string { return e.err.Error() }
func (e *verifyError) Unwrap() error { return e.err }

func (v *verifier) verify(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return &verifyError{ReasonCA, errors.New("the remote sent no certificate")}
	}
	leaf, now := cs.PeerCertificates[0], time.Now()
	if v.roots != nil {
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		chains, err := leaf.Verify(x509.VerifyOptions{Roots: v.roots, Intermediates: inter, DNSName: v.name,
			CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			return &verifyError{x509Reason(err), err}
		}
		if len(v.pins) == 0 {
			return nil
		}
		for _, chain := range chains {
			for _, c := range chain {
				if tlsconf.Pinned(v.pins, c) {
					return nil
				}
			}
		}
		return &verifyError{ReasonPin, tlsconf.ErrPin}
	}
	if !tlsconf.Pinned(v.pins, leaf) {
		return &verifyError{ReasonPin, tlsconf.ErrPin}
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return &verifyError{ReasonExpired, x509.CertificateInvalidError{Cert: leaf, Reason: x509.Expired,
			Detail: fmt.Sprintf("valid from %s to %s", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))}}
	}
	if err := leaf.VerifyHostname(v.name); err != nil {
		return &verifyError{ReasonName, err}
	}
	return nil
}

func x509Reason(err error) string {
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &hn):
		return ReasonName
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return ReasonExpired
	}
	return ReasonCA // unknown authority, a CA not allowed to sign, a usage
}

// clientCertAlerts are the alerts a server sends about the client's
// certificate (RFC 8446, 6.2): bad, unsupported, revoked, expired or
// unknown certificate, unknown CA, access denied, certificate required.
var clientCertAlerts = []tls.AlertError{42, 43, 44, 45, 46, 48, 49, 116}

// classify names why a handshake (or the wait for the remote's verdict on
// the client certificate) failed.
func classify(err error) *failure {
	var ve *verifyError
	if errors.As(err, &ve) {
		return &failure{reason: ve.reason, deny: true, err: err}
	}
	if msg, ok := remoteAlert(err); ok {
		for _, a := range clientCertAlerts {
			if msg == a.Error() {
				return &failure{reason: ReasonClientCert, deny: true, err: err}
			}
		}
		return &failure{reason: ReasonTLS, deny: true, err: err}
	}
	var ne net.Error
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &ne) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return &failure{reason: reasonUnreachable, err: err}
	}
	return &failure{reason: ReasonTLS, deny: true, err: err}
}

// remoteAlert returns the text of the alert the remote sent, if err is
// one. crypto/tls reports a received alert as a *net.OpError of op
// "remote error" around an unexported type whose text is that of
// tls.AlertError of the same code.
func remoteAlert(err error) (string, bool) {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "remote error" || op.Err == nil {
		return "", false
	}
	return op.Err.Error(), true
}
