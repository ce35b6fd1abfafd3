package bpf

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
)

// skLookupCtx is struct bpf_sk_lookup as BPF_PROG_TEST_RUN takes it.
type skLookupCtx struct {
	Cookie         uint64
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte
	RemoteIP6      [16]byte
	RemotePort     [2]byte // network byte order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32
	IngressIfindex uint32
	_              uint32 // the kernel's struct is 8-byte aligned: 72 bytes
}

func lookupCtx(src, dst netip.AddrPort) skLookupCtx {
	c := skLookupCtx{Protocol: unix.IPPROTO_TCP, LocalPort: uint32(dst.Port())}
	binary.BigEndian.PutUint16(c.RemotePort[:], src.Port())
	if src.Addr().Is4() {
		c.Family, c.RemoteIP4, c.LocalIP4 = unix.AF_INET, src.Addr().As4(), dst.Addr().As4()
	} else {
		c.Family, c.RemoteIP6, c.LocalIP6 = unix.AF_INET6, src.Addr().As16(), dst.Addr().As16()
	}
	return c
}

// runLookup runs steer_listener for one listener lookup and returns its
// verdict and the cookie of the socket it selected (0: none).
func (e *testEnv) runLookup(t *testing.T, src, dst netip.AddrPort) (uint32, uint64) {
	t.Helper()
	var ret uint32
	out := lookupCtx(src, dst)
	err := netns.Do(e.nsPath, func() error {
		var err error
		in := lookupCtx(src, dst)
		ret, err = e.dp.SteeringProgram().Run(&ebpf.RunOptions{Context: in, ContextOut: &out})
		return err
	})
	if err != nil {
		t.Fatalf("test run of steer_listener: %v", err)
	}
	return ret, out.Cookie
}

