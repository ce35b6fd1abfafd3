package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// raw fills in the Host placeholder of a raw request.
func (h *harness) raw(s string) string {
	return strings.NewReplacer("{host}", h.hostport(), "{port}", strconv.Itoa(int(h.up.port))).Replace(s)
}

func TestAllowedRequestPassesByteForByte(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		cases := []struct {
			name, req string
			wantIn    string // what the upstream must receive; "" means req itself
		}{
			{name: "GET", req: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sandbox\r\nX-Trace: a b\tc\r\nConnection: close\r\n\r\n"},
			{name: "GET with query", req: "GET /v1/results/abc?page=2&q=/admin/../x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
			{name: "POST with Content-Length", req: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 27\r\nConnection: close\r\n\r\n{\"score\": 42, \"id\": \"x-1\"}\n"},
			{name: "POST chunked is re-chunked", req: "POST /v1/results/7 HTTP/1.1\r\nHost: {host}\r\nContent-Type: Application/JSON\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"a\":\r\n0004\r\n 12}\r\n0\r\n\r\n",
				wantIn: "POST /v1/results/7 HTTP/1.1\r\nHost: {host}\r\nContent-Type: Application/JSON\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n9\r\n{\"a\": 12}\r\n0\r\n\r\n"},
			{name: "absolute-form naming the flow's host", req: "GET http://{host}/v1/results HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
			{name: "escaped unreserved bytes match decoded", req: "GET /v1/re%73ults/a%20b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
			{name: "HTTP/1.0", req: "GET /v1/results HTTP/1.0\r\nHost: {host}\r\n\r\n"},
			{name: "HEAD", req: "HEAD /v1/results/download?size=1000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
			{name: "download 1 MiB", req: "GET /v1/results/download?size=1048576 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
			{name: "chunked streamed response", req: "GET /v1/results/stream HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				h := newHarness(t, policyRules(), mode)
				c, err := net.Dial("tcp", h.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				req := h.raw(tc.req)
				if _, err := io.WriteString(c, req); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(c) // both sides close after the response
				if err != nil {
					t.Fatal(err)
				}
				want := req
				if tc.wantIn != "" {
					want = h.raw(tc.wantIn)
				}
				if in := h.up.rawIn(); in != want {
					t.Errorf("upstream received\n%q\nwant\n%q", in, want)
				}
				if out := h.up.rawOut(); !bytes.Equal(got, []byte(out)) {
					t.Errorf("sandbox received %d bytes, upstream sent %d; first difference at %d", len(got), len(out), firstDiff(got, []byte(out)))
				}
				resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(got)), &http.Request{Method: strings.Fields(req)[0]})
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Fatalf("response %v, %v; want 200", resp, err)
				}
				if reqs := h.up.requests(); len(reqs) != 1 {
					t.Fatalf("upstream handled %d requests, want 1", len(reqs))
				}
			})
		}
	})
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestAllowedWithHTTPClient drives the proxy with Go's HTTP client on one
// keep-alive connection and checks bodies both ways.
func TestAllowedWithHTTPClient(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		cl := h.client()
		body := []byte(`{"results":[1,2,3],"note":"123-45-678 is not an SSN"}`)
		for i := range 3 {
			resp, err := cl.Post(h.url("/v1/results/"+strconv.Itoa(i)), "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Upstream") != "yes" {
				t.Fatalf("status %d, body %s", resp.StatusCode, got)
			}
			want := fmt.Sprintf(`{"method":"POST","uri":"/v1/results/%d","len":%d,"crc":%d}`, i, len(body), crc32.ChecksumIEEE(body))
			if string(got) != want {
				t.Fatalf("response body %s, want %s", got, want)
			}
		}
		// A streamed (chunked) request body of unknown length.
		pr, pw := io.Pipe()
		go func() {
			for _, part := range []string{`{"a":`, `"b",`, `"c":1}`} {
				_, _ = io.WriteString(pw, part)
				time.Sleep(5 * time.Millisecond)
			}
			pw.Close()
		}()
		resp, err := cl.Post(h.url("/v1/results"), "application/json", pr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("chunked POST: status %d", resp.StatusCode)
		}
		reqs := h.up.requests()
		if len(reqs) != 4 {
			t.Fatalf("upstream handled %d requests, want 4", len(reqs))
		}
		for _, r := range reqs[:3] {
			if !bytes.Equal(r.Body, body) {
				t.Errorf("upstream body %q, want %q", r.Body, body)
			}
		}
		if string(reqs[3].Body) != `{"a":"b","c":1}` || len(reqs[3].TransferEncoding) != 1 {
			t.Errorf("chunked body arrived as %q, TE %v", reqs[3].Body, reqs[3].TransferEncoding)
		}
		h.up.mu.Lock()
		conns := h.up.conns
		h.up.mu.Unlock()
		if conns != 1 {
			t.Errorf("upstream saw %d connections for one keep-alive client connection, want 1", conns)
		}
		// An allowed request is counted once its response was relayed, which
		// may be just after the client has read it.
		eventually(t, "allow counter at 4", func() bool {
			return value(h.proxy.Metrics.requests.WithLabelValues("sb-1", "results-api", "allow", "none")) == 4
		})
		if n := value(h.proxy.Metrics.bytesOut.WithLabelValues("sb-1", "results-api")); n < float64(3*len(body)) {
			t.Errorf("bytes out %v, want at least the bodies", n)
		}
	})
}

type refusalCase struct {
	name   string
	rules  *Rules // nil: policyRules
	raw    string // {host} is the flow's Host value
	status int
	reason Reason
	opts   []harnessOption
}

// expectRefused sends tc.raw and checks the refusal: status, reason header,
// OnDeny, the counter, and an upstream that saw nothing at all. It returns
// the connection to the proxy. mode is eachIO's.
func expectRefused(t *testing.T, tc refusalCase, mode harnessOption) (net.Conn, *bufio.Reader) {
	t.Helper()
	rules := tc.rules
	if rules == nil {
		rules = policyRules()
	}
	h := newHarness(t, rules, append([]harnessOption{mode}, tc.opts...)...)
	resp, body, c, br := h.rawExchange(t, h.raw(tc.raw))
	if resp.StatusCode != tc.status || resp.Header.Get("Cleanwall-Reason") != string(tc.reason) {
		t.Fatalf("got %d %q (%s), want %d %q", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), body, tc.status, tc.reason)
	}
	h.up.assertNothing(t)
	if !reasons[tc.reason].failure {
		d := h.lastDenials()
		if len(d) != 1 || d[0].Reason != tc.reason || d[0].Status != tc.status {
			t.Errorf("OnDeny got %+v, want one %s", d, tc.reason)
		}
		if n := value(h.proxy.Metrics.requests.WithLabelValues("sb-1", "results-api", "deny", string(tc.reason))); n != 1 {
			t.Errorf("deny counter %v, want 1", n)
		}
	}
	return c, br
}

