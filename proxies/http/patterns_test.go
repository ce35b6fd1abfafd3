package httpproxy

import (
	"bufio"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf16"
)

// patternRules is policyRules with whole-request patterns instead of body
// patterns: the SSN of docs/policy.md, a phrase with a space, a non-ASCII word,
// a character outside the BMP, and a phone number with a "+".
func patternRules() *Rules {
	r := policyRules()
	r.Rules[0].ContentTypes = append(r.Rules[0].ContentTypes, "application/x-www-form-urlencoded", "text/plain", "application/xml", "application/octet-stream")
	r.DenyBodyPatterns = nil
	r.DenyPatterns = []*regexp.Regexp{ssn, regexp.MustCompile(`top secret`), regexp.MustCompile(`Grüße`), regexp.MustCompile(`🔑`), regexp.MustCompile(`\+1-555-\d{4}`)}
	return r
}

// Body encoders for the tests.

func gzipped(s string) string {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	_, _ = io.WriteString(w, s)
	_ = w.Close()
	return b.String()
}

func zlibbed(s string) string {
	var b bytes.Buffer
	w := zlib.NewWriter(&b)
	_, _ = io.WriteString(w, s)
	_ = w.Close()
	return b.String()
}

func rawDeflated(s string) string {
	var b bytes.Buffer
	w, _ := flate.NewWriter(&b, flate.DefaultCompression)
	_, _ = io.WriteString(w, s)
	_ = w.Close()
	return b.String()
}

// utf16Of encodes s in UTF-16, with a byte order mark when bom.
func utf16Of(s string, bigEndian, bom bool) string {
	units := utf16.Encode([]rune(s))
	if bom {
		units = append([]uint16{0xFEFF}, units...)
	}
	var b []byte
	for _, u := range units {
		if bigEndian {
			b = append(b, byte(u>>8), byte(u))
		} else {
			b = append(b, byte(u), byte(u>>8))
		}
	}
	return string(b)
}

func utf32LE(s string) string {
	var b []byte
	for _, r := range s {
		b = append(b, byte(r), byte(r>>8), byte(r>>16), byte(r>>24))
	}
	return string(b)
}

// latin1Of encodes s (runes below 256 only) in ISO-8859-1.
func latin1Of(s string) string {
	var b []byte
	for _, r := range s {
		b = append(b, byte(r))
	}
	return string(b)
}

