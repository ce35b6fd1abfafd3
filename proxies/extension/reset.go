package extension

import (
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// reset resets the sandbox's connection and closes the proxy's descriptor.
//
// Once the descriptor was sent, the extension may hold a copy, and a
// close with SO_LINGER 0 only resets a socket when it closes the last
// descriptor. connect(2) with AF_UNSPEC makes the kernel disconnect the
// socket itself (tcp_disconnect: RST for every state that needs one),
// whoever else holds it; the extension's copy then reads ECONNRESET.
// SO_LINGER 0 stays as the fallback for a socket the disconnect did not
// reach (not a TCP socket).
func reset(c net.Conn) {
	if sc, ok := c.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) { _ = disconnect(int(fd)) })
		}
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// disconnect is connect(fd, {AF_UNSPEC}): x/sys/unix has no Sockaddr for
// it.
func disconnect(fd int) error {
	sa := unix.RawSockaddr{Family: unix.AF_UNSPEC}
	_, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	if errno != 0 {
		return errno
	}
	return nil
}
