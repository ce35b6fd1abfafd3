package dispatch_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/extension"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	udpproxy "github.com/cleanwall/cleanwall/proxies/udp"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/dispatch"
	"github.com/cleanwall/cleanwall/runtime/enforce"
	"github.com/cleanwall/cleanwall/runtime/fake"
	"github.com/cleanwall/cleanwall/runtime/fqdn"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/metrics"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// These tests run the dispatcher on loopback without root: the "sandbox"
// is 127.0.0.1 (its flows come from there), the datapath an in-memory
// fake programmed by the real enforcer, and a flow's original destination
// is the address the test's client connected to.

// recorder is a stream proxy that records what it receives and answers
// as its behaviour says.
type recorder struct {
	mu    sync.Mutex
	flows []*proxies.Flow
	serve func(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result
}

func (r *recorder) Configure(rule *policy.Rule) (any, error) { return "config-of-" + rule.Name, nil }

func (r *recorder) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	r.mu.Lock()
	r.flows = append(r.flows, f)
	r.mu.Unlock()
	if r.serve != nil {
		return r.serve(ctx, c, f)
	}
	defer c.Close()
	_, _ = c.Write([]byte("ok"))
	return proxies.Result{End: proxies.EndClosed}
}

func (r *recorder) last() *proxies.Flow {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.flows) == 0 {
		return nil
	}
	return r.flows[len(r.flows)-1]
}

// events records what the dispatcher reports.
type events struct {
	mu      sync.Mutex
	refused []string
	denied  []proxies.Denial
}

func (e *events) Refused(f dispatch.FlowInfo, reason string) {
	e.mu.Lock()
	e.refused = append(e.refused, reason)
	e.mu.Unlock()
}

func (e *events) Denied(f dispatch.FlowInfo, d proxies.Denial) {
	e.mu.Lock()
	e.denied = append(e.denied, d)
	e.mu.Unlock()
}

func (e *events) refusals() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.refused...)
}

type env struct {
	t      *testing.T
	dp     *fake.Datapath
	links  *fake.Links
	e      *enforce.Enforcer
	reg    *sandbox.Registry
	d      *dispatch.Dispatcher
	m      *metrics.Metrics
	ev     *events
	stream *recorder
	ln     *net.TCPListener // the "destinations": whatever a client dials here is a redirected flow
	udp    uint16           // the rule's UDP port (0: the listener's port)
}

func newEnv(t *testing.T) *env {
	dp, links, wall := fake.NewDatapath(), fake.NewLinks(), fake.NewWall()
	reg := sandbox.NewRegistry()
	log := testutil.Logger(t)
	e := &enforce.Enforcer{DP: dp, Links: links, Wall: wall, Store: sandbox.Store{Dir: t.TempDir()}, Sandboxes: reg,
		Learner: &fqdn.Learner{DP: dp, Log: log}, AttachMode: "auto", DNSRate: 100, EventRate: 100, Log: log}
	v := &env{t: t, dp: dp, links: links, e: e, reg: reg, m: metrics.New(nil), ev: &events{}, stream: &recorder{}}
	g := proxies.NewRegistry()
	if err := errors.Join(
		g.AddStream(proxies.Key{Mode: "open", Protocol: "tcp"}, v.stream),
		g.AddStream(proxies.Key{Mode: "open", Protocol: "http"}, v.stream),
		g.AddPacket(proxies.Key{Mode: "open", Protocol: "udp"}, &udpproxy.Relay{IdleTimeout: 300 * time.Millisecond}),
	); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v.d = &dispatch.Dispatcher{Sandboxes: reg, DP: dp, Proxies: g, Metrics: v.m, Node: &limits.Node{}, Events: v.ev,
		Log: log, Logs: dispatch.NewLogLimiter(10, time.Second), Ctx: ctx}
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	v.ln = ln
	go dispatch.AcceptLoop(ctx, ln, "test", log, v.d.Logs, func(c *net.TCPConn) { go v.d.ServeTCP(c) })
	return v
}

func (v *env) port() uint16 { return uint16(v.ln.Addr().(*net.TCPAddr).Port) }

