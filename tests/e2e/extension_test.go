package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Extensions end to end: cleanwalld hands the flows of a rule with
// open.protocol NAME to an extension process (docs/extensions.md), here the
// example requestlog.py, running in the node namespace; when the extension
// dies its flows are reset and counted, and other rules' flows go on.

// policyLogged sends sandbox flows to 198.51.100.10 (HTTP on 8080, the
// recording echo server on 8081) through the requestlog extension.
const policyLogged = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: logged}
spec:
  egress:
    - name: logged
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}, {port: 8081}]
      mode: open
      open:
        protocol: requestlog
`

// policyPlain allows the same destinations as policyLogged through
// cleanwalld's own TCP proxy.
const policyPlain = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: plain}
spec:
  egress:
    - name: plain
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}, {port: 8081}]
      mode: open
`

// extensionEnv is a daemon started with the requestlog extension, the
// servers behind it and a sandbox whose rule names it.
type extensionEnv struct {
	env    *harness.Env
	d      *harness.Daemon
	x      *harness.Extension
	web    *harness.HTTPServer // 198.51.100.10:8080
	echo   *harness.TCPServer  // 198.51.100.10:8081, answers "ack:<n>"
	logged *harness.Sandbox    // policyLogged
}

func newExtensionEnv(t *testing.T) *extensionEnv {
	env := harness.New(t)
	// In the env's directory: it outlives the extension and the daemon.
	x := env.StartRequestLog(filepath.Join(env.Dir, "requestlog.sock"), filepath.Join(env.Dir, "requests.log"))
	e := &extensionEnv{
		env:  env,
		x:    x,
		d:    env.StartDaemon("--extension", "requestlog=unix:"+x.Socket),
		web:  env.HTTPServer("198.51.100.10:8080", nil),
		echo: env.TCPServer("198.51.100.10:8081"),
	}
	e.logged = env.MustAddSandbox("logged", harness.SandboxOptions{Policy: policyLogged, NoIPv6: true})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("requestlog stderr:\n%s\nrequest log:\n%s", e.x.Stderr(), e.x.Requests())
		}
	})
	return e
}

// proxyFlows reads cleanwall_proxy_flows_total of a sandbox's rule with
// this result.
func proxyFlows(t *testing.T, d *harness.Daemon, sb *harness.Sandbox, rule, result string) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return harness.MetricSum(m, "cleanwall_proxy_flows_total", `sandbox="`+sb.ContainerID+`"`, `rule="`+rule+`"`, `result="`+result+`"`)
}

// proxyMetric reads one of a sandbox rule's proxy series (the labels after
// sandbox and rule select it).
func proxyMetric(t *testing.T, d *harness.Daemon, name string, sb *harness.Sandbox, rule string, labels ...string) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return harness.MetricSum(m, name, append([]string{`sandbox="` + sb.ContainerID + `"`, `rule="` + rule + `"`}, labels...)...)
}

// echoRoundTrip sends msg over c to the recording echo server and reads
// its "ack:<n>".
func echoRoundTrip(c net.Conn, msg string) error {
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	ack, err := harness.ReadAck(c, 5*time.Second)
	if err != nil {
		return err
	}
	if want := "ack:" + strconv.Itoa(len(msg)); ack != want {
		return errors.New("echo server answered " + ack + ", want " + want)
	}
	return nil
}

