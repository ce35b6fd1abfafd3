// Package policy owns the user-facing egress policy language (docs/policy.md):
// types, strict YAML parsing, validation with field paths in errors, and
// compilation into datapath entries and proxy rules. It is pure: it must not
// touch the kernel, the network or any file but the policy it is asked to
// load (Parse does not even check that caFile and the like exist: the daemon
// does when it loads a policy).
//
// # Using it
//
// Parse (or LoadFile) reads a document and returns it validated and
// normalised, or an ErrorList naming every problem by field path and line:
//
//	spec.egress[1].ports[0].port: 70000 is not a port (1-65535) (line 31)
//
// Compile turns a policy into Rules (ids 1..n in file order), datapath
// Entries for cidr destinations, the compiled DNS allow list, and Warnings.
// Compiled.Match answers "which rule does this flow go to" exactly as the
// datapath's LPM trie keyed by (proto, port, prefix) does. When the DNS
// proxy learns an address for a name, Compiled.EntriesForName gives the
// datapath entries it opens. Policy.Hash identifies a policy's meaning.
//
// # Decisions where docs/policy.md is silent
//
// Parsing:
//   - Unknown fields, duplicate keys, wrong types, merge keys (<<), an
//     empty document and more than one document are errors. YAML anchors
//     and aliases are allowed; the work of expanding them is bounded.
//   - null is the same as an absent field. A field written with an empty
//     string (caFile: "") is an error rather than silently absent.
//   - Strings must be YAML strings: name: 123 is an error (quote it), and
//     port: "443" is an error too.
//
// Normal form (what Parse returns, what Hash digests): fqdn, dns.allow and
// serverName lowercase without a trailing dot; cidr in canonical notation;
// dns.upstream as ip:port; ports[].protocol filled in (TCP); a rule with
// mode open and no open block gets open.protocol tcp; open.http.maxBodyBytes
// filled in (DefaultMaxBodyBytes, 1 MiB); contentTypes lowercase;
// dns.queryTypes filled in (A, AAAA, CNAME).
//
// Destinations and ports:
//   - Names (fqdn, dns.allow, serverName) are LDH labels, plus '_' (service
//     names); labels at most 63 octets, names at most 253; the last label
//     is not all digits, and an IP address is never a name.
//   - A cidr must be canonical (host bits set is an error that shows the
//     masked prefix). IPv4-mapped IPv6 prefixes and zones are refused. IPv4
//     and IPv6 are separate: an IPv4-mapped IPv6 destination address only
//     matches IPv6 prefixes (and so, since mapped prefixes are refused,
//     nothing).
//   - An fqdn destination that spec.dns.allow does not cover (or with no
//     spec.dns at all) is a warning, not an error: its addresses can never
//     be learnt, so the rule is unreachable for it, which is fail-closed.
//     docs/policy.md's own example has one (partner.example.test), and the
//     example must load as written.
//   - UDP is possible only with mode open and open.protocol tcp (no
//     application parser: L4 rules and budgets). HTTP, TLS, HPKE and the
//     sealed streams of mode secure run over TCP.
//   - Port 53 in a rule is a warning: every DNS flow goes to the DNS proxy.
//
// Modes:
//   - mode is required on every rule; a mode's block (open, trusted,
//     secure) is only allowed on a rule of that mode.
//   - open.protocol tcp means "no application parser". open.tcp is allowed
//     with either protocol (docs/policy.md's example sets it on an http rule):
//     maxBytesOut is a budget per connection, HTTP included; absent means
//     no budget, present must be > 0.
//   - open.http: every rule needs at least one method and one path;
//     contentTypes absent means any content type, and an empty list is an
//     error. maxBodyBytes absent means 1 MiB, 0 means no request body is
//     allowed. Methods are uppercase, among GET HEAD POST PUT PATCH DELETE
//     OPTIONS; CONNECT (an uninspectable tunnel) and TRACE (echoes headers)
//     are refused. Paths start with "/", "*" is exactly one segment, "**"
//     only the last; no query, fragment, dot segments or empty segments.
//     Content types are type/subtype without parameters or wildcards. An
//     empty deny pattern is an error (it would match every body), and so is
//     a denyPatterns entry that matches the empty string ("x*"): it would
//     match every path, query and field value. denyPatterns (the whole
//     request) and denyBodyPatterns (the body) may be used together.
//   - trusted has no protocol field: hpke means the flow is HTTP (the proxy
//     parses the sandbox's requests and seals their bodies), with or
//     without tls. trusted.tls needs serverName (the SNI and the name the
//     certificate must carry) and caFile and/or spkiSHA256.
//   - secure.protocol is required (http or tcp): the two framings are not
//     interchangeable and guessing wrong breaks the upstream. It can become
//     optional later without breaking a policy; a default could not be
//     changed. secure.upstreamTLS has the fields of trusted.tls, all
//     optional ({} is valid, as in docs/policy.md): serverName defaults to the
//     fqdn the flow matched (the IP for a cidr destination), and with
//     neither caFile nor spkiSHA256 the proxy's system roots verify.
//   - spkiSHA256 entries should be standard base64 of a 32-byte digest. A
//     malformed one is a warning, not an error, because docs/policy.md's example
//     carries a placeholder there; it can never match, and TLSSpec.Pins
//     returns an error that makes the proxy refuse the rule's connections,
//     so a typo fails closed.
//   - keyID is 1-128 of [A-Za-z0-9._-]; file paths are not checked here.
//
// DNS: upstream is ip:port or a bare ip (port 53), never a name; allow
// entries are names or "*." + name, where "*.a.b" matches x.a.b and
// y.x.a.b but not a.b; queryTypes are names from A NS CNAME SOA PTR MX TXT
// AAAA SRV SVCB HTTPS CAA, and an explicitly empty list is an error.
//
// Compilation: the first rule in file order owns a (prefix, proto, port)
// that several rules name, and the same holds for (fqdn, proto, port).
// Warnings cover shadowed rules (every key owned by earlier rules), partial
// overlaps, later rules whose more specific prefixes take traffic from an
// earlier broader rule, duplicate destinations and allow entries, names
// that can never be learnt, port 53 and malformed pins.
//
// Hash is the SHA-256 of the canonical JSON encoding of the normal form:
// formatting, comments, key order, name case and spelt-out defaults do not
// change it.
package policy