func TestRefusals(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		long := strings.Repeat("a", 9000)
		many := strings.Repeat("X-A: b\r\n", 101)
		websocket := &Rules{Rules: []RequestRule{{Methods: []string{"GET"}, Paths: []string{"/ws"}}}, AllowUpgrade: []string{"websocket"}}
		cases := []refusalCase{
			{name: "method", raw: "DELETE /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonMethod},
			{name: "lowercase method", raw: "get /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonMethod},
			{name: "path", raw: "GET /v1/admin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonPath},
			{name: "path: * is one segment", raw: "GET /v1/results/a/b HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonPath},
			{name: "path: trailing slash is not a segment", raw: "GET /v1/results/ HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonPath},
			{name: "dot-dot segment", raw: "GET /v1/results/../admin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "dot segment", raw: "GET /v1/./results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "encoded dot-dot", raw: "GET /v1/results/%2e%2e/admin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "encoded slash", raw: "GET /v1/results%2Fadmin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "double-encoded slash", raw: "GET /v1/results/a%252Fb HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "encoded NUL", raw: "GET /v1/results/a%00 HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "empty segment", raw: "GET /v1//results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "dot-dot with parameters", raw: "GET /v1/results/..;/admin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "backslash", raw: "GET /v1/results\\..\\admin HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadPath},
			{name: "fragment", raw: "GET /v1/results#x HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadTarget},
			{name: "asterisk-form", raw: "OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadTarget},
			{name: "https absolute-form", raw: "GET https://{host}/v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadTarget},
			{name: "userinfo", raw: "GET http://user@{host}/v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadTarget},
			{name: "content type", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi", status: 403, reason: ReasonContentType},
			{name: "no content type", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\n{}", status: 403, reason: ReasonContentType},
			{name: "content type repeated", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}", status: 400, reason: ReasonBadHeader},
			{name: "Content-Length above maxBodyBytes, body never sent", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1048577\r\n\r\n", status: 403, reason: ReasonBodyTooLarge},
			{name: "chunked above maxBodyBytes", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n", status: 403, reason: ReasonBodyTooLarge},
			{name: "no body allowed", rules: &Rules{Rules: []RequestRule{{}}}, raw: "POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\n\r\nx", status: 403, reason: ReasonBodyTooLarge},
			{name: "body pattern", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"ssn\": \"123-45-6789\"}", status: 403, reason: ReasonBodyPattern},
			{name: "content encoding the proxy cannot decode", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}", status: 403, reason: ReasonContentEncoding},
			{name: "other host (domain fronting)", raw: "GET /v1/results HTTP/1.1\r\nHost: other.example.test\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "host with a trailing dot", raw: "GET /v1/results HTTP/1.1\r\nHost: api.example.test.:{port}\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "host without the port", raw: "GET /v1/results HTTP/1.1\r\nHost: api.example.test\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "host with another port", raw: "GET /v1/results HTTP/1.1\r\nHost: api.example.test:1\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "host as the IP of an fqdn rule", raw: "GET /v1/results HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "absolute-form naming another host", raw: "GET http://other.example.test/v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 421, reason: ReasonHostMismatch},
			{name: "missing host", raw: "GET /v1/results HTTP/1.1\r\n\r\n", status: 400, reason: ReasonBadHost},
			{name: "repeated host", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadHost},
			{name: "host with a space before the value and after", raw: "GET /v1/results HTTP/1.1\r\nHost: {host} \r\n\r\n", status: 400, reason: ReasonBadHost},
			{name: "websocket upgrade", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", status: 403, reason: ReasonUpgrade},
			{name: "h2c upgrade", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", status: 403, reason: ReasonUpgrade},
			{name: "upgrade to a protocol not allowed", rules: websocket, raw: "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n", status: 403, reason: ReasonUpgrade},
			{name: "HTTP/1.0 upgrade", rules: websocket, raw: "GET /ws HTTP/1.0\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", status: 403, reason: ReasonUpgrade},
			{name: "expect", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nExpect: 200-ok\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", status: 417, reason: ReasonExpect},
			{name: "CONNECT", raw: "CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonConnect},
			{name: "request line too long", raw: "GET /v1/results/" + long + " HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 431, reason: ReasonHeaderTooLarge},
			{name: "header line too long", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX-Long: " + long + "\r\n\r\n", status: 431, reason: ReasonHeaderTooLarge},
			{name: "head too large", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\n" + strings.Repeat("X-Long: "+long[:4000]+"\r\n", 9) + "\r\n", status: 431, reason: ReasonHeaderTooLarge},
			{name: "too many headers", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\n" + many + "\r\n", status: 431, reason: ReasonTooManyHeaders},
			{name: "held body above the hold limit", rules: &Rules{Rules: []RequestRule{{}}, MaxBodyBytes: NoBodyLimit, DenyBodyPatterns: []*regexp.Regexp{ssn}}, raw: "PUT /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 8388609\r\n\r\n", status: 413, reason: ReasonHoldLimit},
			{name: "no rules", rules: &Rules{}, raw: "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 403, reason: ReasonMethod},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				expectRefused(t, tc, mode)
			})
		}
	})
}

// TestRefusalKeepsTrustedConnection: a refusal of a well-framed request
// without a body leaves the connection usable; one with an unread body
// closes it.
func TestRefusalKeepsTrustedConnection(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		resp, _, c, br := h.rawExchange(t, h.raw("GET /v1/admin HTTP/1.1\r\nHost: {host}\r\n\r\n"))
		if resp.StatusCode != 403 || resp.Close {
			t.Fatalf("got %d close=%v, want 403 keep-alive", resp.StatusCode, resp.Close)
		}
		if _, err := io.WriteString(c, h.raw("GET /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		resp, _ = readResponseT(t, br, "GET")
		if resp.StatusCode != 200 {
			t.Fatalf("second request: %d, want 200", resp.StatusCode)
		}

		h = newHarness(t, policyRules(), mode)
		resp, _, c, br = h.rawExchange(t, h.raw("POST /v1/admin HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
		if resp.StatusCode != 403 || !resp.Close || !closedByPeer(c, br) {
			t.Fatalf("got %d close=%v, want 403 and the connection closed", resp.StatusCode, resp.Close)
		}
		h.up.assertNothing(t)
	})
}

// TestStaleUpstreamIsRetriedByTheClient: when the upstream drops an idle
// keep-alive connection, the proxy drops the sandbox's connection the same
// way, and the sandbox's HTTP client retries as it would without a proxy.
func TestStaleUpstreamIsRetriedByTheClient(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		cl := h.client()
		get := func() int {
			resp, err := cl.Get(h.url("/v1/results"))
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}
		if st := get(); st != 200 {
			t.Fatalf("first request: %d", st)
		}
		h.up.closeConns()
		if st := get(); st != 200 {
			t.Fatalf("request after the upstream closed: %d", st)
		}
		if reqs := h.up.requests(); len(reqs) != 2 {
			t.Fatalf("upstream handled %d requests, want 2", len(reqs))
		}
		if n := value(h.proxy.Metrics.requests.WithLabelValues("sb-1", "results-api", "error", string(ReasonUpstreamUnreachable))); n != 1 {
			t.Fatalf("stale upstream counted %v times, want 1 (was the stale path taken?)", n)
		}
	})
}

// TestPipelined checks that every pipelined request is inspected on its
// own: a refused one after an allowed one, and the reverse.
func TestPipelined(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		allowed := "GET /v1/results/1 HTTP/1.1\r\nHost: {host}\r\n\r\n"
		refused := "GET /v1/admin HTTP/1.1\r\nHost: {host}\r\n\r\n"
		for _, tc := range []struct {
			name   string
			reqs   []string
			status []int
		}{
			{"allowed then refused", []string{allowed, refused}, []int{200, 403}},
			{"refused then allowed", []string{refused, allowed}, []int{403, 200}},
			{"allowed, refused, allowed", []string{allowed, refused, allowed}, []int{200, 403, 200}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := newHarness(t, policyRules(), mode)
				var all, want strings.Builder
				for i, r := range tc.reqs {
					all.WriteString(h.raw(r))
					if tc.status[i] == 200 {
						want.WriteString(h.raw(r))
					}
				}
				c, err := net.Dial("tcp", h.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(c, all.String()); err != nil { // one write: pipelined
					t.Fatal(err)
				}
				br := bufio.NewReader(c)
				for i, st := range tc.status {
					resp, _ := readResponseT(t, br, "GET")
					if resp.StatusCode != st {
						t.Fatalf("response %d: %d, want %d", i, resp.StatusCode, st)
					}
				}
				if in := h.up.rawIn(); in != want.String() {
					t.Fatalf("upstream received\n%q\nwant exactly the allowed requests\n%q", in, want.String())
				}
			})
		}
	})
}

// TestPipelinedBodies: Content-Length bodies that arrive with their heads
// are forwarded with them, and what follows each body is the next request,
// inspected on its own.
func TestPipelinedBodies(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		rules := &Rules{Rules: []RequestRule{{Methods: []string{"GET", "POST"}, Paths: []string{"/v1/**"}}}, MaxBodyBytes: 1 << 20}
		h := newHarness(t, rules, mode)
		post := func(body string) string {
			return h.raw("POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
		}
		// The second body holds what would be a request, were it not a body.
		reqs := []string{post(`{"a":1}`), post("GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"), h.raw("GET /admin HTTP/1.1\r\nHost: {host}\r\n\r\n"), post(strings.Repeat("x", 3000))}
		status := []int{200, 200, 403, 200}
		c, err := net.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, strings.Join(reqs, "")); err != nil { // one write: pipelined
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		for i, st := range status {
			resp, _ := readResponseT(t, br, "POST")
			if resp.StatusCode != st {
				t.Fatalf("response %d: %d, want %d", i, resp.StatusCode, st)
			}
		}
		if in, want := h.up.rawIn(), reqs[0]+reqs[1]+reqs[3]; in != want {
			t.Fatalf("upstream received\n%q\nwant exactly the allowed requests\n%q", in, want)
		}
	})
}

// TestRequestsArrivingAnyTime: on a keep-alive connection, the next
// request may arrive while the previous one is with the upstream, in
// pieces, with its body later, or after a pause; every one is served. The
// proxy waits for a plain TCP connection's bytes without reading it first
// (poll.go) and reads a wrapped one through its Read: both are checked.
func TestRequestsArrivingAnyTime(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct {
			name string
			opts []harnessOption
		}{{"tcp", nil}, {"wrapped", []harnessOption{withWrappedConns()}}} {
			t.Run(tc.name, func(t *testing.T) {
				rules := &Rules{Rules: []RequestRule{{Methods: []string{"GET", "POST"}, Paths: []string{"/v1/**"}}}, MaxBodyBytes: 1 << 20}
				h := newHarness(t, rules, append([]harnessOption{mode}, tc.opts...)...)
				c, err := net.Dial("tcp", h.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				br := bufio.NewReader(c)
				send := func(parts ...string) {
					for i, p := range parts {
						if i > 0 {
							time.Sleep(20 * time.Millisecond)
						}
						if _, err := io.WriteString(c, h.raw(p)); err != nil {
							t.Fatal(err)
						}
					}
				}
				expect := func(uris ...string) {
					t.Helper()
					for _, uri := range uris {
						resp, body := readResponseT(t, br, "GET")
						if resp.StatusCode != 200 || !strings.Contains(string(body), strconv.Quote(uri)) {
							t.Fatalf("response for %s: %d %s", uri, resp.StatusCode, body)
						}
					}
				}
				get := func(path string) string { return "GET " + path + " HTTP/1.1\r\nHost: {host}\r\n\r\n" }

				send(get("/v1/slow/1"), get("/v1/2")) // the second arrives while the first is upstream
				expect("/v1/slow/1", "/v1/2")
				send(get("/v1/3")[:20], get("/v1/3")[20:]) // a head in two pieces
				expect("/v1/3")
				send("POST /v1/4 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\n0123", "456789") // the body later
				expect("/v1/4")
				time.Sleep(30 * time.Millisecond)
				send(get("/v1/5") + get("/v1/slow/6") + get("/v1/7")) // pipelined
				expect("/v1/5", "/v1/slow/6", "/v1/7")
				send(get("/v1/slow/8"), "POST /v1/9 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\n", "abc")
				expect("/v1/slow/8", "/v1/9")

				var got []string
				for _, r := range h.up.requests() {
					got = append(got, r.Method+" "+r.RequestURI+" "+string(r.Body))
				}
				want := []string{"GET /v1/slow/1 ", "GET /v1/2 ", "GET /v1/3 ", "POST /v1/4 0123456789", "GET /v1/5 ", "GET /v1/slow/6 ", "GET /v1/7 ", "GET /v1/slow/8 ", "POST /v1/9 abc"}
				if !slices.Equal(got, want) {
					t.Fatalf("upstream got\n%q\nwant\n%q", got, want)
				}
				h.up.mu.Lock()
				conns := h.up.conns
				h.up.mu.Unlock()
				if conns != 1 {
					t.Fatalf("%d upstream connections, want 1", conns)
				}
			})
		}
	})
}

// TestSmuggledRequestIsInspected: bytes after a chunked body's end are a
// request of their own, and get inspected as one.
func TestSmuggledRequestIsInspected(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		first := "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
		second := "GET /v1/admin HTTP/1.1\r\nHost: {host}\r\n\r\n"
		_, _, c, br := h.rawExchange(t, h.raw(first+second))
		resp, _ := readResponseT(t, br, "GET")
		if resp.StatusCode != 403 || resp.Header.Get("Cleanwall-Reason") != "path" {
			t.Fatalf("second request: %d %s", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
		}
		_ = c
		if reqs := h.up.requests(); len(reqs) != 1 || reqs[0].Method != "POST" {
			t.Fatalf("upstream handled %+v, want only the POST", reqs)
		}
	})
}

func TestBodyPatternAcrossChunkBoundary(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct{ name, body string }{
			{"split inside the number", "6\r\n{\"s\":1\r\n5\r\n23-45\r\n8\r\n-6789\"}\n\r\n0\r\n\r\n"},
			{"one byte per chunk", oneByteChunks(`{"x":"123-45-6789"}`)},
			{"far into a large body", "100000\r\n" + strings.Repeat("a", 0x100000-6) + " 123-4\r\n7\r\n5-6789 \r\n0\r\n\r\n"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				rules := policyRules()
				rules.MaxBodyBytes = 2 << 20
				expectRefused(t, refusalCase{
					rules:  rules,
					raw:    "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + tc.body,
					status: 403, reason: ReasonBodyPattern,
				}, mode)
			})
		}
	})
}

func oneByteChunks(s string) string {
	var b strings.Builder
	for i := range len(s) {
		b.WriteString("1\r\n" + s[i:i+1] + "\r\n")
	}
	return b.String() + "0\r\n\r\n"
}

// TestBodyPatternRefusalKeepsConnection: the whole body was read, so the
// framing is known and the next request is served.
func TestBodyPatternRefusalKeepsConnection(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		resp, _, c, br := h.rawExchange(t, h.raw("POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n\"123-45-6789\""))
		if resp.StatusCode != 403 || resp.Header.Get("Cleanwall-Reason") != "body-pattern" || resp.Close {
			t.Fatalf("got %d %s close=%v", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), resp.Close)
		}
		_, _ = io.WriteString(c, h.raw("GET /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n"))
		if resp, _ := readResponseT(t, br, "GET"); resp.StatusCode != 200 {
			t.Fatalf("next request: %d", resp.StatusCode)
		}
		if reqs := h.up.requests(); len(reqs) != 1 || reqs[0].Method != "GET" {
			t.Fatalf("upstream handled %+v, want only the GET", reqs)
		}
	})
}

// TestExpectContinue: for a held body the proxy answers 100 Continue itself
// and swallows the upstream's; for a streamed one the upstream's passes.
func TestExpectContinue(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct {
			name  string
			rules *Rules
		}{
			{"held", policyRules()},
			{"streamed", &Rules{Rules: policyRules().Rules, MaxBodyBytes: 1 << 20}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := newHarness(t, tc.rules, mode)
				c, err := net.Dial("tcp", h.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.WriteString(c, h.raw("POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"))
				br := bufio.NewReader(c)
				line, err := br.ReadString('\n')
				if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
					t.Fatalf("got %q, %v; want a 100 Continue", line, err)
				}
				if blank, _ := br.ReadString('\n'); blank != "\r\n" {
					t.Fatalf("100 Continue has fields: %q", blank)
				}
				_, _ = io.WriteString(c, "{}")
				resp, _ := readResponseT(t, br, "POST")
				if resp.StatusCode != 200 {
					t.Fatalf("final response %d", resp.StatusCode)
				}
				if reqs := h.up.requests(); len(reqs) != 1 || string(reqs[0].Body) != "{}" {
					t.Fatalf("upstream got %+v", reqs)
				}
			})
		}
	})
}

func TestTimeouts(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		lim := Limits{HeaderTimeout: 200 * time.Millisecond, IdleTimeout: 200 * time.Millisecond, BodyIdleTimeout: 200 * time.Millisecond}
		t.Run("slow head gets 408", func(t *testing.T) {
			h := newHarness(t, policyRules(), withLimits(lim), mode)
			resp, _, _, _ := h.rawExchange(t, h.raw("GET /v1/results HTTP/1.1\r\nHost: {host}\r\n"))
			if resp.StatusCode != 408 {
				t.Fatalf("got %d, want 408", resp.StatusCode)
			}
			h.up.assertNothing(t)
		})
		t.Run("stalled held body gets 408", func(t *testing.T) {
			h := newHarness(t, policyRules(), withLimits(lim), mode)
			resp, _, _, _ := h.rawExchange(t, h.raw("POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"a\""))
			if resp.StatusCode != 408 {
				t.Fatalf("got %d, want 408", resp.StatusCode)
			}
			h.up.assertNothing(t)
		})
		t.Run("stalled streamed body gets 408", func(t *testing.T) {
			rules := &Rules{Rules: policyRules().Rules, MaxBodyBytes: 1 << 20} // no patterns: streamed
			h := newHarness(t, rules, withLimits(lim), mode)
			resp, _, _, _ := h.rawExchange(t, h.raw("POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"a\""))
			if resp.StatusCode != 408 {
				t.Fatalf("got %d, want 408", resp.StatusCode)
			}
			if reqs := h.up.requests(); len(reqs) != 0 {
				t.Fatalf("upstream handled %+v from an incomplete body", reqs)
			}
		})
		t.Run("idle keep-alive closes quietly", func(t *testing.T) {
			h := newHarness(t, policyRules(), withLimits(lim), mode)
			_, _, c, br := h.rawExchange(t, h.raw("GET /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n"))
			start := time.Now()
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
				t.Fatalf("idle connection: %v, want EOF", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("closed after %v", d)
			}
		})
		t.Run("silent upstream gets 504", func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					defer c.Close() // read nothing, answer nothing
				}
			}()
			dst := netip.MustParseAddrPort(ln.Addr().String())
			h := newHarness(t, policyRules(), withLimits(Limits{ResponseHeaderTimeout: 200 * time.Millisecond}), withDst(dst), mode)
			resp, _, _, _ := h.rawExchange(t, "GET /v1/results HTTP/1.1\r\nHost: "+testHost+":"+strconv.Itoa(int(dst.Port()))+"\r\n\r\n")
			if resp.StatusCode != 504 || resp.Header.Get("Cleanwall-Reason") != string(ReasonUpstreamTimeout) {
				t.Fatalf("got %d %s, want 504", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
			}
		})
	})
}

func TestUpstreamUnreachable(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dst := netip.MustParseAddrPort(ln.Addr().String())
		ln.Close() // nothing listens there now
		h := newHarness(t, policyRules(), withDst(dst), mode)
		resp, _, _, _ := h.rawExchange(t, "GET /v1/results HTTP/1.1\r\nHost: "+testHost+":"+strconv.Itoa(int(dst.Port()))+"\r\n\r\n")
		if resp.StatusCode != 502 || resp.Header.Get("Cleanwall-Reason") != string(ReasonUpstreamUnreachable) {
			t.Fatalf("got %d %s, want 502", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
		}
		if n := value(h.proxy.Metrics.requests.WithLabelValues("sb-1", "results-api", "error", string(ReasonUpstreamUnreachable))); n != 1 {
			t.Errorf("error counter %v, want 1", n)
		}
		if len(h.lastDenials()) != 0 {
			t.Errorf("an unreachable upstream is not a denial: %+v", h.lastDenials())
		}
	})
}

// rawUpstream answers the first connection's request head with canned
// bytes and closes, or after a 101 echoes what it reads, recording the head.
func rawUpstream(t *testing.T, response string) (netip.AddrPort, func() string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var got bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			got.WriteString(line)
			if err != nil || line == "\r\n" {
				break
			}
		}
		_, _ = io.WriteString(c, response)
		if strings.HasPrefix(response, "HTTP/1.1 101") {
			_, _ = io.Copy(c, br) // echo the upgraded stream
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String()), func() string { <-done; return got.String() }
}

