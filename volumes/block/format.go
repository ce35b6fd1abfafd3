package block

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// The image layout (docs/volumes-block.md):
//
//	[0, 4096)                 header (HeaderSize bytes, MAC'd)
//	[4096, tagOff)            flush log: the sectors of a flush in progress
//	[tagOff, dataOff)         tag table: one 64-byte entry (two slots) per sector
//	[dataOff, dataOff+size)   data: sector i's ciphertext at dataOff+i*4096
const (
	// SectorSize is the unit of encryption and the loop device's block size.
	SectorSize = 4096
	// HeaderSize is the header's length at the start of the image.
	HeaderSize = SectorSize
	// EntrySize is one sector's tag-table entry: two slots of SlotSize.
	EntrySize = 2 * SlotSize
	// SlotSize is one slot: nonce, tag, counter.
	SlotSize = 32
	// MaxDirty is how many written sectors the image holds back before it
	// flushes them itself (64 MiB); the flush log has room for them.
	MaxDirty = 16384
	// LogSize is the flush log's length: a count and MaxDirty sector
	// numbers, rounded up to a sector.
	LogSize = (8 + MaxDirty*8 + SectorSize - 1) / SectorSize * SectorSize

	nonceSize = 12
	tagSize   = 16

	// Version is the only image format version this package reads.
	Version = 1
	// CipherAES256GCM is AES-256-GCM per sector with a tag table.
	CipherAES256GCM = 1

	// MaxKeyID is the longest key id a header holds.
	MaxKeyID = 255

	keyIDOffset = 74
	macOffset   = 512
	macSize     = sha256.Size

	// MaxSize bounds an image's data size (16 TiB), so that offsets never
	// overflow and a header cannot ask for an absurd tag table.
	MaxSize = 1 << 44
)

// Magic starts every image.
var Magic = [8]byte{'C', 'W', 'V', 'O', 'L', 'B', 'L', 'K'}

// HKDF info strings: each derived key has one purpose.
const (
	infoHeaderMAC = "cleanwall volumes/block v1 header mac"
	infoSector    = "cleanwall volumes/block v1 sector aead"
)

// ErrWrongKey is returned when the header's MAC does not verify under the
// given key: the image was sealed with another key or the header is damaged.
var ErrWrongKey = errors.New("header MAC does not verify: wrong key (or a damaged header)")

// Header is an image's first sector.
type Header struct {
	Cipher     uint16
	Size       int64 // data bytes, a positive multiple of SectorSize
	ImageID    [16]byte
	KeyID      string
	KeyVersion uint32
}

// Sectors is the number of data sectors.
func (h *Header) Sectors() int64 { return h.Size / SectorSize }

// LogOffset is where the flush log starts.
func (h *Header) LogOffset() int64 { return HeaderSize }

// TagOffset is where the tag table starts.
func (h *Header) TagOffset() int64 { return HeaderSize + LogSize }

// DataOffset is where sector 0's ciphertext starts: after the tag table,
// rounded up to a sector.
func (h *Header) DataOffset() int64 {
	tags := h.Sectors() * EntrySize
	return h.TagOffset() + (tags+SectorSize-1)/SectorSize*SectorSize
}

// FileSize is the image file's full length.
func (h *Header) FileSize() int64 { return h.DataOffset() + h.Size }

func checkSize(size int64) error {
	if size <= 0 || size%SectorSize != 0 || size > MaxSize {
		return fmt.Errorf("size %d: want a positive multiple of %d up to %d", size, SectorSize, int64(MaxSize))
	}
	return nil
}

// keys derives the header MAC key and the sector AEAD key of one image from
// the data key; the image id is the salt, so every image has keys of its own.
func deriveKeys(dataKey []byte, imageID [16]byte) (macKey, sectorKey []byte, err error) {
	if len(dataKey) != 32 {
		return nil, nil, fmt.Errorf("data key is %d bytes, want 32", len(dataKey))
	}
	macKey, err = hkdf.Key(sha256.New, dataKey, imageID[:], infoHeaderMAC, 32)
	if err != nil {
		return nil, nil, err
	}
	sectorKey, err = hkdf.Key(sha256.New, dataKey, imageID[:], infoSector, 32)
	return macKey, sectorKey, err
}

