package httpproxy

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"errors"
	"io"
	"mime"
	"regexp"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// Deny patterns (Rules.DenyPatterns, Rules.DenyBodyPatterns) and the
// decoding that lets them see what the upstream will read. The package
// documentation ("Deny patterns") states the rules; this file implements
// them. Matching always works on copies: the request is forwarded as sent.

// matchHead applies DenyPatterns to the request head: the path, the query
// and every header field. It runs only once the rules allowed the head.
func (c *conn) matchHead(q *request) *refusal {
	pats := c.rules.DenyPatterns
	if len(pats) == 0 {
		return nil
	}
	// q.path is decoded (normalPath refuses escaped "%", so one decoding is
	// all an upstream can do); rawPath is matched too, for patterns written
	// against the escaped form.
	if i := matchString(pats, q.path); i >= 0 {
		return refuse(ReasonPathPattern, "denyPatterns[%d] matched the path", i)
	}
	if q.rawPath != q.path {
		if i := matchString(pats, q.rawPath); i >= 0 {
			return refuse(ReasonPathPattern, "denyPatterns[%d] matched the path", i)
		}
	}
	if _, query, ok := strings.Cut(q.target, "?"); ok {
		if i := c.matchEscaped(pats, query); i >= 0 {
			return refuse(ReasonQueryPattern, "denyPatterns[%d] matched the query", i)
		}
	}
	for k, f := range q.fields {
		if i := matchString(pats, f.name); i >= 0 {
			return refuse(ReasonHeaderPattern, "denyPatterns[%d] matched a field name", i)
		}
		if i := c.matchEscaped(pats, f.value); i >= 0 {
			return refuse(ReasonHeaderPattern, "denyPatterns[%d] matched field %s", i, truncate(f.name, 64))
		}
		if i := c.matchRepeated(pats, q.fields, k); i >= 0 {
			return refuse(ReasonHeaderPattern, "denyPatterns[%d] matched the combined values of field %s", i, truncate(f.name, 64))
		}
	}
	return nil
}

// matchRepeated matches the value a recipient gets when it combines the
// lines of a repeated field (RFC 9110, 5.3: joined with ", "; Cookie with
// "; "), once, at the field's first line: a pattern may span two lines.
func (c *conn) matchRepeated(pats []*regexp.Regexp, fields []field, k int) int {
	name := fields[k].name
	for _, f := range fields[:k] {
		if strings.EqualFold(f.name, name) {
			return -1 // matched at its first line
		}
	}
	sep := ", "
	if strings.EqualFold(name, "Cookie") {
		sep = "; "
	}
	var joined strings.Builder
	n := 0
	for _, f := range fields[k:] {
		if strings.EqualFold(f.name, name) {
			if n > 0 {
				joined.WriteString(sep)
			}
			joined.WriteString(f.value)
			n++
		}
	}
	if n < 2 {
		return -1
	}
	return c.matchEscaped(pats, joined.String())
}

// matchString returns the index of the first pattern that matches s, or -1.
func matchString(pats []*regexp.Regexp, s string) int {
	for i, re := range pats {
		if re.MatchString(s) {
			return i
		}
	}
	return -1
}

func matchBytes(pats []*regexp.Regexp, b []byte) int {
	for i, re := range pats {
		if re.Match(b) {
			return i
		}
	}
	return -1
}

// matchEscaped matches s as sent and percent-decoded, with "+" read as
// itself (RFC 3986) and as a space (HTML forms, most server frameworks):
// the proxy cannot know which reading the upstream makes, so it matches
// every one.
func (c *conn) matchEscaped(pats []*regexp.Regexp, s string) int {
	if i := matchString(pats, s); i >= 0 {
		return i
	}
	esc, plus := hasEscape(s), strings.IndexByte(s, '+') >= 0
	if esc {
		c.headBuf = percentDecode(c.headBuf[:0], s, false)
		if i := matchBytes(pats, c.headBuf); i >= 0 {
			return i
		}
	}
	if plus {
		c.headBuf = percentDecode(c.headBuf[:0], s, true)
		if i := matchBytes(pats, c.headBuf); i >= 0 {
			return i
		}
	}
	return -1
}

// hasEscape reports whether s holds a valid percent-escape.
func hasEscape[T string | []byte](s T) bool {
	for i := 0; i+2 < len(s); i++ {
		if s[i] == '%' && isHex(s[i+1]) && isHex(s[i+2]) {
			return true
		}
	}
	return false
}