// post is a POST to an allowed path with the given extra fields and body.
func post(fields, body string) string {
	return "POST /v1/results HTTP/1.1\r\nHost: {host}\r\n" + fields + "Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

// postChunked sends body in chunks of at most 7 bytes.
func postChunked(fields, body string) string {
	var b strings.Builder
	b.WriteString("POST /v1/results HTTP/1.1\r\nHost: {host}\r\n" + fields + "Transfer-Encoding: chunked\r\n\r\n")
	for len(body) > 0 {
		n := min(7, len(body))
		b.WriteString(strconv.FormatInt(int64(n), 16) + "\r\n" + body[:n] + "\r\n")
		body = body[n:]
	}
	b.WriteString("0\r\n\r\n")
	return b.String()
}

const (
	jsonCT    = "Content-Type: application/json\r\n"
	secretDoc = `{"patient":"a","ssn":"123-45-6789"}`
	cleanDoc  = `{"patient":"a","score":42,"note":"123-45-678 is not one"}`
)

// TestDenyPatternsRefuse: the data of a deny pattern is refused wherever
// the request carries it, in every encoding HTTP declares, and the
// upstream sees nothing of the request.
func TestDenyPatternsRefuse(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		pr := patternRules()
		repeated := &Rules{Rules: []RequestRule{{}}, DenyPatterns: []*regexp.Regexp{regexp.MustCompile(`a1, b2`), regexp.MustCompile(`c3; d4`)}}
		bodyOnly := policyRules() // denyBodyPatterns only: the body is decoded for them too
		small := []harnessOption{withLimits(Limits{MaxHeldBodyBytes: 1 << 20})}
		bomb := gzipped(strings.Repeat("\x00", 2<<20)) // 2 MiB of zeros in about 2 KiB
		get := func(target, fields string) string {
			return "GET " + target + " HTTP/1.1\r\nHost: {host}\r\n" + fields + "\r\n"
		}
		cases := []refusalCase{
			// The head.
			{name: "query", raw: get("/v1/results?ssn=123-45-6789", ""), reason: ReasonQueryPattern},
			{name: "query percent-encoded", raw: get("/v1/results?ssn=%31%32%33%2D45-6789", ""), reason: ReasonQueryPattern},
			{name: "query plus as a space", raw: get("/v1/results?q=top+secret", ""), reason: ReasonQueryPattern},
			{name: "query escaped plus as itself", raw: get("/v1/results?tel=%2B1-555-0199", ""), reason: ReasonQueryPattern},
			{name: "query key", raw: get("/v1/results?123-45-6789=1", ""), reason: ReasonQueryPattern},
			{name: "query in absolute-form", raw: get("http://{host}/v1/results?ssn=123-45-6789", ""), reason: ReasonQueryPattern},
			{name: "path segment under /*", raw: get("/v1/results/123-45-6789", ""), reason: ReasonPathPattern},
			{name: "path percent-encoded", raw: get("/v1/results/%31%32%33-%34%35-6789", ""), reason: ReasonPathPattern},
			{name: "path parameter", raw: get("/v1/results/x;ssn=123-45-6789", ""), reason: ReasonPathPattern},
			{name: "header value", raw: get("/v1/results", "X-Note: 123-45-6789\r\n"), reason: ReasonHeaderPattern},
			{name: "header value percent-encoded", raw: get("/v1/results", "X-Note: %31%32%33-45-6789\r\n"), reason: ReasonHeaderPattern},
			{name: "header value with obs-text around it", raw: get("/v1/results", "X-Note: \xe9123-45-6789\xe9\r\n"), reason: ReasonHeaderPattern},
			{name: "header name", raw: get("/v1/results", "X-123-45-6789: 1\r\n"), reason: ReasonHeaderPattern},
			{name: "cookie", raw: get("/v1/results", "Cookie: sid=abc; ssn=123-45-6789\r\n"), reason: ReasonHeaderPattern},
			{name: "cookie percent-encoded with plus", raw: get("/v1/results", "Cookie: note=top+%73ecret\r\n"), reason: ReasonHeaderPattern},
			{name: "User-Agent", raw: get("/v1/results", "User-Agent: curl/8 (123-45-6789)\r\n"), reason: ReasonHeaderPattern},
			{name: "repeated field, combined", rules: repeated, raw: get("/x", "X-Id: a1\r\nX-Other: 0\r\nx-id: b2\r\n"), reason: ReasonHeaderPattern},
			{name: "repeated Cookie, combined", rules: repeated, raw: get("/x", "Cookie: c3\r\nCookie: d4\r\n"), reason: ReasonHeaderPattern},
			{name: "head of a request with a body", raw: post(jsonCT+"X-Note: 123-45-6789\r\n", cleanDoc), reason: ReasonHeaderPattern},

			// The body, decoded.
			{name: "body", raw: post(jsonCT, secretDoc), reason: ReasonBodyPattern},
			{name: "body chunked", raw: postChunked(jsonCT, secretDoc), reason: ReasonBodyPattern},
			{name: "gzip", raw: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(secretDoc)), reason: ReasonBodyPattern},
			{name: "x-gzip", raw: post(jsonCT+"Content-Encoding: X-GZIP\r\n", gzipped(secretDoc)), reason: ReasonBodyPattern},
			{name: "gzip chunked", raw: postChunked(jsonCT+"Content-Encoding: gzip\r\n", gzipped(secretDoc)), reason: ReasonBodyPattern},
			{name: "gzip, two members", raw: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(`{"a":"123-4`)+gzipped(`5-6789"}`)), reason: ReasonBodyPattern},
			{name: "deflate", raw: post(jsonCT+"Content-Encoding: deflate\r\n", zlibbed(secretDoc)), reason: ReasonBodyPattern},
			{name: "deflate then gzip, and identity", raw: post(jsonCT+"Content-Encoding: deflate, identity, gzip\r\n", gzipped(zlibbed(secretDoc))), reason: ReasonBodyPattern},
			{name: "UTF-16LE with BOM", raw: post(jsonCT, utf16Of(secretDoc, false, true)), reason: ReasonBodyPattern},
			{name: "UTF-16BE with BOM", raw: post(jsonCT, utf16Of(secretDoc, true, true)), reason: ReasonBodyPattern},
			{name: "UTF-16LE by charset", raw: post("Content-Type: application/json; charset=utf-16le\r\n", utf16Of(secretDoc, false, false)), reason: ReasonBodyPattern},
			{name: "UTF-16BE by charset", raw: post("Content-Type: application/json; charset=\"UTF-16BE\"\r\n", utf16Of(secretDoc, true, false)), reason: ReasonBodyPattern},
			{name: "UTF-16 by charset, no BOM", raw: post("Content-Type: text/plain; charset=utf-16\r\n", utf16Of("Grüße", true, false)), reason: ReasonBodyPattern},
			{name: "UTF-16 undeclared without BOM", raw: post(jsonCT, utf16Of(secretDoc, false, false)), reason: ReasonBodyPattern},
			{name: "UTF-16 undeclared, non-ASCII", raw: post(jsonCT, utf16Of("Grüße", false, false)), reason: ReasonBodyPattern},
			{name: "UTF-16 outside the BMP", raw: post(jsonCT, utf16Of("key: 🔑", false, true)), reason: ReasonBodyPattern},
			{name: "UTF-16BE labelled, LE BOM", raw: post("Content-Type: text/plain; charset=utf-16be\r\n", "\xff\xfe"+utf16Of("Grüße", true, false)), reason: ReasonBodyPattern},
			{name: "UTF-16LE labelled, BE data", raw: post("Content-Type: text/plain; charset=utf-16le\r\n", utf16Of("Grüße", true, true)), reason: ReasonBodyPattern},
			{name: "UTF-16 declared UTF-8", raw: post("Content-Type: application/json; charset=utf-8\r\n", utf16Of(secretDoc, true, false)), reason: ReasonBodyPattern},
			{name: "UTF-16 shifted by a byte", raw: post(jsonCT, "x"+utf16Of(secretDoc, false, false)), reason: ReasonBodyPattern},
			{name: "NULs inside the data", raw: post("Content-Type: application/octet-stream\r\n", "\x01123-45\x00-6789\x02"), reason: ReasonBodyPattern},
			{name: "UTF-32 undeclared", raw: post(jsonCT, utf32LE(secretDoc)), reason: ReasonBodyPattern},
			{name: "UTF-16 in gzip", raw: post("Content-Type: application/json; charset=utf-16\r\nContent-Encoding: gzip\r\n", gzipped(utf16Of(secretDoc, false, true))), reason: ReasonBodyPattern},
			{name: "Latin-1 by charset", raw: post("Content-Type: text/plain; charset=ISO-8859-1\r\n", latin1Of("Viele Grüße")), reason: ReasonBodyPattern},
			{name: "US-ASCII read as Latin-1", raw: post("Content-Type: text/plain; charset=us-ascii\r\n", latin1Of("Grüße")), reason: ReasonBodyPattern},
			{name: "form body percent-encoded", raw: post("Content-Type: application/x-www-form-urlencoded\r\n", "a=1&ssn=%31%32%33-45-6789"), reason: ReasonBodyPattern},
			{name: "form body plus as a space", raw: post("Content-Type: application/x-www-form-urlencoded\r\n", "note=top+secret"), reason: ReasonBodyPattern},
			{name: "JSON unicode escapes", raw: post(jsonCT, `{"ssn":"\u0031\u0032\u0033-45-6789"}`), reason: ReasonBodyPattern},
			{name: "JSON surrogate pair", raw: post(jsonCT, `{"k":"\ud83d\udd11"}`), reason: ReasonBodyPattern},
			{name: "JSON escaped space", raw: post(jsonCT, `{"q":"top\u0020secret"}`), reason: ReasonBodyPattern},
			{name: "XML character references", raw: post("Content-Type: application/xml\r\n", "<s>&#49;&#x32;3-45-6789</s>"), reason: ReasonBodyPattern},
			{name: "XML reference to a space", raw: post("Content-Type: application/xml\r\n", "<s>top&#32;secret</s>"), reason: ReasonBodyPattern},
			{name: "denyBodyPatterns on a gzip body", rules: bodyOnly, raw: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(secretDoc)), reason: ReasonBodyPattern},
			{name: "denyBodyPatterns on a UTF-16 body", rules: bodyOnly, raw: post(jsonCT, utf16Of(secretDoc, false, true)), reason: ReasonBodyPattern},

			// Bodies the proxy cannot decode, refused while patterns apply.
			{name: "br", raw: post(jsonCT+"Content-Encoding: br\r\n", "\x1b\x00"), reason: ReasonContentEncoding},
			{name: "zstd", raw: post(jsonCT+"Content-Encoding: zstd\r\n", "\x28\xb5\x2f\xfd"), reason: ReasonContentEncoding},
			{name: "compress", raw: post(jsonCT+"Content-Encoding: compress\r\n", "x"), reason: ReasonContentEncoding},
			{name: "gzip then an unknown coding", raw: post(jsonCT+"Content-Encoding: gzip, br\r\n", "x"), reason: ReasonContentEncoding},
			{name: "unknown coding, chunked", raw: postChunked(jsonCT+"Content-Encoding: x-custom\r\n", "x"), reason: ReasonContentEncoding},
			{name: "unknown coding, denyBodyPatterns", rules: bodyOnly, raw: post(jsonCT+"Content-Encoding: zstd\r\n", "x"), reason: ReasonContentEncoding},
			{name: "four codings", raw: post(jsonCT+"Content-Encoding: gzip, gzip, gzip, gzip\r\n", gzipped(gzipped(gzipped(gzipped(cleanDoc))))), reason: ReasonContentEncoding},
			{name: "charset Shift_JIS", raw: post("Content-Type: text/plain; charset=Shift_JIS\r\n", "x"), reason: ReasonCharset},
			{name: "charset UTF-32", raw: post("Content-Type: application/json; charset=utf-32\r\n", utf32LE(cleanDoc)), reason: ReasonCharset},
			{name: "charset UTF-7", raw: post("Content-Type: text/plain; charset=utf-7\r\n", "+ADEAMgAz--45-6789"), reason: ReasonCharset},
			{name: "charset twice", raw: post("Content-Type: text/plain; charset=utf-8; charset=utf-16\r\n", "x"), reason: ReasonCharset},
			{name: "charset empty", raw: post("Content-Type: text/plain; charset=\r\n", "x"), reason: ReasonCharset},
			{name: "charset in RFC 2231 form", raw: post("Content-Type: text/plain; charset*=utf-8''ebcdic\r\n", "x"), reason: ReasonCharset},
			{name: "charset, denyBodyPatterns", rules: bodyOnly, raw: post("Content-Type: application/json; charset=ebcdic\r\n", "x"), reason: ReasonCharset},
			{name: "gzip that is not gzip", raw: post(jsonCT+"Content-Encoding: gzip\r\n", "{}"), reason: ReasonUndecodableBody},
			{name: "gzip cut short", raw: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(cleanDoc)[:20]), reason: ReasonUndecodableBody},
			{name: "gzip with bytes after it", raw: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(cleanDoc)+"123-45-6789"), reason: ReasonUndecodableBody},
			{name: "deflate with bytes after it", raw: post(jsonCT+"Content-Encoding: deflate\r\n", zlibbed(cleanDoc)+"123-45-6789"), reason: ReasonUndecodableBody},
			{name: "raw deflate labelled deflate", raw: post(jsonCT+"Content-Encoding: deflate\r\n", rawDeflated(cleanDoc)), reason: ReasonUndecodableBody},
			{name: "zip bomb", raw: post(jsonCT+"Content-Encoding: gzip\r\n", bomb), opts: small, reason: ReasonDecodedHoldLimit},
			{name: "zip bomb, chunked", raw: postChunked(jsonCT+"Content-Encoding: gzip\r\n", bomb), opts: small, reason: ReasonDecodedHoldLimit},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				if tc.rules == nil {
					tc.rules = pr
				}
				tc.status = tc.reason.Status()
				expectRefused(t, tc, mode)
			})
		}
	})
}

