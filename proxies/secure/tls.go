package secure

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

// upstreamTLS is a rule's secure.upstreamTLS (tlsconf.Upstream), with the
// handshake the secure proxies run over a raw connection.
type upstreamTLS struct{ *tlsconf.Upstream }

// loadUpstreamTLS reads t's files and pins; errors name the field under
// path (e.g. "secure.upstreamTLS.caFile").
func loadUpstreamTLS(t *policy.TLSSpec, path string) (*upstreamTLS, error) {
	u, err := tlsconf.LoadUpstream(t, path)
	if err != nil {
		return nil, err
	}
	return &upstreamTLS{u}, nil
}

// handshake runs TLS over raw with ctx's deadline; the caller closes raw
// on error.
func (u *upstreamTLS) handshake(ctx context.Context, raw net.Conn, serverName string) (*tls.Conn, error) {
	tc := tls.Client(raw, u.Config(serverName))
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS with %s: %w", serverName, err)
	}
	return tc, nil
}

// isVerifyError reports whether a handshake failed on the remote's
// identity (not on the network).
func isVerifyError(err error) bool { return tlsconf.IsVerifyError(err) }