func isHex(b byte) bool { _, ok := unhex(b); return ok }

// percentDecode appends s with its valid percent-escapes decoded (and "+"
// as a space when plusSpace) to dst. An invalid escape is kept as it is,
// as lenient decoders do; strict ones refuse the request instead.
func percentDecode[T string | []byte](dst []byte, s T, plusSpace bool) []byte {
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case b == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			hi, _ := unhex(s[i+1])
			lo, _ := unhex(s[i+2])
			dst = append(dst, hi<<4|lo)
			i += 2
		case b == '+' && plusSpace:
			dst = append(dst, ' ')
		default:
			dst = append(dst, b)
		}
	}
	return dst
}

// Bodies.

// maxCodings bounds the codings a Content-Encoding may stack: each is a
// full decompression of up to the hold limit.
const maxCodings = 3

type coding uint8

const (
	codingGzip coding = iota + 1
	codingDeflate
)

type charset uint8

const (
	charsetNone   charset = iota // none declared, or UTF-8
	charsetLatin1                // ISO-8859-1, and US-ASCII (which WHATWG decoders read as windows-1252)
	charsetUTF16                 // UTF-16: the byte order mark decides, else both orders are read
	charsetUTF16LE
	charsetUTF16BE
)

// bodyCoding is how a request body is decoded for matching, read from its
// head.
type bodyCoding struct {
	codings [maxCodings]coding // in the order the sender applied them
	n       int
	charset charset
}

// charsets maps the labels decoded for matching (compared in lowercase);
// any other charset parameter is refused while patterns apply.
var charsets = map[string]charset{
	"utf-8": charsetNone, "utf8": charsetNone, "unicode-1-1-utf-8": charsetNone,
	"us-ascii": charsetLatin1, "ascii": charsetLatin1, "iso-8859-1": charsetLatin1, "iso8859-1": charsetLatin1,
	"iso_8859-1": charsetLatin1, "iso_8859-1:1987": charsetLatin1, "latin1": charsetLatin1, "latin-1": charsetLatin1,
	"l1": charsetLatin1, "iso-ir-100": charsetLatin1, "cp819": charsetLatin1, "ibm819": charsetLatin1, "csisolatin1": charsetLatin1,
	"utf-16": charsetUTF16, "utf-16le": charsetUTF16LE, "utf-16be": charsetUTF16BE,
}

// readBodyCoding reads how q's body is encoded, refusing what the proxy
// cannot decode: an unknown or too deeply stacked Content-Encoding, a
// charset other than UTF-8, ASCII, Latin-1 and UTF-16, or Content-Type
// parameters that cannot be read when they mention a charset.
func readBodyCoding(q *request) (bodyCoding, *refusal) {
	var bc bodyCoding
	var rf *refusal
	eachListElement(q.contentEncoding, func(tok string) bool {
		var cd coding
		switch strings.ToLower(tok) {
		case "identity":
			return true
		case "gzip", "x-gzip":
			cd = codingGzip
		case "deflate":
			cd = codingDeflate
		default:
			rf = refuse(ReasonContentEncoding, "Content-Encoding %q", truncate(tok, 32))
			return false
		}
		if bc.n == maxCodings {
			rf = refuse(ReasonContentEncoding, "more than %d content codings", maxCodings)
			return false
		}
		bc.codings[bc.n] = cd
		bc.n++
		return true
	})
	if rf != nil {
		return bc, rf
	}
	if q.contentType == "" {
		return bc, nil
	}
	_, params, err := mime.ParseMediaType(q.contentType)
	if err != nil {
		if strings.Contains(strings.ToLower(q.contentType), "charset") {
			// Repeated, malformed or unterminated: which charset the
			// upstream reads cannot be known.
			return bc, refuse(ReasonCharset, "Content-Type parameters: %v", err)
		}
		return bc, nil
	}
	if label, ok := params["charset"]; ok {
		cs, known := charsets[strings.ToLower(strings.TrimSpace(label))]
		if !known {
			return bc, refuse(ReasonCharset, "charset %q", truncate(label, 32))
		}
		bc.charset = cs
	}
	return bc, nil
}

// matchBody undoes the body's content codings and matches every reading
// of the result (see readings) against the patterns that apply to bodies.
func (c *conn) matchBody() *refusal {
	body := c.held
	for i := c.bc.n - 1; i >= 0; i-- {
		var rf *refusal
		if body, rf = c.decompress(c.bc.codings[i], body); rf != nil {
			return rf
		}
	}
	return c.readings(body, c.matchReading)
}