func TestResponsesRelayedVerbatim(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct{ name, response string }{
			{"chunked with extensions and trailers", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4;ext=1\r\nabcd\r\n3 \r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n"},
			{"until close", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body runs to the end"},
			{"HTTP/1.0 response", "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"},
			{"informational responses first", "HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"},
			{"no reason phrase", "HTTP/1.1 204\r\nConnection: close\r\n\r\n"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				dst, _ := rawUpstream(t, tc.response)
				h := newHarness(t, policyRules(), withDst(dst), mode)
				c, err := net.Dial("tcp", h.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.WriteString(c, "GET /v1/results HTTP/1.1\r\nHost: "+testHost+":"+strconv.Itoa(int(dst.Port()))+"\r\n\r\n")
				got, err := io.ReadAll(c)
				if err != nil {
					t.Fatal(err)
				}
				if string(got) != tc.response {
					t.Fatalf("sandbox received\n%q\nwant\n%q", got, tc.response)
				}
			})
		}
	})
}

func TestBadUpstreamResponse(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, response := range []string{
			"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
			"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
			"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
			"SSH-2.0-OpenSSH\r\n",
		} {
			dst, _ := rawUpstream(t, response)
			h := newHarness(t, policyRules(), withDst(dst), mode)
			resp, _, _, _ := h.rawExchange(t, "GET /v1/results HTTP/1.1\r\nHost: "+testHost+":"+strconv.Itoa(int(dst.Port()))+"\r\n\r\n")
			if resp.StatusCode != 502 || resp.Header.Get("Cleanwall-Reason") != string(ReasonBadUpstreamResponse) {
				t.Errorf("upstream response %q: got %d %s, want 502", response, resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
			}
		}
	})
}

