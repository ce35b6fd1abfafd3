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
package trusted
