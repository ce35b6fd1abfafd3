package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math"
	"strings"
)

// field is one header field of a parsed request. Both strings are
// substrings of request.text; value has its surrounding whitespace removed.
type field struct{ name, value string }

// request is one parsed request head. Every string is a substring of text,
// the head exactly as the sandbox sent it, which is what the upstream gets.
type request struct {
	text   string // request line through the empty line, verbatim
	method string
	target string
	minor  int // HTTP/1.minor
	fields []field

	host      string // the Host field value
	authority string // the absolute-form target's authority; "" for origin-form
	rawPath   string // the target's path as sent; "/" for "http://host" and "http://host?q"
	path      string // rawPath with percent-escapes decoded: what rules match

	contentLength   int64 // -1 when absent
	chunked         bool
	close           bool   // the sandbox sends nothing after this request
	upgrade         string // Upgrade field value
	expect          string // Expect field value
	contentType     string
	contentEncoding string
}

// hasBody reports whether the request's framing announces body bytes.
func (q *request) hasBody() bool { return q.chunked || q.contentLength > 0 }

// headLimits bound one message head.
type headLimits struct {
	maxLine   int // one line without its CRLF
	maxHead   int // the whole head including line ends
	maxFields int
}

// fieldSpan locates one field line inside the head buffer while it is read:
// name is [start:colon], value is [vs:ve], the line ends at end.
type fieldSpan struct{ start, colon, vs, ve, end int }

// readLine returns the next line of r without its CRLF. A line must end in
// CRLF and contain no other CR: a bare LF or a lone CR is refused rather
// than tolerated, because parsers that tolerate them disagree on where a
// line ends. tooLong is the reason for a line longer than max.
func readLine(r *bufio.Reader, max int, tooLong Reason) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, refuse(tooLong, "line longer than %d bytes", max)
		}
		if errors.Is(err, io.EOF) && len(line) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	if len(line)-2 > max {
		return nil, refuse(tooLong, "line longer than %d bytes", max)
	}
	if len(line) < 2 || line[len(line)-2] != '\r' {
		return nil, refuse(ReasonBareLF, "line ends in a bare LF")
	}
	line = line[:len(line)-2]
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, refuse(ReasonBareLF, "lone CR inside a line")
	}
	return line, nil
}

// readFields reads field lines up to and including the empty line that ends
// a head, appending them to buf and their spans to spans.
func readFields(r *bufio.Reader, buf []byte, spans []fieldSpan, lim headLimits) ([]byte, []fieldSpan, error) {
	for {
		line, err := readLine(r, lim.maxLine, ReasonHeaderTooLarge)
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return buf, spans, err
		}
		if len(buf)+len(line)+2 > lim.maxHead {
			return buf, spans, refuse(ReasonHeaderTooLarge, "head longer than %d bytes", lim.maxHead)
		}
		start := len(buf)
		buf = append(buf, line...)
		buf = append(buf, '\r', '\n')
		if len(line) == 0 {
			return buf, spans, nil
		}
		if len(spans) == lim.maxFields {
			return buf, spans, refuse(ReasonTooManyHeaders, "more than %d header fields", lim.maxFields)
		}
		sp, rf := parseFieldLine(line)
		if rf != nil {
			return buf, spans, rf
		}
		sp.start += start
		sp.colon += start
		sp.vs += start
		sp.ve += start
		sp.end += start
		spans = append(spans, sp)
	}
}

