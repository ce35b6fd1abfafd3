package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/dispatch"
	"github.com/cleanwall/cleanwall/runtime/fake"
	"github.com/cleanwall/cleanwall/runtime/keys"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// The daemon's API over its unix socket, without root: the datapath,
// links and nftables wall are runtime/fake's, everything else is real
// (the proxy registry, the enforcer, the dispatcher, the audit log).

type testDaemon struct {
	*Daemon
	dp     *fake.Datapath
	links  *fake.Links
	wall   *fake.Wall
	client *api.Client
}

func startTest(t *testing.T, cfg Config) *testDaemon {
	t.Helper()
	dir := t.TempDir()
	cfg.Socket = filepath.Join(dir, "cleanwalld.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PinRoot = filepath.Join(dir, "bpf")
	cfg.PolicyDir = filepath.Join(dir, "policies")
	cfg.Logger = testutil.Logger(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.audit = &auditor{log: d.log}
	if d.audit.chain, err = audit.Open(d.cfg.AuditLog, audit.Options{}); err != nil {
		t.Fatal(err)
	}
	td := &testDaemon{Daemon: d, dp: fake.NewDatapath(), links: fake.NewLinks(), wall: fake.NewWall()}
	if err := d.wire(td.dp, td.links, td.wall); err != nil {
		t.Fatal(err)
	}
	if err := d.reconcile(); err != nil {
		t.Fatal(err)
	}
	if err := d.serveAPI(); err != nil {
		t.Fatal(err)
	}
	d.ready.Store(true)
	t.Cleanup(func() { d.Close() })
	td.client = api.NewClient(cfg.Socket)
	return td
}

func ctx() context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_ = cancel // bounded by the test
	return c
}

const openPolicy = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: results}
spec:
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}, {port: 8125, protocol: UDP}]
      mode: open
    - name: api
      to: [{cidr: 198.51.100.20/32}]
      ports: [{port: 80}]
      mode: open
      open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}]}}
