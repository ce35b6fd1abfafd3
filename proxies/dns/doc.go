// Package dnsproxy is cleanwall's governed DNS channel: the library behind the
// DNS proxy that every UDP/TCP port-53 flow of a sandbox is redirected to,
// whatever resolver the sandbox asked.
//
// It owns the per-sandbox DNS decision (allow list, query types, hardening of
// the query, rate limit), the forwarding of allowed queries to the sandbox's
// upstream resolver, the sanitising of the upstream answer, a TTL-respecting
// answer cache, and the reporting of learnt addresses for the names that fqdn
// egress rules use. A name that the policy does not allow is answered and is
// never forwarded: the only bytes of a sandbox's query that ever reach an
// upstream are a lower-cased allowed name and an allowed query type, in a
// query that the proxy builds itself.
//
// It owns no sockets of its own: the daemon reads queries off
// the transparent sockets, identifies the sandbox, and calls [Proxy.Handle]
// for a datagram or [Proxy.ServeTCP] for a connection. It does not know the
// policy language (the daemon translates spec.dns into a [Config]) and it
// never imports bpf or attest: learnt addresses leave through the
// [Proxy.OnLearn] hook.
//
// # Answers
//
// A message is judged in this order; the first rule that applies answers it.
// Every answer that the proxy gives without forwarding echoes the header ID,
// and the question byte for byte when it could be read; none of these
// messages reaches the upstream.
//
//  1. Dropped, nothing sent: fewer than 12 bytes (no header to answer), or
//     the QR bit set (a response sent as a query: answering it could start a
//     loop between two responders).
//  2. REFUSED, decision rate_limited: the sandbox's token bucket is empty.
//     Every message with a header costs a token, malformed ones included, so
//     no kind of message escapes the limit. Sandboxes without a Config share
//     one bucket. The answer is REFUSED rather than silence so that clients
//     fail fast instead of retrying; it goes back to the sandbox only, is no
//     larger than the query's header and question, and so amplifies nothing.
//  3. FORMERR: QDCOUNT != 1 (RFC 9619); a question name with a compression
//     pointer (nothing precedes the question that a pointer could name), a
//     label type other than a plain label (a "label" over 63 bytes), a name
//     over 253 characters (255 bytes on the wire); a truncated question.
//  4. NOTIMP: an opcode other than QUERY (RFC 1035 4.1.1: the kind of query
//     is not supported). Judged before the sections, whose meaning differs
//     for UPDATE and NOTIFY.
//  5. FORMERR: a non-empty answer or authority section; an unparseable or
//     non-OPT record in the additional section; more than one OPT record or
//     one not owned by the root (RFC 6891 6.1.1); bytes after the last record
//     (miekg's Msg.Unpack would forgive lying counts and trailing bytes, both
//     places to hide data, so the proxy walks the message itself).
//  6. BADVERS (extended rcode 16, with an OPT record): an EDNS version other
//     than 0, as RFC 6891 6.1.3 requires, so that clients fall back to 0.
//  7. Proxy.DenyRcode (REFUSED by default, or NXDOMAIN): the sandbox has no
//     Config; the name has a byte outside letters, digits, '-' and '_'
//     (nothing the allow list names, and the raw material of tunnels); the
//     name matches no Allow entry.
//  8. REFUSED: a class other than IN; a meta query type (ANY, AXFR, IXFR,
//     OPT, TSIG, TKEY, MAILA, MAILB, type 0), which no Config can allow; a
//     type that the Config does not list. These are REFUSED even when
//     DenyRcode is NXDOMAIN: NXDOMAIN says the name has no records of any
//     type, and a client that caches it (RFC 8020) would lose the allowed
//     types of an allowed name too.
//  9. Otherwise the query is answered from the cache or forwarded. An
//     upstream that fails, times out, answers with an rcode other than
//     NOERROR or NXDOMAIN, or answers a different ID or question, gives
//     SERVFAIL (decision upstream_error); nothing of such a response reaches
//     the sandbox or the cache.
//
// Rules 1, 3, 5 and 6 count as decision malformed, 4, 7 and 8 as refused.
// Each of rules 1-8 is reported to Proxy.OnDeny with its Reason.
//
// An oversized EDNS UDP size is not an error: it is clamped to
// [Limits.MaxUDPSize] (1232 by default), and a response that does not fit
// the client's size (512 bytes without EDNS) is truncated with TC set. EDNS
// options that a client sends (client subnet, cookies, padding, anything),
// its flags (CD, AD, DO) and the case of its name (a 0x20 channel) are never
// forwarded: the proxy builds the upstream query itself.
//
// # Upstream sockets
//
// Allowed queries go to the upstream over UDP from a pool of connected
// sockets, one pool per upstream address, rather than from a socket per
// query (whose socket, connect, poller registration and close cost a fifth
// of the proxy's CPU on the cache-miss path). What a socket per query gave
// is kept:
//
//   - Every query carries a fresh ID from crypto/rand and is matched
//     strictly: the first datagram with its ID must be a response to it
//     (QR, opcode QUERY, its one question: name in any case, type, class
//     IN); datagrams with another ID are ignored, as a resolver ignores
//     them. The socket is connected, so the kernel drops datagrams from any
//     other address or port.
//   - A socket carries one query at a time: answers cannot cross between
//     queries, or between sandboxes.
//   - A socket whose exchange did not end in a matching answer (timeout,
//     mismatch, unreadable response, error) is closed, never reused: a
//     late answer to a query that was given up reaches a closed port.
//   - Source ports rotate: a socket is closed after
//     Limits.UpstreamSocketUses exchanges (100) or Limits.UpstreamSocketMaxAge
//     (5s), whichever comes first, and its successor gets a new random
//     ephemeral port from the kernel. An off-path attacker who learnt a
//     port (side channels take seconds) has at most that long to use it,
//     and must still guess the 16-bit ID of a query in flight. Set
//     UpstreamSocketUses to 1 for a socket per query.
//
// At most 64 idle sockets are kept per upstream; a burst opens as many as it
// has queries in flight and closes the rest as they come back. The query
// sent is the one the proxy builds itself (see Answers); the response is
// read by the proxy, which unpacks only the records it keeps (checked
// against miekg's reading by FuzzReadAnswer). Retries over TCP, after a
// truncated answer, use a new connection each.
//
// # Cache
//
// Upstream answers are cached by upstream address, lower-cased name and
// query type, for the smallest TTL of their records (a negative answer for
// its SOA's negative TTL, RFC 2308), at most Limits.CacheMaxTTL, in an LRU of
// Limits.CacheEntries. An entry holds the upstream's answer, not a sandbox's
// view of it: every hit is filtered again through the asking sandbox's allow
// list, with TTLs aged by the time spent in the cache. Sandboxes that share
// an upstream therefore share entries, which a sandbox can observe (an
// answer that comes fast, or with a TTL already aged, was asked for
// recently); set CacheEntries negative where sandboxes must not learn about
// each other's lookups.
package dnsproxy