// decompress undoes one content coding into a new buffer of at most
// Limits.MaxHeldBodyBytes (a zip bomb is refused, not inflated), counted
// against the proxy-wide hold budget. "deflate" is the zlib format (RFC
// 9110, 8.4.1.2); a raw deflate stream so labelled is refused, as are
// bytes after the end of the stream.
func (c *conn) decompress(cd coding, in []byte) ([]byte, *refusal) {
	if len(in) == 0 {
		return in, nil // nothing to hide
	}
	src := bytes.NewReader(in)
	var r io.Reader
	var err error
	name := "gzip"
	switch cd {
	case codingGzip:
		// Concatenated members are one body (multistream), as gunzip
		// reads them; bytes after the last member are refused.
		r, err = gzip.NewReader(src)
	case codingDeflate:
		name = "deflate"
		r, err = zlib.NewReader(src)
	}
	if err != nil {
		return nil, refuse(ReasonUndecodableBody, "%s: %v", name, err)
	}
	out, rf := c.readDecoded(r, name)
	if rf != nil {
		return nil, rf
	}
	if src.Len() > 0 {
		return nil, refuse(ReasonUndecodableBody, "%s: %d bytes after the end of the stream", name, src.Len())
	}
	return out, nil
}

// readDecoded reads r to its end, growing its buffer by doubling within
// the hold limit and the proxy-wide budget.
func (c *conn) readDecoded(r io.Reader, name string) ([]byte, *refusal) {
	limit := c.lim.MaxHeldBodyBytes
	var buf []byte
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > limit {
				return nil, refuse(ReasonDecodedHoldLimit, "%s body decodes to more than the hold limit %d", name, limit)
			}
			next := min(max(2*int64(cap(buf)), 32<<10), limit+1)
			if rf := c.reserve(next - int64(cap(buf))); rf != nil {
				return nil, rf
			}
			buf = append(make([]byte, 0, next), buf...)
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > limit {
			return nil, refuse(ReasonDecodedHoldLimit, "%s body decodes to more than the hold limit %d", name, limit)
		}
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return nil, refuse(ReasonUndecodableBody, "%s: %v", name, err)
		}
	}
}

// reserve counts n more bytes of decoding buffers against the proxy-wide
// hold budget until the request is done (release).
func (c *conn) reserve(n int64) *refusal {
	if n <= 0 {
		return nil
	}
	if c.p.held.Add(n) > c.lim.MaxHeldTotalBytes {
		c.p.held.Add(-n)
		return refuse(ReasonProxyBusy, "held and decoded bodies above %d bytes", c.lim.MaxHeldTotalBytes)
	}
	c.reserved += n
	return nil
}

// scratch is a decoding buffer reused across a connection's requests. Its
// use by the current request is counted against the hold budget.
type scratch struct {
	b        []byte
	reserved int64 // counted for the current request
}

// take returns s's buffer, empty, with room for need bytes.
func (c *conn) take(s *scratch, need int) ([]byte, *refusal) {
	if d := int64(need) - s.reserved; d > 0 {
		if rf := c.reserve(d); rf != nil {
			return nil, rf
		}
		s.reserved = int64(need)
	}
	if cap(s.b) < need {
		s.b = make([]byte, 0, need)
	}
	return s.b[:0], nil
}

// done ends a request's use of s, dropping a large buffer.
func (s *scratch) done() {
	s.reserved = 0
	if cap(s.b) > 64<<10 {
		s.b = nil
	}
}