`

func (td *testDaemon) request(name string, n int, doc string) api.AddRequest {
	host := td.links.Add("veth-"+name, "veth", 0)
	return api.AddRequest{ContainerID: "c-" + name, IfName: "eth0", Netns: "/run/netns/" + name, HostInterface: host.Name,
		MAC: fmt.Sprintf("02:aa:00:00:00:%02x", n), Policy: []byte(doc), PolicySource: "test",
		IPs: []api.IPConfig{{Address: netip.MustParsePrefix(fmt.Sprintf("10.1.0.%d/24", n)), Gateway: netip.MustParseAddr("10.1.0.1")}}}
}

func TestAPILifecycle(t *testing.T) {
	td := startTest(t, Config{})
	st, err := td.client.Status(ctx())
	if err != nil || !st.Ready || st.Sandboxes != 0 {
		t.Fatalf("status %+v, %v", st, err)
	}
	sb, err := td.client.Add(ctx(), td.request("a", 2, openPolicy))
	if err != nil {
		t.Fatal(err)
	}
	if sb.ID != "c-a" || sb.PolicyName != "results" || sb.Rules == 0 || sb.PolicyHash == "" {
		t.Fatalf("added %+v", sb)
	}
	if err := td.client.Check(ctx(), "c-a", "eth0"); err != nil {
		t.Fatalf("check: %v", err)
	}
	list, err := td.client.List(ctx())
	if err != nil || len(list) != 1 || list[0].ID != "c-a" {
		t.Fatalf("list %+v, %v", list, err)
	}
	view, err := td.client.Policy(ctx(), "c-a", "")
	if err != nil || view.Generation != 0 || len(view.Rules) != 3 || view.Rules[0].Rule != "results" {
		t.Fatalf("policy view %+v, %v", view, err)
	}
	// A new generation: the flip is read back from the (fake) kernel.
	applied := strings.Replace(openPolicy, "198.51.100.10/32", "198.51.100.11/32", 1)
	res, err := td.client.ApplyPolicy(ctx(), "c-a", "", api.ApplyRequest{Policy: []byte(applied), PolicySource: "test"})
	if err != nil || res.Sandbox.Generation != 1 {
		t.Fatalf("apply %+v, %v", res, err)
	}
	view, err = td.client.Policy(ctx(), "c-a", "")
	if err != nil || view.Generation != 1 || view.Slot != 1 || view.Rules[0].Prefix != netip.MustParsePrefix("198.51.100.11/32") {
		t.Fatalf("after apply: %+v, %v", view, err)
	}
	if err := td.client.Check(ctx(), "c-a", "eth0"); err != nil {
		t.Fatalf("check after apply: %v", err)
	}
	// Unknown sandboxes: 404 for apply, nothing for DEL (idempotent).
	if _, err := td.client.ApplyPolicy(ctx(), "c-none", "", api.ApplyRequest{Policy: []byte(applied)}); err == nil || !strings.Contains(err.Error(), "no sandbox") {
		t.Fatalf("apply to an unknown sandbox: %v", err)
	}
	if err := td.client.Delete(ctx(), "c-none", "eth0"); err != nil {
		t.Fatalf("DEL of an unknown sandbox: %v", err)
	}
	// GC keeps what is valid and removes the rest.
	if _, err := td.client.Add(ctx(), td.request("b", 3, openPolicy)); err != nil {
		t.Fatal(err)
	}
	gc, err := td.client.GC(ctx(), api.GCRequest{Valid: []api.AttachmentRef{{ContainerID: "c-a", IfName: "eth0"}}})
	if err != nil || len(gc.Removed) != 1 || gc.Removed[0].ContainerID != "c-b" {
		t.Fatalf("gc %+v, %v", gc, err)
	}
	if err := td.client.Delete(ctx(), "c-a", "eth0"); err != nil {
		t.Fatal(err)
	}
	if st, _ := td.client.Status(ctx()); st.Sandboxes != 0 {
		t.Fatalf("%d sandboxes left", st.Sandboxes)
	}
	// The wall chains stay while the interfaces live (CNI DEL reaches us
	// before the reference plugin removes them) and go with them.
	if n := td.wall.Chains(); n != 2 {
		t.Fatalf("%d wall chains kept for the 2 live interfaces, want 2", n)
	}
	td.links.Remove("veth-a")
	td.links.Remove("veth-b")
	td.enforcer.Repair(func(what, sandbox string, found, err error) {})
	if n := td.wall.Chains(); n != 0 {
		t.Fatalf("%d wall chains left after their interfaces went", n)
	}
	if ids := td.dp.RuleSandboxIDs(); len(ids) != 0 {
		t.Fatalf("rules left for %v", ids)
	}
	// Every change was audited, in a chain that verifies.
	td.audit.close()
	td.audit.chain = nil
	data, err := os.ReadFile(td.cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	if err := audit.Verify(bytes.NewReader(data)); err != nil {
		t.Fatalf("the audit chain does not verify: %v", err)
	}
	for _, kind := range []string{auditSandboxAdd, auditPolicyApply, auditPolicyRefuse, auditSandboxDelete} {
		if !strings.Contains(string(data), `"`+kind+`"`) {
			t.Fatalf("no %s record in the audit log:\n%s", kind, data)
		}
	}
}

// A rule whose privacy proxy is not registered is refused when the policy
// is admitted (ADD or apply), naming the rule, never at flow time; nothing
// of the sandbox is installed.
func TestRuleWithoutProxyRefusedAtAdmission(t *testing.T) {
	td := startTest(t, Config{})
	cases := map[string]string{
		"extension not configured": `
    - name: logged
      to: [{cidr: 198.51.100.30/32}]
      ports: [{port: 80}]
      mode: open
      open: {protocol: requestlog}
`,
		"another extension not configured": `
    - name: warehouse
      to: [{cidr: 198.51.100.40/32}]
      ports: [{port: 5432}]
      mode: open
      open: {protocol: pgproxy}
`,
	}
	n := 10
	for name, rule := range cases {
		t.Run(name, func(t *testing.T) {
			n++
			doc := openPolicy + rule
			_, err := td.client.Add(ctx(), td.request(fmt.Sprintf("x%d", n), n, doc))
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Field != "policy" || !strings.Contains(ae.Message, "spec.egress[2]") || !strings.Contains(ae.Message, "no privacy proxy") {
				t.Fatalf("ADD: %v", err)
			}
			if n := td.wall.Chains(); n != 0 {
				t.Fatalf("a refused sandbox left %d wall chains", n)
			}
		})
	}
	// The same for an apply: the running policy stays.
	if _, err := td.client.Add(ctx(), td.request("ok", 30, openPolicy)); err != nil {
		t.Fatal(err)
	}
	_, err := td.client.ApplyPolicy(ctx(), "c-ok", "", api.ApplyRequest{Policy: []byte(openPolicy + cases["extension not configured"])})
	if err == nil || !strings.Contains(err.Error(), "no privacy proxy for mode open, protocol requestlog") {
		t.Fatalf("apply: %v", err)
	}
	if sb, _ := td.client.Get(ctx(), "c-ok", ""); sb.Generation != 0 {
		t.Fatalf("a refused apply flipped the sandbox to generation %d", sb.Generation)
	}
}

// An extension configured on the daemon serves open.protocol NAME: the
// policy is admitted (the extension need not be running yet).
func TestExtensionProtocolAdmitted(t *testing.T) {
	td := startTest(t, Config{Extensions: []string{"requestlog=unix:" + filepath.Join(t.TempDir(), "ext.sock")}})
	doc := openPolicy + `
    - name: logged
      to: [{cidr: 198.51.100.30/32}]
      ports: [{port: 80}]
      mode: open
      open: {protocol: requestlog}