func TestAllowedUpgradeIsTunnelled(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		dst, got := rawUpstream(t, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		rules := &Rules{Rules: []RequestRule{{Methods: []string{"GET"}, Paths: []string{"/ws"}}}, AllowUpgrade: []string{"WebSocket"}}
		h := newHarness(t, rules, withDst(dst), mode)
		head := "GET /ws HTTP/1.1\r\nHost: " + testHost + ":" + strconv.Itoa(int(dst.Port())) + "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
		resp, _, c, br := h.rawExchange(t, head+"early frame|")
		if resp.StatusCode != 101 {
			t.Fatalf("got %d, want 101", resp.StatusCode)
		}
		_, _ = io.WriteString(c, "late frame")
		c.(*net.TCPConn).CloseWrite()
		echo, err := io.ReadAll(br)
		if err != nil || string(echo) != "early frame|late frame" {
			t.Fatalf("echo %q, %v", echo, err)
		}
		if g := got(); g != head {
			t.Fatalf("upstream got head %q", g)
		}
	})
}

func TestServeConnStopsOnCancel(t *testing.T) {
	p := &Proxy{}
	a, b := net.Pipe()
	defer b.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- p.ServeConn(ctx, a, Flow{Dst: netip.MustParseAddrPort("127.0.0.1:9"), Hosts: []string{testHost}}, policyRules())
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("ServeConn returned %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return after cancel")
	}
}

