package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// fuzzMaxBody keeps fuzzed bodies small.
const fuzzMaxBody = 1 << 16

// parseAll reads one request (head and body) the way ServeConn does.
func parseAll(data []byte) (*request, []byte, error) {
	lim := Limits{}.withDefaults()
	rr := requestReader{
		r:   bufio.NewReaderSize(bytes.NewReader(data), max(minClientReader, lim.MaxLineBytes+2)),
		lim: headLimits{maxLine: lim.MaxLineBytes, maxHead: lim.MaxHeaderBytes, maxFields: lim.MaxHeaderCount},
	}
	q := &request{}
	if err := rr.read(q); err != nil {
		return nil, nil, err
	}
	switch {
	case q.chunked:
		body, err := readChunked(rr.r, nil, func(total int64) error {
			if total > fuzzMaxBody {
				return refuse(ReasonBodyTooLarge, "fuzz limit")
			}
			return nil
		})
		return q, body, err
	case q.contentLength > fuzzMaxBody:
		return nil, nil, errors.New("fuzz limit")
	case q.contentLength > 0:
		body := make([]byte, q.contentLength)
		_, err := io.ReadFull(rr.r, body)
		return q, body, err
	}
	return q, nil, nil
}

// serialize writes a parsed request back in canonical form: single spaces,
// "Name: value" fields, and a held chunked body as the proxy forwards it.
func serialize(q *request, body []byte) []byte {
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	_, _ = w.WriteString(q.method + " " + q.target + " HTTP/1." + string(rune('0'+q.minor)) + "\r\n")
	for _, f := range q.fields {
		_, _ = w.WriteString(f.name + ": " + f.value + "\r\n")
	}
	_, _ = w.WriteString("\r\n")
	if q.chunked {
		writeChunked(w, body)
	} else {
		_, _ = w.Write(body)
	}
	_ = w.Flush()
	return b.Bytes()
}

// fuzzRules are policyRules with whole-request patterns as well, so that
// the verdict covers what the head patterns see.
var fuzzRules = func() *Rules {
	r := policyRules()
	r.DenyPatterns = patternRules().DenyPatterns
	return r
}()

// verdict is the decision ServeConn's checks reach for q on a fixed flow.
func verdict(q *request) Reason {
	hosts, _ := newHostMatcher(Flow{Dst: netip.MustParseAddrPort("127.0.0.1:8080"), Hosts: []string{testHost, "127.0.0.1"}})
	c := &conn{rules: fuzzRules, lim: Limits{}.withDefaults(), hosts: hosts}
	if rf := c.check(q); rf != nil {
		return rf.reason
	}
	return ""
}

// comparable drops what legitimately differs after re-serialisation: the
// verbatim text.
func comparable(q *request) request {
	c := *q
	c.text = ""
	return c
}

// FuzzReadRequest: the parser never panics, and a request it accepts
// re-serialises to one it accepts identically (same fields, framing,
// target, body and verdict, deny patterns on the head included). The seeds
// in testdata/fuzz/FuzzReadRequest are the smuggling corpus and allowed
// requests; the refusals of the deny patterns are added here.
func FuzzReadRequest(f *testing.F) {
	host := strings.NewReplacer("{host}", testHost+":8080", "{port}", "8080")
	for _, tc := range smugglingCorpus {
		f.Add([]byte(host.Replace(tc.raw)))
	}
	for _, raw := range []string{
		"GET /v1/results/%31%32%33-45-6789?q=top+secret HTTP/1.1\r\nHost: {host}\r\nCookie: a=1; b=2\r\nCookie: c=%41\r\n\r\n",
		"GET /v1/results?tel=%2B1-555-0199 HTTP/1.1\r\nHost: {host}\r\nX-123-45-6789: 1\r\n\r\n",
	} {
		f.Add([]byte(host.Replace(raw)))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		q1, body1, err := parseAll(data)
		if err != nil {
			return
		}
		ser := serialize(q1, body1)
		q2, body2, err := parseAll(ser)
		if err != nil {
			t.Fatalf("accepted %q\nbut not its re-serialisation %q: %v", data, ser, err)
		}
		if a, b := comparable(q1), comparable(q2); !reflect.DeepEqual(a, b) {
			t.Fatalf("re-serialisation parses differently:\n%+v\n%+v", a, b)
		}
		if !bytes.Equal(body1, body2) {
			t.Fatalf("body %q became %q", body1, body2)
		}
		if v1, v2 := verdict(q1), verdict(q2); v1 != v2 {
			t.Fatalf("verdict %q became %q for %q", v1, v2, ser)
		}
	})
}