// TestDenyPatternsAllow: requests that carry none of the patterns' data
// are forwarded byte for byte, whatever was decoded to match them; and a
// body the proxy cannot decode passes when no pattern applies.
func TestDenyPatternsAllow(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		pr := patternRules()
		noPatterns := patternRules()
		noPatterns.DenyPatterns = nil
		cases := []struct {
			name   string
			rules  *Rules
			req    string
			wantIn string // "" means req itself
		}{
			{name: "GET with escapes", rules: pr, req: "GET /v1/results/a%20b?q=top%2Bsecret&page=2&x=123-45-678 HTTP/1.1\r\nHost: {host}\r\nCookie: a=1; b=%41\r\nX-Note: top  secret\r\n\r\n"},
			{name: "JSON", rules: pr, req: post(jsonCT, cleanDoc)},
			{name: "JSON with escapes", rules: pr, req: post(jsonCT, `{"a":"\u0031\u0032\u0033-45","b":"x\/y","c":"\ud83d"}`)},
			{name: "gzip", rules: pr, req: post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(cleanDoc))},
			{name: "deflate", rules: pr, req: post(jsonCT+"Content-Encoding: deflate\r\n", zlibbed(cleanDoc))},
			{name: "gzip chunked", rules: pr, req: postChunked(jsonCT+"Content-Encoding: gzip\r\n", gzipped(cleanDoc)),
				wantIn: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\n" + jsonCT + "Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" +
					strconv.FormatInt(int64(len(gzipped(cleanDoc))), 16) + "\r\n" + gzipped(cleanDoc) + "\r\n0\r\n\r\n"},
			{name: "empty gzip body, chunked", rules: pr, req: postChunked(jsonCT+"Content-Encoding: gzip\r\n", "")},
			{name: "UTF-16LE with BOM", rules: pr, req: post("Content-Type: application/json; charset=utf-16\r\n", utf16Of(cleanDoc, false, true))},
			{name: "UTF-16BE undeclared", rules: pr, req: post(jsonCT, utf16Of(cleanDoc, true, false))},
			{name: "Latin-1", rules: pr, req: post("Content-Type: text/plain; charset=latin1\r\n", latin1Of("Grüezi, ça va"))},
			{name: "form", rules: pr, req: post("Content-Type: application/x-www-form-urlencoded\r\n", "a=1&b=top%20drawer+secretary")},
			{name: "binary with NULs", rules: pr, req: post("Content-Type: application/octet-stream\r\n", "\x00\x01\x02abc\x00def-\xff\xfe")},
			{name: "unknown coding without patterns", rules: noPatterns, req: post(jsonCT+"Content-Encoding: br\r\n", "\x1b\x00secret")},
			{name: "unknown charset without patterns", rules: noPatterns, req: post("Content-Type: text/plain; charset=Shift_JIS\r\n", "x")},
			{name: "path data without patterns", rules: noPatterns, req: "GET /v1/results/123-45-6789 HTTP/1.1\r\nHost: {host}\r\n\r\n"},
			{name: "head data with only denyBodyPatterns", rules: policyRules(), req: "GET /v1/results/123-45-6789?ssn=123-45-6789 HTTP/1.1\r\nHost: {host}\r\nX-Note: 123-45-6789\r\n\r\n"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				h := newHarness(t, tc.rules, mode)
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
				resp, body := readResponseT(t, bufio.NewReader(c), "POST")
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("got %d %s (%s), want 200", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), body)
				}
				want := req
				if tc.wantIn != "" {
					want = h.raw(tc.wantIn)
				}
				if in := h.up.rawIn(); in != want {
					t.Fatalf("upstream received\n%q\nwant\n%q", in, want)
				}
				eventually(t, "the hold budget back to zero", func() bool { return h.proxy.held.Load() == 0 })
			})
		}
	})
}