func (e *testEnv) steer(t *testing.T, src, dst netip.AddrPort, listener uint8, age time.Duration) {
	t.Helper()
	k := datapathSteerKey{Family: 4, Sport: src.Port(), Dport: dst.Port()}
	if src.Addr().Is6() {
		k.Family = 6
	}
	k.Saddr, k.Daddr = src.Addr().As16(), dst.Addr().As16()
	if src.Addr().Is4() {
		k.Saddr, k.Daddr = [16]byte{}, [16]byte{}
		a, b := src.Addr().As4(), dst.Addr().As4()
		copy(k.Saddr[:], a[:])
		copy(k.Daddr[:], b[:])
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	v := datapathSteer{CreatedNs: uint64(ts.Nano() - age.Nanoseconds()), Listener: listener}
	if err := e.dp.objs.CwSteer.Put(k, v); err != nil {
		t.Fatal(err)
	}
}

func cookie(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v uint64
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

// steer_listener answers the kernel's listener lookup with our listener
// only for a 4-tuple a tc program noted, once, within its lifetime, and
// fails the lookup (never falls back to a node service on the original
// port) when none of our listeners is there.
func TestSteeringProgram(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	src := netip.AddrPortFrom(sbxIP, 40000)
	dst := netip.AddrPortFrom(remote, 8080)
	src6 := netip.AddrPortFrom(sbxIP6, 40000)
	dst6 := netip.AddrPortFrom(remote6, 443)

	// Nothing noted: the lookup is left alone.
	if ret, c := env.runLookup(t, src, dst); ret != 1 || c != 0 {
		t.Fatalf("unnoted lookup: verdict %d, selected %#x; want pass, none", ret, c)
	}
	// Noted, but no listener of ours in cw_listeners (daemon gone): drop.
	env.steer(t, src, dst, ListenerTCP, 0)
	if ret, c := env.runLookup(t, src, dst); ret != 0 || c != 0 {
		t.Fatalf("noted lookup without listeners: verdict %d, selected %#x; want drop", ret, c)
	}

	st, err := env.dp.AttachSteering([]SteeringListener{{Kind: ListenerTCP, Conn: env.tcp4}, {Kind: ListenerTCP, Conn: env.tcp6}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, c := range []struct {
		name     string
		src, dst netip.AddrPort
		want     uint64
	}{{"ipv4", src, dst, cookie(t, env.tcp4)}, {"ipv6", src6, dst6, cookie(t, env.tcp6)}} {
		env.steer(t, c.src, c.dst, ListenerTCP, 0)
		if ret, got := env.runLookup(t, c.src, c.dst); ret != 1 || got != c.want {
			t.Fatalf("%s: noted lookup: verdict %d, selected %#x; want pass, our listener %#x", c.name, ret, got, c.want)
		}
		// An entry answers one lookup.
		if ret, got := env.runLookup(t, c.src, c.dst); ret != 1 || got != 0 {
			t.Fatalf("%s: second lookup: verdict %d, selected %#x; want pass, none", c.name, ret, got)
		}
	}
	// Another port of the same peer, and a stale entry, are left alone.
	env.steer(t, src, dst, ListenerTCP, 0)
	if ret, c := env.runLookup(t, netip.AddrPortFrom(sbxIP, 40001), dst); ret != 1 || c != 0 {
		t.Fatalf("other source port: verdict %d, selected %#x", ret, c)
	}
	env.steer(t, src, dst, ListenerTCP, 2*time.Second)
	if ret, c := env.runLookup(t, src, dst); ret != 1 || c != 0 {
		t.Fatalf("stale entry: verdict %d, selected %#x", ret, c)
	}
	if _, err := env.dp.AttachSteering([]SteeringListener{{Kind: ListenerUDP, Conn: env.tcp4}}); err == nil {
		t.Fatal("a UDP listener kind was accepted for steering")
	}
}

// timeWait leaves a TIME_WAIT socket in the test namespace for the 4-tuple
// sandbox:40000 -> remote:8080, held by the side of remote, as the proxy
// holds one when the server closes first.
func (e *testEnv) timeWait(t *testing.T) {
	t.Helper()
	err := netns.Do(e.nsPath, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		for _, a := range []netip.Addr{sbxIP, remote} {
			if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil && !errors.Is(err, unix.EEXIST) {
				return err
			}
		}
		l, err := net.Listen("tcp4", netip.AddrPortFrom(remote, 8080).String())
		if err != nil {
			return err
		}
		defer l.Close()
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(sbxIP, 40000))}
		c, err := d.Dial("tcp4", l.Addr().String())
		if err != nil {
			return err
		}
		s, err := l.Accept()
		if err != nil {
			return err
		}
		s.Close() // the server closes first: its side ends in TIME_WAIT
		if _, err := io.Copy(io.Discard, c); err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("making a time-wait socket: %v", err)
	}
}

// A SYN meeting a time-wait socket of its 4-tuple: with the steering
// program attached it goes to that socket (BPF_PROG_TEST_RUN cannot assign,
// so the ptp run ends in assign-failed past every check, and the bridge
// port marks it); without the program it drops (time-wait), because the
// kernel would give it to whatever listens on the original port. Other
// packets of that 4-tuple go to the time-wait socket (the kernel answers
// them), instead of dropping as no-socket.
func TestSYNMeetingTimeWait(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	env.timeWait(t)
	syn := build(t, syn4(remote, 8080))
	ack := build(t, frameOpts{src: sbxIP, dst: remote, proto: layers.IPProtocolTCP, dport: 8080, ack: true})
	expect := func(name string, frame []byte, v Verdict, r Reason, rule uint32) {
		t.Helper()
		before := env.counter(t, rule, v, r)
		ret, _ := env.run(t, frame)
		want := uint32(actOK)
		if v == VerdictDrop {
			want = actShot
		}
		if after := env.counter(t, rule, v, r); ret != want || after.Packets != before.Packets+1 {
			all, _ := env.dp.Counters()
			t.Fatalf("%s: returned %d, want %d; %v/%v rule %d not counted: %v", name, ret, want, v, r, rule, all)
		}
	}
	expect("SYN without steering", syn, VerdictDrop, ReasonTimeWait, 0)
	expect("ACK to the time-wait socket", ack, VerdictDrop, ReasonAssignFailed, 0)

	st, err := env.dp.AttachSteering([]SteeringListener{{Kind: ListenerTCP, Conn: env.tcp4}})
	if err != nil {
		t.Fatal(err)
	}
	before := env.counter(t, 0, VerdictDrop, ReasonTimeWait)
	expect("SYN with steering", syn, VerdictDrop, ReasonAssignFailed, 0)
	if env.counter(t, 0, VerdictDrop, ReasonTimeWait) != before {
		t.Fatal("SYN dropped as time-wait although the steering is attached")
	}
	st.Close()
	expect("SYN after the steering is detached", syn, VerdictDrop, ReasonTimeWait, 0)

	sb, err := env.dp.Sandbox(env.ifindex)
	if err != nil {
		t.Fatal(err)
	}
	sb.Bridge = true
	if err := env.dp.PutSandbox(env.ifindex, sb); err != nil {
		t.Fatal(err)
	}
	expect("bridge port: SYN", syn, VerdictRedirect, ReasonRule, 2)
	expect("bridge port: ACK", ack, VerdictRedirect, ReasonEstablished, 0)
}