// FuzzBodyDecoding: whatever text a sandbox sends, in any encoding the
// proxy decodes (gzip, deflate, stacked; UTF-8, Latin-1, UTF-16 either
// way, declared or not), a text that matches a deny pattern is refused
// with body-pattern. And for arbitrary bytes under arbitrary
// Content-Encoding and Content-Type values, decoding never panics, ends in
// an allowed verdict or one of the body refusals, returns all of the hold
// budget it took, and never makes an escape decoding longer than its input.
func FuzzBodyDecoding(f *testing.F) {
	f.Add([]byte(secretDoc), uint8(0), uint8(0), false, "", "")
	f.Add([]byte("Viele Grüße"), uint8(1), uint8(2), false, "", "")
	f.Add([]byte(`{"k":"\ud83d\udd11"}`), uint8(3), uint8(4), false, "", "")
	f.Add([]byte(gzipped(secretDoc)), uint8(0), uint8(0), true, "gzip", "application/json; charset=utf-16")
	f.Add([]byte("&#49;23-45-6789"), uint8(0), uint8(0), true, "identity", "text/plain; charset=latin1")
	f.Fuzz(func(t *testing.T, data []byte, coding, cs uint8, raw bool, ce, ct string) {
		if len(data) > 1<<16 {
			return
		}
		rules := patternRules()
		c := &conn{p: &Proxy{}, rules: rules, lim: Limits{MaxHeldBodyBytes: 1 << 20}.withDefaults()}
		var want bool // the text matches a pattern, so the body must be refused
		q := &request{contentEncoding: ce, contentType: ct}
		if !raw {
			text := strings.ToValidUTF8(string(data), "\uFFFD")
			want = matchString(rules.DenyPatterns, text) >= 0
			body, ok := encodeText(text, cs%5, coding%4)
			if !ok {
				return // not representable in Latin-1
			}
			if cs%5 == 3 && !strings.ContainsRune(utf16Of(text, false, false), 0) {
				// Undeclared UTF-16 without a BOM is recognised by its NULs:
				// text with no character below U+0100 has none (the
				// documented limit).
				want = false
			}
			q.contentEncoding = [...]string{"", "gzip", "deflate", "deflate, gzip"}[coding%4]
			q.contentType = [...]string{"text/plain", "text/plain; charset=latin1", "text/plain; charset=utf-16", "text/plain", "text/plain; charset=utf-16be"}[cs%5]
			data = []byte(body)
		}
		var rf *refusal
		if c.bc, rf = readBodyCoding(q); rf == nil {
			c.held = data
			rf = c.matchBody()
		}
		c.release()
		if n := c.p.held.Load(); n != 0 {
			t.Fatalf("%d bytes of the hold budget not returned", n)
		}
		var got Reason
		if rf != nil {
			got = rf.reason
		}
		switch {
		case want && got != ReasonBodyPattern:
			t.Fatalf("text matching a pattern got %q, want body-pattern (coding %d, charset %d)", got, coding%4, cs%5)
		case raw && got != "" && got != ReasonBodyPattern && got != ReasonContentEncoding && got != ReasonCharset &&
			got != ReasonUndecodableBody && got != ReasonDecodedHoldLimit:
			t.Fatalf("unexpected refusal %q", got)
		}
		for _, dec := range []func(dst, src []byte) []byte{jsonUnescape, decodeCharRefs, func(d, s []byte) []byte { return percentDecode(d, s, true) }} {
			if out := dec(nil, data); len(out) > len(data) {
				t.Fatalf("an escape decoding grew %d bytes to %d", len(data), len(out))
			}
		}
	})
}

// encodeText encodes text in charset cs (0 UTF-8, 1 Latin-1, 2 UTF-16LE
// with BOM, 3 UTF-16LE undeclared without BOM, 4 UTF-16BE by charset) and
// then the content codings (0 none, 1 gzip, 2 deflate, 3 deflate then
// gzip). It reports false when text has no Latin-1 form.
func encodeText(text string, cs, coding uint8) (string, bool) {
	var body string
	switch cs {
	case 0:
		body = text
	case 1:
		for _, r := range text {
			if r > 0xFF {
				return "", false
			}
		}
		body = latin1Of(text)
	case 2:
		body = utf16Of(text, false, true)
	case 3:
		body = utf16Of(text, false, false)
	case 4:
		body = utf16Of(text, true, false)
	}
	switch coding {
	case 1:
		body = gzipped(body)
	case 2:
		body = zlibbed(body)
	case 3:
		body = gzipped(zlibbed(body))
	}
	return body, true
}