func (v *env) udpPort() uint16 {
	if v.udp != 0 {
		return v.udp
	}
	return v.port()
}

// policy allows 127.0.0.1 on the listener's port (TCP and UDP) under rule
// "local", with extra YAML under spec.
func (v *env) policy(extra, rules string) string {
	return fmt.Sprintf(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: t}
spec:
%s  egress:
    - name: local
      to: [{cidr: 127.0.0.1/32}]
      ports: [{port: %d}, {port: %d, protocol: UDP}]
      mode: open
%s`, extra, v.port(), v.udpPort(), rules)
}

func (v *env) change(doc string) enforce.Change {
	v.t.Helper()
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		v.t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		v.t.Fatal(err)
	}
	configs, err := v.d.Proxies.Configure(c)
	if err != nil {
		v.t.Fatal(err)
	}
	return enforce.Change{Policy: []byte(doc), Source: "test", Compiled: c, Configs: configs, Limits: limits.Effective(limits.Default, c)}
}

// admit makes 127.0.0.1 a sandbox under doc.
func (v *env) admit(doc string) *sandbox.Sandbox {
	v.t.Helper()
	ch := v.change(doc)
	host := v.links.Add("veth-lo", "veth", 0)
	req := api.AddRequest{ContainerID: "c-lo", IfName: "eth0", Netns: "/run/netns/lo", HostInterface: host.Name, MAC: "02:aa:00:00:00:01",
		IPs: []api.IPConfig{{Address: netip.MustParsePrefix("127.0.0.1/8"), Gateway: netip.MustParseAddr("127.0.0.254")}}}
	v.reg.Lock()
	defer v.reg.Unlock()
	s, err := v.e.Admit(enforce.Admission{Req: req, Policy: []byte(doc), Source: "test", Compiled: ch.Compiled, Configs: ch.Configs, Limits: ch.Limits})
	if err != nil {
		v.t.Fatal(err)
	}
	return s
}

// dial connects from src (127.0.0.1 or another loopback address) to the
// listener's port on 127.0.0.1 and returns what the connection read
// until it ended, and how it ended.
func (v *env) dial(src string) (string, error) {
	v.t.Helper()
	dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := dialer.Dial("tcp4", v.ln.Addr().String())
	if isReset(err) {
		return "", err // reset before the connect returned
	}
	if err != nil {
		v.t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func TestTCPFlowReachesItsProxy(t *testing.T) {
	v := newEnv(t)
	s := v.admit(v.policy("", ""))
	got, err := v.dial("127.0.0.1")
	if err != nil || got != "ok" {
		t.Fatalf("read %q, %v: the proxy did not serve the flow", got, err)
	}
	f := v.stream.last()
	if f == nil || f.Sandbox != "c-lo" || f.Attachment != s.Name || f.RuleName() != "local" || f.Config != "config-of-local" ||
		f.Dst != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), v.port()) || f.Src.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("flow handed to the proxy: %+v", f)
	}
	if f.Hosts != nil || f.Keys != nil {
		t.Fatalf("an open tcp flow got hosts %v or keys %v", f.Hosts, f.Keys)
	}
	fs := v.m.Flows("c-lo", f.Rule)
	if n := value(fs.Accepted); n != 1 {
		t.Fatalf("accepted %v, want 1", n)
	}
	waitFor(t, func() bool { return value(fs.Active) == 0 }, "the flow to end")
}

func TestTCPRefusals(t *testing.T) {
	v := newEnv(t)
	// A rule for another port only: the listener's port has no rule.
	doc := strings.Replace(v.policy("", ""), fmt.Sprintf("{port: %d}, ", v.port()), "{port: 1}, ", 1)
	v.admit(doc)
	if got, err := v.dial("127.0.0.1"); !isReset(err) || got != "" {
		t.Fatalf("no rule: read %q, %v; want a reset", got, err)
	}
	if n := value(v.m.Refusal("c-lo", nil, "no-rule")); n != 1 {
		t.Fatalf("no-rule refusals counted %v, want 1", n)
	}
	// A source no sandbox has.
	if got, err := v.dial("127.0.0.2"); !isReset(err) || got != "" {
		t.Fatalf("unknown source: read %q, %v; want a reset", got, err)
	}
	if n := value(v.m.Refusal("", nil, "unknown-source")); n != 1 {
		t.Fatalf("unknown-source refusals counted %v, want 1", n)
	}
	if r := v.ev.refusals(); len(r) != 2 || r[0] != "no-rule" || r[1] != "unknown-source" {
		t.Fatalf("refusal events %v", r)
	}
	if f := v.stream.last(); f != nil {
		t.Fatalf("a refused flow reached the proxy: %+v", f)
	}
}

// A flow over the sandbox's concurrent-flow limit is reset before any
// rule lookup, and counted.
func TestTCPFlowLimit(t *testing.T) {
	v := newEnv(t)
	held := make(chan struct{})
	v.stream.serve = func(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
		defer c.Close()
		held <- struct{}{}
		<-ctx.Done()
		return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
	}
	s := v.admit(v.policy("  limits: {tcpFlows: 1}\n", ""))
	c1, err := net.Dial("tcp4", v.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	<-held
	if got, err := v.dial("127.0.0.1"); !isReset(err) || got != "" {
		t.Fatalf("over the limit: read %q, %v; want a reset", got, err)
	}
	if n := value(v.m.Refusal("c-lo", nil, limits.ReasonFlowLimit)); n != 1 {
		t.Fatalf("flow-limit refusals %v, want 1", n)
	}
	if n := s.Limits.Active(limits.TCP); n != 1 {
		t.Fatalf("active TCP flows %d, want 1", n)
	}
}

// After a flip, flows the new policy no longer allows under their rule are
// closed with ErrRevoked, and counted policy-closed; the others stay.
func TestRevoke(t *testing.T) {
	v := newEnv(t)
	causes := make(chan error, 1)
	held := make(chan struct{})
	v.stream.serve = func(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
		defer c.Close()
		held <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
	}
	s := v.admit(v.policy("", ""))
	c, err := net.Dial("tcp4", v.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-held
	rule := v.stream.last().Rule
	// The same rule again: nothing is closed.
	v.reg.Lock()
	if err := v.e.Flip(s, v.change(v.policy("", ""))); err != nil {
		t.Fatal(err)
	}
	v.reg.Unlock()
	if n := v.d.Revoke(s); n != 0 {
		t.Fatalf("the same policy closed %d flows", n)
	}
	// A policy without the port: the flow is revoked.
	v.reg.Lock()
	if err := v.e.Flip(s, v.change(strings.Replace(v.policy("", ""), fmt.Sprintf("{port: %d}, ", v.port()), "{port: 1}, ", 1))); err != nil {
		t.Fatal(err)
	}
	v.reg.Unlock()
	if n := v.d.Revoke(s); n != 1 {
		t.Fatalf("revoked %d flows, want 1", n)
	}
	if cause := <-causes; !errors.Is(cause, dispatch.ErrRevoked) {
		t.Fatalf("the flow ended with %v, want ErrRevoked", cause)
	}
	waitFor(t, func() bool { return value(v.m.Refusal("c-lo", rule, string(proxies.EndRevoked))) == 1 }, "policy-closed to be counted")
	waitFor(t, func() bool { return s.Flows() == 0 }, "the flow to be forgotten")
}

// A flow its proxy refused as a whole (an extension that is not running)
// counts under the proxy's reason, not as an end.
func TestProxyRefusalCounted(t *testing.T) {
	v := newEnv(t)
	v.stream.serve = func(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
		_ = c.(*net.TCPConn).SetLinger(0)
		_ = c.Close()
		f.Report.Deny(proxies.Denial{Reason: extension.ReasonUnavailable, Detail: "not-listening"})
		return proxies.Result{End: proxies.EndError, Err: &extension.FlowError{Reason: extension.ReasonUnavailable, Err: extension.ErrNotListening}}
	}
	v.admit(v.policy("", ""))
	if got, err := v.dial("127.0.0.1"); !isReset(err) || got != "" {
		t.Fatalf("read %q, %v; want a reset", got, err)
	}
	rule := v.stream.last().Rule
	waitFor(t, func() bool {
		return value(v.m.Refusal("c-lo", rule, extension.ReasonUnavailable)) == 1
	}, "the refusal to be counted")
	if n := value(v.m.Refusal("c-lo", rule, string(proxies.EndError))); n != 0 {
		t.Fatalf("the refusal was also counted as an error end (%v)", n)
	}
	v.ev.mu.Lock()
	defer v.ev.mu.Unlock()
	if len(v.ev.denied) != 1 || v.ev.denied[0].Reason != extension.ReasonUnavailable {
		t.Fatalf("denials reported: %+v", v.ev.denied)
	}
}

// An HTTP rule's flow carries the names its destination was learnt for.
func TestHostsOfLearntDestination(t *testing.T) {
	v := newEnv(t)
	rules := fmt.Sprintf(`    - name: api
      to: [{fqdn: api.example.test}]
      ports: [{port: %d}]
      mode: open
      open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}]}}