// TestDenialWithholdsPatternData: the audit record and the log of a
// refused request keep nothing a deny pattern matches, whatever the
// refusal: the pattern's own, or a rule's that came first.
func TestDenialWithholdsPatternData(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range []struct {
			raw  string
			want Denial
		}{
			{"GET /v1/results/123-45-6789 HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonPathPattern, Status: 403, Method: "GET"}},
			{"GET /v1/admin/%31%32%33-45-6789 HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonPath, Status: 403, Method: "GET"}},
			{"123-45-6789 /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonMethod, Status: 403, Path: "/v1/results"}},
			{"GET /v1/results?ssn=123-45-6789 HTTP/1.1\r\nHost: {host}\r\n\r\n", Denial{Reason: ReasonQueryPattern, Status: 403, Method: "GET", Path: "/v1/results"}},
			{"GET /v1/results HTTP/1.1\r\nHost: {host}\r\nExpect: 123-45-6789\r\n\r\n", Denial{Reason: ReasonExpect, Status: 417, Method: "GET", Path: "/v1/results"}},
		} {
			logs := &lockedBuffer{}
			h := newHarness(t, patternRules(), func(h *harness) { h.proxy.Logger = slog.New(slog.NewTextHandler(logs, nil)) }, mode)
			h.rawExchange(t, h.raw(tc.raw))
			if d := h.lastDenials(); len(d) != 1 || d[0] != tc.want {
				t.Errorf("%q: OnDeny got %+v, want %+v", tc.raw, d, tc.want)
			}
			if strings.Contains(logs.String(), "123-45-6789") || strings.Contains(logs.String(), "%31%32%33") {
				t.Errorf("%q: the log keeps the data:\n%s", tc.raw, logs.String())
			}
			h.up.assertNothing(t)
		}
	})
}

// lockedBuffer collects the proxy's log from its connection goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestDecodedBodyRefusalKeepsConnection: a body refused after it was read
// and decoded leaves the connection usable; the budget taken by the
// decoding is returned.
func TestDecodedBodyRefusalKeepsConnection(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, patternRules(), mode)
		resp, _, c, br := h.rawExchange(t, h.raw(post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(utf16Of(secretDoc, false, true)))))
		if resp.StatusCode != 403 || resp.Header.Get("Cleanwall-Reason") != string(ReasonBodyPattern) || resp.Close {
			t.Fatalf("got %d %s close=%v", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), resp.Close)
		}
		_, _ = io.WriteString(c, h.raw(post(jsonCT+"Content-Encoding: gzip\r\n", gzipped(cleanDoc))))
		if resp, _ := readResponseT(t, br, "POST"); resp.StatusCode != 200 {
			t.Fatalf("next request: %d", resp.StatusCode)
		}
		if reqs := h.up.requests(); len(reqs) != 1 || string(reqs[0].Body) != gzipped(cleanDoc) {
			t.Fatalf("upstream handled %+v, want only the clean body", reqs)
		}
		eventually(t, "the hold budget back to zero", func() bool { return h.proxy.held.Load() == 0 })
	})
}

