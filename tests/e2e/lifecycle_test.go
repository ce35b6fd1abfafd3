package e2e

import (
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// pinnedDrops reads a sandbox's drops for a reason straight from the pinned
// counter map (works while the daemon is dead).
func pinnedDrops(t *testing.T, d *harness.Daemon, reason bpf.Reason) uint64 {
	t.Helper()
	c, err := d.Pinned().Counters()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for k, v := range c {
		if k.Verdict == bpf.VerdictDrop && k.Reason == reason {
			n += v.Packets
		}
	}
	return n
}

// SIGKILL of the daemon in the middle of traffic never opens the datapath:
// the flow dies, nothing of the sandbox's reaches the remote side, new flows
// drop (counted), and after a restart the allowed flow works again.
func TestSIGKILLDuringTrafficLeaksNothing(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("crash", harness.SandboxOptions{Policy: policyOpen})
	sniff := env.Sniff()

	c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var writeErr atomic.Value
	go func() {
		chunk := []byte(strings.Repeat("x", 1024))
		for {
			if _, err := c.Write(chunk); err != nil {
				writeErr.Store(err)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	go func() { // drain the acks so the server never blocks
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	if !harness.Eventually(5*time.Second, func() bool { return srv.TotalBytes() > 20<<10 }) {
		t.Fatalf("traffic did not flow before the kill: %d bytes", srv.TotalBytes())
	}

	d.Kill()
	time.Sleep(300 * time.Millisecond) // bytes already in flight may land
	atKill := srv.TotalBytes()
	if !harness.Eventually(5*time.Second, func() bool { return writeErr.Load() != nil }) {
		t.Fatal("the sandbox's connection survived the proxy's death")
	}
	time.Sleep(time.Second)
	if got := srv.TotalBytes(); got != atKill {
		t.Fatalf("server received %d more bytes after the kill", got-atKill)
	}

	dropsBefore := pinnedDrops(t, d, bpf.ReasonNoProxy)
	if c2, err := sb.Dial("tcp4", "198.51.100.10:8080", 1500*time.Millisecond); err == nil {
		c2.Close()
		t.Fatal("a new connection succeeded with the daemon dead")
	}
	if pinnedDrops(t, d, bpf.ReasonNoProxy) <= dropsBefore {
		t.Fatal("the SYN was not dropped and counted as no-proxy while the daemon was dead")
	}
	if n := len(srv.Conns()); n != 1 {
		t.Fatalf("server saw %d connections, want only the first", n)
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}

	d.Start()
	if err := sb.Check(); err != nil {
		t.Fatalf("CHECK after restart: %v", err)
	}
	c3, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("allowed flow after restart: %v\n%s", err, d.Log())
	}
	defer c3.Close()
	c3.Write([]byte("back"))
	if ack, err := harness.ReadAck(c3, 5*time.Second); err != nil || ack != "ack:4" {
		t.Fatalf("round trip after restart: %q %v", ack, err)
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}
}

// A graceful restart re-adopts the sandbox: its link is updated in place,
// its policy re-applied as a new generation, and denials still hold.
func TestRestartReadoptsSandboxes(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	env.TCPServer("198.51.100.10:8081")
	sb := env.MustAddSandbox("restart", harness.SandboxOptions{Policy: policyOpen})
	before, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}
	d.Stop()
	d.Start()
	after, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatalf("sandbox not re-adopted: %v", err)
	}
	if after.Generation <= before.Generation || after.DatapathID != before.DatapathID {
		t.Fatalf("before %+v after %+v", before, after)
	}
	if err := sb.Check(); err != nil {
		t.Fatal(err)
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err != nil {
		t.Fatalf("allowed flow after restart: %v", err)
	} else {
		c.Close()
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("denied flow passes after restart")
	}
}

// A sandbox whose interface disappeared while the daemon was down is
// cleaned up at restart.
func TestRestartCleansUpGoneSandboxes(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("vanish", harness.SandboxOptions{Policy: policyOpen})
	d.Stop()
	// The runtime tears the sandbox down while cleanwalld is away: DEL
	// cannot reach it, ptp removes the veth.
	if err := sb.Del(); err != nil {
		t.Fatalf("DEL with the daemon down: %v", err)
	}
	d.Start()
	nothingLeft(t, d)
}

func TestBridgeChain(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("198.51.100.10:8080")
	env.TCPServer("198.51.100.10:8081")
	a := env.MustAddSandbox("br-a", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyOpen, NoIPv6: true})
	b := env.MustAddSandbox("br-b", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyOpen, NoIPv6: true})
	sniff := env.Sniff()

	c, err := a.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("allowed flow over the bridge: %v (%s)\n%s", err, countersString(t, d, a), d.Log())
	}
	c.Write([]byte("via bridge"))
	if ack, err := harness.ReadAck(c, 5*time.Second); err != nil || ack != "ack:10" {
		t.Fatalf("round trip: %q %v", ack, err)
	}
	c.Close()
	if from := srv.Conns()[0].From.Addr(); from != harness.NodeRemoteIP {
		t.Fatalf("server saw %v", from)
	}
	if c, err := a.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("denied port passes over the bridge")
	}
	// Sandbox to sandbox on the same bridge: no L2 path around the proxy.
	var l net.Listener
	if err := b.Do(func() (err error) {
		l, err = net.Listen("tcp4", "0.0.0.0:9000")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := l.Accept(); err == nil {
			accepted <- struct{}{}
			c.Close()
		}
	}()
	if c, err := a.Dial("tcp4", net.JoinHostPort(b.IP.String(), "9000"), 1500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("sandbox reached another sandbox on the bridge")
	}
	select {
	case <-accepted:
		t.Fatal("sandbox B accepted a connection from sandbox A")
	default:
	}
	if n := counter(t, d, a, "drop", bpf.ReasonARPNotGateway.String(), "") + counter(t, d, a, "drop", bpf.ReasonL2NotGateway.String(), ""); n == 0 {
		t.Fatalf("sandbox-to-sandbox attempt not counted: %s", countersString(t, d, a))
	}
	if n := sniff.FromSource(a.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}
}

