package trusted

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	tcpproxy "github.com/cleanwall/cleanwall/proxies/tcp"
)

// TCP is the privacy proxy of (trusted, tcp): rules with trusted.tls and
// no hpke. The sandbox speaks plain TCP (HTTP or anything else) to its
// destination; the proxy connects to that address at trusted.upstreamPort
// with TLS 1.3, verifies the remote against the rule's CA and pins before
// a byte of the sandbox's is read, and then relays plaintext on the
// sandbox's side and TLS on the remote's.
type TCP struct {
	// Dial connects to the remote. Nil: a net.Dialer.
	Dial DialFunc
	// Logger receives refusals (Info) and reloads. Nil: slog.Default().
	Logger *slog.Logger
	// DialTimeout bounds the connection and the handshake. Zero:
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// IdleTimeout ends a flow on which nothing moved either way. Zero:
	// DefaultIdleTimeout.
	IdleTimeout time.Duration
	// SessionCacheSize is how many TLS sessions are kept for resumption
	// (per sandbox, rule and client certificate, least recently used
	// dropped). Zero: DefaultSessionCacheSize; negative: no resumption.
	SessionCacheSize int
	// ReloadInterval is how often at most a rule's caFile and client
	// certificate files are checked for a change, at dial time. Zero:
	// DefaultReloadInterval.
	ReloadInterval time.Duration
	// ClientAuthWait is how long, after a TLS 1.3 handshake in which the
	// remote asked for a client certificate, the proxy waits for the
	// remote's verdict before it relays (see awaitClientAuth). Zero:
	// DefaultClientAuthWait.
	ClientAuthWait time.Duration
	// FirstBytesWait is how long after the flow was accepted a refused
	// flow waits for the sandbox's first bytes, to answer an HTTP request
	// with a 502 rather than a reset. Zero: DefaultFirstBytesWait.
	FirstBytesWait time.Duration

	// curves overrides the key exchanges offered (benchmarks).
	curves []tls.CurveID

	once   sync.Once
	origin *origin
}

var _ proxies.StreamProxy = (*TCP)(nil)

// NewTCP returns the trusted TCP proxy, dialing with dial (nil: a
// net.Dialer) and logging to log (nil: slog.Default()).
func NewTCP(dial DialFunc, log *slog.Logger) *TCP {
	return &TCP{Dial: dial, Logger: log}
}

// Configure accepts a trusted rule with tls and without hpke: it refuses
// a rule that could never verify its remote (no caFile and no pin, a
// malformed pin, a caFile or client certificate or key that cannot be
// read or parsed), naming the field.
func (p *TCP) Configure(r *policy.Rule) (any, error) {
	return configure(r, "tcp", p.ReloadInterval)
}

func (p *TCP) init() *origin {
	p.once.Do(func() {
		p.origin = newOrigin(p.Dial, p.Logger, p.DialTimeout, p.ClientAuthWait, p.SessionCacheSize, p.curves, nil)
	})
	return p.origin
}

func newOrigin(dial DialFunc, log *slog.Logger, dialTimeout, clientAuthWait time.Duration, cacheSize int, cv []tls.CurveID, nextProtos []string) *origin {
	o := &origin{dial: dial, log: logger(log), dialTimeout: dialTimeout, clientAuthWait: clientAuthWait, curves: cv, nextProtos: nextProtos}
	switch {
	case cacheSize == 0:
		o.sessions = tls.NewLRUClientSessionCache(DefaultSessionCacheSize)
	case cacheSize > 0:
		o.sessions = tls.NewLRUClientSessionCache(cacheSize)
	}
	return o
}

