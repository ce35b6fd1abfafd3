package hpke

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"
)

// tamperChunk is small so that bodies have many chunks and every byte of
// them can be flipped.
const tamperChunk = MinChunkSize

// body is a sealed body cut into its parts.
type body struct {
	pt     []byte
	sealed []byte
	prefix []byte
	frames [][]byte
}

func newBody(t testing.TB, pub *PublicKey, context string, pt []byte) body {
	t.Helper()
	sealed, err := sealChunks(pt, pub, context, tamperChunk)
	if err != nil {
		t.Fatal(err)
	}
	return cut(t, sealed, pt)
}

func cut(t testing.TB, sealed, pt []byte) body {
	p, n, err := ParsePrefix(sealed)
	if err != nil {
		t.Fatal(err)
	}
	b := body{pt: pt, sealed: sealed, prefix: sealed[:n]}
	full := p.ChunkSize + FrameOverhead
	for off := n; off < len(sealed); off += full {
		b.frames = append(b.frames, sealed[off:min(off+full, len(sealed))])
	}
	return b
}

func join(prefix []byte, frames ...[]byte) []byte {
	return slices.Concat(append([][]byte{prefix}, frames...)...)
}

// with returns a copy of b with change applied.
func with(b []byte, change func([]byte)) []byte {
	c := slices.Clone(b)
	change(c)
	return c
}

// refusal is what a tampered body must produce.
type refusal struct {
	kind  error
	chunk int64 // -1: the prefix
	found int64 // ErrOutOfOrder only
	// released is how many plaintext bytes the opener may have returned
	// before the error: the chunks before the one it refused.
	released int
}

// checkRefusal opens sealed and checks the opener refused it as want,
// after releasing exactly the verified chunks before the refusal.
func checkRefusal(t *testing.T, sealed, pt []byte, priv *PrivateKey, context string, want refusal) *Error {
	t.Helper()
	out, err := openAll(sealed, priv, context)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("opened without an hpke error: %v (released %d bytes)", err, len(out))
	}
	if !errors.Is(err, want.kind) {
		t.Fatalf("error %v, want %v", err, want.kind)
	}
	if e.Chunk != want.chunk || (want.kind == ErrOutOfOrder && e.Found != want.found) {
		t.Fatalf("error %v: at chunk %d (found %d), want chunk %d (found %d)", err, e.Chunk, e.Found, want.chunk, want.found)
	}
	if len(out) != want.released || !bytes.Equal(out, pt[:len(out)]) {
		t.Fatalf("released %d bytes before the error (a verified prefix: %v), want the %d bytes of the chunks before it",
			len(out), bytes.Equal(out, pt[:min(len(out), len(pt))]), want.released)
	}
	// The one-shot Open releases nothing at all.
	if got, err := Open(sealed, priv, context); err == nil || got != nil {
		t.Fatalf("Open: %d bytes, %v", len(got), err)
	}
	return e
}

// Offsets of the prefix fields (docs/sealing.md, "Prefix").
const (
	offVersion = 4
	offKEM     = 5
	offKDF     = 7
	offAEAD    = 9
	offChunk   = 11
	offKeyID   = 15
	offContext = 23
	offEnc     = boundPrefixSize
)

// TestTamper: each way of changing a sealed body, or opening it with the
// wrong key, context or suite, is refused with its own error, at the
// place it happened, and the opener has released nothing but the
// verified chunks before that place.
func TestTamper(t *testing.T) {
	for _, suite := range allSuites {
		t.Run(suite.String(), func(t *testing.T) { testTamper(t, suite) })
	}
}

