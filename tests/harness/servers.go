package harness

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
)

// TCPServer records what every connection sent it. It answers each read
// with "ack:<n>" so clients can see a round trip.
type TCPServer struct {
	Addr  netip.AddrPort
	l     net.Listener
	mu    sync.Mutex
	conns []*Recorded
	total atomic.Int64
}

// Recorded is one accepted connection.
type Recorded struct {
	From  netip.AddrPort
	mu    sync.Mutex
	bytes []byte
}

// Bytes returns what the connection sent so far.
func (r *Recorded) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.bytes...)
}

// TCPServer starts a recording server on addr in the remote namespace.
func (e *Env) TCPServer(addr string) *TCPServer {
	e.T.Helper()
	var l net.Listener
	if err := e.InRemote(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	s := &TCPServer{Addr: l.Addr().(*net.TCPAddr).AddrPort(), l: l}
	e.onCleanup(func() { l.Close() })
	go s.serve()
	return s
}

func (s *TCPServer) serve() {
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		rec := &Recorded{From: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
		s.mu.Lock()
		s.conns = append(s.conns, rec)
		s.mu.Unlock()
		go func() {
			defer c.Close()
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					rec.mu.Lock()
					if len(rec.bytes) < 1<<20 {
						rec.bytes = append(rec.bytes, buf[:n]...)
					}
					rec.mu.Unlock()
					s.total.Add(int64(n))
					if _, werr := fmt.Fprintf(c, "ack:%d\n", n); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// Conns returns the connections accepted so far.
func (s *TCPServer) Conns() []*Recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Recorded(nil), s.conns...)
}

// TotalBytes is every byte received on every connection.
func (s *TCPServer) TotalBytes() int64 { return s.total.Load() }

// UDPServer records datagrams and echoes them back.
type UDPServer struct {
	Addr netip.AddrPort
	mu   sync.Mutex
	got  []Datagram
}

// Datagram is one received datagram.
type Datagram struct {
	From    netip.AddrPort
	Payload []byte
}

// UDPServer starts a recording UDP echo server in the remote namespace.
func (e *Env) UDPServer(addr string) *UDPServer {
	e.T.Helper()
	var c net.PacketConn
	if err := e.InRemote(func() (err error) {
		c, err = net.ListenPacket("udp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	e.onCleanup(func() { c.Close() })
	s := &UDPServer{Addr: c.LocalAddr().(*net.UDPAddr).AddrPort()}
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			s.mu.Lock()
			s.got = append(s.got, Datagram{From: from.(*net.UDPAddr).AddrPort(), Payload: append([]byte(nil), buf[:n]...)})
			s.mu.Unlock()
			_, _ = c.WriteTo(buf[:n], from)
		}
	}()
	return s
}

// Received returns the datagrams received so far.
func (s *UDPServer) Received() []Datagram {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Datagram(nil), s.got...)
}

// Sniffer counts frames on the remote namespace's link, to prove that a
// packet never arrived (not merely that no server answered).
type Sniffer struct {
	fd     int
	mu     sync.Mutex
	frames []gopacket.Packet
	done   chan struct{}
	// keep, when set, decides which frames are kept (the rest are only
	// counted in seen): a long capture of proxied traffic must not hold
	// every frame.
	keep func(gopacket.Packet) bool
	seen int
}

// Sniff starts capturing every frame arriving on the remote side.
func (e *Env) Sniff() *Sniffer { return e.sniff(nil) }

// SniffFromSandboxes captures, on the remote side, only IP packets whose
// source is in a sandbox range (10.0.0.0/8, fd00::/8): what would show a
// leak, without holding the proxied traffic (which comes from the node).
func (e *Env) SniffFromSandboxes() *Sniffer {
	v4, v6 := netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")
	return e.sniff(func(p gopacket.Packet) bool {
		if ip4, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
			a, _ := netip.AddrFromSlice(ip4.SrcIP)
			return v4.Contains(a.Unmap())
		}
		if ip6, ok := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
			a, _ := netip.AddrFromSlice(ip6.SrcIP)
			return v6.Contains(a)
		}
		return false
	})
}

func (e *Env) sniff(keep func(gopacket.Packet) bool) *Sniffer {
	e.T.Helper()
	var fd int
	err := e.InRemote(func() error {
		var err error
		fd, err = openPacketSocket("to-node")
		return err
	})
	if err != nil {
		e.T.Fatal(err)
	}
	s := &Sniffer{fd: fd, done: make(chan struct{}), keep: keep}
	go s.run()
	e.onCleanup(s.Stop)
	return s
}

