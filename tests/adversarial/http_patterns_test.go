package adversarial

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyPatterns is an open HTTP rule with a whole-request deny pattern,
// as docs/policy.md's "Whole-request patterns" writes it.
const policyPatterns = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: http-patterns}
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
          denyPatterns:           # RE2; matched against the decoded path and query,
            - '\b\d{3}-\d{2}-\d{4}\b'   # every header value, and the (decoded) body
`

// theSSN is the data the pattern stops; it must never reach the upstream,
// nor the audit trail or the daemon's log.
const theSSN = "123-45-6789"

// Open-mode HTTP with denyPatterns, through the real datapath and daemon
// with curl inside the sandbox: the pattern's data is refused in the query,
// in a path segment under "/*", in a header, in a cookie, in a UTF-16 body
// and in a gzip body (and a coding the proxy cannot decode is refused);
// each gets 403 with its reason, is counted and audited, and the upstream
// records nothing of it. Allowed requests, a gzip one among them, pass byte
// for byte.
func TestHTTPPatterns(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	sb := env.MustAddSandbox("patterns", harness.SandboxOptions{Policy: policyPatterns, NoIPv6: true})

	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return "@" + p
	}
	secret := `{"patient":"p-17","ssn":"` + theSSN + `"}`
	clean := `{"patient":"p-17","score":42}`
	utf16Body := write("secret.utf16.json", utf16LEWithBOM(secret))
	gzipSecret := write("secret.json.gz", gzipOf(t, secret))
	cleanGzip := gzipOf(t, clean)
	gzipClean := write("clean.json.gz", cleanGzip)

	const url = "http://198.51.100.10:8080"
	refused := []struct {
		name   string
		args   []string
		reason string
	}{
		{"query", []string{url + "/v1/results?ssn=" + theSSN}, "query-pattern"},
		{"query percent-encoded", []string{url + "/v1/results?ssn=%31%32%33-45-6789"}, "query-pattern"},
		{"path segment under /*", []string{url + "/v1/results/" + theSSN}, "path-pattern"},
		{"header", []string{"-H", "X-Patient: " + theSSN, url + "/v1/results"}, "header-pattern"},
		{"cookie", []string{"-b", "session=abc; ssn=" + theSSN, url + "/v1/results"}, "header-pattern"},
		{"UTF-16 body", []string{"-X", "POST", "-H", "Content-Type: application/json; charset=utf-16", "--data-binary", utf16Body, url + "/v1/results"}, "body-pattern"},
		{"gzip body", []string{"-X", "POST", "-H", "Content-Type: application/json", "-H", "Content-Encoding: gzip", "--data-binary", gzipSecret, url + "/v1/results"}, "body-pattern"},
		{"coding the proxy cannot decode", []string{"-X", "POST", "-H", "Content-Type: application/json", "-H", "Content-Encoding: br", "--data-binary", "{}", url + "/v1/results"}, "content-encoding"},
	}
	want := map[string]float64{}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			code, hdr, _ := sb.Curl(t, c.args...)
			if code != 403 {
				t.Fatalf("status %d, want 403\n%s\n%s", code, hdr, d.Log())
			}
			if !strings.Contains(strings.ToLower(hdr), "cleanwall-reason: "+c.reason) {
				t.Fatalf("no Cleanwall-Reason %q in:\n%s", c.reason, hdr)
			}
		})
		want[c.reason]++
	}

	// Allowed requests still pass, the gzip body byte for byte.
	code, _, body := sb.Curl(t, url+"/v1/results/42?page=2")
	if code != 200 || body != "ok /v1/results/42\n" {
		t.Fatalf("allowed GET: %d %q", code, body)
	}
	code, hdr, _ := sb.Curl(t, "-X", "POST", "-H", "Content-Type: application/json", "-H", "Content-Encoding: gzip", "--data-binary", gzipClean, url+"/v1/results")
	if code != 200 {
		t.Fatalf("allowed gzip POST: %d\n%s", code, hdr)
	}

	reqs := srv.Requests()
	if len(reqs) != 2 || reqs[0].Path != "/v1/results/42?page=2" || reqs[1].Method != "POST" ||
		!bytes.Equal(reqs[1].Body, cleanGzip) || reqs[1].Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("the server recorded %+v; want exactly the two allowed requests, the gzip body as sent", reqs)
	}

	// Counted by reason; the allowed requests are counted once relayed.
	var m string
	ok := harness.Eventually(5*time.Second, func() bool {
		var err error
		if m, err = d.Metrics(); err != nil {
			return false
		}
		for reason, n := range want {
			if v, _ := harness.MetricValue(m, "cleanwall_http_requests_total", `decision="deny"`, `reason="`+reason+`"`, `rule="results-api"`); v != n {
				return false
			}
		}
		v, _ := harness.MetricValue(m, "cleanwall_http_requests_total", `decision="allow"`, `rule="results-api"`)
		return v == 2
	})
	if !ok {
		t.Fatalf("want deny counts %v and 2 allowed:\n%s", want, grep(m, "cleanwall_http_requests_total"))
	}

	// Audited, each with its reason, without the data.
	auditLog := filepath.Join(d.StateDir, "audit.jsonl")
	var trail string
	ok = harness.Eventually(5*time.Second, func() bool {
		b, _ := os.ReadFile(auditLog)
		trail = string(b)
		for reason := range want {
			if !hasLineWith(trail, "deny.http", `"`+reason+`"`) {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("audit trail lacks a deny.http record per reason %v:\n%s", want, grep(trail, "deny.http"))
	}
	if strings.Contains(trail, theSSN) {
		t.Fatalf("the audit trail keeps the data the pattern stopped:\n%s", grep(trail, theSSN))
	}
	if strings.Contains(d.Log(), theSSN) {
		t.Fatalf("the daemon's log keeps the data the pattern stopped:\n%s", grep(d.Log(), theSSN))
	}
}

func hasLineWith(s string, parts ...string) bool {
	for _, l := range strings.Split(s, "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			return true
		}
	}
	return false
}

func utf16LEWithBOM(s string) []byte {
	b := []byte{0xFF, 0xFE}
	for _, u := range utf16.Encode([]rune(s)) {
		b = append(b, byte(u), byte(u>>8))
	}
	return b
}

func gzipOf(t *testing.T, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	if _, err := w.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
