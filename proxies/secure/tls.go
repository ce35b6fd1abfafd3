package secure

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

// upstreamTLS is a rule's secure.upstreamTLS, its files read at Configure
// so that a flow never touches the file system.
type upstreamTLS struct {
	serverName string         // "": the flow's host (see serverNameFor)
	roots      *x509.CertPool // nil: the system roots (unless pinsOnly)
	pins       [][sha256.Size]byte
	certs      []tls.Certificate // client certificate for mTLS, if any
	minVersion uint16            // TLS 1.2 unless upstreamTLS.minVersion says 1.3
}

// loadUpstreamTLS reads t's files and pins; errors name the field under
// path (e.g. "secure.upstreamTLS.caFile").
func loadUpstreamTLS(t *policy.TLSSpec, path string) (*upstreamTLS, error) {
	u := &upstreamTLS{serverName: t.ServerName, minVersion: tls.VersionTLS12}
	if t.MinVersion == "1.3" {
		u.minVersion = tls.VersionTLS13
	}
	if t.CAFile != "" {
		roots, err := tlsconf.LoadCA(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%s.%w", path, err)
		}
		u.roots = roots
	}
	pins, err := t.Pins()
	if err != nil {
		// policy accepts a malformed pin with a warning; it can never
		// match, so the rule could never connect: refuse it here.
		return nil, fmt.Errorf("%s.%w", path, err)
	}
	u.pins = pins
	if t.ClientCertFile != "" || t.ClientKeyFile != "" {
		if t.ClientCertFile == "" || t.ClientKeyFile == "" {
			return nil, fmt.Errorf("%s.clientCertFile: clientCertFile and clientKeyFile go together", path)
		}
		cert, err := tls.LoadX509KeyPair(t.ClientCertFile, t.ClientKeyFile)
		if err != nil {
			return nil, fmt.Errorf("%s.clientCertFile: %w", path, err)
		}
		u.certs = []tls.Certificate{cert}
	}
	return u, nil
}

// config is the client TLS configuration of one connection to a remote
// called serverName. With pins and no caFile, the pins alone identify
// the remote (its leaf's key must match one); with a caFile (or the
// system roots) the chain and the name are verified, and pins, if any,
// must match a key of the verified chain.
func (u *upstreamTLS) config(serverName string) *tls.Config {
	c := &tls.Config{
		ServerName:   serverName,
		RootCAs:      u.roots,
		Certificates: u.certs,
		MinVersion:   u.minVersion,
	}
	if len(u.pins) == 0 {
		return c
	}
	if u.roots == nil {
		// The pin is the trust: chain and name are not what is checked
		// (VerifyConnection runs all the same).
		c.InsecureSkipVerify = true
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !u.pinned(cs.PeerCertificates[0]) {
				return tlsconf.ErrPin
			}
			return nil
		}
		return c
	}
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		for _, chain := range cs.VerifiedChains {
			for _, cert := range chain {
				if u.pinned(cert) {
					return nil
				}
			}
		}
		return tlsconf.ErrPin
	}
	return c
}

func (u *upstreamTLS) pinned(cert *x509.Certificate) bool {
	return tlsconf.Pinned(u.pins, cert)
}

// serverNameFor is the name a flow's remote is verified as: upstreamTLS's
// serverName, else host (the HTTP request's Host, or the first name the
// flow's destination was resolved from), else the destination's address
// (policy: "for a cidr destination: the IP address").
func (u *upstreamTLS) serverNameFor(host string, dst netip.AddrPort) string {
	if u.serverName != "" {
		return u.serverName
	}
	if host != "" {
		return host
	}
	return dst.Addr().Unmap().String()
}

// handshake runs TLS over raw with ctx's deadline; the caller closes raw
// on error.
func (u *upstreamTLS) handshake(ctx context.Context, raw net.Conn, serverName string) (*tls.Conn, error) {
	tc := tls.Client(raw, u.config(serverName))
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS with %s: %w", serverName, err)
	}
	return tc, nil
}

// isVerifyError reports whether a handshake failed on the remote's
// identity (not on the network).
func isVerifyError(err error) bool { return tlsconf.IsVerifyError(err) }
