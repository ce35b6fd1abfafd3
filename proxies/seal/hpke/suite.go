package hpke

import (
	"crypto/ecdh"
	stdhpke "crypto/hpke"
	"fmt"
)

// Suite is an HPKE suite this format seals under, named by its KEM: its
// value is the KEM's RFC 9180 identifier. The KDF (HKDF-SHA256) and the
// AEAD (AES-256-GCM) are the same for every suite of format version 1.
type Suite uint16

const (
	// SuiteXWing is the default: the ML-KEM-768 + X25519 hybrid KEM
	// (X-Wing, "MLKEM768-X25519" of draft-ietf-hpke-pq, KEM id 0x647a),
	// which stays confidential if either ML-KEM-768 or X25519 holds, so a
	// body recorded today does not open once a quantum computer breaks
	// X25519.
	SuiteXWing Suite = 0x647a
	// SuiteX25519 is DHKEM(X25519, HKDF-SHA256) (KEM id 0x0020), for
	// recipients whose HPKE has no X-Wing yet. Not post-quantum.
	SuiteX25519 Suite = 0x0020

	// DefaultSuite is what GenerateKey callers and `cleanwall seal keygen`
	// use when the recipient does not ask for another.
	DefaultSuite = SuiteXWing
)

// The KDF and AEAD of every suite (RFC 9180 identifiers).
const (
	kdfHKDFSHA256 = 0x0001
	aeadAES256GCM = 0x0002
)

// suiteInfo is what the format needs to know of a suite.
type suiteInfo struct {
	name    string
	kem     stdhpke.KEM
	encSize int // Nenc: the encapsulated key's size
	pubSize int // Npk
	keySize int // Nsk as the private key file holds it
}

var suites = map[Suite]suiteInfo{
	SuiteXWing:  {name: "xwing", kem: stdhpke.MLKEM768X25519(), encSize: 1120, pubSize: 1216, keySize: 32},
	SuiteX25519: {name: "x25519", kem: stdhpke.DHKEM(ecdh.X25519()), encSize: 32, pubSize: 32, keySize: 32},
}

// String is the suite's name as the CLI and the docs write it.
func (s Suite) String() string {
	if i, ok := suites[s]; ok {
		return i.name
	}
	return fmt.Sprintf("kem-0x%04x", uint16(s))
}

// ParseSuite reads a suite name: "xwing" or "x25519".
func ParseSuite(name string) (Suite, error) {
	for s, i := range suites {
		if i.name == name {
			return s, nil
		}
	}
	return 0, fmt.Errorf("unknown HPKE suite %q: xwing or x25519", name)
}

func (s Suite) info() (suiteInfo, error) {
	i, ok := suites[s]
	if !ok {
		return i, fmt.Errorf("%w: KEM 0x%04x is not one of this format's (X-Wing 0x647a, X25519 0x0020)", ErrSuite, uint16(s))
	}
	return i, nil
}