func TestLegacyTCAttachment(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon("--attach", "tc")
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("legacy", harness.SandboxOptions{Policy: policyOpen})
	got, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}
	if got.AttachMode != string(bpf.AttachLegacyTC) {
		t.Fatalf("attach mode %q", got.AttachMode)
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err != nil {
		t.Fatalf("allowed flow with legacy tc: %v", err)
	} else {
		c.Close()
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("denied flow passes with legacy tc")
	}
	if counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") == 0 {
		t.Fatal("drop not counted with legacy tc")
	}
	if err := sb.Check(); err != nil {
		t.Fatal(err)
	}
	if err := sb.Del(); err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, d)
}

// TestBridgeChainIPv6: over a bridge, an IPv6 flow a rule allows reaches
// the remote through the proxy (the bridge program assigns it), and one no
// rule allows is dropped and counted.
func TestBridgeChainIPv6(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("[2001:db8:100::10]:8080")
	env.TCPServer("[2001:db8:100::10]:8081")
	sb := env.MustAddSandbox("br6", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyV6})
	sniff := env.Sniff()
	c, err := sb.Dial("tcp6", "[2001:db8:100::10]:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("allowed IPv6 flow over the bridge: %v (%s)\n%s", err, countersString(t, d, sb), d.Log())
	}
	c.Write([]byte("v6 bridge"))
	if ack, err := harness.ReadAck(c, 5*time.Second); err != nil || ack != "ack:9" {
		t.Fatalf("round trip: %q %v", ack, err)
	}
	c.Close()
	if from := srv.Conns()[0].From.Addr(); from != harness.NodeRemoteIP6 {
		t.Fatalf("server saw %v, want the proxy's %v", from, harness.NodeRemoteIP6)
	}
	if counter(t, d, sb, "redirect", "rule", "v6-results") == 0 {
		t.Fatalf("no redirect counted: %s", countersString(t, d, sb))
	}
	before := counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "")
	if c, err := sb.Dial("tcp6", "[2001:db8:100::10]:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("denied IPv6 port passes over the bridge")
	}
	if counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") == before {
		t.Fatalf("denied IPv6 flow not counted: %s", countersString(t, d, sb))
	}
	if n := sniff.FromSource(sb.IP6); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}
}
