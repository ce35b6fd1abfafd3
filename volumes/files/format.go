// Package files serves kind files volumes: a store directory of per-file
// encrypted items that the sandbox sees, through FUSE, as a directory of
// plain files. The store format is docs/volumes.md; this file is its
// encoding and the cryptography (subkeys, headers, names, blocks), free of
// any file system calls so that it can be fuzzed and reused by the CLI.
package files

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Sizes of the format (docs/volumes.md).
const (
	// BlockSize is the plaintext size of a content block.
	BlockSize = 4096
	nonceSize = 12
	tagSize   = 16
	// storeBlockSize is a sealed block in the store: nonce, ciphertext, tag.
	// Every block, the last one too, is sealed whole: bytes beyond the
	// file's size in its last block are never returned.
	storeBlockSize = nonceSize + BlockSize + tagSize
	idSize         = 16
	macSize        = 32
	formatVersion  = 1

	// maxKeyID bounds the key id carried in headers.
	maxKeyID = 255
	// maxShortName is the longest plaintext name whose encrypted form fits
	// in NAME_MAX (255) bytes of base64url: 4*ceil((16+n)/3) ≤ 255.
	maxShortName = 175
	// maxName is the longest plaintext name (the kernel's NAME_MAX).
	maxName = 255
)

// Reserved names in the store. None can be the encoding of a name
// (base64url has no '.').
const (
	configName   = "cleanwall.volume"
	dirIDName    = "cw.dirid"
	longPrefix   = "cw.long."
	longSuffix   = ".name"
	tmpPrefix    = "cw.tmp."
	configMagic  = "CWVC"
	fileMagic    = "CWVF"
	dirMagic     = "CWVD"
	labelPrefix  = "cleanwall/volume/files/v1 "
	configLabel  = labelPrefix + "config\x00"
	fileLabel    = labelPrefix + "file\x00"
	dirLabel     = labelPrefix + "dir\x00"
	nameLabel    = labelPrefix + "name\x00"
	fileKeyLabel = labelPrefix + "file key"
)

var b64 = base64.RawURLEncoding

// errAuth is the cause of every authentication failure: the caller turns
// it into EIO (mount) or a refusal naming the file (CLI).
var errAuth = errors.New("authentication failed")

// ID is a random 128-bit identifier: a volume's, a directory's or a file's.
type ID [idSize]byte

// keys are a volume's subkeys, derived from the data key and the volume id.
type keys struct {
	header  []byte       // HMAC-SHA256 key of config, file headers, dir ids
	nameMAC []byte       // HMAC-SHA256 key of the names' synthetic IV
	nameEnc cipher.Block // AES-256 key of the names' CTR encryption
	content []byte       // per-file AES-256-GCM keys derive from it
}

