package attest

import (
	"context"
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
)

// TEESNP is the TEE name of AMD SEV-SNP evidence on the wire ("tee": "snp").
const TEESNP = "snp"

// Attester produces TEE evidence that binds caller-chosen report data.
type Attester interface {
	// TEE names the kind of evidence, as sent in a release request ("snp").
	TEE() string
	// Simulated reports whether the evidence comes from a software simulation
	// (signed by a test-only chain) rather than real hardware.
	Simulated() bool
	// Evidence returns evidence whose report data is exactly reportData. For
	// SEV-SNP it is the raw report followed by its certificate table.
	Evidence(ctx context.Context, reportData [64]byte) ([]byte, error)
}

// ProtocolLabel is the domain separation label of the release protocol v1. It
// starts the REPORT_DATA preimage and the HPKE info.
const ProtocolLabel = "cleanwall-release-v1"

// NonceSize is the size of a broker challenge nonce.
const NonceSize = 32

// KeySize is the size of a released key.
const KeySize = 32

// HPKE KEM identifiers the protocol accepts.
const (
	// KEMX25519 is DHKEM(X25519, HKDF-SHA256); every party must support it.
	KEMX25519 uint16 = 0x0020
	// KEMMLKEM768X25519 is the hybrid ML-KEM-768 + X25519 KEM (X-Wing).
	KEMMLKEM768X25519 uint16 = 0x647a
)

// ErrUnsupportedKEM is returned for a KEM identifier the protocol does not accept.
var ErrUnsupportedKEM = errors.New("unsupported HPKE KEM")

// KEM returns the HPKE KEM for one of the accepted identifiers.
func KEM(id uint16) (hpke.KEM, error) {
	switch id {
	case KEMX25519, KEMMLKEM768X25519:
		return hpke.NewKEM(id)
	default:
		return nil, fmt.Errorf("%w: 0x%04x", ErrUnsupportedKEM, id)
	}
}

// ReportData derives the 64-byte REPORT_DATA that binds a release request:
//
//	SHA-512( "cleanwall-release-v1" || 0x00
//	         || u32be(len(nonce))  || nonce
//	         || u16be(kemID)
//	         || u32be(len(pubKey)) || pubKey
//	         || u32be(len(keyID))  || keyID )
//
// Both the attester and the broker call this one function (through
// ReportDataWithPolicy or ReportDataBound when the request names an egress
// policy or a node key).
func ReportData(nonce []byte, kemID uint16, publicKey []byte, keyID string) [64]byte {
	return ReportDataWithPolicy(nonce, kemID, publicKey, keyID, nil)
}

// ReportDataWithPolicy derives the REPORT_DATA of a release request bound to
// an egress policy (docs/keybroker.md §5): the input of ReportData followed by
//
//	|| u32be(32) || policySHA256
//
// A nil policySHA256 (a request without policySHA256) gives ReportData's
// value, so the §2 layout is unchanged for requests that bind no policy.
func ReportDataWithPolicy(nonce []byte, kemID uint16, publicKey []byte, keyID string, policySHA256 []byte) [64]byte {
	return ReportDataBound(nonce, kemID, publicKey, keyID, policySHA256, nil)
}

// NodeKeyLabel tags the node key in the REPORT_DATA input
// (docs/keybroker.md §7).
const NodeKeyLabel = "cleanwall-node-key"

// NodeKeySize is the size of a node key: an Ed25519 public key.
const NodeKeySize = ed25519.PublicKeySize

