package seal

import (
	"bytes"
	"crypto/aes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"testing"
)

// AES-GCM is not key-committing: knowing two keys, one can compute a
// ciphertext and tag that authenticate under both (the tag is linear in
// the ciphertext blocks over GF(2^128)). TestCommitment builds such a
// segment for two data keys and shows that the segment itself opens under
// both, and that the header's commitment is what makes the object open
// under one only.

// gf is an element of GCM's GF(2^128), bytes 0-7 in hi (NIST SP 800-38D
// bit order: the first bit of byte 0 is the coefficient of x^0).
type gf struct{ hi, lo uint64 }

var gfOne = gf{hi: 1 << 63}

func gfFrom(b []byte) gf {
	return gf{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:16])}
}

func (x gf) bytes() []byte {
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, x.hi), x.lo)
}

func (x gf) add(y gf) gf { return gf{x.hi ^ y.hi, x.lo ^ y.lo} }

// mul is SP 800-38D's Algorithm 1.
func (x gf) mul(y gf) gf {
	var z gf
	v := y
	for i := range 128 {
		var bit uint64
		if i < 64 {
			bit = x.hi >> (63 - i) & 1
		} else {
			bit = x.lo >> (127 - i) & 1
		}
		if bit == 1 {
			z = z.add(v)
		}
		lsb := v.lo & 1
		v.lo = v.lo>>1 | v.hi<<63
		v.hi >>= 1
		if lsb == 1 {
			v.hi ^= 0xe1 << 56
		}
	}
	return z
}

// inv is x^(2^128-2).
func (x gf) inv() gf {
	r, p := gfOne, x
	for range 127 { // r = x^(2^127-1)
		r = r.mul(p)
		p = p.mul(p)
	}
	return r.mul(r)
}

func (x gf) pow(n int) gf {
	r := gfOne
	for range n {
		r = r.mul(x)
	}
	return r
}

// specKeys derives an object's segment key, nonce prefix and commitment
// from docs/sealing.md's key schedule, independently of derive.
func specKeys(t *testing.T, dataKey []byte, bound []byte, salt []byte) (segKey, noncePrefix, commitment []byte) {
	t.Helper()
	prk, err := hkdf.Extract(sha256.New, dataKey, salt)
	if err != nil {
		t.Fatal(err)
	}
	exp := func(label string, n int) []byte {
		out, err := hkdf.Expand(sha256.New, prk, label+"\x00"+string(bound), n)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	return exp("cleanwall/seal/v1 segment key", 32), exp("cleanwall/seal/v1 nonce prefix", 8), exp("cleanwall/seal/v1 commitment", 32)
}

func TestGF(t *testing.T) {
	x := gfFrom(pattern(16))
	if x.mul(x.inv()) != gfOne || x.mul(gfOne) != x {
		t.Fatal("GF(2^128) arithmetic is wrong")
	}
}

func TestCommitment(t *testing.T) {
	k1, k2 := testKey(testKeyID, 1), testKey(testKeyID, 2)
	c := testConfig(MinSegmentSize)
	c.Key, c.KeyVersion = k1, 1
	base, err := Seal(make([]byte, 32), c) // one final segment of two blocks
	if err != nil {
		t.Fatal(err)
	}
	h, hlen, err := ParseHeader(base)
	if err != nil {
		t.Fatal(err)
	}
	bound := base[:hlen-CommitmentSize]

	type derived struct {
		seg, np, commit []byte
		h               gf // the GHASH key E(0)
		ej0             gf // E(J0)
		nonce           []byte
	}
	derive2 := func(key []byte) derived {
		seg, np, commit := specKeys(t, key, bound, h.Salt[:])
		block, err := aes.NewCipher(seg)
		if err != nil {
			t.Fatal(err)
		}
		var zero, hk, ej0 [16]byte
		block.Encrypt(hk[:], zero[:])
		nonce := append(append([]byte{}, np...), 0, 0, 0, 0) // segment 0
		j0 := append(append([]byte{}, nonce...), 0, 0, 0, 1)
		block.Encrypt(ej0[:], j0)
		return derived{seg, np, commit, gfFrom(hk[:]), gfFrom(ej0[:]), nonce}
	}
	d1, d2 := derive2(k1), derive2(k2)
	// The spec's key schedule is the one the package implements.
	if !bytes.Equal(d1.commit, h.Commitment[:]) {
		t.Fatal("docs/sealing.md's key schedule does not give the header's commitment")
	}

	// The frame: header (segment 0, final, 32 bytes), ciphertext blocks
	// C1 (fixed) and C2 (solved for), tag T valid under both keys.
	fh := make([]byte, frameHeaderSize)
	putFrameHeader(fh, 0, true, 32)
	x1 := gfFrom(append(append([]byte{}, fh...), make([]byte, 8)...))
	c1 := gfFrom(pattern(16))
	lenBlock := gf{hi: 8 * frameHeaderSize, lo: 8 * 32}
	constant := func(d derived) gf {
		return d.ej0.add(x1.mul(d.h.pow(4))).add(c1.mul(d.h.pow(3))).add(lenBlock.mul(d.h))
	}
	c2 := constant(d1).add(constant(d2)).mul(d1.h.pow(2).add(d2.h.pow(2)).inv())
	tag := constant(d1).add(c2.mul(d1.h.pow(2)))
	frame := append(append(append(append([]byte{}, fh...), c1.bytes()...), c2.bytes()...), tag.bytes()...)

	// Without the commitment, the segment opens under both keys, to
	// different plaintexts.
	o1, err := derive(k1, &h)
	if err != nil {
		t.Fatal(err)
	}
	o2, err := derive(k2, &h)
	if err != nil {
		t.Fatal(err)
	}
	p1, err1 := o1.aead.Open(nil, d1.nonce, frame[frameHeaderSize:], fh)
	p2, err2 := o2.aead.Open(nil, d2.nonce, frame[frameHeaderSize:], fh)
	if err1 != nil || err2 != nil || bytes.Equal(p1, p2) {
		t.Fatalf("the two-key segment does not open under both keys: %v, %v", err1, err2)
	}

	// With it, the object opens under the key its header commits to and
	// is refused under the other before any segment is opened.
	obj1 := append(append([]byte{}, base[:hlen]...), frame...)
	key := func(k []byte) KeyFunc { return func(string, int) ([]byte, error) { return k, nil } }
	if got, err := Open(obj1, key(k1)); err != nil || !bytes.Equal(got, p1) {
		t.Fatalf("opening under the committed key: %v", err)
	}
	checkRefusal(t, obj1, p2, key(k2), refusal{kind: ErrCommitment, segment: -1})

	// A header committing to the other key opens only under that key.
	obj2 := append(append(append([]byte{}, bound...), d2.commit...), frame...)
	if got, err := Open(obj2, key(k2)); err != nil || !bytes.Equal(got, p2) {
		t.Fatalf("opening under the second header's key: %v", err)
	}
	checkRefusal(t, obj2, p1, key(k1), refusal{kind: ErrCommitment, segment: -1})
}
