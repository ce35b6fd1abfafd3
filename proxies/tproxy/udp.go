package tproxy

import (
	"container/list"
	"context"
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

	// MaxReplySockets bounds the cached reply sockets (0: DefaultMaxReplySockets).
	MaxReplySockets int

	mu      sync.Mutex
	replies map[netip.AddrPort]*replySock // by the address replies come from
	lru     *list.List                    // of those addresses, most recently used first
	closed  bool
}

type replySock struct {
	conn *net.UDPConn
	used time.Time
	elem *list.Element
}

// ListenUDP opens the transparent UDP sockets on port (0: pick one).
func ListenUDP(ctx context.Context, port uint16, mark uint32) (*UDPSocket, error) {
	lc := net.ListenConfig{Control: SocketOptions(mark, false, false)}
	u := &UDPSocket{Port: port, mark: mark, replies: map[netip.AddrPort]*replySock{}, lru: list.New()}
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

// origDstFromOOB reads the IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message.
func origDstFromOOB(oob []byte) (netip.AddrPort, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.AddrPort{}, err
	}
	for i := range msgs {
		// unix.ParseOrigDstAddr reads a whole sockaddr without checking the
		// message's length (an empty one panics, a short one reads past
		// it): a message too short for its sockaddr is skipped.
		if len(msgs[i].Data) < origDstSize(msgs[i].Header) {
			continue
		}
		sa, err := unix.ParseOrigDstAddr(&msgs[i])
		if err != nil {
			continue
		}
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), nil
		case *unix.SockaddrInet6:
			return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)), nil
		}
	}
	return netip.AddrPort{}, errors.New("no original destination in control messages")
}

// origDstSize is the length of the sockaddr an original-destination control
// message of h's level carries.
func origDstSize(h unix.Cmsghdr) int {
	if h.Level == unix.SOL_IPV6 {
		return unix.SizeofSockaddrInet6
	}
	return unix.SizeofSockaddrInet4
}

// DefaultMaxReplySockets bounds the reply sockets an UDPSocket keeps.
const DefaultMaxReplySockets = 4096

// Reply sends payload to the sandbox at to, from the address from (the
// original destination the sandbox used), through a transparent socket
// bound to from. One unconnected reply socket serves every sandbox and
// source port that asked from: a sandbox sending from thousands of source
// ports costs no more descriptors than one. Reply sockets are cached,
// expire when idle (Sweep), and at most MaxReplySockets are kept (the
// least recently used is closed first).
func (u *UDPSocket) Reply(from, to netip.AddrPort, payload []byte) error {
	c, err := u.replySocket(from)
	if err != nil {
		return err
	}
	_, err = c.WriteToUDPAddrPort(payload, to)
	return err
}

func (u *UDPSocket) replySocket(from netip.AddrPort) (*net.UDPConn, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil, net.ErrClosed
	}
	if r, ok := u.replies[from]; ok {
		r.used = time.Now()
		u.lru.MoveToFront(r.elem)
		return r.conn, nil
	}
	network := "udp4"
	if from.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: SocketOptions(u.mark, false, true)}
	pc, err := lc.ListenPacket(context.Background(), network, from.String())
	if err != nil {
		return nil, fmt.Errorf("opening reply socket from %s: %w", from, err)
	}
	max := u.MaxReplySockets
	if max <= 0 {
		max = DefaultMaxReplySockets
	}
	for len(u.replies) >= max {
		oldest := u.lru.Back()
		u.drop(oldest.Value.(netip.AddrPort))
	}
	uc := pc.(*net.UDPConn)
	u.replies[from] = &replySock{conn: uc, used: time.Now(), elem: u.lru.PushFront(from)}
	return uc, nil
}

// drop closes and forgets one reply socket. Called with u.mu held.
func (u *UDPSocket) drop(from netip.AddrPort) {
	if r, ok := u.replies[from]; ok {
		r.conn.Close()
		u.lru.Remove(r.elem)
		delete(u.replies, from)
	}
}

// ReplySockets is the number of reply sockets held.
func (u *UDPSocket) ReplySockets() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.replies)
}

// Sweep closes reply sockets idle for longer than idle.
func (u *UDPSocket) Sweep(idle time.Duration) {
	cut := time.Now().Add(-idle)
	u.mu.Lock()
	defer u.mu.Unlock()
	for e := u.lru.Back(); e != nil; {
		prev := e.Prev()
		from := e.Value.(netip.AddrPort)
		if u.replies[from].used.After(cut) {
			break // the rest were used later
		}
		u.drop(from)
		e = prev
	}
}

// Close closes the receiving sockets and every reply socket.
func (u *UDPSocket) Close() error {
	u.mu.Lock()
	u.closed = true
	for from := range u.replies {
		u.drop(from)
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