func TestServeConnRefusesInvalidRules(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	err := (&Proxy{}).ServeConn(context.Background(), a, Flow{Dst: netip.MustParseAddrPort("127.0.0.1:9")}, &Rules{Rules: []RequestRule{{Paths: []string{"/a/**/b"}}}})
	if !errors.Is(err, ErrInvalidRules) || !strings.Contains(err.Error(), "rules[0].paths[0]") {
		t.Fatalf("got %v", err)
	}
	if _, err := b.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("client not closed: %v", err)
	}
}

// value reads a counter's current value.
func value(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestEarlyResponseIsRelayedAtOnce: an upstream that answers before it has
// read a streamed body gets its response to the sandbox immediately; the
// connection then ends, since the rest of the body cannot be told apart
// from a next request.
func TestEarlyResponseIsRelayedAtOnce(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			for line := ""; line != "\r\n"; {
				if line, err = br.ReadString('\n'); err != nil {
					return
				}
			}
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
			_, _ = io.Copy(io.Discard, br)
		}()
		dst := netip.MustParseAddrPort(ln.Addr().String())
		rules := &Rules{Rules: []RequestRule{{}}, MaxBodyBytes: NoBodyLimit}
		h := newHarness(t, rules, withDst(dst), mode)
		head := "PUT /up HTTP/1.1\r\nHost: " + testHost + ":" + strconv.Itoa(int(dst.Port())) + "\r\nContent-Length: 1000000\r\n\r\n"
		resp, body, c, br := h.rawExchange(t, head+"first bytes")
		if resp.StatusCode != 200 || string(body) != "early" {
			t.Fatalf("got %d %q before sending the body", resp.StatusCode, body)
		}
		if !closedByPeer(c, br) {
			t.Fatal("connection still open with most of the body unsent")
		}
	})
}

