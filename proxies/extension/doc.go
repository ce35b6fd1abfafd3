// Package extension is the privacy proxy of out-of-process extensions: a
// proxies.StreamProxy that hands each TCP flow of an open rule whose
// open.protocol names the extension to a separate process, in any
// language, over a unix socket. The accepted connection's descriptor
// travels with the flow's metadata in SCM_RIGHTS; the extension owns the
// flow from then on and reports bytes, refusals and the flow's end back.
// The wire protocol is docs/extensions.md, byte for byte.
//
// What this package guarantees is that a flow is either taken by the
// extension or reset: when the extension is not running, does not answer
// in time, breaks the protocol, is over its flows limit or refuses the
// flow, the connection is reset (the sandbox sees ECONNRESET) and the
// result says why (ReasonUnavailable, or ReasonRefusedPrefix and the
// extension's reason). A flow is never forwarded another way.
//
// The reset works even while the extension holds its copy of the
// descriptor: connect(2) with AF_UNSPEC disconnects the TCP socket itself
// (tcp_disconnect sends the RST), which closing one of several descriptors
// would not do.
//
// It owns the control connection to each extension (dialled lazily,
// redialled with a bounded backoff after any failure) and nothing else:
// it never imports the daemon, the datapath or the key broker, and it
// never dials a flow's destination itself.
package extension
