package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// Format constants (docs/sealing.md has the layout they describe).
const (
	// Version is the format version this package writes and reads.
	Version = 1

	// DefaultSegmentSize is the plaintext bytes per segment when the
	// caller does not choose.
	DefaultSegmentSize = 64 << 10
	// MinSegmentSize and MaxSegmentSize bound the segment size a header
	// may carry.
	MinSegmentSize = 64
	MaxSegmentSize = 16 << 20

	// KeySize is the size of a data key (AES-256).
	KeySize = 32
	// SaltSize is the size of the per-object random salt.
	SaltSize = 32
	// CommitmentSize is the size of the key commitment.
	CommitmentSize = 32
	// MaxKeyIDLen and MaxContextLen bound the header's strings.
	MaxKeyIDLen   = 255
	MaxContextLen = 1024
	// MaxKeyVersion is the largest key version a header can carry.
	MaxKeyVersion = 1<<32 - 1

	// FrameOverhead is what a segment costs beyond its plaintext: the
	// frame header (index, final flag and length) and the GCM tag.
	FrameOverhead = frameHeaderSize + tagSize
	// MaxSegments is the most segments one object can have (the index is
	// 32 bits).
	MaxSegments = 1 << 32

	// MaxHeaderSize is the largest header: the longest key id and context.
	MaxHeaderSize = fixedHeaderSize + MaxKeyIDLen + MaxContextLen
)

const (
	magic = "CWSL"

	// flagInteractive: non-final segments may be shorter than the segment
	// size (the sealer flushed). Every other flag bit must be zero.
	flagInteractive = 0x01

	// magic, version, flags, segment size, key id length, key version,
	// context length, salt, commitment.
	fixedHeaderSize = 4 + 1 + 1 + 4 + 1 + 4 + 2 + SaltSize + CommitmentSize

	frameHeaderSize = 8 // index (4) | final flag and length (4)
	tagSize         = 16
	noncePrefixSize = 8
	finalBit        = 1 << 31

	// HKDF-Expand labels; each is followed by a zero byte and the header
	// up to and including the salt.
	labelKey    = "cleanwall/seal/v1 segment key"
	labelNonce  = "cleanwall/seal/v1 nonce prefix"
	labelCommit = "cleanwall/seal/v1 commitment"
)

// Header is what a sealed object says about itself: everything an opener
// needs besides the data key.
type Header struct {
	// KeyID and KeyVersion name the data key the object is sealed under.
	KeyID      string
	KeyVersion int
	// Context is the sealer's context string (for cleanwall's proxies, the
	// rule and the direction). It is in clear text and bound into the
	// object key: an opener can insist on it (WithContext).
	Context string
	// SegmentSize is the plaintext bytes in every segment but the last.
	SegmentSize int
	// Interactive objects may have short non-final segments (the sealer
	// flushed): their plaintext offsets do not map to segments.
	Interactive bool
	// Salt is the object's random salt; Commitment commits to the data key
	// and every header field before it.
	Salt       [SaltSize]byte
	Commitment [CommitmentSize]byte
}

// Size is the header's encoded size in bytes.
func (h Header) Size() int { return fixedHeaderSize + len(h.KeyID) + len(h.Context) }

// Layout is the object's layout (sizes and ranges).
func (h Header) Layout() Layout {
	return Layout{HeaderSize: int64(h.Size()), SegmentSize: int64(h.SegmentSize), Interactive: h.Interactive}
}

// check validates the fields an encoder writes (and a decoder reads).
func (h *Header) check() error {
	switch {
	case h.KeyID == "" || len(h.KeyID) > MaxKeyIDLen:
		return fmt.Errorf("key id must be 1-%d bytes, not %d", MaxKeyIDLen, len(h.KeyID))
	case !utf8.ValidString(h.KeyID):
		return fmt.Errorf("key id %q is not UTF-8", h.KeyID)
	case h.KeyVersion < 0 || h.KeyVersion > MaxKeyVersion:
		return fmt.Errorf("key version %d out of range 0-%d", h.KeyVersion, MaxKeyVersion)
	case len(h.Context) > MaxContextLen:
		return fmt.Errorf("context must be at most %d bytes, not %d", MaxContextLen, len(h.Context))
	case !utf8.ValidString(h.Context):
		return fmt.Errorf("context %q is not UTF-8", h.Context)
	case h.SegmentSize < MinSegmentSize || h.SegmentSize > MaxSegmentSize:
		return fmt.Errorf("segment size %d out of range %d-%d", h.SegmentSize, MinSegmentSize, MaxSegmentSize)
	}
	return nil
}

// appendBound appends the header up to and including the salt: the part
// the object key and the commitment are derived over.
func (h *Header) appendBound(b []byte) []byte {
	b = append(b, magic...)
	b = append(b, Version)
	var flags byte
	if h.Interactive {
		flags |= flagInteractive
	}
	b = append(b, flags)
	b = binary.BigEndian.AppendUint32(b, uint32(h.SegmentSize))
	b = append(b, byte(len(h.KeyID)))
	b = append(b, h.KeyID...)
	b = binary.BigEndian.AppendUint32(b, uint32(h.KeyVersion))
	b = binary.BigEndian.AppendUint16(b, uint16(len(h.Context)))
	b = append(b, h.Context...)
	return append(b, h.Salt[:]...)
}