`
	if _, err := td.client.Add(ctx(), td.request("e", 4, doc)); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Extensions: []string{"tcp=unix:/x"}, StateDir: t.TempDir()}); err == nil {
		t.Fatal("an extension named like a built-in protocol was accepted")
	}
	if _, err := New(Config{Extensions: []string{"a=unix:/x", "a=unix:/y"}, StateDir: t.TempDir()}); err == nil {
		t.Fatal("an extension given twice was accepted")
	}
}

// Without a key broker, a policy with secure rules is refused at ADD with
// the flag to set.
func TestSecureWithoutKeyBroker(t *testing.T) {
	td := startTest(t, Config{})
	for _, protocol := range []string{"http", "tcp"} {
		if _, ok := td.proxies.Stream(proxies.Key{Mode: "secure", Protocol: protocol}); !ok {
			t.Fatalf("no secure/%s proxy registered", protocol)
		}
	}
	doc := openPolicy + `
    - name: blob
      to: [{cidr: 198.51.100.50/32}]
      ports: [{port: 80}]
      mode: secure
      secure: {keyID: k1, protocol: http}
`
	_, err := td.client.Add(ctx(), td.request("s", 5, doc))
	if err == nil || !strings.Contains(err.Error(), "--keybroker") {
		t.Fatalf("ADD: %v", err)
	}
}

// Sandboxes survive a restart: a new daemon over the same state re-adopts
// them from their records.
func TestReconcileAfterRestart(t *testing.T) {
	td := startTest(t, Config{})
	if _, err := td.client.Add(ctx(), td.request("r", 6, openPolicy)); err != nil {
		t.Fatal(err)
	}
	td.Close()
	cfg := td.cfg
	cfg.Logger = testutil.Logger(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.audit = &auditor{log: d.log}
	defer d.Close()
	if err := d.wire(td.dp, td.links, td.wall); err != nil {
		t.Fatal(err)
	}
	if err := d.reconcile(); err != nil {
		t.Fatal(err)
	}
	s := d.sandboxes.Lookup("c-r/eth0")
	if s == nil {
		t.Fatal("the sandbox was not re-adopted")
	}
	if gen := s.Record().Generation; gen != 1 {
		t.Fatalf("re-adopted at generation %d, want 1 (re-applied)", gen)
	}
	if err := d.enforcer.Check(s); err != nil {
		t.Fatalf("check after reconcile: %v", err)
	}
}

// releaser releases every key as version 1 for an hour.
type releaser struct{}

func (releaser) ReleaseWith(ctx context.Context, id string, o client.ReleaseOptions) (client.Key, error) {
	return client.Key{ID: id, Version: 1, Bytes: bytes.Repeat([]byte{7}, 32), NotAfter: time.Now().Add(time.Hour)}, nil
}

// When a key lapses (not released again before it expired), the flows
// that seal with it end; the sandbox's other flows go on.
func TestKeyLapseClosesItsFlows(t *testing.T) {
	td := startTest(t, Config{})
	att, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	td.keys = keys.NewWith("https://broker.test", att, releaser{}, td.log, td.audit.record)
	doc := openPolicy + `
    - name: sealed
      to: [{cidr: 198.51.100.60/32}]
      ports: [{port: 9000}]
      mode: secure
      secure: {keyID: k1, protocol: tcp}
