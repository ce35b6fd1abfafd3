package tproxy

import (
	"container/list"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// cmsg builds one control message as the kernel lays it out.
func cmsg(level, typ int, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = int32(level), int32(typ)
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func TestOrigDstFromOOB(t *testing.T) {
	v4 := make([]byte, unix.SizeofSockaddrInet4)
	binary.LittleEndian.PutUint16(v4[0:], unix.AF_INET)
	binary.BigEndian.PutUint16(v4[2:], 53)
	copy(v4[4:8], []byte{198, 51, 100, 53})
	v6 := make([]byte, unix.SizeofSockaddrInet6)
	binary.LittleEndian.PutUint16(v6[0:], unix.AF_INET6)
	binary.BigEndian.PutUint16(v6[2:], 8443)
	a6 := netip.MustParseAddr("2001:db8::53").As16()
	copy(v6[8:24], a6[:])
	mapped := make([]byte, unix.SizeofSockaddrInet6)
	binary.LittleEndian.PutUint16(mapped[0:], unix.AF_INET6)
	binary.BigEndian.PutUint16(mapped[2:], 5353)
	m6 := netip.MustParseAddr("::ffff:198.51.100.53").As16()
	copy(mapped[8:24], m6[:])
	for _, tc := range []struct {
		oob  []byte
		want string
	}{
		{cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4), "198.51.100.53:53"},
		{cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, v6), "[2001:db8::53]:8443"},
		// another message first: the destination is still found
		{append(cmsg(unix.SOL_IP, unix.IP_TTL, []byte{64, 0, 0, 0}), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4)...), "198.51.100.53:53"},
		// an IPv4 destination in an IPv6 message is reported as IPv4
		{cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, mapped), "198.51.100.53:5353"},
		// a truncated message is skipped, the next one still read
		{append(cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, v6[:24]), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4)...), "198.51.100.53:53"},
	} {
		got, err := origDstFromOOB(tc.oob)
		if err != nil || got.String() != tc.want {
			t.Errorf("got %v %v, want %s", got, err, tc.want)
		}
	}
	for what, oob := range map[string][]byte{
		"a datagram without its destination": cmsg(unix.SOL_IP, unix.IP_TTL, []byte{64, 0, 0, 0}),
		"garbage control data":               {1, 2, 3},
		"an empty IPv4 destination":          cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, nil),
		"a truncated IPv4 destination":       cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4[:8]),
		"an empty IPv6 destination":          cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, nil),
		"a truncated IPv6 destination":       cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, v6[:24]),
	} {
		if got, err := origDstFromOOB(oob); err == nil {
			t.Errorf("%s must be refused, got %v", what, got)
		}
	}
}

// TestServeReportsOriginalDestination: datagrams the kernel delivers to a
// wildcard-bound socket arrive with the address they were sent to (not the
// bound one), decoded from the kernel's own control messages, and with the
// sender's address. IP(V6)_RECVORIGDSTADDR needs no privilege, so this runs
// without root, outside the datapath.
func TestServeReportsOriginalDestination(t *testing.T) {
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if network == "udp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	u := &UDPSocket{replies: map[netip.AddrPort]*replySock{}, lru: list.New()}
	for _, la := range []struct{ network, addr string }{{"udp4", "0.0.0.0:0"}, {"udp6", "[::]:0"}} {
		pc, err := lc.ListenPacket(context.Background(), la.network, la.addr)
		if err != nil {
			if la.network == "udp6" && ipv6Unavailable(err) {
				testutil.Skip(t, "no IPv6 in this namespace")
			}
			t.Fatal(err)
		}
		u.conns = append(u.conns, pc.(*net.UDPConn))
	}
	got := make(chan Datagram, 1)
	served := make(chan error, 1)
	go func() { served <- u.Serve(func(d Datagram) { got <- d }) }()
	defer func() {
		u.Close()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()

	for i, dst := range []netip.AddrPort{
		// 127.0.0.2 is local but not the address the socket is bound to
		netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), uint16(u.conns[0].LocalAddr().(*net.UDPAddr).Port)),
		netip.AddrPortFrom(netip.IPv6Loopback(), uint16(u.conns[1].LocalAddr().(*net.UDPAddr).Port)),
	} {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		payload := fmt.Sprintf("datagram %d", i)
		if _, err := c.Write([]byte(payload)); err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-got:
			src := c.LocalAddr().(*net.UDPAddr).AddrPort()
			if d.OrigDst != dst || d.Src != src || string(d.Payload) != payload {
				t.Errorf("got %v -> %v %q, want %v -> %v %q", d.Src, d.OrigDst, d.Payload, src, dst, payload)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no datagram to %v arrived", dst)
		}
	}
}

// TestReplySocketsAreBounded: replies from thousands of source ports and
// many original destinations hold at most MaxReplySockets descriptors,
// and each reply still leaves from the address the sandbox asked.
func TestReplySocketsAreBounded(t *testing.T) {
	testutil.RequireRoot(t)
	name := fmt.Sprintf("cwt-tproxy-%d", os.Getpid())
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Delete(name)
	err = netns.Do(path, func() error {
		u, err := ListenUDP(context.Background(), 0, 0x0c1f0000)
		if err != nil {
			return err
		}
		defer u.Close()
		u.MaxReplySockets = 3
		rx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		defer rx.Close()
		to := rx.LocalAddr().(*net.UDPAddr).AddrPort()
		buf := make([]byte, 64)
		for i := 1; i <= 6; i++ {
			from := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 53)
			for port := 0; port < 3; port++ {
				if err := u.Reply(from, to, []byte("answer")); err != nil {
					return err
				}
				_ = rx.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, src, err := rx.ReadFromUDPAddrPort(buf)
				if err != nil {
					return err
				}
				if src != from || string(buf[:n]) != "answer" {
					return fmt.Errorf("reply from %v (%q), want from %v", src, buf[:n], from)
				}
			}
			if n := u.ReplySockets(); n > 3 {
				return fmt.Errorf("%d reply sockets held, limit 3", n)
			}
		}
		u.Sweep(0)
		if n := u.ReplySockets(); n != 0 {
			return fmt.Errorf("%d reply sockets after a sweep", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
