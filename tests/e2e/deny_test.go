package e2e

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// denyCase sets up one sandbox, runs an attempt, and proves that nothing
// from the sandbox reached the remote side and that the drop was counted
// under the expected reason.
func denyCase(t *testing.T, reason bpf.Reason, attempt func(t *testing.T, env *harness.Env, sb *harness.Sandbox)) {
	t.Helper()
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("sbx", harness.SandboxOptions{Policy: policyOpen})
	sniff := env.Sniff()
	before := counter(t, d, sb, "drop", reason.String(), "")
	attempt(t, env, sb)
	ok := harness.Eventually(3*time.Second, func() bool {
		return counter(t, d, sb, "drop", reason.String(), "") > before
	})
	if !ok {
		t.Fatalf("no drop counted under %q: %s", reason, countersString(t, d, sb))
	}
	time.Sleep(200 * time.Millisecond)
	for _, a := range []netip.Addr{sb.IP, sb.IP6, netip.MustParseAddr("10.99.99.99")} {
		if a.IsValid() {
			if n := sniff.FromSource(a); n != 0 {
				t.Fatalf("%d packets from %v arrived at the remote side", n, a)
			}
		}
	}
}

func TestUDPIsDropped(t *testing.T) {
	var srv *harness.UDPServer
	denyCase(t, bpf.ReasonNoRule, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		srv = env.UDPServer("198.51.100.10:8080")
		err := sb.Do(func() error {
			c, err := net.Dial("udp4", "198.51.100.10:8080")
			if err != nil {
				return err
			}
			defer c.Close()
			for i := 0; i < 3; i++ {
				c.Write([]byte("exfiltrate"))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	if n := len(srv.Received()); n != 0 {
		t.Fatalf("UDP server received %d datagrams", n)
	}
}

func TestICMPIsDropped(t *testing.T) {
	denyCase(t, bpf.ReasonICMP, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		err := sb.Do(func() error {
			c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
			if err != nil {
				return err
			}
			defer c.Close()
			msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: 7, Seq: 1, Data: []byte("ping")}}
			b, _ := msg.Marshal(nil)
			_, err = c.WriteTo(b, &net.IPAddr{IP: net.ParseIP("198.51.100.10")})
			if err != nil {
				return err
			}
			c.SetReadDeadline(time.Now().Add(time.Second))
			if _, _, err := c.ReadFrom(make([]byte, 1500)); err == nil {
				t.Error("got an ICMP reply")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func TestIPv6IsDroppedWithoutARule(t *testing.T) {
	denyCase(t, bpf.ReasonNoRule, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		env.TCPServer("[2001:db8:100::10]:8080")
		if !sb.IP6.IsValid() {
			t.Fatal("sandbox got no IPv6 address")
		}
		if c, err := sb.Dial("tcp6", "[2001:db8:100::10]:8080", 1500*time.Millisecond); err == nil {
			c.Close()
			t.Fatal("IPv6 connection without a rule succeeded")
		}
	})
}

func TestIPv6AllowedByRule(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("[2001:db8:100::10]:8080")
	sb := env.MustAddSandbox("v6", harness.SandboxOptions{Policy: policyV6})
	c, err := sb.Dial("tcp6", "[2001:db8:100::10]:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("allowed IPv6 connection failed: %v (%s)", err, countersString(t, d, sb))
	}
	defer c.Close()
	c.Write([]byte("v6"))
	if ack, err := harness.ReadAck(c, 5*time.Second); err != nil || ack != "ack:2" {
		t.Fatalf("round trip: %q %v", ack, err)
	}
	if from := srv.Conns()[0].From.Addr(); from != harness.NodeRemoteIP6 {
		t.Fatalf("server saw %v, want the proxy's %v", from, harness.NodeRemoteIP6)
	}
	if counter(t, d, sb, "redirect", "rule", "v6-results") == 0 {
		t.Fatalf("no redirect counted: %s", countersString(t, d, sb))
	}
}

// synFrame crafts a TCP SYN from the sandbox's interface to the remote
// server, with the given source MAC and IP.
func synFrame(t *testing.T, sb *harness.Sandbox, srcMAC net.HardwareAddr, src netip.Addr) []byte {
	t.Helper()
	return sb.SYNFrame(t, srcMAC, src, netip.AddrPortFrom(harness.RemoteIP, 8080))
}

func TestSpoofedSourceIPIsDropped(t *testing.T) {
	denyCase(t, bpf.ReasonSpoofedIP, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		// To an allowed destination and port: only the forged source is wrong.
		if err := sb.Inject(synFrame(t, sb, sb.MAC, netip.MustParseAddr("10.99.99.99"))); err != nil {
			t.Fatal(err)
		}
	})
}

func TestSpoofedSourceMACIsDropped(t *testing.T) {
	denyCase(t, bpf.ReasonSpoofedMAC, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		if err := sb.Inject(synFrame(t, sb, net.HardwareAddr{0x02, 0xde, 0xad, 0xbe, 0xef, 0x01}, sb.IP)); err != nil {
			t.Fatal(err)
		}
	})
}

// A node-side service listening on a wildcard address must not be reachable
// by port number: the datapath ignores listeners that are not ours.
func TestNodeServicesAreNotReachable(t *testing.T) {
	denyCase(t, bpf.ReasonNoRule, func(t *testing.T, env *harness.Env, sb *harness.Sandbox) {
		var l net.Listener
		if err := env.InNode(func() (err error) {
			l, err = net.Listen("tcp4", "0.0.0.0:2222")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		for _, dst := range []string{"198.51.100.10:2222", net.JoinHostPort(sb.Result.IPs[0].Gateway.String(), "2222")} {
			if c, err := sb.Dial("tcp4", dst, time.Second); err == nil {
				c.Close()
				t.Fatalf("reached the node's listener via %s", dst)
			}
		}
	})
}
