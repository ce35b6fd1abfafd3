package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyConsent needs consent (spec.governance.consent: required): a TCP
// echo rule and an HTTP rule on the remote side.
const policyConsent = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: consented}
spec:
  governance:
    consent: required
  egress:
    - name: echo
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 9000}]
      mode: open
    - name: web
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
      open:
        protocol: http
        http:
          rules:
            - methods: [GET]
              paths: ["/**"]
`

const consentAddr = "198.51.100.10:8443"

// consentEnv is a topology with a consent service in the remote namespace,
// a cleanwalld asking it, a TCP echo server and an HTTP server.
type consentEnv struct {
	env  *harness.Env
	cs   *harness.ConsentServer
	d    *harness.Daemon
	echo *harness.TCPServer
	web  *harness.HTTPServer
}

func newConsentEnv(t *testing.T, timeout string) *consentEnv {
	env := harness.New(t)
	cs := env.StartConsentServer(consentAddr)
	d := env.StartDaemon("--consent-url", cs.URL, "--consent-ca", cs.CAFile, "--consent-timeout", timeout)
	return &consentEnv{env: env, cs: cs, d: d, echo: env.TCPServer("198.51.100.10:9000"), web: env.HTTPServer("198.51.100.10:8080", nil)}
}

func (c *consentEnv) allowAll(ttl int) {
	c.cs.Allow("execute", "consented", "", ttl)
	c.cs.Allow("egress", "consented", "echo", ttl)
	c.cs.Allow("egress", "consented", "web", ttl)
}

// consentDecisions sums cleanwall_consent_decisions_total of the labels.
func consentDecisions(t *testing.T, d *harness.Daemon, labels ...string) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return harness.MetricSum(m, "cleanwall_consent_decisions_total", labels...)
}

// keepAlive opens an HTTP/1.1 connection from the sandbox, makes one
// request on it and returns it open (keep-alive) with its reader.
func keepAlive(t *testing.T, sb *harness.Sandbox, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := sb.Dial("tcp4", addr, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /first HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok /first\n" || resp.Close {
		t.Fatalf("keep-alive request: %s %q close=%v", resp.Status, body, resp.Close)
	}
	_ = c.SetDeadline(time.Time{})
	return c, br
}

// closedWithin waits for the peer to end c (a reset or an end of stream)
// and returns how long that took after since; it fails past limit.
func closedWithin(t *testing.T, what string, c net.Conn, r io.Reader, since time.Time, limit time.Duration) time.Duration {
	t.Helper()
	_ = c.SetReadDeadline(since.Add(limit))
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			t.Fatalf("%s: read %q after the revocation", what, buf[:n])
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("%s: still open %v after the revocation", what, limit)
			}
			el := time.Since(since)
			t.Logf("%s closed %v after the revocation (%v)", what, el.Round(time.Millisecond), err)
			return el
		}
	}
}

// consentRefused is expectRefused for flows refused at once: a cached
// deny resets the flow right after the handshake, and a dialer scheduled
// late reads that reset as connect's own error (SO_ERROR), which is the
// same refusal: nothing was sent.
func consentRefused(t *testing.T, sb *harness.Sandbox, addr, msg string) {
	t.Helper()
	c, err := sb.Dial("tcp4", addr, 3*time.Second)
	if errors.Is(err, syscall.ECONNRESET) {
		return
	}
	if err != nil {
		t.Fatalf("dial %s: %v (want a connection that is then reset)", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var got []byte
	if _, err = c.Write([]byte(msg)); err == nil {
		got, err = io.ReadAll(c)
	}
	if len(got) > 0 {
		t.Fatalf("the sandbox read %q from %s", got[:min(len(got), 64)], addr)
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("flow to %s ended with %v, want a reset", addr, err)
	}
}

func hostname(t *testing.T) string {
	h, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// TestConsentRevokeMidFlow: with consent, a sandbox is admitted once
// execute is allowed and its rules' first flows ask egress; withdrawing
// the egress grants closes an open TCP connection and a keep-alive HTTP
// connection within the TTL plus one second, with no flow asking; new
// flows are then reset before anything is dialed, and counted.
func TestConsentRevokeMidFlow(t *testing.T) {
	c := newConsentEnv(t, "1s")
	const ttl = 2
	c.allowAll(ttl)
	sb := c.env.MustAddSandbox("consent", harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})

	// execute was asked at admission with the protocol's fields.
	reqs := c.cs.Requests()
	if len(reqs) != 1 || reqs[0].Kind != "execute" || reqs[0].Sandbox != sb.ContainerID || reqs[0].Policy != "consented" ||
		reqs[0].PolicySHA256 != sha256Hex(policyConsent) || reqs[0].Node != hostname(t) || reqs[0].Rule != "" {
		t.Fatalf("requests at admission: %+v (want one execute for %s, policy sha %s)", reqs, sb.ContainerID, sha256Hex(policyConsent))
	}

	held, err := sb.Dial("tcp4", "198.51.100.10:9000", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := echoRoundTrip(held, "before the revocation\n"); err != nil {
		t.Fatal(err)
	}
	web, webR := keepAlive(t, sb, "198.51.100.10:8080")
	defer web.Close()
	var egress []harness.ConsentRequest
	for _, r := range c.cs.Requests() {
		if r.Kind == "egress" {
			egress = append(egress, r)
		}
	}
	if len(egress) != 2 || egress[0].Destination == "" {
		t.Fatalf("egress requests: %+v (want one per rule, with the first flow's destination)", egress)
	}

	c.cs.Revoke("egress", "consented", "echo")
	c.cs.Revoke("egress", "consented", "web")
	revoked := time.Now()
	limit := (ttl + 1) * time.Second
	closedWithin(t, "the open TCP connection", held, held, revoked, limit)
	closedWithin(t, "the keep-alive HTTP connection", web, webR, revoked, limit)

	conns, webReqs := len(c.echo.Conns()), len(c.web.Requests())
	consentRefused(t, sb, "198.51.100.10:9000", "after the revocation\n")
	consentRefused(t, sb, "198.51.100.10:8080", "GET /after HTTP/1.1\r\nHost: 198.51.100.10:8080\r\n\r\n")
	if n := len(c.echo.Conns()); n != conns {
		t.Errorf("the echo server accepted %d connections after the revocation", n-conns)
	}
	if n := len(c.web.Requests()); n != webReqs {
		t.Errorf("the web server got %d requests after the revocation", n-webReqs)
	}
	for _, rule := range []string{"echo", "web"} {
		if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, c.d, sb, rule, "consent-denied") >= 1 }) {
			t.Errorf("rule %s: the refused flow was not counted (result=consent-denied)", rule)
		}
	}
	if n := consentDecisions(t, c.d, `kind="egress"`, `decision="deny"`, `source="fresh"`); n < 2 {
		t.Errorf("fresh egress denies counted: %v, want 2 or more", n)
	}
	if n := consentDecisions(t, c.d, `kind="egress"`, `decision="deny"`, `source="cached"`); n < 2 {
		t.Errorf("cached egress denies counted: %v, want 2 or more (the refused flows)", n)
	}
	if n := consentDecisions(t, c.d, `kind="execute"`, `decision="allow"`, `source="fresh"`); n < 1 {
		t.Errorf("fresh execute allows counted: %v", n)
	}
	auditHas(t, c.d, `"kind":"consent.decision"`, 4)
	auditHas(t, c.d, `"kind":"consent.close"`, 2)
}

// TestConsentRefresh: `cleanwall consent refresh` makes a revocation take
// effect at once, long before the cached answer (an hour) would expire: a
// withdrawn execute closes every flow of the sandbox and refuses new ones,
// until execute is granted again.
func TestConsentRefresh(t *testing.T) {
	c := newConsentEnv(t, "1s")
	c.allowAll(3600)
	sb := c.env.MustAddSandbox("refresh", harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})
	held, err := sb.Dial("tcp4", "198.51.100.10:9000", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := echoRoundTrip(held, "hello\n"); err != nil {
		t.Fatal(err)
	}
	web, webR := keepAlive(t, sb, "198.51.100.10:8080")
	defer web.Close()

	c.cs.Revoke("execute", "consented", "")
	start := time.Now()
	out, err := exec.Command(filepath.Join(c.env.Bin, "cleanwall"), "consent", "refresh", "--socket", c.d.Socket, "--sandbox", sb.ContainerID).CombinedOutput()
	if err != nil {
		t.Fatalf("cleanwall consent refresh: %v\n%s", err, out)
	}
	t.Logf("cleanwall consent refresh (%v):\n%s", time.Since(start).Round(time.Millisecond), out)
	if !strings.Contains(string(out), "2 flow(s) closed") || !strings.Contains(string(out), "execute") {
		t.Errorf("the refresh's report: %s", out)
	}
	// Closed when the command returned: the reset is on its way.
	closedWithin(t, "the TCP connection", held, held, start, 2*time.Second)
	closedWithin(t, "the keep-alive HTTP connection", web, webR, start, 2*time.Second)
	conns := len(c.echo.Conns())
	consentRefused(t, sb, "198.51.100.10:9000", "while execute is denied\n")
	if n := len(c.echo.Conns()); n != conns {
		t.Errorf("the echo server accepted %d connections while execute was denied", n-conns)
	}
	if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, c.d, sb, "echo", "consent-denied") >= 1 }) {
		t.Error("the refused flow was not counted (result=consent-denied)")
	}

	// Granted again: new flows run.
	c.cs.Allow("execute", "consented", "", 3600)
	if out, err := exec.Command(filepath.Join(c.env.Bin, "cleanwall"), "consent", "refresh", "--socket", c.d.Socket).CombinedOutput(); err != nil {
		t.Fatalf("cleanwall consent refresh: %v\n%s", err, out)
	}
	again, err := sb.Dial("tcp4", "198.51.100.10:9000", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if err := echoRoundTrip(again, "allowed again\n"); err != nil {
		t.Fatalf("after execute was granted again: %v", err)
	}
	// An unknown sandbox is an error naming it.
	out, err = exec.Command(filepath.Join(c.env.Bin, "cleanwall"), "consent", "refresh", "--socket", c.d.Socket, "--sandbox", "no-such-sandbox").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "no sandbox no-such-sandbox") {
		t.Errorf("refresh of an unknown sandbox: %v\n%s", err, out)
	}
}

// TestConsentServiceFailures: a consent service that is down, slow (past
// the timeout), answering garbage or 500 is a deny: the ADD fails naming
// why, and nothing of the sandbox stays. A flow whose first egress answer
// fails is reset and counted, and nothing of it arrives.
func TestConsentServiceFailures(t *testing.T) {
	c := newConsentEnv(t, "500ms")
	c.allowAll(30)
	cases := []struct {
		name string
		mode harness.ConsentMode
		want string
	}{
		{"slow", harness.ConsentSlow, "did not answer in time"},
		{"garbage", harness.ConsentGarbage, "malformed"},
		{"500", harness.Consent500, "500"},
	}
	for _, tc := range cases {
		c.cs.SetMode(tc.mode)
		start := time.Now()
		_, err := c.env.AddSandbox("fail-"+tc.name, harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})
		if err == nil || !strings.Contains(err.Error(), "consent: denied") || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s: ADD: %v, want a consent deny naming %q", tc.name, err, tc.want)
		}
		if el := time.Since(start); el > 5*time.Second {
			t.Errorf("%s: the ADD took %v", tc.name, el)
		}
	}
	if list, err := c.d.Client().List(harness.Ctx()); err != nil || len(list) != 0 {
		t.Fatalf("sandboxes after the refused ADDs: %v %v", list, err)
	}
	if n, _ := harness.MetricValue(mustMetrics(t, c.d), "cleanwall_consent_failures_total", `cause="timeout"`); n < 1 {
		t.Errorf("timeouts counted: %v", n)
	}

	// Admitted while the service answers; its first egress answer fails.
	c.cs.SetMode(harness.ConsentAnswer)
	sb := c.env.MustAddSandbox("flow", harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})
	leaks := c.env.SniffFromSandboxes()
	c.cs.SetMode(harness.Consent500)
	consentRefused(t, sb, "198.51.100.10:9000", "first flow\n")
	if n := len(c.echo.Conns()); n != 0 {
		t.Errorf("the echo server accepted %d connections without consent", n)
	}
	if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, c.d, sb, "echo", "consent-denied") >= 1 }) {
		t.Error("the refused flow was not counted (result=consent-denied)")
	}
	if n := leaks.FromSource(sb.IP); n != 0 {
		t.Errorf("%d packets from the sandbox reached the remote side", n)
	}

	// Down: connection refused.
	c.cs.Stop()
	_, err := c.env.AddSandbox("fail-down", harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})
	if err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("down: ADD: %v, want a consent deny naming the service unreachable", err)
	}
}

func mustMetrics(t *testing.T, d *harness.Daemon) string {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestConsentRun: `cleanwall run` asks execute before the command starts,
// with the reference consent service (examples/consent) and its
// allow-list: granted, the command runs and reaches its rule; not
// granted, the command never starts; without --consent-url a policy that
// needs consent is refused.
func TestConsentRun(t *testing.T) {
	env := harness.New(t)
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	cs := env.StartExampleConsentServer(consentAddr, "execute consented\negress consented web ttl=5\n")
	pol := writePolicy(t, env, "consent.yaml", policyConsent)
	flags := []string{"--consent-url", cs.URL, "--consent-ca", cs.CAFile, "--consent-timeout", "1s"}

	name := runName("consent-ok")
	res := cleanwallRun(t, env, append(append([]string{"--policy", pol, "--name", name}, flags...),
		"--", "curl", "-sS", "-m", "5", "http://198.51.100.10:8080/granted")...)
	if res.code != 0 || !strings.Contains(res.stdout, "ok /granted") {
		t.Fatalf("granted run: exit %d\nstdout: %s\nstderr: %s\nconsent log:\n%s", res.code, res.stdout, res.stderr, cs.Log())
	}
	if !strings.Contains(cs.Log(), `sandbox=cleanwall-`+name) {
		t.Errorf("the consent service logged no decision for sandbox cleanwall-%s:\n%s", name, cs.Log())
	}
	runLeftovers(t, env, name)

	marker := filepath.Join(env.Dir, "ran")
	cs.SetAllowList("egress consented web\n") // execute no longer granted
	// The server reloads within its 100 ms poll: wait until it denies.
	if !harness.Eventually(5*time.Second, func() bool { return strings.Contains(cs.Log(), "grants=1") }) {
		t.Fatalf("the allow-list was not reloaded:\n%s", cs.Log())
	}
	name = runName("consent-deny")
	res = cleanwallRun(t, env, append(append([]string{"--policy", pol, "--name", name}, flags...), "--", "touch", marker)...)
	if res.code == 0 || !strings.Contains(res.stderr, "consent: denied (execute") || !strings.Contains(res.stderr, "no grant in the allow-list") {
		t.Fatalf("denied run: exit %d, stderr:\n%s", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the command ran although execute was denied (%v)", err)
	}
	runLeftovers(t, env, name)

	name = runName("consent-none")
	res = cleanwallRun(t, env, "--policy", pol, "--name", name, "--", "touch", marker)
	if res.code == 0 || !strings.Contains(res.stderr, "no --consent-url") {
		t.Fatalf("run without --consent-url: exit %d, stderr:\n%s", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the command ran without a consent service")
	}
	runLeftovers(t, env, name)
	if n := len(srv.Requests()); n != 1 {
		t.Errorf("the server got %d requests, want the granted run's 1", n)
	}
}

const policyConsentUDP = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: consented-udp}
spec:
  governance: {consent: required}
  egress:
    - name: stats
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8125, protocol: UDP}]
      mode: open
`

