package tproxy

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
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
	for _, tc := range []struct {
		oob  []byte
		want string
	}{
		{cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4), "198.51.100.53:53"},
		{cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, v6), "[2001:db8::53]:8443"},
		// another message first: the destination is still found
		{append(cmsg(unix.SOL_IP, unix.IP_TTL, []byte{64, 0, 0, 0}), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4)...), "198.51.100.53:53"},
	} {
		got, err := origDstFromOOB(tc.oob)
		if err != nil || got.String() != tc.want {
			t.Errorf("got %v %v, want %s", got, err, tc.want)
		}
	}
	if _, err := origDstFromOOB(cmsg(unix.SOL_IP, unix.IP_TTL, []byte{64, 0, 0, 0})); err == nil {
		t.Error("a datagram without its destination must be refused")
	}
	if _, err := origDstFromOOB([]byte{1, 2, 3}); err == nil {
		t.Error("garbage control data must be refused")
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