// TestExtensionServesFlows: a sandbox's HTTP request under a rule that names
// the extension reaches the server through the extension (from the node,
// never from the sandbox's address), its request line is logged with the
// flow's sandbox, rule and original destination, and cleanwalld counts the
// flow, the bytes the extension reported and its end.
func TestExtensionServesFlows(t *testing.T) {
	e := newExtensionEnv(t)
	sb := e.logged

	code, _, body := sb.Curl(t, "http://198.51.100.10:8080/v1/logged?q=1")
	if code != 200 || body != "ok /v1/logged\n" {
		t.Fatalf("GET through the extension: %d %q\n%s", code, body, e.d.Log())
	}
	reqs := e.web.Requests()
	if len(reqs) != 1 || reqs[0].Path != "/v1/logged?q=1" {
		t.Fatalf("the server recorded %+v", reqs)
	}
	if from, _, _ := net.SplitHostPort(reqs[0].From); from != harness.NodeRemoteIP.String() {
		t.Fatalf("the request came from %s, want the node (%s): not through the extension", reqs[0].From, harness.NodeRemoteIP)
	}

	// requestlog writes the line before it forwards the request, so it is
	// there once the answer is.
	lines := strings.Split(strings.TrimSpace(e.x.Requests()), "\n")
	if len(lines) != 1 {
		t.Fatalf("request log has %d lines, want 1:\n%s", len(lines), e.x.Requests())
	}
	for _, want := range []string{"sandbox=" + sb.ContainerID + " ", "rule=logged ", "src=" + sb.IP.String() + ":", "dst=198.51.100.10:8080 ", "hosts=198.51.100.10 ", `"GET /v1/logged?q=1 HTTP/1.1"`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("request log line %q lacks %q", lines[0], want)
		}
	}

	if n := proxyFlows(t, e.d, sb, "logged", "accepted"); n != 1 {
		t.Errorf("cleanwall_proxy_flows_total{result=accepted} = %v, want 1", n)
	}
	// The end and the bytes come from the extension's reports, after curl
	// closed its side.
	if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, e.d, sb, "logged", "closed") == 1 }) {
		m, _ := e.d.Metrics()
		t.Fatalf("the flow's end was not counted as closed:\n%s", grep(m, `rule="logged"`))
	}
	out := proxyMetric(t, e.d, "cleanwall_proxy_bytes_total", sb, "logged", `direction="out"`)
	in := proxyMetric(t, e.d, "cleanwall_proxy_bytes_total", sb, "logged", `direction="in"`)
	if out < float64(len("GET /v1/logged?q=1 HTTP/1.1\r\n")) || in < float64(len("ok /v1/logged\n")) {
		t.Errorf("bytes reported out %v in %v: less than the request line and the body", out, in)
	}
	if n := proxyMetric(t, e.d, "cleanwall_proxy_active_flows", sb, "logged"); n != 0 {
		t.Errorf("cleanwall_proxy_active_flows = %v after the end, want 0", n)
	}
	if n := proxyFlows(t, e.d, sb, "logged", "extension-unavailable"); n != 0 {
		t.Errorf("%v flows counted extension-unavailable", n)
	}
}

// TestExtensionKilledResetsItsFlows: when the extension is killed, the flow
// it was relaying ends at once, new flows of its rule are reset at once
// (not left to time out), counted as extension-unavailable and reported as
// deny events; another sandbox's flows through cleanwalld's own proxy, open
// or new, carry on. Started again on the same path, the extension serves
// new flows within about a second, without anyone telling cleanwalld.
func TestExtensionKilledResetsItsFlows(t *testing.T) {
	e := newExtensionEnv(t)
	a := e.logged
	b := e.env.MustAddSandbox("plain", harness.SandboxOptions{Policy: policyPlain, NoIPv6: true})
	events := watchEvents(t, e.d, a)

	heldA, err := a.Dial("tcp4", "198.51.100.10:8081", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer heldA.Close()
	if err := echoRoundTrip(heldA, "held by the extension"); err != nil {
		t.Fatalf("A's flow through the extension: %v", err)
	}
	heldB, err := b.Dial("tcp4", "198.51.100.10:8081", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer heldB.Close()
	if err := echoRoundTrip(heldB, "held by cleanwalld"); err != nil {
		t.Fatalf("B's flow: %v", err)
	}
	if n := proxyMetric(t, e.d, "cleanwall_proxy_active_flows", a, "logged"); n != 1 {
		t.Fatalf("cleanwall_proxy_active_flows of A = %v with one flow open, want 1", n)
	}

	killed := time.Now()
	e.x.Kill()

	// A's open flow ends: the extension held its only descriptor.
	_ = heldA.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = heldA.Read(make([]byte, 1))
	if err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("A's flow after the kill: read %v, want the end of the flow or a reset", err)
	}
	if took := time.Since(killed); took > 2*time.Second {
		t.Errorf("A's flow ended %v after the kill, want at once", took)
	} else {
		t.Logf("A's open flow ended %v after the kill (%v)", took.Round(time.Millisecond), err)
	}
	if !harness.Eventually(5*time.Second, func() bool {
		return proxyMetric(t, e.d, "cleanwall_proxy_active_flows", a, "logged") == 0 && proxyFlows(t, e.d, a, "logged", "error") == 1
	}) {
		m, _ := e.d.Metrics()
		t.Errorf("A's open flow not counted as ended with an error:\n%s", grep(m, `rule="logged"`))
	}

	// New flows of A are reset, fast: cleanwalld finds nobody listening.
	const probes = 3
	for i := range probes {
		took := expectReset(t, a, "198.51.100.10:8081")
		if took > 3*time.Second {
			t.Errorf("new flow %d of A reset after %v, want well under the 5 s a timeout would take", i, took)
		}
		t.Logf("new flow %d of A reset after %v", i, took.Round(time.Millisecond))
	}
	start := time.Now()
	if code, _, body := a.Curl(t, "http://198.51.100.10:8080/while-down"); code != 0 {
		t.Fatalf("curl from A while the extension is down: %d %q", code, body)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("curl from A failed after %v, want well under its 5 s timeout", took)
	}
	if !harness.Eventually(5*time.Second, func() bool {
		return proxyFlows(t, e.d, a, "logged", "extension-unavailable") >= probes+1
	}) {
		m, _ := e.d.Metrics()
		t.Errorf("reset flows of A not counted as extension-unavailable (want %d):\n%s", probes+1, grep(m, `rule="logged"`))
	}
	if !events.wait(5*time.Second, func(ev api.DenyEvent) bool {
		return ev.Source == "requestlog" && ev.Reason == "extension-unavailable" && ev.Dst == "198.51.100.10:8081"
	}) {
		t.Errorf("no requestlog/extension-unavailable deny event for A; got %+v", events.all())
	}
	if len(e.web.Requests()) != 0 {
		t.Errorf("the server received requests while the extension was down: %+v", e.web.Requests())
	}

	// B's open flow and new flows go on.
	if err := echoRoundTrip(heldB, "after the kill"); err != nil {
		t.Fatalf("B's open flow after the extension died: %v", err)
	}
	if code, _, body := b.Curl(t, "http://198.51.100.10:8080/plain"); code != 200 || body != "ok /plain\n" {
		t.Fatalf("new flow from B after the extension died: %d %q", code, body)
	}
	if n := proxyFlows(t, e.d, b, "plain", "extension-unavailable"); n != 0 {
		t.Errorf("B has %v flows counted extension-unavailable", n)
	}

	// Back on the same path: cleanwalld redials (backoff at most 1 s).
	e.x = e.env.StartRequestLog(e.x.Socket, e.x.LogFile)
	restarted := time.Now()
	attempts := 0
	var code int
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		attempts++
		if code, _, _ = a.Curl(t, "http://198.51.100.10:8080/after-restart"); code == 200 {
			break
		}
	}
	if code != 200 {
		t.Fatalf("A's flows do not work %d attempts after the extension restarted (last status %d)\n%s", attempts, code, e.d.Log())
	}
	t.Logf("A served again %v after the restart, on attempt %d", time.Since(restarted).Round(time.Millisecond), attempts)
	if !strings.Contains(e.x.Requests(), `"GET /after-restart HTTP/1.1"`) {
		t.Errorf("the restarted extension did not log the request:\n%s", e.x.Requests())
	}
}

