package hpke

import (
	"bytes"
	stdhpke "crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
)

// Key files (docs/sealing.md, "Key files"): one PEM block whose base64
// body is the KEM id (u16, big-endian) followed by RFC 9180's serialized
// key.
const (
	PublicKeyPEMType  = "CLEANWALL HPKE PUBLIC KEY"
	PrivateKeyPEMType = "CLEANWALL HPKE PRIVATE KEY"

	// KeyIDSize is the size of a key id: the first bytes of the SHA-256 of
	// the public key file's body.
	KeyIDSize = 8
)

// KeyID names a recipient's key pair in a sealed body's prefix.
type KeyID [KeyIDSize]byte

// String is the key id in lowercase hex, as the CLI prints it.
func (id KeyID) String() string { return hex.EncodeToString(id[:]) }

// A PublicKey is a recipient's public key: what a sealer needs.
type PublicKey struct {
	suite Suite
	key   stdhpke.PublicKey
	body  []byte // the key file's body: KEM id || serialized public key
	id    KeyID
}

// A PrivateKey is a recipient's private key: what an opener needs.
type PrivateKey struct {
	suite Suite
	key   stdhpke.PrivateKey
	body  []byte // the key file's body: KEM id || serialized private key
	pub   *PublicKey
}

// GenerateKey makes a new key pair of suite (DefaultSuite unless the
// recipient cannot use it).
func GenerateKey(suite Suite) (*PrivateKey, error) {
	si, err := suite.info()
	if err != nil {
		return nil, err
	}
	k, err := si.kem.GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("hpke: generating a %s key: %w", suite, err)
	}
	raw, err := k.Bytes()
	if err != nil {
		return nil, fmt.Errorf("hpke: serializing the %s key: %w", suite, err)
	}
	return newPrivateKey(suite, k, raw)
}

func newPrivateKey(suite Suite, k stdhpke.PrivateKey, raw []byte) (*PrivateKey, error) {
	pub, err := newPublicKey(suite, k.PublicKey())
	if err != nil {
		return nil, err
	}
	return &PrivateKey{suite: suite, key: k, body: keyBody(suite, raw), pub: pub}, nil
}

func newPublicKey(suite Suite, k stdhpke.PublicKey) (*PublicKey, error) {
	body := keyBody(suite, k.Bytes())
	return &PublicKey{suite: suite, key: k, body: body, id: keyID(body)}, nil
}

func keyBody(suite Suite, raw []byte) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(suite)), raw...)
}

func keyID(publicBody []byte) KeyID {
	sum := sha256.Sum256(publicBody)
	return KeyID(sum[:KeyIDSize])
}

// Public is the private key's public half.
func (k *PrivateKey) Public() *PublicKey { return k.pub }

// Suite is the key's suite.
func (k *PrivateKey) Suite() Suite { return k.suite }

// Marshal encodes the private key as a key file.
func (k *PrivateKey) Marshal() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: PrivateKeyPEMType, Bytes: k.body})
}

// Suite is the key's suite.
func (k *PublicKey) Suite() Suite { return k.suite }

// ID is the key id sealed bodies carry in their prefix.
func (k *PublicKey) ID() KeyID { return k.id }

// Marshal encodes the public key as a key file.
func (k *PublicKey) Marshal() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: PublicKeyPEMType, Bytes: k.body})
}

// Equal reports whether k and o are the same key.
func (k *PublicKey) Equal(o *PublicKey) bool { return o != nil && bytes.Equal(k.body, o.body) }

// ParsePublicKey reads a public key file.
func ParsePublicKey(data []byte) (*PublicKey, error) {
	suite, raw, err := decodeKeyFile(data, PublicKeyPEMType)
	if err != nil {
		return nil, err
	}
	si, _ := suite.info()
	if len(raw) != si.pubSize {
		return nil, fmt.Errorf("hpke: public key file: a %s public key is %d bytes, this one %d", suite, si.pubSize, len(raw))
	}
	k, err := si.kem.NewPublicKey(raw)
	if err != nil {
		return nil, fmt.Errorf("hpke: public key file: not a valid %s public key: %w", suite, err)
	}
	return newPublicKey(suite, k)
}

// ParsePrivateKey reads a private key file.
func ParsePrivateKey(data []byte) (*PrivateKey, error) {
	suite, raw, err := decodeKeyFile(data, PrivateKeyPEMType)
	if err != nil {
		return nil, err
	}
	si, _ := suite.info()
	if len(raw) != si.keySize {
		return nil, fmt.Errorf("hpke: private key file: a %s private key is %d bytes, this one %d", suite, si.keySize, len(raw))
	}
	k, err := si.kem.NewPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("hpke: private key file: not a valid %s private key: %w", suite, err)
	}
	// Keep the bytes as the file has them: an X25519 key is clamped when
	// used, and Marshal must give the file back unchanged.
	return newPrivateKey(suite, k, bytes.Clone(raw))
}

// decodeKeyFile checks that data is exactly one PEM block of type want
// (whitespace around it allowed) and returns its suite and serialized key.
func decodeKeyFile(data []byte, want string) (Suite, []byte, error) {
	what := "public key file"
	if want == PrivateKeyPEMType {
		what = "private key file"
	}
	trimmed := bytes.TrimSpace(data)
	if !bytes.HasPrefix(trimmed, []byte("-----BEGIN ")) {
		return 0, nil, fmt.Errorf("hpke: %s: not PEM (it must start with -----BEGIN %s-----)", what, want)
	}
	block, rest := pem.Decode(trimmed)
	switch {
	case block == nil:
		return 0, nil, fmt.Errorf("hpke: %s: malformed PEM", what)
	case block.Type != want:
		hint := ""
		if block.Type == PublicKeyPEMType || block.Type == PrivateKeyPEMType {
			hint = " (the other half of the pair?)"
		}
		return 0, nil, fmt.Errorf("hpke: %s: it holds a %q block, want %q%s", what, block.Type, want, hint)
	case len(block.Headers) != 0:
		return 0, nil, fmt.Errorf("hpke: %s: PEM headers are not allowed", what)
	case len(bytes.TrimSpace(rest)) != 0:
		return 0, nil, fmt.Errorf("hpke: %s: data after the PEM block", what)
	case len(block.Bytes) < 2:
		return 0, nil, fmt.Errorf("hpke: %s: %d bytes is too short for a key", what, len(block.Bytes))
	}
	suite := Suite(binary.BigEndian.Uint16(block.Bytes))
	if _, err := suite.info(); err != nil {
		return 0, nil, fmt.Errorf("hpke: %s: %w", what, err)
	}
	return suite, block.Bytes[2:], nil
}

var errNilKey = errors.New("hpke: nil key")