// parseFieldLine checks one field line: a token, a colon right after it,
// optional whitespace, a value of visible bytes, spaces and tabs (obs-text
// allowed), optional whitespace. Offsets are relative to line.
func parseFieldLine(line []byte) (fieldSpan, *refusal) {
	if line[0] == ' ' || line[0] == '\t' {
		return fieldSpan{}, refuse(ReasonBadHeader, "obs-fold continuation line")
	}
	colon := bytes.IndexByte(line, ':')
	if colon < 0 {
		return fieldSpan{}, refuse(ReasonBadHeader, "field line without a colon")
	}
	if colon == 0 {
		return fieldSpan{}, refuse(ReasonBadHeader, "empty field name")
	}
	for _, b := range line[:colon] {
		if !isTchar(b) {
			if b == ' ' || b == '\t' {
				return fieldSpan{}, refuse(ReasonBadHeader, "whitespace before the colon")
			}
			return fieldSpan{}, refuse(ReasonBadHeader, "byte %#x in a field name", b)
		}
	}
	vs, ve := colon+1, len(line)
	for vs < ve && (line[vs] == ' ' || line[vs] == '\t') {
		vs++
	}
	for ve > vs && (line[ve-1] == ' ' || line[ve-1] == '\t') {
		ve--
	}
	for _, b := range line[vs:ve] {
		if (b < 0x20 && b != '\t') || b == 0x7f {
			return fieldSpan{}, refuse(ReasonBadHeader, "byte %#x in a field value", b)
		}
	}
	return fieldSpan{colon: colon, vs: vs, ve: ve, end: len(line)}, nil
}

// framingValue reports whether a field's value is written plainly: at most
// one space after the colon and nothing after the value. Fields that decide
// framing or routing (Content-Length, Transfer-Encoding, Host) must be,
// since parsers disagree about other whitespace.
func framingValue(text string, sp fieldSpan) bool {
	lead := sp.vs - sp.colon - 1
	return sp.ve == sp.end && (lead == 0 || (lead == 1 && text[sp.colon+1] == ' '))
}

// requestLine checks a request line and returns the offsets of its two
// spaces and the HTTP minor version. It runs as soon as the line arrives,
// so that an HTTP/0.9 request (which sends no header section) or bytes of
// another protocol are refused at once.
func requestLine(line []byte) (sp1, sp2, minor int, err *refusal) {
	sp1 = bytes.IndexByte(line, ' ')
	if sp1 < 0 {
		if isToken(line) {
			return 0, 0, 0, refuse(ReasonHTTPVersion, "request line without a target and version")
		}
		return 0, 0, 0, refuse(ReasonBadRequestLine, "no method")
	}
	if sp1 == 0 || !isToken(line[:sp1]) {
		return 0, 0, 0, refuse(ReasonBadRequestLine, "method is not a token")
	}
	rest := line[sp1+1:]
	n := bytes.IndexByte(rest, ' ')
	if n < 0 {
		return 0, 0, 0, refuse(ReasonHTTPVersion, "no HTTP version (HTTP/0.9)")
	}
	sp2 = sp1 + 1 + n
	target, version := line[sp1+1:sp2], line[sp2+1:]
	if len(target) == 0 {
		return 0, 0, 0, refuse(ReasonBadRequestLine, "empty request target")
	}
	switch string(version) {
	case "HTTP/1.1":
		minor = 1
	case "HTTP/1.0":
		minor = 0
	default:
		if len(version) == 8 && bytes.HasPrefix(version, []byte("HTTP/")) && isDigit(version[5]) && version[6] == '.' && isDigit(version[7]) {
			return 0, 0, 0, refuse(ReasonHTTPVersion, "version %s", version)
		}
		return 0, 0, 0, refuse(ReasonBadRequestLine, "malformed version")
	}
	for _, b := range target {
		if b <= ' ' || b >= 0x7f {
			return 0, 0, 0, refuse(ReasonBadTarget, "byte %#x in the target", b)
		}
	}
	if string(line[:sp1]) == "CONNECT" {
		return 0, 0, 0, refuse(ReasonConnect, "CONNECT")
	}
	return sp1, sp2, minor, nil
}

// requestReader reads requests from one connection, reusing its buffers.
type requestReader struct {
	r     *bufio.Reader
	lim   headLimits
	buf   []byte
	spans []fieldSpan
}

