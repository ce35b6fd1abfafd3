package secure

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/cleanwall/cleanwall/internal/rawsys"
)

// Log field names.
const (
	logSandbox = "sandbox"
	logRule    = "rule"
	logDst     = "dst"
	logReason  = "reason"
	logStatus  = "status"
	logError   = "error"
)

// remote is a flow's connection to its original destination: conn carries
// the sealed bytes (TLS over raw when the rule has upstreamTLS).
type remote struct {
	conn net.Conn
	raw  net.Conn
}

// dialRemote connects to dst and, when the rule says so, runs TLS with the
// remote verified as host (see tlsconf.Upstream.ServerNameFor).
func dialRemote(ctx context.Context, dial DialFunc, timeout time.Duration, cfg *ruleConfig, dst netip.AddrPort, host string) (remote, error) {
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if dial == nil {
		d := net.Dialer{KeepAlive: -1}
		dial = d.DialContext
	}
	raw, err := dial(dctx, "tcp", dst.String())
	if err != nil {
		return remote{}, fmt.Errorf("dialing %s: %w", dst, err)
	}
	if cfg.tls == nil {
		return remote{conn: raw, raw: raw}, nil
	}
	tc, err := cfg.tls.handshake(dctx, raw, cfg.tls.ServerNameFor(host, dst))
	if err != nil {
		reset(raw)
		return remote{}, err
	}
	return remote{conn: tc, raw: raw}, nil
}

// reset closes r abortively.
func (r remote) reset() {
	if r.raw != nil {
		reset(r.raw)
	}
}

// close closes r gracefully (TLS close_notify, then FIN).
func (r remote) close() {
	if r.conn != nil {
		_ = r.conn.Close()
	}
}

// reset closes c abortively (rawsys.Reset): a stream that ended badly (a
// refused segment, no key, a revocation) can never pass for one that
// ended.
func reset(c net.Conn) { rawsys.Reset(c) }

// closeWrite half-closes c when it can (TCP FIN, TLS close_notify).
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func logger(l *slog.Logger) *slog.Logger {
	if l != nil {
		return l
	}
	return slog.Default()
}
