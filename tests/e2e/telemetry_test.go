package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	colmetrics "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Confidential telemetry (issue 17, docs/telemetry.md): a sandbox puts
// canary secrets everywhere it can — request bodies, HTTP paths, query
// values, header names and values, a method, a malformed header, DNS
// labels (names the policy does not list, and names under a pattern it
// lists), SQL parameters and literals, TCP and UDP payloads — in traffic
// the policy allows and in traffic it refuses. Then every metric
// (/metrics), every log line (the daemon's stderr at debug level), every
// audit record, every OTLP export (a local OTLP/HTTP receiver over TLS,
// decoding protobuf) and every deny event streamed to observers (their
// sampled packet headers included) is searched: no canary is in any.
//
// The test first proves that the canaries went where they should (the
// servers received them) and that the refusals were counted and audited,
// so that finding nothing means something.
func TestTelemetryCarriesNoCanary(t *testing.T) {
	start := time.Now()
	env := harness.New(t)
	otlp := startOTLPReceiver(t, env)
	d := env.StartDaemon("--otlp-endpoint", otlp.url, "--otlp-ca", otlp.ca, "--otlp-interval", "1s")
	pg := env.StartPostgres()
	harness.Eventually(5*time.Second, func() bool { return strings.Contains(d.Log(), "cleanwalld ready") })
	requirePostgresProxy(t, d)
	upstream := env.DNSServer(append(zone, "*.wild.example.test. 300 IN A 198.51.100.10")...)
	web := env.HTTPServer("198.51.100.10:8080", nil)
	raw := env.TCPServer("198.51.100.10:8081")
	sb := env.MustAddSandbox("telemetry", harness.SandboxOptions{Policy: fmt.Sprintf(policyTelemetry, pg.UserFile, pg.PasswordFile), NoIPv6: true})
	events := watchEventsWithHeaders(t, d, sb)

	c := newCanaries(t)

	// HTTP through the open http proxy: allowed requests carry canaries in
	// the path, the query, a header and the body; refused ones in the
	// path, the query, header names and values, the method, the body, a
	// deny pattern's match and a malformed header.
	url := "http://198.51.100.10:8080"
	httpCases := []struct {
		what string
		args []string
		code int
	}{
		{"allowed GET", []string{"-H", "X-Token: " + c.get("http-header"), url + "/v1/results/" + c.get("http-path") + "?q=" + c.get("http-query")}, 200},
		{"allowed POST", []string{"-H", "Content-Type: application/json", "--data", `{"v":"` + c.get("http-body") + `"}`, url + "/v1/results"}, 200},
		{"refused path", []string{"-H", "X-Token: " + c.get("http-header-refused"), "-H", "X-" + c.get("http-header-name") + ": 1",
			url + "/admin/" + c.get("http-path-refused") + "?token=" + c.get("http-query-refused")}, 403},
		{"refused method", []string{"-X", strings.ToUpper(c.get("http-method")), url + "/v1/results"}, 403},
		{"refused body", []string{"-H", "Content-Type: application/json", "--data", `{"v":"ssn-123 ` + c.get("http-body-refused") + `"}`, url + "/v1/results"}, 403},
		{"refused header pattern", []string{"-H", "X-Note: zzdeny" + c.get("http-pattern"), url + "/v1/results"}, 403},
	}
	for _, hc := range httpCases {
		if code, hdr, _ := sb.Curl(t, hc.args...); code != hc.code {
			t.Errorf("%s: status %d, want %d\n%s", hc.what, code, hc.code, hdr)
		}
	}
	// A malformed request head: its Content-Length is the canary.
	if resp := rawHTTP(t, sb, "GET /v1/results HTTP/1.1\r\nHost: 198.51.100.10\r\nContent-Length: "+c.get("http-malformed")+"\r\n\r\n"); !strings.HasPrefix(resp, "HTTP/1.1 400") {
		t.Errorf("a malformed Content-Length: %q, want a 400", firstLine(resp))
	}

	// A plain TCP rule carries a payload; a datagram to a port no rule
	// allows is dropped by the datapath (its deny event samples the
	// packet's first bytes).
	conn, err := sb.Dial("tcp4", "198.51.100.10:8081", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "%s\n", c.get("tcp-payload"))
	if ack, err := harness.ReadAck(conn, 5*time.Second); err != nil {
		t.Fatalf("the TCP payload was not acknowledged: %q %v", ack, err)
	}
	conn.Close()
	if err := sb.Do(func() error {
		u, err := net.Dial("udp4", "198.51.100.10:9998")
		if err != nil {
			return err
		}
		defer u.Close()
		_, err = u.Write([]byte(c.get("udp-payload") + strings.Repeat(".", 64)))
		return err
	}); err != nil {
		t.Fatal(err)
	}

	// DNS: a name the policy does not list, a name under a pattern it lists
	// (answered), the same pattern with a query type it refuses, and a
	// listed name.
	dnsCases := []struct {
		name  string
		qtype uint16
		rcode int
	}{
		{c.get("dns-unlisted") + ".exfil.test", dns.TypeA, dns.RcodeRefused},
		{c.get("dns-pattern") + ".wild.example.test", dns.TypeA, dns.RcodeSuccess},
		{c.get("dns-pattern-qtype") + ".wild.example.test", dns.TypeTXT, dns.RcodeRefused},
		{"api.example.test", dns.TypeA, dns.RcodeSuccess},
	}
	for _, q := range dnsCases {
		m, err := sb.DNSExchange("198.51.100.53:53", q.name, q.qtype, false)
		if err != nil || m.Rcode != q.rcode {
			t.Errorf("query %s %s: %v %v, want rcode %s", q.name, dns.TypeToString[q.qtype], rcodeOf(m), err, dns.RcodeToString[q.rcode])
		}
	}

	// SQL through the postgres proxy: a listed statement whose parameter
	// is the canary (the server fails it, quoting the value), a listed
	// statement with the canary as a literal, and an unlisted statement
	// carrying one.
	proxied := harness.PGConn{Host: pg.Addr.Addr().String(), Port: int(pg.Addr.Port()), User: "analyst", Database: "clinic"}
	run := sb.RunPG(t, harness.PGClientPgx, proxied, []harness.PGQuery{
		{Name: "param", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= $1", Params: []any{c.get("sql-param")}},
		{Name: "literal", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= '" + c.get("sql-literal") + "'"},
		{Name: "unlisted", SQL: "SELECT '" + c.get("sql-unlisted") + "' AS x"},
		{Name: "allowed", SQL: "SELECT region, count(*) AS n FROM patients WHERE age > $1 GROUP BY region", Params: []any{20}},
	})
	for name, state := range map[string]string{"param": "22007", "literal": "22007", "unlisted": "42501", "allowed": ""} {
		if r, ok := run.Result(name); !ok || r.SQLState != state {
			t.Errorf("statement %s: SQLSTATE %q (%s), want %q", name, r.SQLState, r.Error, state)
		}
	}

	// The canaries went where the policy lets them: the test is not
	// searching for secrets that never left the sandbox.
	reqs := web.Requests()
	var seen strings.Builder
	for _, r := range reqs {
		fmt.Fprintf(&seen, "%s %s %v %s\n", r.Method, r.Path, r.Header, r.Body)
	}
	for _, k := range []string{"http-header", "http-path", "http-query", "http-body"} {
		if !strings.Contains(seen.String(), c.get(k)) {
			t.Errorf("the web server never received the %s canary:\n%s", k, seen.String())
		}
	}
	for _, k := range []string{"http-path-refused", "http-body-refused", "http-method", "http-pattern", "http-malformed"} {
		if strings.Contains(strings.ToLower(seen.String()), c.get(k)) {
			t.Errorf("a refused request (%s) reached the web server:\n%s", k, seen.String())
		}
	}
	if !harness.Eventually(5*time.Second, func() bool { return tcpReceived(raw, c.get("tcp-payload")) }) {
		t.Error("the TCP server never received the payload canary")
	}
	if !slicesContainsFold(upstream.Queries(), c.get("dns-pattern")+".wild.example.test.") {
		t.Errorf("the upstream resolver never received the name under the listed pattern: %v", upstream.Queries())
	}
	if log := pg.StatementLog(); !strings.Contains(log, c.get("sql-param")) {
		t.Errorf("the server never received the SQL parameter canary:\n%s", log)
	}

	// Every refusal is counted, audited and streamed before the search.
	var metrics string
	counted := harness.Eventually(10*time.Second, func() bool {
		metrics, err = d.Metrics()
		return err == nil &&
			harness.MetricSum(metrics, "cleanwall_http_requests_total", `decision="deny"`) >= 5 &&
			harness.MetricSum(metrics, "cleanwall_dns_denies_total") >= 2 &&
			harness.MetricSum(metrics, "cleanwall_postgres_statements_total", `decision="refused"`) >= 1 &&
			harness.MetricSum(metrics, "cleanwall_datapath_packets_total", `verdict="drop"`) >= 1
	})
	if !counted {
		t.Fatalf("the refusals were not all counted:\n%s", harness.Grep(metrics, "deny\"\\|denies\\|refused\\|drop"))
	}
	udpDrop := func(ev api.DenyEvent) bool {
		return ev.Source == "datapath" && ev.Dst == "198.51.100.10:9998" && len(ev.Header) > 0
	}
	if !events.wait(10*time.Second, func(ev api.DenyEvent) bool { return udpDrop(ev) }) {
		t.Fatalf("no deny event with sampled headers for the dropped datagram: %+v", events.all())
	}
	for _, ev := range events.all() {
		if udpDrop(ev) && len(ev.Header) != 14+20+8 {
			t.Errorf("the dropped datagram's event carries %d bytes, want its 42 bytes of headers", len(ev.Header))
		}
	}
	if !events.wait(5*time.Second, func(ev api.DenyEvent) bool { return ev.Source == "dns" && ev.Name == "*.wild.example.test." }) {
		t.Errorf("the refused query under the listed pattern is not streamed under the pattern: %+v", events.all())
	}
	auditLog := filepath.Join(d.StateDir, "audit.jsonl")
	var audit string
	if !harness.Eventually(10*time.Second, func() bool {
		audit = readAuditFiles(t, d.StateDir)
		return strings.Contains(audit, `"deny.http"`) && strings.Contains(audit, `"deny.dns"`) && strings.Contains(audit, `"deny.datapath"`)
	}) {
		t.Fatalf("the audit trail (%s) lacks the refusals:\n%s", auditLog, audit)
	}
	// An OTLP export made after every refusal was counted.
	if !harness.Eventually(15*time.Second, func() bool {
		return otlp.exported("cleanwall_http_requests_total", "deny")
	}) {
		t.Fatalf("no OTLP export carried the refused requests (%d exports)", otlp.count())
	}

	// The search.
	logs := d.Log()
	if !strings.Contains(logs, "request refused") || !strings.Contains(logs, "dns query denied") {
		t.Fatalf("the daemon's log lacks the refusals: the search would prove nothing:\n%s", logs)
	}
	var evs strings.Builder
	for _, ev := range events.all() {
		b, _ := json.Marshal(ev)
		evs.Write(b)
		evs.WriteString("\n")
		evs.Write(ev.Header) // the sampled bytes themselves, not their base64
		evs.WriteString("\n")
	}
	signals := map[string]string{
		"metrics (/metrics)":    metrics,
		"daemon log":            logs,
		"audit records":         audit,
		"OTLP exports":          otlp.all(),
		"deny events (observe)": evs.String(),
	}
	for signal, text := range signals {
		low := strings.ToLower(text)
		for _, k := range c.names() {
			if i := strings.Index(low, c.get(k)); i >= 0 {
				t.Errorf("%s carry the %s canary: ...%s...", signal, k, text[max(0, i-200):min(len(text), i+len(c.get(k))+100)])
			}
		}
	}
	// The policy's own names are what telemetry may say.
	if !strings.Contains(audit, `results-api`) || !strings.Contains(metrics, `rule="results-api"`) {
		t.Errorf("the rule's name is missing from the audit trail or the metrics")
	}
	t.Logf("searched %d bytes of metrics, %d of logs, %d of audit records, %d of OTLP exports (%d), %d of deny events (%d) for %d canaries in %v",
		len(metrics), len(logs), len(audit), len(otlp.all()), otlp.count(), evs.Len(), len(events.all()), len(c.names()), time.Since(start).Round(time.Millisecond))
}

// `cleanwall run --otlp-endpoint` exports its embedded runtime's metrics
// (a last export when the command ends); an endpoint that is not https is
// refused before the command runs, naming the flag.
func TestRunExportsOTLP(t *testing.T) {
	env := harness.New(t)
	otlp := startOTLPReceiver(t, env)
	pol := writePolicy(t, env, "otlp.yaml", policyOpen)
	marker := filepath.Join(t.TempDir(), "ran")
	res := cleanwallRun(t, env, "--policy", pol, "--name", runName("otlp-bad"), "--otlp-endpoint", "http://127.0.0.1:4318", "--", "touch", marker)
	if res.code == 0 || !strings.Contains(res.stderr, "--otlp-endpoint") {
		t.Errorf("an http endpoint: exit %d, stderr %q; want a failure naming --otlp-endpoint", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the command ran although the OTLP endpoint was refused")
	}
	res = cleanwallRun(t, env, "--policy", pol, "--name", runName("otlp"), "--otlp-endpoint", otlp.url, "--otlp-ca", otlp.ca,
		"--otlp-interval", "1s", "--", "touch", marker)
	if res.code != 0 {
		t.Fatalf("cleanwall run: exit %d\n%s", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("the command did not run")
	}
	if otlp.count() == 0 {
		t.Fatal("no OTLP export from cleanwall run")
	}
	if !strings.Contains(otlp.all(), "cleanwall-run") || !strings.Contains(otlp.all(), "cleanwall_sandboxes") {
		t.Errorf("the export lacks service.name cleanwall-run or the runtime's metrics (%d exports)", otlp.count())
	}
}

// policyTelemetry: an open HTTP rule with paths, methods, a body limit
// and deny patterns; a plain TCP rule; DNS with a listed name and a
// pattern; the postgres rule of policyWarehouse (login files from the
// harness).
const policyTelemetry = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: telemetry}
spec:
  dns:
    upstream: 198.51.100.53:53
    allow: [api.example.test, '*.wild.example.test']
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
      open:
        protocol: http
        http:
          rules:
            - methods: [GET, POST]
              paths: ["/v1/results", "/v1/results/*"]
          maxBodyBytes: 4096
          denyBodyPatterns: ['\bssn-\d{3}\b']
          denyPatterns: ['zzdeny[0-9a-f]+']
    - name: raw-tcp
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8081}]
      mode: open
    - name: warehouse
      to: [{cidr: 198.51.100.20/32}]
      ports: [{port: 5432}]
      mode: open
      open:
        protocol: postgres
        postgres:
          database: clinic
          upstreamUserFile: %s
          upstreamPasswordFile: %s
          queries:
            - name: cohort-by-region
              sql: SELECT region, count(*) AS n FROM patients WHERE age > $1 GROUP BY region
            - name: visits
              sql: SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= $1
          columns:
            deny: [ssn, name, email]
          rows:
            maxRows: 50
`

// canaries are random tokens, one per place a sandbox can put data: a
// leak names the place. Lower-case letters and digits, so that each is a
// DNS label, an SQL literal and a header value as is (the method is its
// upper-case form); searched case-insensitively.
type canaries map[string]string

func newCanaries(t *testing.T) canaries {
	t.Helper()
	c := canaries{}
	for _, k := range []string{"http-header", "http-path", "http-query", "http-body", "http-header-refused", "http-header-name",
		"http-path-refused", "http-query-refused", "http-method", "http-body-refused", "http-pattern", "http-malformed",
		"tcp-payload", "udp-payload", "dns-unlisted", "dns-pattern", "dns-pattern-qtype", "sql-param", "sql-literal", "sql-unlisted"} {
		b := make([]byte, 8)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		c[k] = "cnry" + hex.EncodeToString(b)
	}
	return c
}

func (c canaries) get(k string) string {
	v, ok := c[k]
	if !ok {
		panic("no canary " + k)
	}
	return v
}

func (c canaries) names() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// otlpReceiver is a local OpenTelemetry collector: OTLP/HTTP over TLS (its
// own CA) in the node namespace, where cleanwalld runs. It keeps every
// export, raw and decoded.
type otlpReceiver struct {
	url, ca string
	mu      sync.Mutex
	raw     [][]byte
	decoded []string
	msgs    []*colmetrics.ExportMetricsServiceRequest
}

func startOTLPReceiver(t *testing.T, env *harness.Env) *otlpReceiver {
	t.Helper()
	dir := t.TempDir()
	testutil.TestCA(t, dir, "collector")
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "collector.pem"), filepath.Join(dir, "collector.key"))
	if err != nil {
		t.Fatal(err)
	}
	var l net.Listener
	if err := env.InNode(func() (err error) {
		l, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	r := &otlpReceiver{url: "https://" + l.Addr().String(), ca: filepath.Join(dir, "ca.pem")}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, err := io.ReadAll(io.LimitReader(req.Body, 64<<20))
		var m colmetrics.ExportMetricsServiceRequest
		if err != nil || req.URL.Path != "/v1/metrics" || proto.Unmarshal(body, &m) != nil {
			http.Error(w, "bad export", http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		r.raw = append(r.raw, body)
		r.decoded = append(r.decoded, prototext.Format(&m))
		r.msgs = append(r.msgs, &m)
		r.mu.Unlock()
		out, _ := proto.Marshal(&colmetrics.ExportMetricsServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go func() { _ = srv.ServeTLS(l, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })
	return r
}

func (r *otlpReceiver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.raw)
}

// exported reports whether an export holds a data point of metric with an
// attribute whose value is value.
func (r *otlpReceiver) exported(metric, value string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		for _, rm := range m.GetResourceMetrics() {
			for _, sm := range rm.GetScopeMetrics() {
				for _, mt := range sm.GetMetrics() {
					if mt.GetName() != metric {
						continue
					}
					for _, p := range mt.GetSum().GetDataPoints() {
						for _, kv := range p.GetAttributes() {
							if kv.GetValue().GetStringValue() == value {
								return true
							}
						}
					}
				}
			}
		}
	}
	return false
}

// all is every export, decoded and raw.
func (r *otlpReceiver) all() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for i := range r.raw {
		b.WriteString(r.decoded[i])
		b.Write(r.raw[i])
	}
	return b.String()
}

// watchEventsWithHeaders subscribes to sb's deny events with the sampled
// headers of dropped packets (`cleanwall observe --pcap`) and returns once
// the stream is live.
func watchEventsWithHeaders(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) *eventLog {
	t.Helper()
	l := &eventLog{added: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		_ = d.Client().WatchEvents(ctx, api.EventFilter{Sandbox: sb.ContainerID, Headers: true}, func(ev api.DenyEvent) error {
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

// readAuditFiles returns every audit file under dir (the trail and its
// rotated files).
func readAuditFiles(t *testing.T, dir string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "audit*"))
	var b strings.Builder
	for _, f := range files {
		if st, err := os.Stat(f); err != nil || st.IsDir() {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(data)
	}
	return b.String()
}

// rawHTTP sends a request head as is through the proxy and returns the
// answer.
func rawHTTP(t *testing.T, sb *harness.Sandbox, req string) string {
	t.Helper()
	c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(io.LimitReader(c, 64<<10))
	return string(b)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\r\n")
	return line
}

func rcodeOf(m *dns.Msg) string {
	if m == nil {
		return "no answer"
	}
	return dns.RcodeToString[m.Rcode]
}

func tcpReceived(s *harness.TCPServer, what string) bool {
	for _, c := range s.Conns() {
		if strings.Contains(string(c.Bytes()), what) {
			return true
		}
	}
	return false
}

func slicesContainsFold(list []string, s string) bool {
	for _, x := range list {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}
