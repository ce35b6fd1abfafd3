package rawsys

import (
	"crypto/tls"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Abort makes c's close a reset: SO_LINGER 0 has the close send RST
// rather than FIN, so that a flow that ended badly (refused, revoked, a
// stream that failed to open) can never pass for one that ended. Through
// a *tls.Conn it reaches the socket underneath; a conn that is no socket
// is left as it is.
func Abort(c net.Conn) {
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
}

// Reset closes c abortively (Abort, then Close).
func Reset(c net.Conn) {
	Abort(c)
	_ = c.Close()
}