// TestDecodingCountsAgainstTheHoldBudget: decompressed bodies count against
// Limits.MaxHeldTotalBytes, so concurrent zip bombs cannot take more memory
// than the operator allowed.
func TestDecodingCountsAgainstTheHoldBudget(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		h := newHarness(t, patternRules(), withLimits(Limits{MaxHeldBodyBytes: 1 << 20, MaxHeldTotalBytes: 256 << 10}), mode)
		body := gzipped(strings.Repeat("a", 512<<10)) // small on the wire, 512 KiB decoded
		resp, _, _, _ := h.rawExchange(t, h.raw(post(jsonCT+"Content-Encoding: gzip\r\n", body)))
		if resp.StatusCode != 503 || resp.Header.Get("Cleanwall-Reason") != string(ReasonProxyBusy) {
			t.Fatalf("got %d %s, want 503 proxy-busy", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
		}
		h.up.assertNothing(t)
		eventually(t, "the hold budget back to zero", func() bool { return h.proxy.held.Load() == 0 })
	})
}

func TestReadBodyCoding(t *testing.T) {
	for _, tc := range []struct {
		ce, ct  string
		codings []coding
		cs      charset
		reason  Reason
	}{
		{"", "", nil, charsetNone, ""},
		{"identity", "application/json", nil, charsetNone, ""},
		{"GZip", "text/plain; charset=UTF-8", []coding{codingGzip}, charsetNone, ""},
		{"deflate,  gzip", "text/plain;charset=latin1", []coding{codingDeflate, codingGzip}, charsetLatin1, ""},
		{"", "text/plain; charset=\"utf-16be\"", nil, charsetUTF16BE, ""},
		{"", "text/plain; charset=UTF-16", nil, charsetUTF16, ""},
		{"", "text/plain; format=flowed", nil, charsetNone, ""},
		{"", "application/json;", nil, charsetNone, ""},
		{"", "application/json; foo", nil, charsetNone, ""}, // unreadable, but names no charset
		{"", "application/json; charset", nil, charsetNone, ReasonCharset},
		{"", "text/plain; charset=windows-1252", nil, charsetNone, ReasonCharset},
		{"br", "", nil, charsetNone, ReasonContentEncoding},
		{"gzip, gzip, gzip, gzip", "", nil, charsetNone, ReasonContentEncoding},
		{"\"gzip\"", "", nil, charsetNone, ReasonContentEncoding},
	} {
		bc, rf := readBodyCoding(&request{contentEncoding: tc.ce, contentType: tc.ct})
		var got Reason
		if rf != nil {
			got = rf.reason
		}
		if got != tc.reason {
			t.Errorf("%q %q: reason %q, want %q", tc.ce, tc.ct, got, tc.reason)
			continue
		}
		if got == "" && (bc.charset != tc.cs || !bytes.Equal(codingBytes(bc.codings[:bc.n]), codingBytes(tc.codings))) {
			t.Errorf("%q %q: %+v, want codings %v charset %v", tc.ce, tc.ct, bc, tc.codings, tc.cs)
		}
	}
}