// MarshalBinary encodes the header as it starts a sealed object.
func (h *Header) MarshalBinary() ([]byte, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	b := h.appendBound(make([]byte, 0, h.Size()))
	return append(b, h.Commitment[:]...), nil
}

// ParseHeader decodes the header at the start of b and returns it with its
// size. It checks the encoding only: the commitment is checked when a key
// is at hand (an Opener does both). A b that ends inside the header gives
// ErrTruncated.
func ParseHeader(b []byte) (Header, int, error) {
	var h Header
	if n := min(len(b), len(magic)); string(b[:n]) != magic[:n] {
		return h, 0, headerError(ErrNotSealed, "")
	}
	p := headerParser{b: b}
	fixed := p.take(4 + 1 + 1 + 4 + 1)
	if fixed == nil {
		return h, 0, headerError(ErrTruncated, "input ends inside the header")
	}
	if fixed[4] != Version {
		return h, 0, headerError(ErrVersion, fmt.Sprintf("version %d, this opener reads %d", fixed[4], Version))
	}
	if fixed[5]&^flagInteractive != 0 {
		return h, 0, headerError(ErrHeader, fmt.Sprintf("unknown flags %#02x", fixed[5]))
	}
	h.Interactive = fixed[5]&flagInteractive != 0
	seg := binary.BigEndian.Uint32(fixed[6:10])
	if seg < MinSegmentSize || seg > MaxSegmentSize {
		return h, 0, headerError(ErrHeader, fmt.Sprintf("segment size %d out of range %d-%d", seg, MinSegmentSize, MaxSegmentSize))
	}
	h.SegmentSize = int(seg)
	idLen := int(fixed[10])
	if idLen == 0 {
		return h, 0, headerError(ErrHeader, "empty key id")
	}
	id := p.take(idLen)
	ver := p.take(4)
	ctxLen := p.take(2)
	if ctxLen == nil {
		return h, 0, headerError(ErrTruncated, "input ends inside the header")
	}
	h.KeyID = string(id)
	h.KeyVersion = int(binary.BigEndian.Uint32(ver))
	n := int(binary.BigEndian.Uint16(ctxLen))
	if n > MaxContextLen {
		return h, 0, headerError(ErrHeader, fmt.Sprintf("context of %d bytes, at most %d", n, MaxContextLen))
	}
	ctx := p.take(n)
	salt := p.take(SaltSize)
	commit := p.take(CommitmentSize)
	if commit == nil {
		return h, 0, headerError(ErrTruncated, "input ends inside the header")
	}
	h.Context = string(ctx)
	copy(h.Salt[:], salt)
	copy(h.Commitment[:], commit)
	if err := h.check(); err != nil {
		return h, 0, headerError(ErrHeader, err.Error())
	}
	return h, p.off, nil
}

// headerParser takes fields off the front of a buffer; once a take fails
// every later one does.
type headerParser struct {
	b   []byte
	off int
	bad bool
}

func (p *headerParser) take(n int) []byte {
	if p.bad || len(p.b)-p.off < n {
		p.bad = true
		return nil
	}
	s := p.b[p.off : p.off+n : p.off+n]
	p.off += n
	return s
}

// objectKeys are what one object's data key and header derive.
type objectKeys struct {
	aead        cipher.AEAD
	noncePrefix [noncePrefixSize]byte
	commitment  [CommitmentSize]byte
}

// derive computes the object key, nonce prefix and commitment of header h
// under data key key (docs/sealing.md, "Key schedule").
func derive(key []byte, h *Header) (*objectKeys, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("data key is %d bytes, want %d", len(key), KeySize)
	}
	prk, err := hkdf.Extract(sha256.New, key, h.Salt[:])
	if err != nil {
		return nil, err
	}
	bound := h.appendBound(make([]byte, 0, h.Size()))
	expand := func(label string, n int) ([]byte, error) {
		info := make([]byte, 0, len(label)+1+len(bound))
		info = append(append(append(info, label...), 0), bound...)
		return hkdf.Expand(sha256.New, prk, string(info), n)
	}
	segKey, err := expand(labelKey, KeySize)
	if err != nil {
		return nil, err
	}
	np, err := expand(labelNonce, noncePrefixSize)
	if err != nil {
		return nil, err
	}
	cm, err := expand(labelCommit, CommitmentSize)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(segKey)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	k := &objectKeys{aead: aead}
	copy(k.noncePrefix[:], np)
	copy(k.commitment[:], cm)
	return k, nil
}

// commits reports whether the header's commitment is the one these keys
// derive, in constant time.
func (k *objectKeys) commits(h *Header) bool {
	return subtle.ConstantTimeCompare(k.commitment[:], h.Commitment[:]) == 1
}

// nonce fills n with segment index i's nonce: the nonce prefix, then the
// index big-endian.
func (k *objectKeys) nonce(n *[12]byte, i uint32) {
	copy(n[:noncePrefixSize], k.noncePrefix[:])
	binary.BigEndian.PutUint32(n[noncePrefixSize:], i)
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
