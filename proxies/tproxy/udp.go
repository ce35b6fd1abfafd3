package tproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Datagram is one UDP payload a sandbox sent, with the destination it was
// sent to (before the datapath assigned it to our socket).
type Datagram struct {
	Src     netip.AddrPort // the sandbox's address
	OrigDst netip.AddrPort
	Payload []byte
}

// UDPSocket is a transparent UDP socket pair (IPv4 and, when available,
// IPv6) receiving datagrams with their original destination, and a cache of
// reply sockets bound to original destinations.
type UDPSocket struct {
	Port  uint16
	mark  uint32
	conns []*net.UDPConn

	mu      sync.Mutex
	replies map[replyKey]*replySock
	closed  bool
}

type replyKey struct{ from, to netip.AddrPort }

type replySock struct {
	conn *net.UDPConn
	used time.Time
}

// ListenUDP opens the transparent UDP sockets on port (0: pick one).
func ListenUDP(ctx context.Context, port uint16, mark uint32) (*UDPSocket, error) {
	lc := net.ListenConfig{Control: SocketOptions(mark, false, false)}
	u := &UDPSocket{Port: port, mark: mark, replies: map[replyKey]*replySock{}}
	for _, family := range []string{"udp4", "udp6"} {
		addr := "0.0.0.0"
		if family == "udp6" {
			addr = "::"
		}
		pc, err := lc.ListenPacket(ctx, family, net.JoinHostPort(addr, fmt.Sprint(u.Port)))
		if err != nil {
			if family == "udp6" && ipv6Unavailable(err) {
				break
			}
			u.Close()
			return nil, fmt.Errorf("listening on %s port %d: %w", family, u.Port, err)
		}
		c := pc.(*net.UDPConn)
		u.conns = append(u.conns, c)
		if u.Port == 0 {
			u.Port = uint16(c.LocalAddr().(*net.UDPAddr).Port)
		}
	}
	return u, nil
}

// Serve reads datagrams from every socket and calls handle for each, in the
// reading goroutine (handle must not block for long). It returns when the
// socket is closed.
func (u *UDPSocket) Serve(handle func(Datagram)) error {
	var wg sync.WaitGroup
	errc := make(chan error, len(u.conns))
	for _, c := range u.conns {
		wg.Add(1)
		go func(c *net.UDPConn) {
			defer wg.Done()
			errc <- u.serveConn(c, handle)
		}(c)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
	}
	return nil
}

func (u *UDPSocket) serveConn(c *net.UDPConn, handle func(Datagram)) error {
	buf := make([]byte, 65535)
	oob := make([]byte, 128)
	for {
		n, oobn, _, src, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			return err
		}
		dst, err := origDstFromOOB(oob[:oobn])
		if err != nil {
			continue // without its destination a datagram cannot be judged: dropped
		}
		payload := make([]byte, n)
		copy(payload, buf[:n])
		handle(Datagram{Src: netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), OrigDst: dst, Payload: payload})
	}
}

// origDstFromOOB parses IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control messages.
func origDstFromOOB(oob []byte) (netip.AddrPort, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.AddrPort{}, err
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_ORIGDSTADDR && len(m.Data) >= 8:
			port := binary.BigEndian.Uint16(m.Data[2:4])
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(m.Data[4:8])), port), nil
		case m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_ORIGDSTADDR && len(m.Data) >= 24:
			port := binary.BigEndian.Uint16(m.Data[2:4])
			return netip.AddrPortFrom(netip.AddrFrom16([16]byte(m.Data[8:24])).Unmap(), port), nil
		}
	}
	return netip.AddrPort{}, errors.New("no original destination in control messages")
}

// Reply sends payload to the sandbox at to, from the address from (the
// original destination the sandbox used), through a transparent socket
// bound to from. Reply sockets are cached and expire when idle (Sweep).
func (u *UDPSocket) Reply(from, to netip.AddrPort, payload []byte) error {
	c, err := u.replySocket(from, to)
	if err != nil {
		return err
	}
	_, err = c.Write(payload)
	return err
}

func (u *UDPSocket) replySocket(from, to netip.AddrPort) (*net.UDPConn, error) {
	k := replyKey{from, to}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil, net.ErrClosed
	}
	if r, ok := u.replies[k]; ok {
		r.used = time.Now()
		return r.conn, nil
	}
	network := "udp4"
	if from.Addr().Is6() {
		network = "udp6"
	}
	d := net.Dialer{
		LocalAddr: net.UDPAddrFromAddrPort(from),
		Control:   SocketOptions(u.mark, false, true),
	}
	c, err := d.Dial(network, to.String())
	if err != nil {
		return nil, fmt.Errorf("opening reply socket %s -> %s: %w", from, to, err)
	}
	uc := c.(*net.UDPConn)
	u.replies[k] = &replySock{conn: uc, used: time.Now()}
	return uc, nil
}

// Sweep closes reply sockets idle for longer than idle.
func (u *UDPSocket) Sweep(idle time.Duration) {
	cut := time.Now().Add(-idle)
	u.mu.Lock()
	defer u.mu.Unlock()
	for k, r := range u.replies {
		if r.used.Before(cut) {
			r.conn.Close()
			delete(u.replies, k)
		}
	}
}

// Close closes the receiving sockets and every reply socket.
func (u *UDPSocket) Close() error {
	u.mu.Lock()
	u.closed = true
	for k, r := range u.replies {
		r.conn.Close()
		delete(u.replies, k)
	}
	u.mu.Unlock()
	var errs []error
	for _, c := range u.conns {
		if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
