// Package tproxy owns the transparent sockets that the datapath assigns
// sandbox flows to: per-CPU SO_REUSEPORT TCP listeners and transparent UDP
// sockets. Every socket carries the node's proxy socket mark, which is how
// the datapath tells our sockets from any other socket in the namespace.
//
// For TCP the accepted connection's local address is the flow's original
// destination; for UDP it comes from IP_RECVORIGDSTADDR, and replies leave
// from a transparent socket bound to that destination, so the sandbox sees
// the answer come from the address it asked. This package never imports
// bpf, policy or attest.
package tproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// SocketOptions returns a net.ListenConfig/Dialer Control function that sets
// the options every proxy socket needs: IP(V6)_TRANSPARENT, SO_MARK and,
// when reusePort is set, SO_REUSEPORT (and SO_REUSEADDR for reply sockets).
func SocketOptions(mark uint32, reusePort, reuseAddr bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			s := int(fd)
			set := func(level, opt, val int, what string) {
				if serr == nil {
					if err := unix.SetsockoptInt(s, level, opt, val); err != nil {
						serr = fmt.Errorf("setting %s: %w", what, err)
					}
				}
			}
			if network == "tcp6" || network == "udp6" {
				set(unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT")
				set(unix.SOL_IPV6, unix.IPV6_V6ONLY, 1, "IPV6_V6ONLY")
			} else {
				set(unix.SOL_IP, unix.IP_TRANSPARENT, 1, "IP_TRANSPARENT")
			}
			set(unix.SOL_SOCKET, unix.SO_MARK, int(mark), "SO_MARK")
			if reusePort {
				set(unix.SOL_SOCKET, unix.SO_REUSEPORT, 1, "SO_REUSEPORT")
			}
			if reuseAddr {
				set(unix.SOL_SOCKET, unix.SO_REUSEADDR, 1, "SO_REUSEADDR")
			}
			if network == "udp4" {
				set(unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1, "IP_RECVORIGDSTADDR")
			}
			if network == "udp6" {
				set(unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1, "IPV6_RECVORIGDSTADDR")
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// TCPListener is a group of transparent listeners sharing one port through
// SO_REUSEPORT, for both address families. The datapath assigns a flow to
// one of them; the kernel spreads flows over the group.
type TCPListener struct {
	Port      uint16
	listeners []*net.TCPListener
}

// ListenTCP opens n listeners per family on port (0: pick one) with the
// proxy socket mark. IPv6 is skipped when the namespace has no IPv6.
func ListenTCP(ctx context.Context, port uint16, n int, mark uint32) (*TCPListener, error) {
	if n < 1 {
		n = 1
	}
	// No TCP keepalive on accepted connections: every proxy bounds a flow
	// with idle timeouts of its own, and Go's default probe settings cost
	// four system calls per accepted connection.
	lc := net.ListenConfig{Control: SocketOptions(mark, true, false), KeepAlive: -1}
	// Plain TCP, not Go's default MPTCP listener: the datapath's time-wait
	// steering keeps these sockets in a sockmap, which refuses MPTCP
	// sockets (EOPNOTSUPP), and a sandbox has no business opening subflows.
	lc.SetMultipathTCP(false)
	t := &TCPListener{Port: port}
	fail := func(err error) (*TCPListener, error) {
		t.Close()
		return nil, err
	}
	for _, family := range []string{"tcp4", "tcp6"} {
		for i := 0; i < n; i++ {
			addr := "0.0.0.0"
			if family == "tcp6" {
				addr = "::"
			}
			l, err := lc.Listen(ctx, family, net.JoinHostPort(addr, fmt.Sprint(t.Port)))
			if err != nil {
				if family == "tcp6" && i == 0 && ipv6Unavailable(err) {
					break
				}
				return fail(fmt.Errorf("listening on %s port %d: %w", family, t.Port, err))
			}
			t.listeners = append(t.listeners, l.(*net.TCPListener))
			if t.Port == 0 {
				t.Port = uint16(l.Addr().(*net.TCPAddr).Port)
			}
		}
	}
	return t, nil
}

func ipv6Unavailable(err error) bool {
	return errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EADDRNOTAVAIL)
}

// Listeners returns the individual sockets (one accept loop each).
func (t *TCPListener) Listeners() []*net.TCPListener { return t.listeners }

// Close closes every socket of the group.
func (t *TCPListener) Close() error {
	var errs []error
	for _, l := range t.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// OriginalDst returns the original destination of an accepted transparent
// connection and the sandbox-side source, both unmapped.
func OriginalDst(c net.Conn) (src, dst netip.AddrPort) {
	src = addrPort(c.RemoteAddr())
	dst = addrPort(c.LocalAddr())
	return src, dst
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}