// TestConsentUDP: the datagram path never waits for the consent service:
// a UDP flow's first datagram is dropped (consent-pending) while its
// egress answer is asked for, the retry goes through; a revoked rule's
// relay is closed by the refresh and later datagrams are refused,
// counted, and never arrive.
func TestConsentUDP(t *testing.T) {
	env := harness.New(t)
	cs := env.StartConsentServer(consentAddr)
	d := env.StartDaemon("--consent-url", cs.URL, "--consent-ca", cs.CAFile, "--consent-timeout", "1s")
	srv := env.UDPServer("198.51.100.10:8125")
	cs.Allow("execute", "consented-udp", "", 3600)
	cs.Allow("egress", "consented-udp", "stats", 3600)
	sb := env.MustAddSandbox("udp", harness.SandboxOptions{Policy: policyConsentUDP, NoIPv6: true})
	c, err := sb.Dial("udp4", "198.51.100.10:8125", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoed := func(msg string) bool {
		if _, err := c.Write([]byte(msg)); err != nil {
			return false
		}
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 256)
		n, err := c.Read(buf)
		return err == nil && string(buf[:n]) == msg
	}
	i := 0
	if !harness.Eventually(5*time.Second, func() bool { i++; return echoed(fmt.Sprintf("ping-%d", i)) }) {
		t.Fatal("no datagram went through with consent")
	}
	if n := proxyFlows(t, d, sb, "stats", "consent-pending"); n < 1 {
		t.Errorf("the first datagram was not dropped while its answer was asked for (consent-pending: %v)", n)
	}
	t.Logf("through after %d datagram(s)", i)

	cs.Revoke("egress", "consented-udp", "stats")
	start := time.Now()
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "consent", "refresh", "--socket", d.Socket).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "1 flow(s) closed") {
		t.Fatalf("cleanwall consent refresh: %v\n%s", err, out)
	}
	t.Logf("refresh took %v", time.Since(start))
	got := len(srv.Received())
	if !harness.Eventually(5*time.Second, func() bool {
		if echoed("after the revocation") {
			t.Fatal("a datagram went through after the revocation")
		}
		return proxyFlows(t, d, sb, "stats", "consent-denied") >= 1
	}) {
		t.Error("the refused datagram's flow was not counted (consent-denied)")
	}
	t.Logf("refused %v after the refresh began", time.Since(start))
	if n := len(srv.Received()); n != got {
		t.Errorf("the server received %d datagrams after the revocation", n-got)
	}
}