// TestDenialRecord checks what the audit trail receives: the method and the
// path without its query, truncated, even when the head failed after the
// request line.
func TestDenialRecord(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct {
			raw  string
			want Denial
		}{
			{"GET /v1/admin?token=secret HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonPath, Status: 403, Method: "GET", Path: "/v1/admin"}},
			{"POST /v1/results?x=1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", Denial{Reason: ReasonCLAndTE, Status: 400, Method: "POST", Path: "/v1/results"}},
			{"GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX: a\nY: b\r\n\r\n", Denial{Reason: ReasonBareLF, Status: 400, Method: "GET", Path: "/v1/results"}},
			{"GET /" + strings.Repeat("a", 300) + " HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonPath, Status: 403, Method: "GET", Path: "/" + strings.Repeat("a", maxDenialPath-1)}},
			{"GET /v1/results HTTP/9.9\r\n\r\n", Denial{Reason: ReasonHTTPVersion, Status: 505, Method: "GET"}},
		} {
			h := newHarness(t, policyRules(), mode)
			h.rawExchange(t, h.raw(tc.raw))
			if d := h.lastDenials(); len(d) != 1 || d[0] != tc.want {
				t.Errorf("%q: OnDeny got %+v, want %+v", truncate(tc.raw, 40), d, tc.want)
			}
		}
	})
}

