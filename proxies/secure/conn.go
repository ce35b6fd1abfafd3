package secure

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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

// reset closes c abortively: SO_LINGER 0 makes the close send RST rather
// than FIN, so that a stream that ended badly (a refused segment, no key,
// a revocation) can never pass for one that ended. A conn that is not a
// socket is only closed.
func reset(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	} else if sc, ok := c.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) {
				_ = unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			})
		}
	}
	_ = c.Close()
}

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