// TestConsentExecuteRevoked: execute is re-asked on its own schedule, with
// no flow and no refresh: withdrawn, every flow of the sandbox (both
// rules) is closed within the TTL plus one second and new flows are
// refused; granted again, the deny's own re-ask lets new flows run.
func TestConsentExecuteRevoked(t *testing.T) {
	c := newConsentEnv(t, "1s")
	const ttl = 2
	c.cs.Allow("execute", "consented", "", ttl)
	c.cs.Allow("egress", "consented", "echo", 3600)
	c.cs.Allow("egress", "consented", "web", 3600)
	c.cs.SetDenyTTL(1)
	sb := c.env.MustAddSandbox("exec", harness.SandboxOptions{Policy: policyConsent, NoIPv6: true})
	held, err := sb.Dial("tcp4", "198.51.100.10:9000", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := echoRoundTrip(held, "hello\n"); err != nil {
		t.Fatal(err)
	}
	web, webR := keepAlive(t, sb, "198.51.100.10:8080")
	defer web.Close()

	c.cs.Revoke("execute", "consented", "")
	revoked := time.Now()
	closedWithin(t, "the TCP connection (rule echo)", held, held, revoked, (ttl+1)*time.Second)
	closedWithin(t, "the keep-alive HTTP connection (rule web)", web, webR, revoked, (ttl+1)*time.Second)
	conns := len(c.echo.Conns())
	consentRefused(t, sb, "198.51.100.10:9000", "while execute is denied\n")
	if n := len(c.echo.Conns()); n != conns {
		t.Errorf("the echo server accepted %d connections while execute was denied", n-conns)
	}
	if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, c.d, sb, "echo", "consent-denied") >= 1 }) {
		t.Error("the refused flow was not counted (result=consent-denied)")
	}
	auditHas(t, c.d, `"kind":"consent.close"`, 1)

	c.cs.Allow("execute", "consented", "", ttl)
	granted := time.Now()
	if !harness.Eventually(5*time.Second, func() bool {
		again, err := sb.Dial("tcp4", "198.51.100.10:9000", time.Second)
		if err != nil {
			return false
		}
		defer again.Close()
		return echoRoundTrip(again, "allowed again\n") == nil
	}) {
		t.Fatal("new flows still refused after execute was granted again")
	}
	t.Logf("flows run again %v after the grant (deny ttl 1s)", time.Since(granted).Round(time.Millisecond))
}
