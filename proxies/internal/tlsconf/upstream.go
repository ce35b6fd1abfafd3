package tlsconf

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/netip"

	"github.com/cleanwall/cleanwall/policy"
)

// Upstream is an upstreamTLS block (secure.upstreamTLS,
// open.postgres.upstreamTLS) with its files read at Configure: TLS the
// proxy originates to a data store, verified against the system roots
// unless caFile or pins say otherwise.
type Upstream struct {
	serverName string
	roots      *x509.CertPool // nil: the system roots (unless pins alone)
	pins       [][sha256.Size]byte
	certs      []tls.Certificate // client certificate for mTLS, if any
	minVersion uint16            // TLS 1.2 unless minVersion says 1.3
}

// LoadUpstream reads t's files and pins; errors name the field under
// path (e.g. "secure.upstreamTLS.caFile"). A malformed pin, which policy
// accepts with a warning, is refused: it could never match, so the rule
// could never connect.
func LoadUpstream(t *policy.TLSSpec, path string) (*Upstream, error) {
	u := &Upstream{serverName: t.ServerName, minVersion: tls.VersionTLS12}
	if t.MinVersion == "1.3" {
		u.minVersion = tls.VersionTLS13
	}
	if t.CAFile != "" {
		roots, err := LoadCA(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%s.%w", path, err)
		}
		u.roots = roots
	}
	pins, err := t.Pins()
	if err != nil {
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

// ServerNameFor is the name a flow's remote is verified as: serverName,
// else host (an HTTP request's Host, or the first name the flow's
// destination was resolved from), else the destination's address
// (policy: "for a cidr destination: the IP address").
func (u *Upstream) ServerNameFor(host string, dst netip.AddrPort) string {
	if u.serverName != "" {
		return u.serverName
	}
	if host != "" {
		return host
	}
	return dst.Addr().Unmap().String()
}

// Config is the client TLS configuration of one connection to a remote
// called serverName. With pins and no caFile, the pins alone identify the
// remote (its leaf's key must match one); with a caFile (or the system
// roots) the chain and the name are verified, and pins, if any, must
// match a key of the verified chain.
func (u *Upstream) Config(serverName string) *tls.Config {
	c := &tls.Config{ServerName: serverName, RootCAs: u.roots, Certificates: u.certs, MinVersion: u.minVersion}
	if len(u.pins) == 0 {
		return c
	}
	if u.roots == nil {
		// The pin is the trust: chain and name are not what is checked
		// (VerifyConnection runs all the same).
		c.InsecureSkipVerify = true
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !Pinned(u.pins, cs.PeerCertificates[0]) {
				return ErrPin
			}
			return nil
		}
		return c
	}
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		for _, chain := range cs.VerifiedChains {
			for _, cert := range chain {
				if Pinned(u.pins, cert) {
					return nil
				}
			}
		}
		return ErrPin
	}
	return c
}
