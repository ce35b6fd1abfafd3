package adversarial

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyFlood allows TCP 8080 and UDP 9000 to the remote, with per-policy
// limits lower than the daemon's.
const policyFlood = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: flood}
spec:
  limits: {tcpFlows: 50, udpFlows: 20}
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}, {port: 9000, protocol: UDP}]
      mode: open
`

// policyRate allows TCP 8080 at 5 new flows a second (burst 10).
const policyRate = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: rate}
spec:
  limits: {newFlowsPerSecond: 5}
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// reaches sends one byte on c and waits for the server's ack: true when
// the flow really reaches the remote (a refused flow is accepted by the
// proxy's listener, then reset).
func reaches(c net.Conn) bool {
	if _, err := c.Write([]byte("x")); err != nil {
		return false
	}
	ack, err := harness.ReadAck(c, 2*time.Second)
	return err == nil && strings.HasPrefix(ack, "ack:")
}

func flowLimitRefusals(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return harness.MetricSum(m, "cleanwall_proxy_flows_total", `sandbox="`+sb.ContainerID+`"`, `result="flow-limit"`)
}

func openFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestOneSandboxCannotStarveTheNode: a sandbox holding as many idle TCP
// flows and UDP flows as it can gets its limits and no more; the flows
// over them are refused and counted as flow-limit, its established flows
// keep working, a neighbour's requests all pass, the API answers and a new
// sandbox is admitted meanwhile, the daemon's descriptors stay bounded and
// its log does not grow with the refusals.
func TestOneSandboxCannotStarveTheNode(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon("--log-level", "info", "--max-tcp-flows", "100", "--max-udp-flows", "40")
	srv := env.TCPServer("198.51.100.10:8080")
	udp := env.UDPServer("198.51.100.10:9000")
	flooder := env.MustAddSandbox("flooder", harness.SandboxOptions{Policy: policyFlood, NoIPv6: true})
	calm := env.MustAddSandbox("calm", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	fdsBefore := openFDs(t, d.Pid())

	// TCP: 150 idle flows asked, 50 allowed.
	var held []net.Conn
	refused := 0
	for i := 0; i < 150; i++ {
		c, err := flooder.Dial("tcp4", "198.51.100.10:8080", 2*time.Second)
		if err != nil {
			refused++
			continue
		}
		if reaches(c) {
			held = append(held, c)
		} else {
			refused++
			c.Close()
		}
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	if len(held) != 50 || refused != 100 {
		t.Fatalf("%d flows reached the remote and %d were refused, want 50 and 100", len(held), refused)
	}

	// UDP: 200 source ports, 20 flows.
	err := flooder.Do(func() error {
		for i := 0; i < 200; i++ { // distinct source ports: 200 flows asked
			c, err := net.DialUDP("udp4", &net.UDPAddr{Port: 41000 + i}, &net.UDPAddr{IP: net.IPv4(198, 51, 100, 10), Port: 9000})
			if err != nil {
				return err
			}
			_, _ = c.Write([]byte("u"))
			c.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(2*time.Second, func() bool { return len(udp.Received()) >= 20 })
	sources := map[string]bool{}
	for _, dg := range udp.Received() {
		sources[dg.From.String()] = true
	}
	if len(sources) != 20 {
		t.Errorf("the UDP server saw %d flows, want the limit of 20", len(sources))
	}

	// The neighbour, the API and a new sandbox are unaffected.
	var wg sync.WaitGroup
	okCalm := 0
	var mu sync.Mutex
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := calm.Dial("tcp4", "198.51.100.10:8080", 2*time.Second)
			if err != nil {
				return
			}
			defer c.Close()
			if reaches(c) {
				mu.Lock()
				okCalm++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if okCalm != 10 {
		t.Errorf("the neighbour got %d of 10 requests through", okCalm)
	}
	if _, err := d.Client().List(harness.Ctx()); err != nil {
		t.Errorf("the API does not answer: %v", err)
	}
	if _, err := env.AddSandbox("newcomer", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true}); err != nil {
		t.Errorf("a new sandbox was not admitted: %v", err)
	}

	// The flooder's established flows still work.
	for i, c := range held {
		if !reaches(c) {
			t.Fatalf("established flow %d of the flooder broke", i)
		}
	}
	// The last datagrams may still be on their way through the proxy.
	if !harness.Eventually(3*time.Second, func() bool { return flowLimitRefusals(t, d, flooder) >= 100+180 }) {
		t.Errorf("cleanwall_proxy_flows_total{result=flow-limit} = %v, want at least 280 (100 TCP, 180 UDP)", flowLimitRefusals(t, d, flooder))
	}
	if n := openFDs(t, d.Pid()) - fdsBefore; n > 400 {
		t.Errorf("the daemon holds %d more descriptors than before the flood", n)
	}
	if n := strings.Count(d.Log(), "flow refused by proxy"); n > 60 {
		t.Errorf("the log has %d refusal lines for 280 refusals: not rate-limited", n)
	}
	if len(srv.Conns()) < 50 {
		t.Errorf("the server saw %d connections", len(srv.Conns()))
	}
}

// TestNewFlowRateLimit: a policy's newFlowsPerSecond (5, burst 10) is
// enforced in the datapath: SYNs beyond the burst are dropped in the
// kernel and counted as flow-limit (the proxies never see them), and flows
// are admitted again as the budget refills.
func TestNewFlowRateLimit(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon("--log-level", "info")
	srv := env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("rate", harness.SandboxOptions{Policy: policyRate, NoIPv6: true})
	before := d.Counter(t, sb, "drop", "flow-limit", "")
	ok := 0
	start := time.Now()
	for i := 0; i < 30; i++ {
		// Shorter than the first SYN retransmission (1 s): a dropped SYN
		// is a failed connect here.
		c, err := sb.Dial("tcp4", "198.51.100.10:8080", 300*time.Millisecond)
		if err != nil {
			continue
		}
		if reaches(c) {
			ok++
		}
		c.Close()
	}
	// 10 from the burst, plus what refilled at 5/s while the loop ran.
	if max := 10 + int(5*time.Since(start).Seconds()) + 1; ok < 10 || ok > max {
		t.Fatalf("%d of 30 flows passed in %v, want 10 to %d", ok, time.Since(start), max)
	}
	if n := d.Counter(t, sb, "drop", "flow-limit", "") - before; n < uint64(30-ok) {
		t.Errorf("%d SYNs dropped as flow-limit for %d refused flows", n, 30-ok)
	}
	if n := len(srv.Conns()); n != ok {
		t.Errorf("the server saw %d connections for %d admitted flows", n, ok)
	}
	// The budget refills: a rate, not a quota.
	if !harness.Eventually(3*time.Second, func() bool {
		c, err := sb.Dial("tcp4", "198.51.100.10:8080", 300*time.Millisecond)
		if err != nil {
			return false
		}
		defer c.Close()
		return reaches(c)
	}) {
		t.Fatal("no flow admitted after the budget refilled")
	}
}