// expectReset opens a flow from sb to addr, sends a request and returns
// how long until the flow was reset. cleanwalld accepts every redirected
// flow before it finds a proxy for it, so the dial succeeds; the reset
// shows on the write or the read.
func expectReset(t *testing.T, sb *harness.Sandbox, addr string) time.Duration {
	t.Helper()
	start := time.Now()
	c, err := sb.Dial("tcp4", addr, 3*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v (want a connection that is then reset)", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err = c.Write([]byte("GET /while-down HTTP/1.1\r\nHost: 198.51.100.10\r\n\r\n")); err == nil {
		var n int
		n, err = c.Read(make([]byte, 64))
		if n > 0 {
			t.Fatalf("a flow to %s got an answer while its extension is down", addr)
		}
	}
	took := time.Since(start)
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("flow to %s ended with %v after %v, want a reset", addr, err, took)
	}
	return took
}

// eventLog collects the deny events of one sandbox from cleanwalld's
// stream (what `cleanwall observe` shows).
type eventLog struct {
	mu     sync.Mutex
	events []api.DenyEvent
	added  chan struct{}
}

// watchEvents subscribes to sb's deny events and returns once the stream is
// live: a dial to a port no rule allows has come back as a datapath event.
func watchEvents(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) *eventLog {
	t.Helper()
	l := &eventLog{added: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		_ = d.Client().Events(ctx, sb.ContainerID, func(ev api.DenyEvent) error {
			l.mu.Lock()
			l.events = append(l.events, ev)
			l.mu.Unlock()
			select {
			case l.added <- struct{}{}:
			default:
			}
			return nil
		})
	}()
	live := func(ev api.DenyEvent) bool { return ev.Source == "datapath" && ev.Dst == "198.51.100.10:9" }
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if c, err := sb.Dial("tcp4", "198.51.100.10:9", 200*time.Millisecond); err == nil {
			c.Close()
			t.Fatal("a dial to a port no rule allows connected")
		}
		if l.wait(300*time.Millisecond, live) {
			return l
		}
	}
	t.Fatalf("the deny event stream did not deliver a datapath drop within 10 s: %+v", l.all())
	return nil
}

// wait reports whether an event matching ok arrives within timeout (or
// has arrived).
func (l *eventLog) wait(timeout time.Duration, ok func(api.DenyEvent) bool) bool {
	deadline := time.After(timeout)
	for {
		for _, ev := range l.all() {
			if ok(ev) {
				return true
			}
		}
		select {
		case <-l.added:
		case <-deadline:
			return false
		}
	}
}

func (l *eventLog) all() []api.DenyEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]api.DenyEvent(nil), l.events...)
}
