package hpke

import (
	"crypto/aes"
	"crypto/cipher"
	stdhpke "crypto/hpke"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// Format constants (docs/sealing.md, "Trusted mode: HPKE", has the layout
// they describe).
const (
	// Version is the format version this package writes and reads.
	Version = 1

	// ChunkSize is the plaintext bytes per chunk a Sealer writes: the
	// largest TLS record's plaintext (2^14), so that a proxy holds 16 KiB
	// per body in flight and a recipient gets verified bytes every 16 KiB,
	// while the AEAD call and the 24 bytes of framing stay under 0.2 % of
	// the work and the size (docs/sealing.md has the measurements).
	ChunkSize = 16 << 10
	// MinChunkSize and MaxChunkSize bound the chunk size a prefix may
	// carry: an opener holds one chunk.
	MinChunkSize = 64
	MaxChunkSize = 1 << 20

	// FrameOverhead is what a chunk costs beyond its plaintext: the frame
	// header (index, final flag and length) and the AEAD tag.
	FrameOverhead = frameHeaderSize + tagSize
	// MaxChunks is the most chunks one body can have (the index is 32
	// bits): 64 TiB at ChunkSize.
	MaxChunks = 1 << 32

	// CommitmentSize is the size of the prefix's key commitment;
	// ContextDigestSize of the context's digest.
	CommitmentSize    = 32
	ContextDigestSize = sha256.Size
)

const (
	magic = "CWHP"

	// magic, version, KEM, KDF and AEAD ids, chunk size, key id, context
	// digest: the bound prefix, which goes into HPKE's info.
	boundPrefixSize = 4 + 1 + 2 + 2 + 2 + 4 + KeyIDSize + ContextDigestSize

	frameHeaderSize = 8 // index (4) | final flag and length (4)
	tagSize         = 16
	nonceSize       = 12
	keySize         = 32 // AES-256
	finalBit        = 1 << 31

	// infoLabel starts HPKE's info, followed by a zero byte and the bound
	// prefix. The export labels name the three secrets exported from the
	// HPKE context.
	infoLabel    = "cleanwall/hpke/v1"
	exportKey    = "cleanwall/hpke/v1 chunk key"
	exportNonce  = "cleanwall/hpke/v1 chunk nonce"
	exportCommit = "cleanwall/hpke/v1 commitment"
)

// PrefixSize is the size of a body's prefix under suite: 87 bytes and the
// encapsulated key (1207 for X-Wing, 119 for X25519).
func PrefixSize(suite Suite) int {
	si, err := suite.info()
	if err != nil {
		return 0
	}
	return boundPrefixSize + si.encSize + CommitmentSize
}

// SealedSize is the size of the body a Sealer makes of n plaintext bytes
// sealed to pub: the prefix, and each chunk's plaintext plus
// FrameOverhead. A proxy sets it as Content-Length before sealing. An
// unknown length (n < 0) stays unknown, and there is no size without a
// key: -1.
func SealedSize(n int64, pub *PublicKey) int64 {
	if n < 0 || pub == nil {
		return -1
	}
	chunks := max(1, (n+ChunkSize-1)/ChunkSize)
	return int64(PrefixSize(pub.suite)) + chunks*FrameOverhead + n
}

// ContextDigest is the SHA-256 of a context, as a prefix carries it.
func ContextDigest(context string) [ContextDigestSize]byte {
	return sha256.Sum256([]byte(context))
}

// Prefix is what a sealed body says about itself before its chunks.
type Prefix struct {
	// Suite is the recipient key's suite (the KEM); the KDF and AEAD are
	// the format's.
	Suite Suite
	// ChunkSize is the plaintext bytes in every chunk but the last.
	ChunkSize int
	// KeyID is the id of the public key the body was sealed to.
	KeyID KeyID
	// ContextDigest is the SHA-256 of the sealer's context.
	ContextDigest [ContextDigestSize]byte
	// Enc is HPKE's encapsulated key.
	Enc []byte
	// Commitment commits to the HPKE context (so to the recipient's key
	// and every prefix field); an opener checks it before any chunk.
	Commitment [CommitmentSize]byte
}

// Size is the prefix's encoded size.
func (p *Prefix) Size() int { return boundPrefixSize + len(p.Enc) + CommitmentSize }

// appendBound appends the bound prefix: magic through context digest.
func (p *Prefix) appendBound(b []byte) []byte {
	b = append(b, magic...)
	b = append(b, Version)
	b = binary.BigEndian.AppendUint16(b, uint16(p.Suite))
	b = binary.BigEndian.AppendUint16(b, kdfHKDFSHA256)
	b = binary.BigEndian.AppendUint16(b, aeadAES256GCM)
	b = binary.BigEndian.AppendUint32(b, uint32(p.ChunkSize))
	b = append(b, p.KeyID[:]...)
	return append(b, p.ContextDigest[:]...)
}

// info is HPKE's info for the body: the format's label, a zero byte, and
// the bound prefix.
func (p *Prefix) info() []byte {
	b := make([]byte, 0, len(infoLabel)+1+boundPrefixSize)
	b = append(append(b, infoLabel...), 0)
	return p.appendBound(b)
}

// marshal encodes the whole prefix.
func (p *Prefix) marshal() []byte {
	b := p.appendBound(make([]byte, 0, p.Size()))
	b = append(b, p.Enc...)
	return append(b, p.Commitment[:]...)
}

// ParsePrefix decodes the prefix at the start of b and returns it with its
// size. It checks the encoding only; the commitment needs the private key
// (an Opener checks both). A b that ends inside the prefix gives
// ErrTruncated, once the bytes there are say nothing worse.
func ParsePrefix(b []byte) (Prefix, int, error) {
	var p Prefix
	if n := min(len(b), len(magic)); string(b[:n]) != magic[:n] {
		return p, 0, prefixError(ErrNotSealed, "")
	}
	truncated := prefixError(ErrTruncated, "the input ends inside the prefix")
	if len(b) < len(magic)+1 {
		return p, 0, truncated
	}
	if b[4] != Version {
		return p, 0, prefixError(ErrVersion, fmt.Sprintf("version %d, this opener reads %d", b[4], Version))
	}
	if len(b) < boundPrefixSize {
		return p, 0, truncated
	}
	p.Suite = Suite(binary.BigEndian.Uint16(b[5:7]))
	kdf, aead := binary.BigEndian.Uint16(b[7:9]), binary.BigEndian.Uint16(b[9:11])
	si, err := p.Suite.info()
	switch {
	case err != nil:
		return p, 0, prefixError(ErrSuite, fmt.Sprintf("KEM 0x%04x (this format: X-Wing 0x647a or X25519 0x0020)", uint16(p.Suite)))
	case kdf != kdfHKDFSHA256:
		return p, 0, prefixError(ErrSuite, fmt.Sprintf("KDF 0x%04x (this format: HKDF-SHA256 0x0001)", kdf))
	case aead != aeadAES256GCM:
		return p, 0, prefixError(ErrSuite, fmt.Sprintf("AEAD 0x%04x (this format: AES-256-GCM 0x0002)", aead))
	}
	chunk := binary.BigEndian.Uint32(b[11:15])
	if chunk < MinChunkSize || chunk > MaxChunkSize {
		return p, 0, prefixError(ErrPrefix, fmt.Sprintf("chunk size %d out of range %d-%d", chunk, MinChunkSize, MaxChunkSize))
	}
	p.ChunkSize = int(chunk)
	copy(p.KeyID[:], b[15:15+KeyIDSize])
	copy(p.ContextDigest[:], b[15+KeyIDSize:boundPrefixSize])
	size := boundPrefixSize + si.encSize + CommitmentSize
	if len(b) < size {
		return p, 0, truncated
	}
	p.Enc = b[boundPrefixSize : boundPrefixSize+si.encSize : boundPrefixSize+si.encSize]
	copy(p.Commitment[:], b[size-CommitmentSize:size])
	return p, size, nil
}

// bodyKeys are what one body's HPKE context exports.
type bodyKeys struct {
	aead       cipher.AEAD
	baseNonce  [nonceSize]byte
	commitment [CommitmentSize]byte
}

// exporter is a sending or receiving HPKE context.
type exporter interface {
	Export(exporterContext string, length int) ([]byte, error)
}

// derive exports the chunk key, the base nonce and the commitment from an
// HPKE context (docs/sealing.md, "Key schedule").
func derive(ctx exporter) (*bodyKeys, error) {
	key, err := ctx.Export(exportKey, keySize)
	if err != nil {
		return nil, err
	}
	nonce, err := ctx.Export(exportNonce, nonceSize)
	if err != nil {
		return nil, err
	}
	commit, err := ctx.Export(exportCommit, CommitmentSize)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	k := &bodyKeys{aead: aead}
	copy(k.baseNonce[:], nonce)
	copy(k.commitment[:], commit)
	return k, nil
}

// hpkeSuite is the KDF and AEAD every suite's HPKE context is set up with.
// The context's own Seal is never used (chunks are sealed under the
// exported key), but the AEAD id is part of RFC 9180's suite_id and so of
// every exported secret.
func hpkeSuite() (stdhpke.KDF, stdhpke.AEAD) { return stdhpke.HKDFSHA256(), stdhpke.AES256GCM() }

// commits reports, in constant time, whether the prefix's commitment is
// the one these keys derive.
func (k *bodyKeys) commits(p *Prefix) bool {
	return subtle.ConstantTimeCompare(k.commitment[:], p.Commitment[:]) == 1
}

// nonce fills n with chunk index i's nonce: the base nonce XOR i as a
// 12-byte big-endian integer (RFC 9180's ComputeNonce with i as the
// sequence number).
func (k *bodyKeys) nonce(n *[nonceSize]byte, i uint32) {
	*n = k.baseNonce
	var idx [4]byte
	binary.BigEndian.PutUint32(idx[:], i)
	subtle.XORBytes(n[nonceSize-4:], n[nonceSize-4:], idx[:])
}

// putFrameHeader writes a frame header: the index, then the final flag in
// the top bit of the plaintext length.
func putFrameHeader(b []byte, index uint32, final bool, n int) {
	binary.BigEndian.PutUint32(b[0:4], index)
	v := uint32(n)
	if final {
		v |= finalBit
	}
	binary.BigEndian.PutUint32(b[4:8], v)
}

// frameHeader decodes a frame header.
func frameHeader(b []byte) (index uint32, final bool, n int) {
	v := binary.BigEndian.Uint32(b[4:8])
	return binary.BigEndian.Uint32(b[0:4]), v&finalBit != 0, int(v &^ finalBit)
}

// sealFrame appends chunk index's frame (frame header, ciphertext, tag) to
// dst. pt may be dst's spare capacity just past the frame header (sealing
// in place).
func (k *bodyKeys) sealFrame(dst []byte, index uint32, final bool, pt []byte, nonce *[nonceSize]byte) []byte {
	start := len(dst)
	dst = binary.BigEndian.AppendUint64(dst, 0)
	putFrameHeader(dst[start:], index, final, len(pt))
	k.nonce(nonce, index)
	return k.aead.Seal(dst, nonce[:], pt, dst[start:start+frameHeaderSize])
}