// TestMetricsLabels checks the exported series and that their labels are
// the bounded set: never a path or a host.
func TestMetricsLabels(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, policyRules(), mode)
		h.rawExchange(t, h.raw("GET /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n"))
		h.rawExchange(t, h.raw("GET /v1/admin HTTP/1.1\r\nHost: {host}\r\n\r\n"))
		want := map[string][]string{
			"cleanwall_http_requests_total":           {"decision", "reason", "rule", "sandbox"},
			"cleanwall_http_request_bytes_out_total":  {"rule", "sandbox"},
			"cleanwall_http_request_duration_seconds": {"decision", "rule", "sandbox"},
		}
		eventually(t, "three metric families", func() bool {
			mfs, _ := h.reg.Gather()
			return len(mfs) == 3
		})
		mfs, err := h.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			labels, ok := want[mf.GetName()]
			if !ok {
				t.Errorf("unexpected series %s", mf.GetName())
				continue
			}
			for _, m := range mf.GetMetric() {
				var got []string
				for _, lp := range m.GetLabel() {
					got = append(got, lp.GetName())
					if strings.Contains(lp.GetValue(), "/") || strings.Contains(lp.GetValue(), testHost) {
						t.Errorf("%s: label %s=%q carries a path or host", mf.GetName(), lp.GetName(), lp.GetValue())
					}
				}
				if strings.Join(got, ",") != strings.Join(labels, ",") {
					t.Errorf("%s: labels %v, want %v", mf.GetName(), got, labels)
				}
			}
		}
		h.proxy.Metrics.DeleteSandbox("sb-1")
		if mfs, _ := h.reg.Gather(); len(mfs) != 0 {
			t.Errorf("series left after DeleteSandbox: %d families", len(mfs))
		}
	})
}
