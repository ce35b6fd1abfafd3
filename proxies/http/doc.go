// Package httpproxy is the open-mode HTTP/1.1 inspection proxy: it serves
// one redirected sandbox connection at a time (Proxy.ServeConn), checks
// every request against the egress rule's open.http block (Rules) and the
// flow's destination (Flow), forwards what is allowed to the original
// destination and refuses the rest. It owns HTTP parsing, request
// inspection, the refusal responses and the cleanwall_http_* metrics. It
// never imports bpf or attest, and not policy either: the daemon translates
// a validated policy into Rules and Flow, and supplies the Dial function
// whose traffic the datapath does not redirect again.
//
// # Parsing
//
// Request heads are parsed by a strict parser of our own rather than
// net/http's http.ReadRequest, for two reasons. net/http is deliberately
// tolerant as a server (bare LF line ends, obs-fold lines joined to the
// previous value, repeated identical Content-Length values,
// Transfer-Encoding ignored in an HTTP/1.0 request, tabs around any value),
// and every tolerance is a place where the proxy and the upstream may frame
// a request differently. And the proxy
// forwards the head verbatim, byte for byte as received, so that what the
// upstream reads is exactly what was inspected; net/http keeps only a
// canonicalised header map. The parser refuses rather than repairs:
//
//   - every line must end in CRLF; a bare LF or a lone CR is refused;
//   - the request line is method SP target SP HTTP/1.1 or HTTP/1.0, single
//     spaces, target bytes 0x21-0x7E; HTTP/0.9, HTTP/2 (and its preface)
//     and other versions are refused, as are leading empty lines and a
//     first byte that cannot start a method (TLS, binary);
//   - field names are tokens with the colon right after them; values hold
//     visible bytes, spaces, tabs and obs-text only (no NUL, no CR); obs-fold
//     is refused;
//   - Content-Length is 1 to 18 digits, once; Transfer-Encoding, once, must
//     be exactly "chunked" (any case) in an HTTP/1.1 request; both together
//     are refused; these fields and Host must be written plainly (at most
//     one space after the colon, none after the value): tab, vertical tab
//     and trailing-space variants are refused;
//   - chunk sizes are 1 to 16 hex digits with no extensions and no
//     whitespace; chunk data must be followed by CRLF; trailer fields are
//     refused (they would carry uninspected data);
//   - Connection may not name Content-Length, Transfer-Encoding, Host,
//     Content-Type or Content-Encoding (an intermediary would drop them),
//     and field names such as Transfer_Encoding, which CGI-style gateways
//     read as the real thing, are refused;
//   - Host must be present once, a name or IP literal with an optional port;
//     Content-Type, Content-Encoding, Upgrade and Expect at most once;
//   - CONNECT is refused (a tunnel is never inspected).
//
// Upstream response heads go through the same line and field checks, so that
// the proxy and the sandbox's client agree on where each response ends; a
// response with both Content-Length and Transfer-Encoding, or with
// Transfer-Encoding in HTTP/1.0, is refused (502).
//
// # Targets and paths
//
// The target is forwarded as sent, so it must be in a form that every
// upstream reads the same way; anything that would need rewriting is
// refused instead (400 bad-path or bad-target). Origin-form ("/p?q") and
// http absolute-form ("http://host/p") are accepted; an absolute-form
// authority must name the flow's destination like Host (421 otherwise) and
// carry no userinfo. In the path: "." and ".." segments, also written
// "..;x" (servlet containers drop ";x"), empty segments other than a
// trailing slash, backslashes, and escapes of "/", "\", ".", "%" (against
// double decoding) and control bytes are refused, as are bytes outside RFC
// 3986's pchar and a fragment. Every other escape is decoded before
// matching: "/v1/re%73ults" matches the pattern "/v1/results". Rules never
// match the query (deny patterns do) and it is forwarded as sent.
//
// Rule paths: literal segments match exactly, "*" matches one non-empty
// segment, a final "**" matches the rest of the path including nothing.
//
// # Bodies: what is held, and the guarantee
//
// The upstream never sees any byte of a refused request, not even its head,
// and never a connection for a refused first request. A request is
// therefore forwarded only once its verdict is final:
//
//   - Without a body, or with a Content-Length body when no pattern applies
//     to bodies (neither denyBodyPatterns nor denyPatterns), the verdict is
//     final at the head (a Content-Length
//     above maxBodyBytes is refused before any body byte is read). The body
//     is then streamed through a 32 KiB buffer: memory stays flat whatever
//     the size (the test uploads 1 GiB).
//   - A chunked body (size unknown until its end) or any body when a pattern
//     applies to bodies is held: read completely into memory while its
//     size is checked against maxBodyBytes chunk by chunk, matched against
//     the patterns, and only then forwarded. Held bodies are bounded by
//     Limits.MaxHeldBodyBytes per connection (413 body-over-hold-limit
//     above it, refused from the Content-Length before reading when known)
//     and Limits.MaxHeldTotalBytes per Proxy (503 proxy-busy). A body is
//     never written to disk: in a clean room that would be a leak of its
//     own. Operators who need patterns on larger bodies raise the hold limit.
//
// Because held bodies are complete, each pattern runs over the whole
// decoded body: there is no window, a match of any length is found, and a
// match spanning chunk boundaries is found like any other. A held chunked
// body is forwarded re-encoded as one chunk and the last chunk (the head,
// including "Transfer-Encoding: chunked", is unchanged); since extensions
// and trailers are refused, the upstream decodes the same bytes.
//
// For Expect: 100-continue the proxy answers 100 Continue itself when it
// holds the body (after the head was allowed) and drops the upstream's 100;
// for a streamed body the upstream's 100 is relayed.
//
// # Deny patterns
//
// denyBodyPatterns (Rules.DenyBodyPatterns) see the body only;
// denyPatterns (Rules.DenyPatterns) see the whole request:
//
//   - the path, percent-decoded, and as sent when that differs. The path is
//     in normal form (above): escapes of "%" are refused, so no upstream can
//     decode it twice;
//   - the query (all after the first "?"), as one string: as sent,
//     percent-decoded with "+" read as itself (RFC 3986), and
//     percent-decoded with "+" read as a space (HTML forms, most server
//     frameworks). Which reading the upstream makes is unknown, so a match
//     in any one refuses. Invalid escapes are kept as they are;
//   - every header field, Host and Cookie included: its name, and its value
//     as sent and percent-decoded both ways, as the query (cookies and other
//     values are often percent-encoded). A field sent on several lines is
//     also matched combined, as a recipient combines it (", " between the
//     values; "; " for Cookie), so a pattern split over two lines is seen.
//     obs-fold is refused by the parser: a value is always one line;
//   - the body, decoded as below.
//
// Each place is matched on its own: a match across the path and the query,
// or across two different fields, is not seen. A refusal is 403
// path-pattern, query-pattern, header-pattern or body-pattern; the log
// names the pattern (denyPatterns[1]), never the data. Whatever the
// refusal (a rule's may come first), neither the audit record (Denial) nor
// the log keeps a method, path or detail that a denyPatterns entry
// matches.
//
// When any pattern applies to bodies, the held body is matched
//
//   - with its Content-Encoding undone: gzip and x-gzip (concatenated
//     members are one body), deflate (the zlib format, as RFC 9110 defines
//     it: a raw deflate stream so labelled is refused) and identity, stacked
//     up to three deep, with the standard library. The decompressed body may
//     be at most Limits.MaxHeldBodyBytes: a zip bomb is refused with 413
//     decoded-body-over-hold-limit once it inflates past that, never
//     inflated further. Any other coding (br, zstd, compress, unknown ones,
//     alone or stacked) is refused at the head with 403 content-encoding,
//     before any body byte is read; a body that is not what its coding says
//     (corrupt, cut short, bytes after the stream's end) with 403
//     undecodable-body;
//   - in every reading its charset allows: as sent (UTF-8); as Latin-1
//     mapped to UTF-8 when declared ISO-8859-1 or US-ASCII (which WHATWG
//     decoders read as windows-1252); and as UTF-16, and with its NUL bytes
//     removed, when declared UTF-16 (utf-16, utf-16le, utf-16be), when it
//     starts with a UTF-16 byte order mark, or when it holds a NUL byte. The
//     byte order is the one a BOM or the label names (decoders honour a BOM,
//     else the label), both if they disagree or neither names one. Any
//     other charset, or Content-Type
//     parameters that mention a charset but cannot be read (repeated,
//     malformed), is refused at the head with 403 charset;
//   - each reading also with the escapes of common body formats decoded,
//     each kind on its own: percent-escapes (form bodies; "+" both ways),
//     JSON string escapes (\u0031, \/, surrogate pairs), numeric character
//     references (&#49;, &#x31;) and the five predefined XML entities.
//
// An undeclared UTF-16 body without a BOM is the sandbox's choice of
// encoding, and JSON readers detect UTF-16 and UTF-32 from where the NULs
// are; so a NUL byte makes the proxy read the body as UTF-16 in both byte
// orders, and the NUL-free copy shows ASCII text sent in UTF-16 or UTF-32
// of any byte order or alignment. UTF-16 text with no character below U+0100 (CJK, say) has
// no NUL and is recognised only by a declaration or a BOM.
//
// Decoding works on copies: the upstream receives the request exactly as
// sent. An unknown coding or charset passes untouched when no pattern
// applies. The decoded copies (the decompressed body, its widest reading,
// at most twice its size, and one escape decoding) count against
// Limits.MaxHeldTotalBytes with the held bodies while the request is
// decided. Matching costs CPU in proportion: each pattern runs over each
// reading (measured here: a 1 MiB JSON body against the SSN pattern, whose
// \b makes RE2 use its slower engine, about 17 ms; gzip adds about 2 ms;
// the same text in UTF-16 with a BOM, read three ways, about 90 ms).
//
// What patterns can see: data in the encodings HTTP declares
// (percent-encoding, content codings, charsets) and the escapes of the body
// formats above. Data an application encodes, encrypts or obfuscates
// itself (base64, hex, a compression inside the body, a second
// percent-encoding, multipart parts with their own transfer encoding,
// HTML's other named references, an undeclared charset other than UTF-16
// as above) is beyond any pattern, and so is data split across places or
// requests. Patterns stop mistakes and careless leaks; against code that
// means to leak, what bounds the channel is maxBodyBytes, the byte budgets,
// and the secure and trusted modes, where only ciphertext or data under
// trust the customer chose leaves the Clean Room.
//
// # Responses
//
// Responses are relayed verbatim: the head's bytes as received, the body in
// its own framing (Content-Length, chunked with its extensions and trailers,
// or until the upstream closes), flushed as the upstream sends it, so
// streamed responses are not delayed. Nothing is re-encoded: the sandbox
// gets exactly the upstream's bytes. A malformed response (or one whose
// framing is ambiguous) is answered 502 if nothing of it was relayed yet,
// and ends the connection otherwise. After an allowed upgrade's 101 the
// connection is relayed in both directions uninspected.
//
// # Connections
//
// Requests on a connection, pipelined or not, are read, decided and
// answered one at a time, in order; each is inspected on its own. The first
// allowed request dials Flow.Dst, and that upstream connection carries the
// connection's later requests: one upstream connection per sandbox
// connection mirrors the connection the sandbox would have had (keep-alive
// and Connection: close propagate unchanged, a stale upstream shows up as
// the same silent close the sandbox's HTTP client knows how to retry), and
// no request ever travels on a connection opened for another sandbox or
// flow.
//
// Each connection is served by one goroutine, with no handoff between
// goroutines for a request whose body (if any) arrived with its head; only
// a body still arriving is streamed by a second goroutine. On a TCP
// connection that the daemon does not wrap, the proxy waits for the
// sandbox's next request, and for the upstream's answer, without first
// reading the empty socket as a net.Conn Read does: two system calls fewer
// per request (poll.go says why nothing that arrives can be missed). A
// keep-alive request costs one read and one write on each side, made as
// raw system calls on the non-blocking sockets (internal/rawsys.Conn) so
// that the runtime does not hand the goroutine's scheduler context to
// another thread while a write delivers to a local peer. Proxy.PlainIO
// turns all of this off: every connection is then read and written
// through its net.Conn.
//
// # Refusals
//
// A refused request gets a short response with a Cleanwall-Reason header
// carrying the reason code, is reported through Proxy.OnDeny and counted.
// The connection stays open after a refusal only if the refusal says
// nothing about framing (403, 421, 417), the request's body was absent or
// fully read (a refusal after the body was held and decoded), and the
// sandbox did not ask to close; every other refusal closes it, since the bytes that follow cannot
// be trusted to start a request.
//
//	status  reasons
//	403     method, path, content-type, content-encoding, charset,
//	        undecodable-body, body-too-large, body-pattern, path-pattern,
//	        query-pattern, header-pattern, upgrade, connect (docs/policy.md: rule
//	        refusals are 403)
//	421     host-mismatch (Host or absolute-form authority is not the
//	        flow's destination: domain fronting)
//	417     expect (anything but 100-continue)
//	400     bad-request-line, bad-target, bad-path, bad-header, bare-lf,
//	        bad-host, bad-content-length, content-length-and-transfer-encoding,
//	        bad-transfer-encoding (repeated, or in HTTP/1.0), bad-chunk,
//	        trailer
//	501     transfer-encoding (anything but exactly "chunked")
//	505     http-version
//	431     header-too-large (line, or whole head), too-many-headers
//	413     body-over-hold-limit, decoded-body-over-hold-limit
//	408     timeout (head or held body too slow)                     [error]
//	503     proxy-busy (proxy-wide hold budget)                      [error]
//	502     upstream-unreachable, bad-upstream-response              [error]
//	504     upstream-timeout                                         [error]
//
// Rows marked [error] are failures rather than decisions: counted with
// decision="error" and not passed to OnDeny.
//
// # Memory and time
//
// Per connection, at most about 220 KiB plus a held body: a client reader of
// max(16 KiB, MaxLineBytes), an upstream reader of 32 KiB, two 4 KiB
// writers and two 32 KiB copy buffers (all pooled across connections), the
// current request head (MaxHeaderBytes, 32 KiB, and its string copy) and
// upstream response head (MaxResponseHeaderBytes, 64 KiB). A held body is at
// most MaxHeldBodyBytes, its buffer at most twice that while chunks arrive,
// and all held bodies of a Proxy, with their decoded copies (Deny
// patterns), at most MaxHeldTotalBytes. Timeouts:
// HeaderTimeout from a request's first byte to its last head byte,
// IdleTimeout between requests, BodyIdleTimeout for any stall of a body in
// either direction, ResponseHeaderTimeout from the request's last byte to
// the response head (these four fire between their duration and a
// sixteenth more: deadlines are moved lazily, not on every request),
// DialTimeout; at most 8 informational (1xx) responses precede a final
// one. A failure while a body streams (the sandbox stalls,
// the upstream stops reading) closes both connections: the upstream is left
// with an incomplete request, which it discards, as it would had the
// sandbox been connected directly. An upgraded connection has no idle
// timeout; it ends with either side or ctx.
//
// # Metrics
//
// cleanwall_http_requests_total{sandbox,rule,decision,reason},
// cleanwall_http_request_bytes_out_total{sandbox,rule} (request bytes
// forwarded: heads, bodies, upgraded streams), and
// cleanwall_http_request_duration_seconds{sandbox,rule,decision}. Labels
// never carry paths, hosts or payload.
package httpproxy