func deriveKeys(dataKey []byte, volumeID ID) (*keys, error) {
	if len(dataKey) != 32 {
		return nil, fmt.Errorf("data key is %d bytes, want 32", len(dataKey))
	}
	sub := func(info string) []byte {
		k, err := hkdf.Key(sha256.New, dataKey, volumeID[:], labelPrefix+info, 32)
		if err != nil {
			panic(err) // only for lengths HKDF cannot give
		}
		return k
	}
	k := &keys{header: sub("header mac"), nameMAC: sub("name mac"), content: sub("content")}
	var err error
	if k.nameEnc, err = aes.NewCipher(sub("name enc")); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *keys) mac(label string, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, k.header)
	m.Write([]byte(label))
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// fileAEAD is the AES-256-GCM of one file: its key derives from the
// content key and the file id, so nonces (random, 96 bits) only have to be
// unique within one file.
func (k *keys) fileAEAD(id ID) (cipher.AEAD, error) {
	fk, err := hkdf.Key(sha256.New, k.content, id[:], fileKeyLabel, 32)
	if err != nil {
		return nil, err
	}
	b, err := aes.NewCipher(fk)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// config is the store's cleanwall.volume: its volume id and the key it is
// sealed under.
type config struct {
	VolumeID   ID
	KeyID      string
	KeyVersion uint32
}

// encodeConfig: magic(4) version(1) volumeID(16) keyVersion(4)
// keyIDLen(1) keyID MAC(32).
func encodeConfig(c config, k *keys) []byte {
	b := make([]byte, 0, 26+len(c.KeyID)+macSize)
	b = append(b, configMagic...)
	b = append(b, formatVersion)
	b = append(b, c.VolumeID[:]...)
	b = binary.BigEndian.AppendUint32(b, c.KeyVersion)
	b = append(b, byte(len(c.KeyID)))
	b = append(b, c.KeyID...)
	return append(b, k.mac(configLabel, b)...)
}

// parseConfig decodes a config without checking its MAC (which needs keys
// derived from the volume id it holds); verifyConfig checks it.
func parseConfig(b []byte) (config, error) {
	var c config
	if len(b) < 26+macSize || string(b[:4]) != configMagic {
		return c, errors.New("not a cleanwall files volume config")
	}
	if b[4] != formatVersion {
		return c, fmt.Errorf("config format version %d, this build reads %d", b[4], formatVersion)
	}
	copy(c.VolumeID[:], b[5:21])
	c.KeyVersion = binary.BigEndian.Uint32(b[21:25])
	n := int(b[25])
	if len(b) != 26+n+macSize {
		return c, fmt.Errorf("config is %d bytes, want %d", len(b), 26+n+macSize)
	}
	c.KeyID = string(b[26 : 26+n])
	return c, nil
}

func verifyConfig(b []byte, k *keys) error {
	body, mac := b[:len(b)-macSize], b[len(b)-macSize:]
	if !hmac.Equal(mac, k.mac(configLabel, body)) {
		return errAuth
	}
	return nil
}

// header is a file's header: its identity, its authenticated plaintext
// size and the key it is sealed under; its MAC binds it to the directory
// and name it is stored under.
type header struct {
	FileID     ID
	Size       int64
	KeyVersion uint32
	KeyID      string
}

// headerLen is the header's length for a key id of n bytes:
// magic(4) version(1) fileID(16) size(8) keyVersion(4) keyIDLen(1) keyID MAC(32).
func headerLen(keyIDLen int) int { return 34 + keyIDLen + macSize }

// appendHeader encodes h bound to (parent, name) onto dst.
func appendHeader(dst []byte, h header, parent ID, name string, k *keys) []byte {
	start := len(dst)
	dst = append(dst, fileMagic...)
	dst = append(dst, formatVersion)
	dst = append(dst, h.FileID[:]...)
	dst = binary.BigEndian.AppendUint64(dst, uint64(h.Size))
	dst = binary.BigEndian.AppendUint32(dst, h.KeyVersion)
	dst = append(dst, byte(len(h.KeyID)))
	dst = append(dst, h.KeyID...)
	return append(dst, k.mac(fileLabel, dst[start:], parent[:], []byte(name))...)
}

// parseHeader decodes and authenticates a header bound to (parent, name).
// b may extend past the header (the caller reads a fixed length).
func parseHeader(b []byte, parent ID, name string, k *keys) (header, error) {
	var h header
	if len(b) < 34 || string(b[:4]) != fileMagic {
		return h, fmt.Errorf("not a volume file header: %w", errAuth)
	}
	if b[4] != formatVersion {
		return h, fmt.Errorf("file format version %d, this build reads %d: %w", b[4], formatVersion, errAuth)
	}
	n := int(b[33])
	if len(b) < headerLen(n) {
		return h, fmt.Errorf("header cut short: %w", errAuth)
	}
	body, mac := b[:34+n], b[34+n:34+n+macSize]
	if !hmac.Equal(mac, k.mac(fileLabel, body, parent[:], []byte(name))) {
		return h, fmt.Errorf("header MAC (wrong key, or not this file's place in the volume): %w", errAuth)
	}
	copy(h.FileID[:], b[5:21])
	size := binary.BigEndian.Uint64(b[21:29])
	if size > 1<<62 {
		return h, fmt.Errorf("size %d out of range: %w", size, errAuth)
	}
	h.Size = int64(size)
	h.KeyVersion = binary.BigEndian.Uint32(b[29:33])
	h.KeyID = string(b[34 : 34+n])
	return h, nil
}

// dirIDLen is a cw.dirid file: magic(4) version(1) dirID(16) MAC(32).
const dirIDLen = 21 + macSize

func encodeDirID(id, parent ID, name string, k *keys) []byte {
	b := make([]byte, 0, dirIDLen)
	b = append(b, dirMagic...)
	b = append(b, formatVersion)
	b = append(b, id[:]...)
	return append(b, k.mac(dirLabel, b, parent[:], []byte(name))...)
}

func parseDirID(b []byte, parent ID, name string, k *keys) (ID, error) {
	var id ID
	if len(b) != dirIDLen || string(b[:4]) != dirMagic || b[4] != formatVersion {
		return id, fmt.Errorf("not a volume directory id: %w", errAuth)
	}
	if !hmac.Equal(b[21:], k.mac(dirLabel, b[:21], parent[:], []byte(name))) {
		return id, fmt.Errorf("directory id MAC (wrong key, or not this directory's place in the volume): %w", errAuth)
	}
	copy(id[:], b[5:21])
	return id, nil
}

// encryptName is the deterministic encryption of name in directory dir:
// SIV (RFC 5297's construction) with HMAC-SHA256 as the PRF: the
// synthetic IV is HMAC(nameMAC, label || dir || name) cut to 128 bits, the
// name is encrypted with AES-256-CTR from that IV, and the result is
// base64url(IV || ciphertext) without padding.
func (k *keys) encryptName(dir ID, name string) string {
	m := hmac.New(sha256.New, k.nameMAC)
	m.Write([]byte(nameLabel))
	m.Write(dir[:])
	m.Write([]byte(name))
	iv := m.Sum(nil)[:aes.BlockSize]
	out := make([]byte, aes.BlockSize+len(name))
	copy(out, iv)
	cipher.NewCTR(k.nameEnc, iv).XORKeyStream(out[aes.BlockSize:], []byte(name))
	return b64.EncodeToString(out)
}

// decryptName reverses encryptName and authenticates the result: a name
// that is not ours, or belongs in another directory, fails.
func (k *keys) decryptName(dir ID, enc string) (string, error) {
	raw, err := b64.DecodeString(enc)
	if err != nil || len(raw) <= aes.BlockSize || len(raw) > aes.BlockSize+maxName {
		return "", fmt.Errorf("not an encrypted name: %w", errAuth)
	}
	iv := raw[:aes.BlockSize]
	name := make([]byte, len(raw)-aes.BlockSize)
	cipher.NewCTR(k.nameEnc, iv).XORKeyStream(name, raw[aes.BlockSize:])
	m := hmac.New(sha256.New, k.nameMAC)
	m.Write([]byte(nameLabel))
	m.Write(dir[:])
	m.Write(name)
	if subtle.ConstantTimeCompare(m.Sum(nil)[:aes.BlockSize], iv) != 1 {
		return "", fmt.Errorf("name does not authenticate in this directory: %w", errAuth)
	}
	if err := checkName(string(name)); err != nil {
		return "", fmt.Errorf("%v: %w", err, errAuth)
	}
	return string(name), nil
}

// checkName refuses what cannot be a directory entry's name.
func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("invalid name %q", name)
	case len(name) > maxName:
		return fmt.Errorf("name of %d bytes is longer than %d", len(name), maxName)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("name %q holds '/' or NUL", name)
	}
	return nil
}

