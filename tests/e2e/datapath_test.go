package e2e

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// counter sums a sandbox's counters for a verdict and reason (and rule).
func counter(t *testing.T, d *harness.Daemon, s *harness.Sandbox, verdict, reason, rule string) uint64 {
	t.Helper()
	return d.Counter(t, s, verdict, reason, rule)
}

func countersString(t *testing.T, d *harness.Daemon, s *harness.Sandbox) string {
	return d.CountersString(s)
}

func TestAllowedTCPGoesThroughTheProxy(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("allowed", harness.SandboxOptions{Policy: policyOpen})

	c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("allowed connection failed: %v\ncounters: %s\n%s", err, countersString(t, d, sb), d.Log())
	}
	defer c.Close()
	msg := []byte("hello from the clean room")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	ack, err := harness.ReadAck(c, 5*time.Second)
	if err != nil || ack != fmt.Sprintf("ack:%d", len(msg)) {
		t.Fatalf("no round trip: %q %v", ack, err)
	}
	conns := srv.Conns()
	if len(conns) != 1 || !bytes.Equal(conns[0].Bytes(), msg) {
		t.Fatalf("server did not receive the bytes: %d conns", len(conns))
	}
	// Through the proxy: the server sees the node's address, never the sandbox's.
	if got := conns[0].From.Addr(); got != harness.NodeRemoteIP {
		t.Fatalf("server saw the connection from %v, want the proxy at %v", got, harness.NodeRemoteIP)
	}
	if n := counter(t, d, sb, "redirect", "rule", "results-api"); n == 0 {
		t.Fatalf("no redirect counted for rule results-api: %s", countersString(t, d, sb))
	}
	c.Close()
	ok := harness.Eventually(5*time.Second, func() bool {
		m, err := d.Metrics()
		if err != nil {
			return false
		}
		v, ok := harness.MetricValue(m, "cleanwall_proxy_bytes_total", `rule="results-api"`, `direction="out"`)
		return ok && v == float64(len(msg))
	})
	if !ok {
		m, _ := d.Metrics()
		t.Fatalf("proxy byte counter for results-api/out is not %d:\n%s", len(msg), grep(m, "cleanwall_proxy"))
	}
}

func grep(s, sub string) string { return harness.Grep(s, sub) }

// A deny test proves the packet did not arrive and that the drop was counted.
func TestDisallowedPortIsDroppedAndCounted(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("198.51.100.10:8081")
	sb := env.MustAddSandbox("denied", harness.SandboxOptions{Policy: policyOpen})
	sniff := env.Sniff()

	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 1500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("connection to a port no rule allows succeeded")
	}
	if n := len(srv.Conns()); n != 0 {
		t.Fatalf("server accepted %d connections", n)
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox arrived at the remote side", n)
	}
	if n := counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), ""); n == 0 {
		t.Fatalf("drop not counted: %s", countersString(t, d, sb))
	}
}