// read reads and checks the next request head into q. It returns io.EOF
// when the connection ended cleanly before a request, a *refusal for a
// request the proxy will not forward whatever the rules say, or the read
// error.
func (rr *requestReader) read(q *request) error {
	*q = request{fields: q.fields[:0], contentLength: -1}
	b, err := rr.r.Peek(1)
	if err != nil {
		return err
	}
	if !isTchar(b[0]) {
		// Not a method: TLS, an HTTP/2 frame, binary. Answer now rather than
		// wait for a line end that may never come.
		return refuse(ReasonBadRequestLine, "first byte %#x is not a method", b[0])
	}
	line, err := readLine(rr.r, rr.lim.maxLine, ReasonHeaderTooLarge)
	if err != nil {
		return err
	}
	sp1, sp2, minor, rf := requestLine(line)
	if rf != nil {
		// Keep what was parsed for the audit record.
		if i := bytes.IndexByte(line, ' '); i > 0 {
			q.method = string(line[:i])
		}
		return rf
	}
	rr.buf = append(rr.buf[:0], line...)
	rr.buf = append(rr.buf, '\r', '\n')
	rr.buf, rr.spans, err = readFields(rr.r, rr.buf, rr.spans[:0], rr.lim)
	if err != nil {
		// Keep the request line for the audit record.
		q.method = string(rr.buf[:sp1])
		q.target = string(rr.buf[sp1+1 : sp2])
		return err
	}
	q.text = string(rr.buf)
	q.method = q.text[:sp1]
	q.target = q.text[sp1+1 : sp2]
	q.minor = minor
	for _, sp := range rr.spans {
		q.fields = append(q.fields, field{name: q.text[sp.start:sp.colon], value: q.text[sp.vs:sp.ve]})
	}
	if rf := q.interpret(rr.spans); rf != nil {
		return rf
	}
	return nil
}

// interpret derives framing, target and host from the fields, refusing
// every ambiguity that could let the upstream read the request differently
// from the proxy.
func (q *request) interpret(spans []fieldSpan) *refusal {
	var cl, te, host, ct, ce, upgrade, expect int
	var clSpan, teSpan, hostSpan fieldSpan
	keepAlive := false
	for i, f := range q.fields {
		switch {
		case strings.EqualFold(f.name, "Content-Length"):
			cl++
			clSpan = spans[i]
		case strings.EqualFold(f.name, "Transfer-Encoding"):
			te++
			teSpan = spans[i]
		case strings.EqualFold(f.name, "Host"):
			host++
			hostSpan = spans[i]
			q.host = f.value
		case strings.EqualFold(f.name, "Content-Type"):
			ct++
			q.contentType = f.value
		case strings.EqualFold(f.name, "Content-Encoding"):
			ce++
			q.contentEncoding = f.value
		case strings.EqualFold(f.name, "Upgrade"):
			upgrade++
			q.upgrade = f.value
		case strings.EqualFold(f.name, "Expect"):
			expect++
			q.expect = f.value
		case strings.EqualFold(f.name, "Connection"):
			var rf *refusal
			eachListElement(f.value, func(tok string) bool {
				switch {
				case !isToken(tok):
					rf = refuse(ReasonBadHeader, "Connection element %q is not a token", truncate(tok, 32))
				case strings.EqualFold(tok, "close"):
					q.close = true
				case strings.EqualFold(tok, "keep-alive"):
					keepAlive = true
				case sensitiveField(tok):
					rf = refuse(ReasonBadHeader, "Connection names %s", tok)
				}
				return rf == nil
			})
			if rf != nil {
				return rf
			}
		case strings.IndexByte(f.name, '_') >= 0 && sensitiveField(strings.ReplaceAll(f.name, "_", "-")):
			// Gateways that map fields to CGI-style names read
			// Content_Length as Content-Length.
			return refuse(ReasonBadHeader, "field %s looks like a framing field", f.name)
		}
	}
	if q.minor == 0 && !keepAlive {
		q.close = true
	}

	switch {
	case cl > 0 && te > 0:
		return refuse(ReasonCLAndTE, "both Content-Length and Transfer-Encoding")
	case te > 1:
		return refuse(ReasonBadTransferEncoding, "Transfer-Encoding repeated")
	case te == 1 && q.minor == 0:
		return refuse(ReasonBadTransferEncoding, "Transfer-Encoding in an HTTP/1.0 request")
	case te == 1:
		if !framingValue(q.text, teSpan) || !strings.EqualFold(q.text[teSpan.vs:teSpan.ve], "chunked") {
			return refuse(ReasonTransferEncoding, "Transfer-Encoding is not exactly chunked")
		}
		q.chunked = true
	case cl > 1:
		return refuse(ReasonBadContentLength, "Content-Length repeated")
	case cl == 1:
		v := q.text[clSpan.vs:clSpan.ve]
		n, ok := parseDecimal(v)
		if !ok || !framingValue(q.text, clSpan) {
			return refuse(ReasonBadContentLength, "Content-Length %q", truncate(v, 32))
		}
		q.contentLength = n
	}
	if ct > 1 || ce > 1 || upgrade > 1 || expect > 1 {
		return refuse(ReasonBadHeader, "a single-valued field is repeated")
	}

	if rf := q.parseTarget(); rf != nil {
		return rf
	}

	switch {
	case host == 0:
		return refuse(ReasonBadHost, "no Host")
	case host > 1:
		return refuse(ReasonBadHost, "Host repeated")
	case !framingValue(q.text, hostSpan) || !validHostPort(q.host):
		return refuse(ReasonBadHost, "malformed Host %q", truncate(q.host, 64))
	}
	return nil
}