// readings calls match with text and every other reading of it that an
// upstream may make, until match refuses one:
//
//   - as Latin-1, when declared so (or US-ASCII) and bytes above 0x7F occur;
//   - as UTF-16, and with its NUL bytes removed, when declared UTF-16, when
//     it starts with a UTF-16 byte order mark, or when it holds a NUL byte:
//     an attacker chooses the encoding, and JSON readers detect UTF-16 and
//     UTF-32 from where the NULs are, so an undeclared UTF-16 body is not
//     trusted to be UTF-8. The byte order is the one the BOM or the label
//     (utf-16le, utf-16be) names, both if they disagree, and both when
//     neither names one: decoders honour a BOM, or else the label. The
//     NUL-free copy shows ASCII in UTF-16 or UTF-32 of any byte order or
//     alignment.
func (c *conn) readings(text []byte, match func([]byte) *refusal) *refusal {
	if rf := match(text); rf != nil {
		return rf
	}
	if c.bc.charset == charsetLatin1 && hasHighByte(text) {
		buf, rf := c.take(&c.reading, 2*len(text))
		if rf != nil {
			return rf
		}
		c.reading.b = latin1ToUTF8(buf, text)
		if rf := match(c.reading.b); rf != nil {
			return rf
		}
	}
	nul := bytes.IndexByte(text, 0) >= 0
	le := c.bc.charset == charsetUTF16LE || len(text) >= 2 && text[0] == 0xFF && text[1] == 0xFE
	be := c.bc.charset == charsetUTF16BE || len(text) >= 2 && text[0] == 0xFE && text[1] == 0xFF
	if !le && !be {
		if c.bc.charset != charsetUTF16 && !nul {
			return nil
		}
		le, be = true, true
	}
	for _, bigEndian := range []bool{false, true} {
		if bigEndian && !be || !bigEndian && !le {
			continue
		}
		buf, rf := c.take(&c.reading, len(text)/2*3+3)
		if rf != nil {
			return rf
		}
		c.reading.b = utf16ToUTF8(buf, text, bigEndian)
		if rf := match(c.reading.b); rf != nil {
			return rf
		}
	}
	if nul {
		buf, rf := c.take(&c.reading, len(text))
		if rf != nil {
			return rf
		}
		c.reading.b = stripNUL(buf, text)
		if rf := match(c.reading.b); rf != nil {
			return rf
		}
	}
	return nil
}

// matchReading matches one reading of a body, and the same reading with
// the escapes that common body formats define decoded, each on its own:
// percent-escapes (form bodies, with "+" as itself and as a space), JSON
// string escapes (\u0031, \/), and XML/HTML character references (&#49;,
// &#x31;, &amp;).
func (c *conn) matchReading(b []byte) *refusal {
	if rf := c.matchBodyPatterns(b); rf != nil {
		return rf
	}
	type decoder struct {
		applies func([]byte) bool
		decode  func(dst, src []byte) []byte
	}
	for _, d := range [...]decoder{
		{hasEscape[[]byte], func(dst, src []byte) []byte { return percentDecode(dst, src, false) }},
		{func(b []byte) bool { return bytes.IndexByte(b, '+') >= 0 }, func(dst, src []byte) []byte { return percentDecode(dst, src, true) }},
		{hasJSONEscape, jsonUnescape},
		{hasCharRef, decodeCharRefs},
	} {
		if !d.applies(b) {
			continue
		}
		// Each decoder's output is at most as long as its input.
		buf, rf := c.take(&c.unescape, len(b))
		if rf != nil {
			return rf
		}
		c.unescape.b = d.decode(buf, b)
		if rf := c.matchBodyPatterns(c.unescape.b); rf != nil {
			return rf
		}
	}
	return nil
}

func (c *conn) matchBodyPatterns(b []byte) *refusal {
	if i := matchBytes(c.rules.DenyBodyPatterns, b); i >= 0 {
		return refuse(ReasonBodyPattern, "denyBodyPatterns[%d] matched", i)
	}
	if i := matchBytes(c.rules.DenyPatterns, b); i >= 0 {
		return refuse(ReasonBodyPattern, "denyPatterns[%d] matched the body", i)
	}
	return nil
}

func hasHighByte(b []byte) bool {
	for _, x := range b {
		if x >= 0x80 {
			return true
		}
	}
	return false
}

// latin1ToUTF8 appends src, read as ISO-8859-1, to dst in UTF-8.
func latin1ToUTF8(dst, src []byte) []byte {
	for _, b := range src {
		if b < 0x80 {
			dst = append(dst, b)
		} else {
			dst = append(dst, 0xC0|b>>6, 0x80|b&0x3F)
		}
	}
	return dst
}

// utf16ToUTF8 appends src, read as UTF-16 in the given byte order, to dst
// in UTF-8. A leading byte order mark is dropped; unpaired surrogates and
// an odd last byte become U+FFFD.
func utf16ToUTF8(dst, src []byte, bigEndian bool) []byte {
	unit := func(i int) rune {
		if bigEndian {
			return rune(src[i])<<8 | rune(src[i+1])
		}
		return rune(src[i+1])<<8 | rune(src[i])
	}
	i := 0
	if len(src) >= 2 && unit(0) == 0xFEFF {
		i = 2
	}
	for ; i+1 < len(src); i += 2 {
		r := unit(i)
		if utf16.IsSurrogate(r) {
			if i+3 < len(src) {
				if d := utf16.DecodeRune(r, unit(i+2)); d != utf8.RuneError {
					dst = utf8.AppendRune(dst, d)
					i += 2
					continue
				}
			}
			r = utf8.RuneError
		}
		dst = utf8.AppendRune(dst, r)
	}
	if len(src)%2 == 1 {
		dst = utf8.AppendRune(dst, utf8.RuneError)
	}
	return dst
}