`, v.port())
	doc := strings.Replace(v.policy("  dns: {upstream: 127.0.0.53:53, allow: [api.example.test]}\n", rules), "to: [{cidr: 127.0.0.1/32}]", "to: [{cidr: 127.0.0.2/32}]", 1)
	s := v.admit(doc)
	if got, err := v.dial("127.0.0.1"); !isReset(err) {
		t.Fatalf("before learning: read %q, %v; want a reset", got, err)
	}
	if !v.e.Learner.Learn(s, "api.example.test", []netip.Addr{netip.MustParseAddr("127.0.0.1")}, time.Minute) {
		t.Fatal("nothing learnt")
	}
	if got, err := v.dial("127.0.0.1"); err != nil || got != "ok" {
		t.Fatalf("after learning: read %q, %v", got, err)
	}
	f := v.stream.last()
	if f.RuleName() != "api" || len(f.Hosts) != 1 || f.Hosts[0] != "api.example.test" {
		t.Fatalf("flow %q hosts %v", f.RuleName(), f.Hosts)
	}
}

// A UDP flow opens at its first datagram, relays both ways, is noted in
// the datapath while it lives and forgotten when it goes idle.
func TestUDPFlow(t *testing.T) {
	v := newEnv(t)
	echo, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	v.udp = uint16(echo.LocalAddr().(*net.UDPAddr).Port)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = echo.WriteToUDPAddrPort(append([]byte("re:"), buf[:n]...), from)
		}
	}()
	v.admit(v.policy("", ""))
	src := netip.MustParseAddrPort("127.0.0.1:40000")
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), v.udpPort())
	replies := make(chan string, 4)
	reply := func(from, to netip.AddrPort, p []byte) error {
		if from != dst || to != src {
			t.Errorf("reply from %v to %v", from, to)
		}
		replies <- string(p)
		return nil
	}
	v.d.HandleDatagram(tproxy.Datagram{Src: src, OrigDst: dst, Payload: []byte("one")}, reply)
	v.d.HandleDatagram(tproxy.Datagram{Src: src, OrigDst: dst, Payload: []byte("two")}, reply)
	for _, want := range []string{"re:one", "re:two"} {
		select {
		case got := <-replies:
			if got != want {
				t.Fatalf("reply %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no reply")
		}
	}
	if n := v.d.UDPFlows(); n != 1 {
		t.Fatalf("%d UDP flows for one pair", n)
	}
	if n := v.dp.UDPFlows(); n != 1 {
		t.Fatalf("%d UDP flows noted in the datapath", n)
	}
	waitFor(t, func() bool { return v.d.UDPFlows() == 0 && v.dp.UDPFlows() == 0 }, "the idle flow to end")
	// A destination without a rule: refused, nothing opened.
	v.d.HandleDatagram(tproxy.Datagram{Src: src, OrigDst: netip.MustParseAddrPort("127.0.0.1:1"), Payload: []byte("x")}, reply)
	if n := value(v.m.Refusal("c-lo", nil, "no-rule")); n != 1 || v.d.UDPFlows() != 0 {
		t.Fatalf("no-rule UDP refusals %v, flows %d", n, v.d.UDPFlows())
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		panic(err)
	}
	if out.Counter != nil {
		return out.Counter.GetValue()
	}
	return out.Gauge.GetValue()
}
