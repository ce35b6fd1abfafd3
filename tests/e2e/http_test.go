package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

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
          denyBodyPatterns: ['\b\d{3}-\d{2}-\d{4}\b']
    - name: uploads
      to: [{cidr: 198.51.100.11/32}]
      ports: [{port: 8080}]
      mode: open
      open:
        protocol: http
        http:
          rules:
            - methods: [PUT]
              paths: ["/upload/**"]
          maxBodyBytes: 4294967296
`

func httpEnv(t *testing.T) (*harness.Env, *harness.Daemon, *harness.HTTPServer, *harness.Sandbox) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	sb := env.MustAddSandbox("http", harness.SandboxOptions{Policy: policyHTTP, NoIPv6: true})
	return env, d, srv, sb
}

// curlIn runs Debian's curl inside the sandbox and returns the HTTP status,
// the response headers and the body.
func curlIn(t *testing.T, sb *harness.Sandbox, args ...string) (int, string, string) {
	t.Helper()
	return sb.Curl(t, args...)
}

func TestHTTPAllowedRequestsPassByteForByte(t *testing.T) {
	_, d, srv, sb := httpEnv(t)
	code, _, body := curlIn(t, sb, "http://198.51.100.10:8080/v1/results/42")
	if code != 200 || body != "ok /v1/results/42\n" {
		t.Fatalf("GET: %d %q\n%s", code, body, d.Log())
	}
	payload := `{"rows":[1,2,3],"note":"aggregates only"}`
	code, _, _ = curlIn(t, sb, "-X", "POST", "-H", "Content-Type: application/json", "--data-binary", payload, "http://198.51.100.10:8080/v1/results")
	if code != 200 {
		t.Fatalf("POST: %d", code)
	}
	reqs := srv.Requests()
	if len(reqs) != 2 || string(reqs[1].Body) != payload || reqs[1].Method != "POST" || reqs[1].Path != "/v1/results" {
		t.Fatalf("server recorded %+v", reqs)
	}
	m, _ := d.Metrics()
	if v, ok := harness.MetricValue(m, "cleanwall_http_requests_total", `decision="allow"`); !ok || v != 2 {
		t.Fatalf("allowed requests metric: %v", grep(m, "cleanwall_http_requests_total"))
	}
}

func TestHTTPRefusals(t *testing.T) {
	_, d, srv, sb := httpEnv(t)
	cases := []struct {
		name   string
		args   []string
		status int
		reason string
	}{
		{"path not allowed", []string{"http://198.51.100.10:8080/admin"}, 403, "path"},
		{"method not allowed", []string{"-X", "DELETE", "http://198.51.100.10:8080/v1/results/1"}, 403, "method"},
		{"content type not allowed", []string{"-X", "POST", "-H", "Content-Type: text/plain", "--data-binary", "x", "http://198.51.100.10:8080/v1/results"}, 403, "content-type"},
		{"body over maxBodyBytes", []string{"-X", "POST", "-H", "Content-Type: application/json", "--data-binary", strings.Repeat("a", 2000), "http://198.51.100.10:8080/v1/results"}, 403, "body-too-large"},
		{"deny body pattern", []string{"-X", "POST", "-H", "Content-Type: application/json", "--data-binary", `{"ssn":"123-45-6789"}`, "http://198.51.100.10:8080/v1/results"}, 403, "body-pattern"},
		{"domain fronting", []string{"-H", "Host: partner.example.test", "http://198.51.100.10:8080/v1/results"}, 421, "host-mismatch"},
		{"dot-dot traversal", []string{"--path-as-is", "http://198.51.100.10:8080/v1/results/../admin"}, 400, "bad-path"},
		{"encoded traversal", []string{"--path-as-is", "http://198.51.100.10:8080/v1/results/%2e%2e/admin"}, 400, "bad-path"},
		{"websocket upgrade", []string{"-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "http://198.51.100.10:8080/v1/results"}, 403, "upgrade"},
		{"h2c upgrade", []string{"--http2", "http://198.51.100.10:8080/v1/results"}, 403, "upgrade"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, hdr, _ := curlIn(t, sb, c.args...)
			if code != c.status {
				t.Fatalf("status %d, want %d\n%s", code, c.status, hdr)
			}
			if !strings.Contains(strings.ToLower(hdr), "cleanwall-reason: "+c.reason) {
				t.Fatalf("no Cleanwall-Reason %q in:\n%s", c.reason, hdr)
			}
		})
	}
	if n := len(srv.Requests()); n != 0 {
		t.Fatalf("the server received %d refused requests: %+v", n, srv.Requests())
	}
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if v := harness.MetricSum(m, "cleanwall_http_requests_total", `decision="deny"`); v < float64(len(cases)) {
		t.Fatalf("refusals not counted (%v < %d):\n%s", v, len(cases), grep(m, "cleanwall_http_requests_total"))
	}
}

// A deny pattern split across two chunks is still caught.
func TestHTTPBodyPatternAcrossChunks(t *testing.T) {
	_, _, srv, sb := httpEnv(t)
	c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "POST /v1/results HTTP/1.1\r\nHost: 198.51.100.10:8080\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
	fmt.Fprintf(c, "d\r\n{\"ssn\":\"123-4\r\n")
	time.Sleep(100 * time.Millisecond) // a separate segment, too
	fmt.Fprintf(c, "8\r\n5-6789\"}\r\n0\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 || resp.Header.Get("Cleanwall-Reason") != "body-pattern" {
		t.Fatalf("status %d reason %q", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
	}
	if len(srv.Requests()) != 0 {
		t.Fatal("the server received the request")
	}
}

// An allowed large upload streams through the daemon with flat memory: the
// daemon's resident set grows far less than the upload.
func TestHTTPLargeUploadStreams(t *testing.T) {
	env, d, _, sb := httpEnv(t)
	size := int64(1 << 30)
	if testing.Short() {
		size = 256 << 20
	}
	up := env.HTTPServer("198.51.100.11:8080", nil)
	rssBefore := daemonRSS(t, d)
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := netns.Do(sb.NS, func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}}
	src := io.LimitReader(rand.Reader, size)
	req, _ := http.NewRequest("PUT", "http://198.51.100.11:8080/upload/big.bin", src)
	req.ContentLength = size
	peak := rssBefore
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if r := daemonRSS(t, d); r > peak {
					peak = r
				}
			}
		}
	}()
	resp, err := client.Do(req)
	close(stop)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d (%s)", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
	}
	if reqs := up.Requests(); len(reqs) != 1 || reqs[0].BodyLen != size {
		t.Fatalf("the upstream received %+v", reqs)
	}
	growth := peak - rssBefore
	t.Logf("uploaded %d MiB; daemon RSS %d MiB before, peak growth %d MiB", size>>20, rssBefore>>20, growth>>20)
	if growth > 64<<20 {
		t.Fatalf("daemon memory grew by %d MiB during a %d MiB upload: not streaming", growth>>20, size>>20)
	}
	m, _ := d.Metrics()
	if v, ok := harness.MetricValue(m, "cleanwall_http_request_bytes_out_total", `rule="uploads"`); !ok || v < float64(size) {
		t.Fatalf("bytes-out metric: %v", grep(m, "cleanwall_http_request_bytes_out_total"))
	}
}

// daemonRSS reads the daemon's resident set size.
func daemonRSS(t *testing.T, d *harness.Daemon) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}