func stripNUL(dst, src []byte) []byte {
	for _, b := range src {
		if b != 0 {
			dst = append(dst, b)
		}
	}
	return dst
}

// hasJSONEscape reports whether b holds a JSON string escape.
func hasJSONEscape(b []byte) bool {
	for i := 0; i+1 < len(b); i++ {
		if b[i] == '\\' && strings.IndexByte(`"\/bfnrtu`, b[i+1]) >= 0 {
			return true
		}
	}
	return false
}

// jsonUnescape appends b with its JSON string escapes decoded to dst:
// \uXXXX (surrogate pairs joined, lone surrogates as U+FFFD) and the
// one-letter escapes. Anything else is kept as it is. The output is never
// longer than b.
func jsonUnescape(dst, b []byte) []byte {
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' || i+1 == len(b) {
			dst = append(dst, b[i])
			continue
		}
		switch e := b[i+1]; e {
		case '"', '\\', '/':
			dst = append(dst, e)
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r, ok := hex4(b[i+2:])
			if !ok {
				dst = append(dst, '\\')
				continue
			}
			n := 6 // bytes of the escape
			if utf16.IsSurrogate(r) {
				d := utf8.RuneError
				if i+12 <= len(b) && b[i+6] == '\\' && b[i+7] == 'u' {
					if lo, ok := hex4(b[i+8:]); ok {
						if d = utf16.DecodeRune(r, lo); d != utf8.RuneError {
							n = 12
						}
					}
				}
				r = d
			}
			dst = utf8.AppendRune(dst, r)
			i += n - 1
			continue
		default:
			dst = append(dst, '\\')
			continue
		}
		i++
	}
	return dst
}

// hex4 parses the 4 hex digits that start b.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, x := range b[:4] {
		d, ok := unhex(x)
		if !ok {
			return 0, false
		}
		r = r<<4 | rune(d)
	}
	return r, true
}

// xmlEntities are the predefined XML entities (HTML's hundreds of other
// named references are not decoded).
var xmlEntities = map[string]byte{"amp": '&', "lt": '<', "gt": '>', "quot": '"', "apos": '\''}

// hasCharRef reports whether b may hold a character reference.
func hasCharRef(b []byte) bool {
	i := bytes.IndexByte(b, '&')
	return i >= 0 && bytes.IndexByte(b[i:], ';') >= 0
}

// decodeCharRefs appends b with its numeric character references (&#49;,
// &#x31;) and predefined XML entities decoded to dst; anything else is
// kept as it is. The output is never longer than b.
func decodeCharRefs(dst, b []byte) []byte {
	for i := 0; i < len(b); i++ {
		if b[i] != '&' {
			dst = append(dst, b[i])
			continue
		}
		end := bytes.IndexByte(b[i+1:min(len(b), i+12)], ';')
		if end < 0 {
			dst = append(dst, '&')
			continue
		}
		ref := b[i+1 : i+1+end]
		if r, ok := numericRef(ref); ok {
			dst = utf8.AppendRune(dst, r)
			i += end + 1
			continue
		}
		if e, ok := xmlEntities[string(ref)]; ok {
			dst = append(dst, e)
			i += end + 1
			continue
		}
		dst = append(dst, '&')
	}
	return dst
}

// numericRef parses "#49" or "#x31" (the text of a reference between & and
// ;); code points that are not characters become U+FFFD.
func numericRef(ref []byte) (rune, bool) {
	if len(ref) < 2 || ref[0] != '#' {
		return 0, false
	}
	digits, base := ref[1:], rune(10)
	if digits[0] == 'x' || digits[0] == 'X' {
		digits, base = digits[1:], 16
	}
	if len(digits) == 0 || len(digits) > 7 {
		return 0, false
	}
	var r rune
	for _, x := range digits {
		d, ok := unhex(x)
		if !ok || rune(d) >= base {
			return 0, false
		}
		r = r*base + rune(d)
	}
	if !utf8.ValidRune(r) || r == 0 {
		return utf8.RuneError, true
	}
	return r, true
}