// sensitiveField reports whether name is a field whose removal or
// duplication by an intermediary changes framing or routing.
func sensitiveField(name string) bool {
	for _, s := range [...]string{"content-length", "transfer-encoding", "host", "content-type", "content-encoding"} {
		if strings.EqualFold(name, s) {
			return true
		}
	}
	return false
}

// eachListElement calls fn for each element of a comma-separated list,
// trimmed of whitespace (empty elements are allowed by the list syntax and
// skipped), until fn returns false; it reports whether fn accepted all.
func eachListElement[T string | []byte](v T, fn func(T) bool) bool {
	for len(v) > 0 {
		i := 0
		for i < len(v) && v[i] != ',' {
			i++
		}
		elem := v[:i]
		v = v[min(i+1, len(v)):]
		s, e := 0, len(elem)
		for s < e && (elem[s] == ' ' || elem[s] == '\t') {
			s++
		}
		for e > s && (elem[e-1] == ' ' || elem[e-1] == '\t') {
			e--
		}
		if e > s && !fn(elem[s:e]) {
			return false
		}
	}
	return true
}

// parseDecimal parses 1 to 18 ASCII digits.
func parseDecimal[T string | []byte](s T) (int64, bool) {
	if len(s) == 0 || len(s) > 18 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		if !isDigit(s[i]) {
			return 0, false
		}
		n = n*10 + int64(s[i]-'0')
	}
	return n, true
}

// maxChunkLine bounds a request chunk-size line: 16 hex digits and no
// extensions fit easily.
const maxChunkLine = 64

