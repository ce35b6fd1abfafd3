// Package secure holds the privacy proxies of secure mode: TCP serves the
// rules with secure.protocol tcp, HTTP those with secure.protocol http.
// Whatever they send towards a rule's destination is sealed in the format
// of proxies/seal under the rule's data key, and whatever they hand the
// sandbox from there has been opened and verified under it: a flow without
// the key is reset before anything is dialed, and nothing ever goes out in
// clear or comes in unauthenticated. docs/sealing.md ("Secure mode
// proxies") is the user's description; this comment says how and why.
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
// its rule (an object sealed for another rule, or by another rule of the
// same key, does not open through this one) and to its direction (a TCP
// stream reflected back carries "dir=out" and is refused). An opener also
// insists on the rule's key id before it asks the key source: the loop of
// a rule is its key id and its name.
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
// as a complete one. The remote that answers in clear, or sends nothing
// at all before it closes, is refused the same way: an inbound object
// that never started is a truncated one.
//
// Performance: sealing costs little next to what any proxy that reads the
// bytes costs. BenchmarkRatio measures, over loopback, secure TCP against
// open-mode TCP as deployed (proxies/tcp, which splices bulk transfers
// and never copies them through user space) and against open mode
// copying (its PlainIO): on our 2-core machines secure moves about 0.4x
// the bytes per second of the splicing proxy and 0.7x those of the
// copying one, at about the copying proxy's CPU per byte. The gap to the
// splicing proxy is the two copies through user space that sealing needs
// and splice avoids; docs/sealing.md has the numbers.
package secure