`
	if _, err := td.client.Add(ctx(), td.request("k", 7, doc)); err != nil {
		t.Fatal(err)
	}
	s := td.sandboxes.Lookup("c-k/eth0")
	s.Lock()
	c := s.Compiled
	s.Unlock()
	flow := func(rule string) (*sandbox.Flow, context.Context) {
		fctx, cancel := context.WithCancelCause(context.Background())
		var r *policy.Rule
		for _, x := range c.Rules {
			if x.Name == rule {
				r = x
			}
		}
		f := &sandbox.Flow{Rule: r, Cancel: cancel}
		if ok, err := s.AddFlowDecidedAt(f, s.Record()); !ok || err != nil {
			t.Fatalf("registering a %s flow: %v %v", rule, ok, err)
		}
		return f, fctx
	}
	_, sealed := flow("sealed")
	_, open := flow("results")
	td.keyLapsed("k1", "another-policy")
	if sealed.Err() != nil {
		t.Fatal("a lapse of a key released for another policy closed the flow")
	}
	td.keyLapsed("k1", c.Hash)
	if !errors.Is(context.Cause(sealed), errKeyLapsed) {
		t.Fatalf("the sealed flow: %v", context.Cause(sealed))
	}
	if open.Err() != nil {
		t.Fatal("an open flow was closed by a key lapse")
	}
}

// Every field of an ADD is checked before anything is touched, and the
// error names the field.
func TestAddValidation(t *testing.T) {
	td := startTest(t, Config{})
	ok := td.request("v", 8, openPolicy)
	cases := []struct {
		field string
		edit  func(r *api.AddRequest)
	}{
		{"containerID", func(r *api.AddRequest) { r.ContainerID = "../etc" }},
		{"ifName", func(r *api.AddRequest) { r.IfName = "a/b" }},
		{"netns", func(r *api.AddRequest) { r.Netns = "" }},
		{"hostInterface", func(r *api.AddRequest) { r.HostInterface = "" }},
		{"mac", func(r *api.AddRequest) { r.MAC = "zz" }},
		{"ips", func(r *api.AddRequest) { r.IPs = nil }},
		{"ips[0].address", func(r *api.AddRequest) { r.IPs[0].Address = netip.MustParsePrefix("127.0.0.1/8") }},
		{"ips[0].gateway", func(r *api.AddRequest) { r.IPs[0].Gateway = netip.Addr{} }},
		{"ips[0].gateway", func(r *api.AddRequest) { r.IPs[0].Gateway = netip.MustParseAddr("fd00::1") }},
		{"ips", func(r *api.AddRequest) { r.IPs = append(r.IPs, r.IPs[0]) }},
		{"policy", func(r *api.AddRequest) { r.Policy = nil }},
		{"policyName", func(r *api.AddRequest) { r.PolicyName = "x" }},
		{"policyName", func(r *api.AddRequest) { r.Policy, r.PolicyName = nil, "Not_A_Label" }},
		{"policyName", func(r *api.AddRequest) { r.Policy, r.PolicyName = nil, "missing" }},
		{"policy", func(r *api.AddRequest) { r.Policy = []byte("spec: [") }},
		{"hostInterface", func(r *api.AddRequest) { r.HostInterface = "no-such-if" }},
	}
	for _, c := range cases {
		r := ok
		r.IPs = append([]api.IPConfig(nil), ok.IPs...)
		c.edit(&r)
		_, err := td.client.Add(ctx(), r)
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Field != c.field {
			t.Errorf("%s: got %v", c.field, err)
		}
	}
	if n := td.wall.Chains(); n != 0 {
		t.Fatalf("refused requests left %d wall chains", n)
	}
	// A named policy from the policy directory.
	if err := os.MkdirAll(td.cfg.PolicyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(td.cfg.PolicyDir, "named.yaml"), []byte(openPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	r := ok
	r.Policy, r.PolicyName = nil, "named"
	sb, err := td.client.Add(ctx(), r)
	if err != nil || sb.PolicyName != "results" {
		t.Fatalf("ADD with a named policy: %+v %v", sb, err)
	}
	if _, err := td.client.Add(ctx(), r); err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Fatalf("a second ADD of the same attachment: %v", err)
	}
}

// Refusals and denials reach `cleanwall observe` streams (filtered by
// sandbox) and the metrics registry gathers the datapath's series.
func TestEventsAndMetrics(t *testing.T) {
	td := startTest(t, Config{})
	if _, err := td.client.Add(ctx(), td.request("m", 9, openPolicy)); err != nil {
		t.Fatal(err)
	}
	evs := make(chan api.DenyEvent, 16)
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		_ = td.client.Events(sctx, "c-m", func(ev api.DenyEvent) error {
			evs <- ev
			return nil
		})
	}()
	// The stream is live once an event published after subscribing arrives.
	src, dst := netip.MustParseAddrPort("10.1.0.9:40000"), netip.MustParseAddrPort("198.51.100.10:8080")
	deadline := time.Now().Add(10 * time.Second)
	var first api.DenyEvent
	for first.Source == "" {
		flowEvents{td.Daemon}.Refused(dispatch.FlowInfo{Sandbox: "c-m/eth0", Proto: "tcp", Src: src, Dst: dst}, "no-rule")
		select {
		case first = <-evs:
		case <-time.After(50 * time.Millisecond):
			if time.Now().After(deadline) {
				t.Fatal("no event on the stream")
			}
		}
	}
	if first.Source != "proxy" || first.Reason != "no-rule" || first.Proto != "TCP" || first.Dst != dst.String() {
		t.Fatalf("refusal event %+v", first)
	}
	for len(evs) > 0 {
		<-evs
	}
	flowEvents{td.Daemon}.Denied(dispatch.FlowInfo{Sandbox: "c-m/eth0", Proxy: proxies.Key{Mode: "open", Protocol: "http"}, Proto: "tcp", Src: src, Dst: dst},
		proxies.Denial{Reason: "method", Status: 403, Method: "DELETE", Path: "/x"})
	td.dnsDenied("c-m/eth0", dnsproxy.DenyEvent{Reason: dnsproxy.ReasonNotAllowed, Name: "evil.test", TCP: true})
	flowEvents{td.Daemon}.Refused(dispatch.FlowInfo{Sandbox: "c-other/eth0", Proto: "udp", Src: src, Dst: dst}, "no-rule") // filtered out
	got := map[string]api.DenyEvent{}
	for len(got) < 2 {
		select {
		case ev := <-evs:
			if ev.Sandbox != "c-m/eth0" {
				t.Fatalf("an event of another sandbox passed the filter: %+v", ev)
			}
			got[ev.Source] = ev
		case <-time.After(10 * time.Second):
			t.Fatalf("events: %+v", got)
		}
	}
	if h := got["http"]; h.Reason != "method" || h.Status != 403 || h.Method != "DELETE" {
		t.Fatalf("http denial %+v", h)
	}
	// A name the policy does not list is never streamed (docs/telemetry.md).
	if d := got["dns"]; d.Reason != string(dnsproxy.ReasonNotAllowed) || d.Name != "" || d.Proto != "TCP" {
		t.Fatalf("dns denial %+v", d)
	}
	// The datapath collector reads the fake datapath at scrape time.
	td.dp.Count(bpf.CounterKey{SandboxID: 1, RuleID: 1, Verdict: bpf.VerdictDrop, Reason: bpf.ReasonNoRule}, 3)
	mfs, err := td.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, mf := range mfs {
		found[mf.GetName()] = true
	}
	for _, name := range []string{"cleanwall_datapath_rules", "cleanwall_datapath_rule_capacity", "cleanwall_sandboxes", "cleanwall_datapath_packets_total"} {
		if !found[name] {
			t.Errorf("metric %s not gathered", name)
		}
	}
}

// A trusted rule that could never verify its remote, or whose files
// cannot be read, is refused at ADD naming the field (issue 14's policy
// check, done by the trusted proxies' Configure).
func TestTrustedRuleChecked(t *testing.T) {
	td := startTest(t, Config{})
	for field, tlsSpec := range map[string]string{
		"trusted.tls.caFile":         "serverName: p.example.test, caFile: /nonexistent/ca.pem",
		"trusted.tls":                "serverName: p.example.test",
		"trusted.tls.clientCertFile": "serverName: p.example.test, spkiSHA256: ['" + strings.Repeat("A", 43) + "='], clientCertFile: /nonexistent/c.pem, clientKeyFile: /nonexistent/c.key",
	} {
		doc := openPolicy + `
    - name: partner
      to: [{cidr: 198.51.100.70/32}]
      ports: [{port: 80}]
      mode: trusted
      trusted: {tls: {` + tlsSpec + `}}
`
		_, err := td.client.Add(ctx(), td.request("t", 11, doc))
		var ae *api.Error
		if !errors.As(err, &ae) || !strings.Contains(ae.Message, "spec.egress[2]") || !strings.Contains(ae.Message, field) {
			t.Errorf("%s: ADD gave %v", field, err)
		}
	}
	if n := td.wall.Chains(); n != 0 {
		t.Fatalf("refused sandboxes left %d wall chains", n)
	}
}
