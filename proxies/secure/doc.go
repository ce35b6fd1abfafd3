// Package secure holds the privacy proxies of secure mode: TCP serves the
// rules with secure.protocol tcp, HTTP those with secure.protocol http.
// Whatever they send towards a rule's destination is sealed in the format
// of proxies/seal under the rule's data key, and whatever they hand the
// sandbox from there has been opened and verified under it: a flow without
// the key is reset before anything is dialed, and nothing ever goes out in
// clear or comes in unauthenticated. docs/secure.md is the user's
// description (contexts, framing, ranges, refusals); this comment says how
// and why.
//
// The package owns the framing of flows into sealed objects, the seal
// contexts (Contexts), the refusals and their Denial reasons, and the
// upstream TLS of secure rules (secure.upstreamTLS). It does not own the
// format (proxies/seal), the keys (proxies.KeySource: the daemon's
// keyring), nor the datapath; it never imports runtime, bpf or attest.
//
// # Contexts
//
// A rule named R seals under "rule=R dir=out" and opens the remote's
// direction of a TCP flow under "rule=R dir=in"; Configure refuses a rule
// whose context the sealer would refuse. The context binds an object to
// its rule (an object sealed for another rule does not open through this
// one) and to its direction (a TCP stream reflected back carries
// "dir=out" and is refused). An opener also insists on the rule's key id
// before it asks the key source: the loop of a rule is its key id and its
// name. Every refusal is reported (Flow.Report.Deny) before the sandbox
// sees its effect, so the audit trail never lags the sandbox.
//
// # TCP
//
// Each direction of a connection is one interactive object. Outbound, each
// read from the sandbox is sealed as one segment at once (Sealer.ReadFrom
// on an interactive sealer), so request-response protocols work through
// the proxy; the sandbox's half-close seals the final segment and
// half-closes towards the remote. Inbound, the opener releases a segment
// to the sandbox only once it verified, and the final one only once the
// remote's stream ended right after it; that end is passed on as a
// half-close. Any refusal of the inbound object (not sealed, another key
// id, context or key, a changed bit, a cut, bytes after the end), any
// failure to seal, an idle timeout and a revocation (ctx) reset both
// connections (SO_LINGER 0): a FIN would let the sandbox read a cut stream
// as a complete one. A remote that answers in clear, or sends nothing at
// all before it closes, is refused the same way: an inbound object that
// never started is a truncated one.
//
// # HTTP, and why it does not reuse open mode's relay
//
// proxies/http forwards heads byte for byte as received and relays
// responses verbatim, because in open mode what the upstream reads must be
// exactly what was inspected; its strict parser exists to close the gaps
// between how the proxy and an upstream frame a message (smuggling).
// Secure mode cannot forward a head verbatim: the body it sends is another
// length (sealed) or another framing, and so is the body it returns. It
// writes every head itself, from the fields it read, with its own
// Content-Length or chunked framing, so the remote only ever reads framing
// the proxy produced; a sandbox that frames ambiguously can only confuse
// the proxy about its own requests, and whatever the proxy takes for a
// body is sealed, whatever it takes for a head goes out as a head, as any
// head does. A body-transform hook in open mode's relay would have touched
// its hardened, measured paths for none of its guarantees; so this package
// reads messages with net/http's ReadRequest and ReadResponse, bounded
// (head sizes, timeouts, at most 8 informational responses), and shares
// with open mode the one decision both must make alike: whether Host names
// the flow's destination (httpproxy.HostAllowed).
//
// What stays in clear is what HTTP needs the remote to read: the request
// line and header fields (the object's name, the store's credentials),
// the response status and fields. They are bounded (HTTPLimits), but they
// are a channel the sandbox writes: secure mode seals bodies, which is what
// a store keeps. Digest fields of the plaintext body are dropped, as they
// would let the remote confirm a guess of it.
//
// Requests: a body (Content-Length, 0 included, or chunked) is sealed as
// one object, Content-Length becoming the sealed size (seal.Layout); a body
// that does not arrive whole is never closed as an object: the remote
// connection is reset. Responses: a body that starts with the format's
// magic is opened (the header and key commitment verified before the
// response head goes out; a failure of the first segment, while nothing
// has left the proxy's buffer, is still a clean 502); a body that does not
// is withheld, its status kept (Cleanwall-Reason: unsealed-body); a
// failure after part of a body went out resets the connection. The last
// byte of a body framed by Content-Length is held until the object
// verified to its end (holdLast says why). Ranges: httprange.go.
//
// # Performance
//
// Sealing costs little next to what any proxy that reads the bytes costs.
// BenchmarkRatio measures, over loopback, secure TCP against open-mode TCP
// as deployed (proxies/tcp, which splices bulk transfers and never copies
// them through user space) and against open mode copying (its PlainIO):
// docs/secure.md has the numbers. The gap to the splicing proxy is the
// two copies through user space that sealing needs and splice avoids;
// secure costs about what the copying proxy does per byte. Pipelining a
// direction over two goroutines (read-ahead, write-behind) and raw system
// calls (internal/rawsys) were measured and made no difference here, so
// each direction is one goroutine over the net.Conn.
package secure