func testTamper(t *testing.T, suite Suite) {
	const S = tamperChunk
	priv, pub := testKey(suite), testPub(suite)
	a := newBody(t, pub, testContext, pattern(4*S+20)) // 5 chunks, the last short
	b := newBody(t, pub, testContext, pattern(4*S+20)) // same key, context and plaintext; another encapsulation
	f := a.frames
	encEnd := offEnc + len(mustPrefix(t, a.sealed).Enc)
	other := otherKey(suite)
	otherSuite := SuiteX25519
	if suite == SuiteX25519 {
		otherSuite = SuiteXWing
	}
	setU16 := func(off int, v uint16) func([]byte) {
		return func(b []byte) { binary.BigEndian.PutUint16(b[off:], v) }
	}
	flip := func(off int) func([]byte) { return func(b []byte) { b[off] ^= 0x01 } }
	frameOff := func(i int) int { return len(a.prefix) + i*(S+FrameOverhead) }
	// A frame header rewritten: its index, final flag and length.
	reframe := func(i int, index uint32, final bool, n int) func([]byte) {
		return func(b []byte) { putFrameHeader(b[frameOff(i):], index, final, n) }
	}

	cases := []struct {
		name    string
		sealed  []byte
		priv    *PrivateKey
		context string
		want    refusal
	}{
		// Chunks dropped, moved, repeated.
		{"dropped chunk", join(a.prefix, f[0], f[2], f[3], f[4]), nil, "",
			refusal{kind: ErrOutOfOrder, chunk: 1, found: 2, released: S}},
		{"reordered chunks", join(a.prefix, f[0], f[1], f[3], f[2], f[4]), nil, "",
			refusal{kind: ErrOutOfOrder, chunk: 2, found: 3, released: 2 * S}},
		{"repeated chunk", join(a.prefix, f[0], f[1], f[1], f[2], f[3], f[4]), nil, "",
			refusal{kind: ErrOutOfOrder, chunk: 2, found: 1, released: 2 * S}},
		{"final chunk moved up", join(a.prefix, f[0], f[4]), nil, "",
			refusal{kind: ErrOutOfOrder, chunk: 1, found: 4, released: S}},
		// Cuts.
		{"truncated at a chunk boundary", join(a.prefix, f[0], f[1], f[2]), nil, "",
			refusal{kind: ErrTruncated, chunk: 3, released: 3 * S}},
		{"truncated after the prefix", a.prefix, nil, "",
			refusal{kind: ErrTruncated, chunk: 0}},
		{"truncated inside a chunk", join(a.prefix, f[0], f[1], f[2][:40]), nil, "",
			refusal{kind: ErrTruncated, chunk: 2, released: 2 * S}},
		{"truncated inside a frame header", join(a.prefix, f[0], f[1][:5]), nil, "",
			refusal{kind: ErrTruncated, chunk: 1, released: S}},
		{"truncated inside the final chunk", a.sealed[:len(a.sealed)-1], nil, "",
			refusal{kind: ErrTruncated, chunk: 4, released: 4 * S}},
		{"truncated inside the magic", a.sealed[:2], nil, "", refusal{kind: ErrTruncated, chunk: -1}},
		{"truncated inside the bound prefix", a.sealed[:30], nil, "", refusal{kind: ErrTruncated, chunk: -1}},
		{"truncated inside the encapsulated key", a.sealed[:offEnc+10], nil, "", refusal{kind: ErrTruncated, chunk: -1}},
		{"truncated inside the commitment", a.prefix[:len(a.prefix)-1], nil, "", refusal{kind: ErrTruncated, chunk: -1}},
		{"empty input", nil, nil, "", refusal{kind: ErrTruncated, chunk: -1}},
		// Extensions.
		{"one byte appended", append(slices.Clip(a.sealed), 0), nil, "",
			refusal{kind: ErrTrailingData, chunk: 4, released: 4 * S}},
		{"chunk appended", join(a.prefix, f[0], f[1], f[2], f[3], f[4], f[4]), nil, "",
			refusal{kind: ErrTrailingData, chunk: 4, released: 4 * S}},
		{"another body appended", slices.Concat(a.sealed, b.sealed), nil, "",
			refusal{kind: ErrTrailingData, chunk: 4, released: 4 * S}},
		// Splices of two bodies.
		{"spliced: another body's chunks under this prefix", join(a.prefix, b.frames...), nil, "",
			refusal{kind: ErrAuth, chunk: 0}},
		{"spliced: another body's tail", join(a.prefix, f[0], f[1], b.frames[2], b.frames[3], b.frames[4]), nil, "",
			refusal{kind: ErrAuth, chunk: 2, released: 2 * S}},
		{"spliced: another body's final chunk", join(a.prefix, f[0], f[1], f[2], f[3], b.frames[4]), nil, "",
			refusal{kind: ErrAuth, chunk: 4, released: 4 * S}},
		{"spliced: this body's chunks under another's prefix", join(b.prefix, f...), nil, "",
			refusal{kind: ErrAuth, chunk: 0}},
		// Frame headers.
		{"final flag cleared", with(a.sealed, reframe(4, 4, false, 20)), nil, "",
			refusal{kind: ErrAuth, chunk: 4, released: 4 * S}},
		{"final flag set on a full chunk", with(a.sealed, reframe(1, 1, true, S)), nil, "",
			refusal{kind: ErrAuth, chunk: 1, released: S}},
		{"final chunk made empty", with(a.sealed[:frameOff(4)+frameHeaderSize+tagSize], reframe(4, 4, true, 0)), nil, "",
			refusal{kind: ErrAuth, chunk: 4, released: 4 * S}},
		{"index changed", with(a.sealed, reframe(2, 3, false, S)), nil, "",
			refusal{kind: ErrAuth, chunk: 2, released: 2 * S}},
		{"length over a chunk", with(a.sealed, reframe(0, 0, false, S+1)), nil, "",
			refusal{kind: ErrAuth, chunk: 0}},
		{"ciphertext bit flipped", with(a.sealed, flip(frameOff(1)+frameHeaderSize+5)), nil, "",
			refusal{kind: ErrAuth, chunk: 1, released: S}},
		{"tag bit flipped", with(a.sealed, flip(frameOff(3)-1)), nil, "",
			refusal{kind: ErrAuth, chunk: 2, released: 2 * S}},
		// The prefix.
		{"not sealed", []byte("GET / HTTP/1.1\r\n"), nil, "", refusal{kind: ErrNotSealed, chunk: -1}},
		{"magic changed", with(a.sealed, flip(0)), nil, "", refusal{kind: ErrNotSealed, chunk: -1}},
		{"version 2", with(a.sealed, func(b []byte) { b[offVersion] = 2 }), nil, "", refusal{kind: ErrVersion, chunk: -1}},
		{"unknown KEM", with(a.sealed, setU16(offKEM, 0x0010)), nil, "", refusal{kind: ErrSuite, chunk: -1}},
		{"KDF changed", with(a.sealed, setU16(offKDF, 0x0003)), nil, "", refusal{kind: ErrSuite, chunk: -1}},
		{"AEAD changed to ChaCha20-Poly1305", with(a.sealed, setU16(offAEAD, 0x0003)), nil, "", refusal{kind: ErrSuite, chunk: -1}},
		{"chunk size out of range", with(a.sealed, func(b []byte) { binary.BigEndian.PutUint32(b[offChunk:], 16) }), nil, "",
			refusal{kind: ErrPrefix, chunk: -1}},
		{"chunk size changed", with(a.sealed, func(b []byte) { binary.BigEndian.PutUint32(b[offChunk:], 2*S) }), nil, "",
			refusal{kind: ErrCommitment, chunk: -1}},
		{"key id changed", with(a.sealed, flip(offKeyID)), nil, "", refusal{kind: ErrWrongKey, chunk: -1}},
		{"context digest changed, opened under any context", with(a.sealed, flip(offContext)), nil, anyContext,
			refusal{kind: ErrCommitment, chunk: -1}},
		{"encapsulated key: first byte flipped", with(a.sealed, flip(offEnc)), nil, "", refusal{kind: ErrCommitment, chunk: -1}},
		{"encapsulated key: last byte flipped", with(a.sealed, flip(encEnd-2)), nil, "", refusal{kind: ErrCommitment, chunk: -1}},
		{"commitment changed", with(a.sealed, flip(len(a.prefix)-1)), nil, "", refusal{kind: ErrCommitment, chunk: -1}},
		// Wrong key, context, suite.
		{"wrong key", a.sealed, other, "", refusal{kind: ErrWrongKey, chunk: -1}},
		{"wrong key, its id forged into the prefix", with(a.sealed, func(b []byte) { copy(b[offKeyID:], other.pub.id[:]) }), other, "",
			refusal{kind: ErrCommitment, chunk: -1}},
		{"wrong context", a.sealed, nil, "rule=partner-crm dir=in", refusal{kind: ErrContext, chunk: -1}},
		{"empty context expected", a.sealed, nil, "\x00empty", refusal{kind: ErrContext, chunk: -1}},
		{"wrong suite: the other suite's key", a.sealed, testKey(otherSuite), "", refusal{kind: ErrSuite, chunk: -1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := priv
			if tc.priv != nil {
				p = tc.priv
			}
			ctx := testContext
			switch tc.context {
			case "":
			case "\x00empty":
				ctx = ""
			default:
				ctx = tc.context
			}
			if tc.context == anyContext {
				out, err := io.ReadAll(NewOpenerAnyContext(bytes.NewReader(tc.sealed), p))
				if !errors.Is(err, tc.want.kind) || len(out) != 0 {
					t.Fatalf("any context: %d bytes, %v; want %v", len(out), err, tc.want.kind)
				}
				return
			}
			checkRefusal(t, tc.sealed, a.pt, p, ctx, tc.want)
		})
	}
	// The untampered body opens: the cases above fail for their change.
	if got, err := Open(a.sealed, priv, testContext); err != nil || !bytes.Equal(got, a.pt) {
		t.Fatalf("the untampered body: %d bytes, %v", len(got), err)
	}
}