// storeName is where name in directory dir is stored: its encrypted name,
// or for names longer than maxShortName cw.long.HASH with the encrypted
// name in the sidecar cw.long.HASH.name (long is then that encrypted name).
func (k *keys) storeName(dir ID, name string) (stored, long string) {
	enc := k.encryptName(dir, name)
	if len(name) <= maxShortName {
		return enc, ""
	}
	return longStoreName(enc), enc
}

func longStoreName(enc string) string {
	h := sha256.Sum256([]byte(enc))
	return longPrefix + b64.EncodeToString(h[:])
}

// isLongName reports whether a store entry is a long name's entry (not its
// sidecar).
func isLongName(stored string) bool {
	return strings.HasPrefix(stored, longPrefix) && !strings.HasSuffix(stored, longSuffix)
}

// blockAD is a block's associated data: the file id and the block number.
func blockAD(dst *[idSize + 8]byte, id ID, n int64) []byte {
	copy(dst[:], id[:])
	binary.BigEndian.PutUint64(dst[idSize:], uint64(n))
	return dst[:]
}

// sealBlock seals one whole plaintext block (BlockSize bytes) into dst
// (storeBlockSize bytes) with nonce (nonceSize bytes, random).
func sealBlock(aead cipher.AEAD, dst, plain, nonce []byte, id ID, n int64) {
	var ad [idSize + 8]byte
	copy(dst[:nonceSize], nonce)
	aead.Seal(dst[nonceSize:nonceSize], dst[:nonceSize], plain, blockAD(&ad, id, n))
}

// openBlock opens one sealed block (storeBlockSize bytes) into dst
// (BlockSize bytes). dst must not overlap src.
func openBlock(aead cipher.AEAD, dst, src []byte, id ID, n int64) error {
	var ad [idSize + 8]byte
	if len(src) != storeBlockSize {
		return fmt.Errorf("block %d is %d bytes: %w", n, len(src), errAuth)
	}
	if _, err := aead.Open(dst[:0], src[:nonceSize], src[nonceSize:], blockAD(&ad, id, n)); err != nil {
		return fmt.Errorf("block %d: %w", n, errAuth)
	}
	return nil
}

// blocksFor is the number of blocks a file of size bytes holds.
func blocksFor(size int64) int64 { return (size + BlockSize - 1) / BlockSize }