// readChunked decodes a chunked request body from r into dst. The framing
// accepted is strict: 1 to 16 hex digits, no chunk extensions (parsers
// disagree on them and they carry uninspected data), CRLF after every
// chunk's data, and no trailer fields (they would carry uninspected data
// too). grow is called with the decoded total before a chunk's data is read
// and may refuse it.
func readChunked(r *bufio.Reader, dst []byte, grow func(total int64) error) ([]byte, error) {
	for {
		line, err := readLine(r, maxChunkLine, ReasonBadChunk)
		if err != nil {
			var rf *refusal
			if errors.As(err, &rf) {
				rf.reason = ReasonBadChunk
			} else if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return dst, err
		}
		size, ok := parseChunkSize(line)
		if !ok {
			if bytes.IndexByte(line, ';') >= 0 {
				return dst, refuse(ReasonBadChunk, "chunk extension")
			}
			return dst, refuse(ReasonBadChunk, "chunk size %q", truncate(string(line), 20))
		}
		if size == 0 {
			end, err := r.Peek(2)
			if err != nil {
				return dst, unexpected(err)
			}
			if end[0] != '\r' || end[1] != '\n' {
				return dst, refuse(ReasonTrailer, "trailer section")
			}
			_, _ = r.Discard(2)
			return dst, nil
		}
		total := int64(len(dst)) + size
		if err := grow(total); err != nil {
			return dst, err
		}
		n := len(dst)
		if int64(cap(dst)) < total {
			// Grow by at most doubling, so that a body of many small
			// chunks does not reallocate each time and a big one does not
			// allocate far beyond its size.
			next := make([]byte, n, max(total, min(2*int64(cap(dst)), math.MaxInt)))
			copy(next, dst)
			dst = next
		}
		dst = dst[:total]
		if _, err := io.ReadFull(r, dst[n:]); err != nil {
			return dst[:n], unexpected(err)
		}
		end, err := r.Peek(2)
		if err != nil {
			return dst, unexpected(err)
		}
		if end[0] != '\r' || end[1] != '\n' {
			return dst, refuse(ReasonBadChunk, "chunk data not followed by CRLF")
		}
		_, _ = r.Discard(2)
	}
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parseChunkSize parses 1 to 16 hex digits and nothing else.
func parseChunkSize(line []byte) (int64, bool) {
	if len(line) == 0 || len(line) > 16 {
		return 0, false
	}
	var n uint64
	for _, b := range line {
		d, ok := unhex(b)
		if !ok {
			return 0, false
		}
		n = n<<4 | uint64(d)
	}
	if n > math.MaxInt64 {
		return 0, false
	}
	return int64(n), true
}

// writeChunked writes body as the chunked body the proxy forwards for a
// held chunked request: one chunk and the last chunk. The framing is
// re-encoded (the bytes are the same) because the body was decoded to
// inspect it; the head keeps "Transfer-Encoding: chunked" verbatim. Write
// errors stick in w. It returns the bytes written.
func writeChunked(w *bufio.Writer, body []byte) int64 {
	n := int64(0)
	if len(body) > 0 {
		var buf [18]byte
		size := append(appendHex(buf[:0], uint64(len(body))), '\r', '\n')
		_, _ = w.Write(size)
		_, _ = w.Write(body)
		_, _ = w.WriteString("\r\n")
		n = int64(len(size) + len(body) + 2)
	}
	_, _ = w.WriteString("0\r\n\r\n")
	return n + 5
}

func appendHex(b []byte, n uint64) []byte {
	const digits = "0123456789abcdef"
	var tmp [16]byte
	i := len(tmp)
	for {
		i--
		tmp[i] = digits[n&0xf]
		n >>= 4
		if n == 0 {
			break
		}
	}
	return append(b, tmp[i:]...)
}

// response is what the proxy needs to know about an upstream response head
// to relay it verbatim: its status and how its body is delimited.
type response struct {
	status        int
	contentLength int64 // -1 when absent
	chunked       bool
	untilClose    bool // the body ends when the upstream closes
	close         bool // the upstream closes after this response
	upgrade       []byte
}

// readResponse reads one response head into buf (verbatim) and returns it
// with its parsed framing. Response heads are checked with the same line and
// field rules as requests: the proxy must find the same message boundaries
// as the sandbox's client.
func readResponse(r *bufio.Reader, buf []byte, spans []fieldSpan, lim headLimits) ([]byte, []fieldSpan, response, error) {
	resp := response{contentLength: -1}
	line, err := readLine(r, lim.maxLine, ReasonHeaderTooLarge)
	if err != nil {
		return buf, spans, resp, err
	}
	minor, status, ok := statusLine(line)
	if !ok {
		return buf, spans, resp, refuse(ReasonBadUpstreamResponse, "malformed status line")
	}
	resp.status = status
	buf = append(buf[:0], line...)
	buf = append(buf, '\r', '\n')
	buf, spans, err = readFields(r, buf, spans[:0], lim)
	if err != nil {
		return buf, spans, resp, err
	}
	keepAlive := false
	te := false
	for _, sp := range spans {
		name, value := buf[sp.start:sp.colon], buf[sp.vs:sp.ve]
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			n, ok := parseDecimal(value)
			if !ok || (resp.contentLength >= 0 && n != resp.contentLength) {
				return buf, spans, resp, refuse(ReasonBadUpstreamResponse, "bad Content-Length")
			}
			resp.contentLength = n
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			// The last coding decides: chunked, or the body runs to
			// the connection's end.
			te = true
			last := value
			if i := bytes.LastIndexByte(value, ','); i >= 0 {
				last = bytes.Trim(value[i+1:], " \t")
			}
			resp.chunked = bytes.EqualFold(last, []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			eachListElement(value, func(tok []byte) bool {
				switch {
				case bytes.EqualFold(tok, []byte("close")):
					resp.close = true
				case bytes.EqualFold(tok, []byte("keep-alive")):
					keepAlive = true
				}
				return true
			})
		case bytes.EqualFold(name, []byte("Upgrade")):
			resp.upgrade = value
		}
	}
	if te && (resp.contentLength >= 0 || minor == 0) {
		return buf, spans, resp, refuse(ReasonBadUpstreamResponse, "Transfer-Encoding with Content-Length or in HTTP/1.0")
	}
	if te && !resp.chunked {
		resp.untilClose = true
	}
	if minor == 0 && !keepAlive {
		resp.close = true
	}
	return buf, spans, resp, nil
}

// statusLine parses "HTTP/1.x NNN reason" (the reason, and the space before
// it, may be missing: some servers omit both).
func statusLine(line []byte) (minor, status int, ok bool) {
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, 0, false
	}
	switch line[7] {
	case '0':
	case '1':
		minor = 1
	default:
		return 0, 0, false
	}
	for _, b := range line[9:12] {
		if !isDigit(b) {
			return 0, 0, false
		}
		status = status*10 + int(b-'0')
	}
	if status < 100 || (len(line) > 12 && line[12] != ' ') {
		return 0, 0, false
	}
	for _, b := range line[12:] {
		if (b < 0x20 && b != '\t') || b == 0x7f {
			return 0, 0, false
		}
	}
	return minor, status, true
}

