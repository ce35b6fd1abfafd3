// Package hpke is trusted mode's body sealing: a request body streamed out
// of a Clean Room is sealed to a public key whose private half the
// customer holds, with RFC 9180 HPKE (the standard library's crypto/hpke),
// in chunks that a recipient opens and verifies one by one. Whoever holds
// only the public key (the Clean Room, its proxy, the store in between)
// can seal but never open.
//
// The format is specified byte for byte in docs/sealing.md ("Trusted mode:
// HPKE"), with the key files; the test vectors in testdata/ pin it. A body
// is a prefix (magic, version, the HPKE suite, the chunk size, the
// recipient key's id, the digest of the sealer's context, the encapsulated
// key and a key commitment) followed by chunks framed as secure mode's
// segments (proxies/seal): index, final flag and length authenticated as
// AEAD associated data, the nonce derived from the index. The chunk key
// and nonce are exported from the HPKE context rather than taken from its
// own Seal, so that chunks are sealed in place without an allocation each
// and an opener can tell a moved chunk from a changed one; the doc says
// what that changes against chunked Oblivious HTTP.
//
// A Sealer (NewSealer) is an io.WriteCloser holding one chunk; SealedSize
// gives the body's size for Content-Length before sealing. An Opener
// (NewOpener) is an io.Reader that returns only verified bytes, and io.EOF
// only after the final chunk ended the input.
//
// The package owns the format and the key files, nothing else: it does not
// know proxies, rules or flows (the caller chooses the context), never
// reads files (callers pass the key files' bytes), and imports only the
// standard library.
package hpke
