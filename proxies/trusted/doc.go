// Package trusted holds the privacy proxies of trusted mode, where
// outbound data is protected by trust the customer chose: TCP serves the
// rules with trusted.tls alone, originating TLS to an endpoint the
// customer pinned; HTTP serves the rules with trusted.hpke (and tls or
// not), sealing request bodies to the customer's public key. docs/trusted.md
// is the user's description; this comment says how and why.
//
// The package owns the TLS trusted mode originates (versions, groups,
// verification, resumption, reloading the rule's files), the refusals of a
// remote and their reasons, and trusted HTTP's framing of sealed bodies.
// It does not own the sealing format (proxies/seal/hpke), the datapath or
// the daemon; it never imports runtime, bpf or attest.
//
// # TLS origination
//
// The sandbox speaks plain TCP to its destination; the proxy dials that
// address at trusted.upstreamPort (default: the sandbox's port) and runs
// TLS 1.3 with tls.serverName as SNI, offering the X25519MLKEM768 hybrid
// first. Every handshake, a resumed one included, is verified by the
// config's VerifyConnection (crypto/tls verifies full handshakes only, and
// resumed sessions only against the name): the chain against caFile for
// the server name, then the pins against the verified chain; or, with pins
// alone, the leaf's key against the pins and the leaf's validity and name.
// There is no "accept any": Configure refuses a rule without a CA or a
// pin. Sessions are cached per sandbox, rule and client certificate, so a
// session never resumes another sandbox's or another certificate's
// identity; a session whose remote fails verification is dropped.
//
// The sandbox's bytes are read only once the remote verified, so a
// refused flow sent the remote nothing but a handshake. In TLS 1.3 a
// server judges the client certificate after the client's handshake has
// ended; when the remote asked for one, the proxy waits for its verdict (a
// session ticket, data, or an alert) for up to ClientAuthWait before it
// relays.
//
// A refused flow is reported (Flow.Report.Deny) before the sandbox sees
// anything, and ends in a proxies.RefusalError, so the firewall counts it
// under its reason. The sandbox then gets a 502 with Cleanwall-Reason if
// its first bytes are an HTTP/1.x request line, else a reset.
//
// # Reloading
//
// caFile, clientCertFile and clientKeyFile are stat'ed at dial time, at
// most once per ReloadInterval each (size, times and inode), and loaded
// again when one changed: a rotated CA or client certificate is used by
// the next flow, with no daemon restart and no goroutine per rule. A
// client certificate that fails to load keeps the previous one in use; a
// caFile that fails to load refuses the rule's flows (tls-config) until it
// loads, as trust the file no longer states is no trust.
//
// # Relay
//
// Once verified, a TCP flow is relayed by open mode's forwarder
// (proxies/tcp), the remote's side through the TLS connection: each
// direction half-closes on its end (close_notify towards the remote),
// idle flows end, and a done ctx closes both.
//
// # HTTP and HPKE
//
// A rule with trusted.hpke is an HTTP rule: the proxy reads the sandbox's
// requests (net/http's reader, bounded as secure mode's HTTP proxy is,
// with the same refusals of CONNECT, Upgrade, unknown expectations,
// content codings, fields out of the grammar and a Host that does not
// name the flow's destination) and writes every head itself, so the
// remote only reads framing the proxy produced. Each request body is
// sealed to the customer's public key in the format of proxies/seal/hpke
// under Context(rule), Content-Length becoming hpke.SealedSize (chunked
// when the sandbox's was), with Cleanwall-Sealed: hpke-v1; a body that
// does not arrive whole resets the remote connection rather than ending
// the sealed body. Responses are not sealed by anyone and pass as the
// remote sent them, re-framed. Secure mode's HTTP proxy is not reused
// through a body hook: it opens response bodies, maps ranges and checks
// keys on every request, none of which trusted mode has; the two share
// the wire helpers (proxies/internal/httpwire) and the Host decision
// (httpproxy.HostAllowed). With trusted.tls as well, the remote
// connection is the TCP proxy's verified TLS.
//
// # Performance
//
// BenchmarkRatio measures, interleaved in one run over loopback, trusted
// TLS origination against open mode's HTTP proxy and TCP relay, the
// handshake with and without resumption, and X25519MLKEM768 against
// X25519 (docs/trusted.md has the numbers). On a kept-alive connection
// TLS costs about a tenth of the requests per second; a flow per request
// pays a full key exchange each time, which TLS 1.3 resumption does not
// skip (Go resumes with psk_dhe_ke: it saves the certificate and its
// signature, not the hybrid key exchange).
package trusted
