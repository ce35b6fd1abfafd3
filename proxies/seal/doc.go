// Package seal is secure mode's sealing format: a streaming AEAD that cuts a
// byte stream into fixed segments, each sealed with AES-256-GCM under a key
// derived for that object alone, so that whatever leaves a Clean Room is
// ciphertext that only holders of the data key can open, and any change to
// it (a flipped bit, a dropped, reordered or appended segment, a cut at any
// point, segments spliced in from another object, a different key) is
// refused before a byte of it is released.
//
// The format is specified byte for byte in docs/sealing.md; the test
// vectors in testdata/ pin it. A Sealer is an io.WriteCloser over the
// upstream writer (an Interactive one also Flushes short segments, for
// request-response streams), an Opener an io.Reader over a sealed stream
// that returns only verified bytes; each holds one segment in memory.
// Layout maps plaintext sizes and byte ranges to sealed ones
// (Content-Length, HTTP range requests; WithRange opens a range).
//
// The package owns the format and nothing else: it does not fetch keys
// (callers pass the data key, or a KeyFunc that the opener asks with the key
// id and version it found in the header), does not know proxies, rules or
// flows, and imports only the standard library.
package seal