// responseChunkSize parses a response chunk-size line leniently (the
// sandbox's client reads it, not an upstream): hex digits, optional
// whitespace, optional extensions.
func responseChunkSize(line []byte) (int64, bool) {
	i := 0
	for i < len(line) && i < 17 {
		if _, ok := unhex(line[i]); !ok {
			break
		}
		i++
	}
	if i == 0 || i > 16 {
		return 0, false
	}
	rest := bytes.TrimLeft(line[i:], " \t")
	if len(rest) > 0 && rest[0] != ';' {
		return 0, false
	}
	return parseChunkSize(line[:i])
}

func isDigit(b byte) bool { return '0' <= b && b <= '9' }

func unhex(b byte) (byte, bool) {
	switch {
	case '0' <= b && b <= '9':
		return b - '0', true
	case 'a' <= b && b <= 'f':
		return b - 'a' + 10, true
	case 'A' <= b && b <= 'F':
		return b - 'A' + 10, true
	}
	return 0, false
}

// isTchar reports whether b may appear in a token (RFC 9110, 5.6.2).
func isTchar(b byte) bool {
	switch {
	case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", b) >= 0
}

func isToken[T string | []byte](s T) bool {
	if len(s) == 0 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTchar(s[i]) {
			return false
		}
	}
	return true
}