func openPacketSocket(ifName string) (int, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	ifi, err := net.InterfaceByName(ifName)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("binding packet socket: %w", err)
	}
	tv := unix.Timeval{Usec: 100000}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (s *Sniffer) run() {
	defer close(s.done)
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		p := gopacket.NewPacket(append([]byte(nil), buf[:n]...), layers.LayerTypeEthernet, gopacket.Default)
		s.mu.Lock()
		s.seen++
		if s.keep == nil || s.keep(p) {
			s.frames = append(s.frames, p)
		}
		s.mu.Unlock()
	}
}

// Stop ends the capture.
func (s *Sniffer) Stop() {
	unix.Close(s.fd)
	<-s.done
}

// FromSource counts captured IP packets whose source address is a.
func (s *Sniffer) FromSource(a netip.Addr) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, p := range s.frames {
		if ip4, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
			if src, _ := netip.AddrFromSlice(ip4.SrcIP); src.Unmap() == a {
				n++
			}
		}
		if ip6, ok := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
			if src, _ := netip.AddrFromSlice(ip6.SrcIP); src == a {
				n++
			}
		}
	}
	return n
}

// Frames counts every captured frame (kept or not).
func (s *Sniffer) Frames() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen
}

// Inject writes a raw Ethernet frame out of the sandbox's interface, as a
// malicious sandbox process with CAP_NET_RAW would.
func (s *Sandbox) Inject(frame []byte) error {
	return netns.Do(s.NS, func() error {
		fd, err := openPacketSocket(s.IfName)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifi, err := net.InterfaceByName(s.IfName)
		if err != nil {
			return err
		}
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6})
	})
}

// GatewayMAC returns the MAC the sandbox's gateway answers with (its
// neighbour entry for the default gateway after some traffic, or the host
// veth's address).
func (s *Sandbox) GatewayMAC() (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := s.env.InNode(func() error {
		for _, iface := range s.Result.Interfaces {
			if iface.Sandbox == "" {
				ifi, err := net.InterfaceByName(iface.Name)
				if err == nil {
					mac = ifi.HardwareAddr
					// a bridge result lists the bridge first: that is the gateway
					return nil
				}
			}
		}
		return errors.New("no host-side interface")
	})
	return mac, err
}

// Eventually polls cond until it is true or the timeout passes.
func Eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cond()
}

// ReadAck reads one "ack:<n>" line from the recording server.
func ReadAck(c net.Conn, timeout time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	var b []byte
	one := make([]byte, 1)
	for {
		n, err := c.Read(one)
		if n == 1 {
			if one[0] == '\n' {
				return string(b), nil
			}
			b = append(b, one[0])
		}
		if err != nil {
			if err == io.EOF {
				return string(b), io.ErrUnexpectedEOF
			}
			return string(b), err
		}
	}
}

// Sniff captures every frame on the sandbox's own interface, inside its
// namespace: what the sandbox sent and everything it was sent (through
// cleanwall, that is the proxies' side of its flows).
func (s *Sandbox) Sniff() *Sniffer {
	s.env.T.Helper()
	var fd int
	if err := s.Do(func() (err error) {
		fd, err = openPacketSocket(s.IfName)
		return err
	}); err != nil {
		s.env.T.Fatal(err)
	}
	sn := &Sniffer{fd: fd, done: make(chan struct{})}
	go sn.run()
	s.env.onCleanup(sn.Stop)
	return sn
}

// TCPPayloads returns the TCP payload bytes captured so far, each
// connection direction's segments concatenated in capture order (so a
// string split across segments is still found), the streams one after
// another.
func (s *Sniffer) TCPPayloads() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	type dir struct {
		src, dst netip.AddrPort
	}
	var order []dir
	streams := map[dir][]byte{}
	for _, p := range s.frames {
		tcp, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if !ok || len(tcp.Payload) == 0 {
			continue
		}
		var src, dst netip.Addr
		if nl := p.NetworkLayer(); nl != nil {
			src, _ = netip.AddrFromSlice(nl.NetworkFlow().Src().Raw())
			dst, _ = netip.AddrFromSlice(nl.NetworkFlow().Dst().Raw())
		}
		d := dir{netip.AddrPortFrom(src, uint16(tcp.SrcPort)), netip.AddrPortFrom(dst, uint16(tcp.DstPort))}
		if _, seen := streams[d]; !seen {
			order = append(order, d)
		}
		streams[d] = append(streams[d], tcp.Payload...)
	}
	var out []byte
	for _, d := range order {
		out = append(out, streams[d]...)
	}
	return out
}