// Marshal encodes h and its MAC under macKey.
func (h *Header) Marshal(macKey []byte) ([]byte, error) {
	if err := checkSize(h.Size); err != nil {
		return nil, err
	}
	if len(h.KeyID) == 0 || len(h.KeyID) > MaxKeyID {
		return nil, fmt.Errorf("key id %q: want 1 to %d bytes", h.KeyID, MaxKeyID)
	}
	b := make([]byte, HeaderSize)
	copy(b[0:8], Magic[:])
	le := binary.LittleEndian
	le.PutUint16(b[8:], Version)
	le.PutUint16(b[10:], h.Cipher)
	le.PutUint32(b[12:], SectorSize)
	le.PutUint64(b[16:], uint64(h.Size))
	copy(b[24:40], h.ImageID[:])
	le.PutUint32(b[40:], h.KeyVersion)
	// b[44:48] flags, zero in version 1
	le.PutUint64(b[48:], uint64(h.LogOffset()))
	le.PutUint64(b[56:], uint64(h.TagOffset()))
	le.PutUint64(b[64:], uint64(h.DataOffset()))
	le.PutUint16(b[72:], uint16(len(h.KeyID)))
	copy(b[keyIDOffset:], h.KeyID)
	m := hmac.New(sha256.New, macKey)
	m.Write(b[:macOffset])
	copy(b[macOffset:], m.Sum(nil))
	return b, nil
}

// ParseHeader decodes an image header without checking its MAC (the key
// id it names tells which key to check it with); VerifyHeader checks it.
// Every field is checked: a header that is not exactly what Marshal
// writes is refused with the field it gets wrong.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("header: %d bytes, want %d", len(b), HeaderSize)
	}
	b = b[:HeaderSize]
	if !bytes.Equal(b[0:8], Magic[:]) {
		return nil, errors.New("header: bad magic: not a cleanwall block image")
	}
	le := binary.LittleEndian
	if v := le.Uint16(b[8:]); v != Version {
		return nil, fmt.Errorf("header: version %d, this build reads %d", v, Version)
	}
	h := &Header{Cipher: le.Uint16(b[10:])}
	if h.Cipher != CipherAES256GCM {
		return nil, fmt.Errorf("header: cipher %d unknown (want %d, AES-256-GCM)", h.Cipher, CipherAES256GCM)
	}
	if s := le.Uint32(b[12:]); s != SectorSize {
		return nil, fmt.Errorf("header: sector size %d, want %d", s, SectorSize)
	}
	size := le.Uint64(b[16:])
	if size > MaxSize {
		return nil, fmt.Errorf("header: size %d above %d", size, int64(MaxSize))
	}
	h.Size = int64(size)
	if err := checkSize(h.Size); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	copy(h.ImageID[:], b[24:40])
	h.KeyVersion = le.Uint32(b[40:])
	if f := le.Uint32(b[44:]); f != 0 {
		return nil, fmt.Errorf("header: flags %#x unknown", f)
	}
	if o := le.Uint64(b[48:]); o != uint64(h.LogOffset()) {
		return nil, fmt.Errorf("header: flush log offset %d, want %d", o, h.LogOffset())
	}
	if o := le.Uint64(b[56:]); o != uint64(h.TagOffset()) {
		return nil, fmt.Errorf("header: tag table offset %d, want %d", o, h.TagOffset())
	}
	if o := le.Uint64(b[64:]); o != uint64(h.DataOffset()) {
		return nil, fmt.Errorf("header: data offset %d, want %d", o, h.DataOffset())
	}
	n := int(le.Uint16(b[72:]))
	if n == 0 || n > MaxKeyID {
		return nil, fmt.Errorf("header: key id length %d, want 1 to %d", n, MaxKeyID)
	}
	h.KeyID = string(b[keyIDOffset : keyIDOffset+n])
	if !allZero(b[keyIDOffset+n : macOffset]) {
		return nil, errors.New("header: bytes after the key id are not zero")
	}
	if !allZero(b[macOffset+macSize:]) {
		return nil, errors.New("header: bytes after the MAC are not zero")
	}
	return h, nil
}

// VerifyHeader checks the MAC of the header bytes b under macKey.
func VerifyHeader(b []byte, macKey []byte) error {
	m := hmac.New(sha256.New, macKey)
	m.Write(b[:macOffset])
	if !hmac.Equal(m.Sum(nil), b[macOffset:macOffset+macSize]) {
		return ErrWrongKey
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