const anyContext = "\x00any"

func mustPrefix(t testing.TB, sealed []byte) Prefix {
	p, _, err := ParsePrefix(sealed)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestEveryBitFlip: a bit flipped in any byte of a body, prefix or chunk,
// is refused, and nothing but the chunks before the flipped one is
// released.
func TestEveryBitFlip(t *testing.T) {
	for _, suite := range allSuites {
		t.Run(suite.String(), func(t *testing.T) {
			priv := testKey(suite)
			a := newBody(t, priv.Public(), testContext, pattern(3*tamperChunk+7))
			for off := range a.sealed {
				sealed := with(a.sealed, func(b []byte) { b[off] ^= 1 << (off % 8) })
				out, err := openAll(sealed, priv, testContext)
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("byte %d flipped: %v (released %d bytes)", off, err, len(out))
				}
				before := 0
				if off >= len(a.prefix) {
					before = (off - len(a.prefix)) / (tamperChunk + FrameOverhead) * tamperChunk
				}
				if len(out) > before || !bytes.Equal(out, a.pt[:len(out)]) {
					t.Fatalf("byte %d flipped: released %d bytes (%v), at most the %d before it", off, len(out), err, before)
				}
			}
		})
	}
}

// TestErrorText: a refusal says where and what in words a user can act on.
func TestErrorText(t *testing.T) {
	a := newBody(t, testPub(SuiteX25519), testContext, pattern(3*tamperChunk))
	for _, tc := range []struct {
		sealed []byte
		priv   *PrivateKey
		want   string
	}{
		{join(a.prefix, a.frames[0], a.frames[2]), testKey(SuiteX25519),
			"hpke: chunk 1 (byte 207): chunk out of order: found chunk 2: a chunk is missing here (dropped, or moved later)"},
		{a.sealed, otherKey(SuiteX25519), fmt.Sprintf("hpke: prefix: sealed to another key: sealed to key %s, this private key is %s",
			testPub(SuiteX25519).ID(), otherKey(SuiteX25519).pub.ID())},
		{a.sealed, testKey(SuiteXWing), "hpke: prefix: unsupported or mismatched HPKE suite: sealed to a x25519 key, this private key is xwing"},
	} {
		_, err := Open(tc.sealed, tc.priv, testContext)
		if err == nil || err.Error() != tc.want {
			t.Errorf("error %q\nwant       %q", err, tc.want)
		}
	}
}
