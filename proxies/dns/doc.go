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
// It owns no sockets of its own: the daemon (proxies/tproxy) reads queries off
// the transparent sockets, identifies the sandbox, and calls [Proxy.Handle]
// for a datagram or [Proxy.ServeTCP] for a connection. It does not know the
// policy language (the daemon translates spec.dns into a [Config]) and it
// never imports bpf or attest: learnt addresses leave through the
// [Proxy.OnLearn] hook.
//
// # Answers
//
// Every query that the proxy answers without forwarding gets one of these
// response codes (the question is echoed byte for byte):
//
//   - dropped, nothing sent: fewer than 12 bytes (no header to answer), or the
//     QR bit set (a response sent as a query: answering it could start a
//     loop between two responders).
//   - FORMERR: the message is malformed. QDCOUNT != 1 (RFC 9619), a non-empty
//     answer or authority section, a question name with a compression pointer,
//     a label type other than a plain label (a "label" over 63 bytes), a name
//     over 253 characters (255 bytes on the wire), a truncated question, an
//     unparseable or non-OPT record in the additional section, more than one
//     OPT record or an OPT record not owned by the root (RFC 6891 6.1.1), and
//     trailing bytes after the last record.
//   - NOTIMP: an opcode other than QUERY (RFC 1035 4.1.1: "the kind of query"
//     is not supported).
//   - BADVERS (extended rcode 16, with an OPT record): an EDNS version other
//     than 0; RFC 6891 6.1.3 requires exactly this so that clients fall back
//     to version 0.
//   - REFUSED: a class other than IN; a meta query type (ANY, AXFR, IXFR, OPT,
//     TSIG, TKEY, MAILA, MAILB, type 0), which no Config can allow; a query
//     type that the sandbox's Config does not list; a query over the sandbox's
//     rate limit; and an upstream that could not be reached is SERVFAIL.
//   - Proxy.DenyRcode (REFUSED by default, or NXDOMAIN): a name that the
//     sandbox's allow list does not match, a name with a byte outside letters,
//     digits, '-' and '_', and every query of a sandbox without a Config.
//     A query type that is not allowed for an allowed name is REFUSED even
//     when DenyRcode is NXDOMAIN: NXDOMAIN says the name has no records of any
//     type, and a client that caches it (RFC 8020) would lose the allowed
//     types too.
//
// An oversized EDNS UDP size is not an error: it is clamped to
// [Limits.MaxUDPSize]. EDNS options that a client sends (client subnet,
// cookies, padding, anything) are never forwarded.
package dnsproxy