// ReportDataBound derives the REPORT_DATA of a release request with every
// optional binding: the input of ReportDataWithPolicy (with the policy
// element only when policySHA256 is not nil) followed, when nodeKey is not
// nil, by
//
//	|| u32be(18) || "cleanwall-node-key" || u32be(32) || nodeKey
//
// the Ed25519 public key that signs the node's audit checkpoints
// (docs/keybroker.md §7). The label's length (18) differs from the policy
// element's (32), so the two optional elements cannot be mistaken for each
// other. Nil for both gives ReportData's value.
func ReportDataBound(nonce []byte, kemID uint16, publicKey []byte, keyID string, policySHA256, nodeKey []byte) [64]byte {
	h := sha512.New()
	h.Write([]byte(ProtocolLabel))
	h.Write([]byte{0})
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(nonce)))
	h.Write(n[:])
	h.Write(nonce)
	var k [2]byte
	binary.BigEndian.PutUint16(k[:], kemID)
	h.Write(k[:])
	binary.BigEndian.PutUint32(n[:], uint32(len(publicKey)))
	h.Write(n[:])
	h.Write(publicKey)
	binary.BigEndian.PutUint32(n[:], uint32(len(keyID)))
	h.Write(n[:])
	h.Write([]byte(keyID))
	if policySHA256 != nil {
		binary.BigEndian.PutUint32(n[:], uint32(len(policySHA256)))
		h.Write(n[:])
		h.Write(policySHA256)
	}
	if nodeKey != nil {
		binary.BigEndian.PutUint32(n[:], uint32(len(NodeKeyLabel)))
		h.Write(n[:])
		h.Write([]byte(NodeKeyLabel))
		binary.BigEndian.PutUint32(n[:], uint32(len(nodeKey)))
		h.Write(n[:])
		h.Write(nodeKey)
	}
	var out [64]byte
	h.Sum(out[:0])
	return out
}

// PolicySHA256Size is the size of an egress policy hash (docs/keybroker.md §5).
const PolicySHA256Size = sha256.Size

// ErrMalformedPolicyHash is returned for a policy hash that is not 64 hex
// characters.
var ErrMalformedPolicyHash = errors.New("malformed egress policy hash")

// ParsePolicySHA256 decodes the hash that `cleanwall policy hash` prints
// (and policy.Compiled.Hash holds): exactly 64 hex characters. Upper and
// lower case decode to the same bytes.
func ParsePolicySHA256(s string) ([]byte, error) {
	if len(s) != 2*PolicySHA256Size {
		return nil, fmt.Errorf("%w: %d characters, want %d hex characters", ErrMalformedPolicyHash, len(s), 2*PolicySHA256Size)
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: not hex", ErrMalformedPolicyHash)
	}
	return b, nil
}

// HPKEInfo returns the HPKE info of a release: "cleanwall-release-v1" || REPORT_DATA.
func HPKEInfo(reportData [64]byte) []byte {
	info := make([]byte, 0, len(ProtocolLabel)+len(reportData))
	info = append(info, ProtocolLabel...)
	return append(info, reportData[:]...)
}

// SealKey seals key to publicKey (of KEM kemID) in HPKE base mode with
// HKDF-SHA256 and AES-256-GCM, bound to reportData through the info. The
// result is the encapsulated key followed by the ciphertext.
func SealKey(kemID uint16, publicKey []byte, reportData [64]byte, key []byte) ([]byte, error) {
	kem, err := KEM(kemID)
	if err != nil {
		return nil, err
	}
	pk, err := kem.NewPublicKey(publicKey)
	if err != nil {
		return nil, fmt.Errorf("parsing HPKE public key: %w", err)
	}
	sealed, err := hpke.Seal(pk, hpke.HKDFSHA256(), hpke.AES256GCM(), HPKEInfo(reportData), key)
	if err != nil {
		return nil, fmt.Errorf("sealing key: %w", err)
	}
	return sealed, nil
}

// OpenKey opens what SealKey sealed, with the ephemeral private key.
func OpenKey(priv hpke.PrivateKey, reportData [64]byte, sealed []byte) ([]byte, error) {
	key, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), HPKEInfo(reportData), sealed)
	if err != nil {
		return nil, fmt.Errorf("opening sealed key: %w", err)
	}
	return key, nil
}