// ServeStream serves one flow: the remote is dialed and verified first; a
// remote that fails verification refuses the flow (an HTTP sandbox gets a
// 502 naming the reason, any other a reset) before any byte of the
// sandbox's went anywhere. Then both directions are relayed, each
// half-closing on its end, until both ended, the flow idled out or ctx
// was done (revocation), which closes both connections.
func (p *TCP) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	accepted := time.Now()
	cfg, err := flowConfig(f, "tcp")
	if err != nil {
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: err}
	}
	o := p.init()
	log := o.log.With(logSandbox, f.Sandbox, logRule, f.RuleName(), logDst, f.Dst.String())
	up, err := o.connect(ctx, f, cfg)
	if err != nil {
		if ctx.Err() != nil {
			reset(c)
			return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
		}
		wait := p.FirstBytesWait
		if wait <= 0 {
			wait = DefaultFirstBytesWait
		}
		return refuseFlow(c, f, cfg, err, accepted.Add(wait), log)
	}

	// The remote's first read tells a client certificate refused after
	// the wait (awaitClientAuth) from any other end: such a flow is
	// refused too, the sandbox reset.
	var mu sync.Mutex
	var late *failure
	rc := &relayConn{up: up, onRefuse: func(fl *failure) {
		mu.Lock()
		late = fl
		mu.Unlock()
		f.Report.Deny(denial(fl.reason, 0, "", "", cfg.tls.serverNameFor(f), false))
		log.Info("trusted flow refused", logReason, fl.reason, logError, fl.err)
		abortive(c)
	}}
	fw := tcpproxy.Forwarder{IdleTimeout: p.IdleTimeout, Dial: func(context.Context, netip.AddrPort) (net.Conn, error) { return rc, nil }}
	var st tcpproxy.Stats
	err = fw.Forward(ctx, c, tcpproxy.Flow{Dst: cfg.upstream(f.Dst)}, &st)
	f.Report.Bytes(st.BytesOut.Load(), st.BytesIn.Load())
	mu.Lock()
	defer mu.Unlock()
	if late != nil && ctx.Err() == nil {
		return proxies.Result{End: proxies.EndError, Err: &proxies.RefusalError{Reason: late.reason, Err: late.err}}
	}
	return tcpproxy.Result(ctx, err)
}

// refuseFlow ends a flow whose remote connection failed: a refusal is
// reported (before the sandbox sees it) and counted under its reason; a
// failure to reach the remote is logged and counted as an error.
func refuseFlow(c net.Conn, f *proxies.Flow, cfg *ruleConfig, err error, deadline time.Time, log *slog.Logger) proxies.Result {
	var fl *failure
	if !errors.As(err, &fl) {
		fl = &failure{reason: reasonUnreachable, err: err}
	}
	name := ""
	if cfg.tls != nil {
		name = cfg.tls.serverNameFor(f)
	}
	refuseSandbox(c, deadline, fl.reason, func(status int, method, path string) {
		if fl.deny {
			f.Report.Deny(denial(fl.reason, status, method, path, name, fl.resumed))
			log.Info("trusted flow refused", logReason, fl.reason, logStatus, status, logError, fl.err)
		} else {
			log.Info("trusted flow failed", logReason, fl.reason, logStatus, status, logError, fl.err)
		}
	})
	if fl.deny {
		return proxies.Result{End: proxies.EndError, Err: &proxies.RefusalError{Reason: fl.reason, Err: fl.err}}
	}
	return proxies.Result{End: proxies.EndError, Err: fl.err}
}

// relayConn is the remote's connection as the relay sees it: what the
// remote sent while the proxy awaited its verdict comes first, and the
// first read that fails before the remote sent anything is checked for a
// late refusal of the client certificate.
type relayConn struct {
	up       *upstream
	got      bool
	onRefuse func(*failure)
}

func (r *relayConn) Read(p []byte) (int, error) {
	if len(r.up.early) > 0 {
		n := copy(p, r.up.early)
		r.up.early = r.up.early[n:]
		r.got = true
		return n, nil
	}
	if r.up.earlyErr != nil {
		return 0, r.up.earlyErr
	}
	n, err := r.up.conn.Read(p)
	if n > 0 {
		r.got = true
	}
	if err != nil && !r.got && r.up.tls != nil {
		if fl := classify(err); fl.deny && fl.reason == ReasonClientCert {
			r.onRefuse(fl)
		}
	}
	return n, err
}

func (r *relayConn) Write(p []byte) (int, error)        { return r.up.conn.Write(p) }
func (r *relayConn) Close() error                       { return r.up.conn.Close() }
func (r *relayConn) LocalAddr() net.Addr                { return r.up.conn.LocalAddr() }
func (r *relayConn) RemoteAddr() net.Addr               { return r.up.conn.RemoteAddr() }
func (r *relayConn) SetDeadline(t time.Time) error      { return r.up.conn.SetDeadline(t) }
func (r *relayConn) SetReadDeadline(t time.Time) error  { return r.up.conn.SetReadDeadline(t) }
func (r *relayConn) SetWriteDeadline(t time.Time) error { return r.up.conn.SetWriteDeadline(t) }

// CloseWrite passes the sandbox's half-close on: close_notify over TLS, a
// FIN over plain TCP.
func (r *relayConn) CloseWrite() error {
	if cw, ok := r.up.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