func codingBytes(cs []coding) []byte {
	b := []byte{}
	for _, c := range cs {
		b = append(b, byte(c))
	}
	return b
}

func TestDecoders(t *testing.T) {
	for _, tc := range []struct {
		name     string
		decode   func(dst, src []byte) []byte
		in, want string
	}{
		{"percent", func(d, s []byte) []byte { return percentDecode(d, s, false) }, "a%20b+c%zz%4", "a b+c%zz%4"},
		{"percent, plus as space", func(d, s []byte) []byte { return percentDecode(d, s, true) }, "a%2Bb+c", "a+b c"},
		{"json", jsonUnescape, `\u0031\"\\\/\n\t\x\u12`, "1\"\\/\n\t\\x\\u12"},
		{"json surrogates", jsonUnescape, `\ud83d\udd11 \ud83d! \udd11`, "🔑 \uFFFD! \uFFFD"},
		{"json escape at the end", jsonUnescape, `a\`, `a\`},
		{"char refs", decodeCharRefs, "&#49;&#x32;&#X33;&amp;&lt;&nbsp;&#;&#xZ;&#0;&#1114112;&", "123&<&nbsp;&#;&#xZ;\uFFFD\uFFFD&"},
		{"utf-16le", func(d, s []byte) []byte { return utf16ToUTF8(d, s, false) }, utf16Of("aé🔑", false, true), "aé🔑"},
		{"utf-16be", func(d, s []byte) []byte { return utf16ToUTF8(d, s, true) }, utf16Of("aé🔑", true, false), "aé🔑"},
		{"utf-16 lone surrogate and odd byte", func(d, s []byte) []byte { return utf16ToUTF8(d, s, false) }, "\x3d\xd8a\x00b", "\uFFFDa\uFFFD"},
		{"latin-1", latin1ToUTF8, "\xe9t\xe9 \xff", "été ÿ"},
		{"NULs", stripNUL, "1\x00\x002\x003", "123"},
	} {
		if got := string(tc.decode(nil, []byte(tc.in))); got != tc.want {
			t.Errorf("%s(%q) = %q, want %q", tc.name, tc.in, got, tc.want)
		}
	}
}
