package hpke

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"strings"
	"testing"
)

// TestKeyFiles: a generated pair survives its files byte for byte, the
// files are what docs/sealing.md says (one PEM block: KEM id || RFC 9180
// serialized key), and the key id is the SHA-256 of the public body.
func TestKeyFiles(t *testing.T) {
	for _, suite := range allSuites {
		t.Run(suite.String(), func(t *testing.T) {
			priv := testKey(suite)
			si, _ := suite.info()
			privFile, pubFile := priv.Marshal(), priv.Public().Marshal()
			for _, f := range []struct {
				data     []byte
				typ      string
				bodySize int
			}{{privFile, PrivateKeyPEMType, 2 + si.keySize}, {pubFile, PublicKeyPEMType, 2 + si.pubSize}} {
				b, rest := pem.Decode(f.data)
				if b == nil || b.Type != f.typ || len(rest) != 0 || len(b.Headers) != 0 {
					t.Fatalf("key file is not one %q PEM block:\n%s", f.typ, f.data)
				}
				if len(b.Bytes) != f.bodySize || b.Bytes[0] != byte(suite>>8) || b.Bytes[1] != byte(suite) {
					t.Fatalf("%s body: %d bytes starting %x, want %d starting with KEM id %04x", f.typ, len(b.Bytes), b.Bytes[:2], f.bodySize, uint16(suite))
				}
			}
			priv2, err := ParsePrivateKey(privFile)
			if err != nil {
				t.Fatal(err)
			}
			pub2, err := ParsePublicKey(pubFile)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(priv2.Marshal(), privFile) || !bytes.Equal(pub2.Marshal(), pubFile) {
				t.Fatal("a parsed key marshals to another file")
			}
			if !priv2.Public().Equal(pub2) || priv2.Suite() != suite || pub2.Suite() != suite {
				t.Fatal("the parsed private key's public half is not the parsed public key")
			}
			b, _ := pem.Decode(pubFile)
			sum := sha256.Sum256(b.Bytes)
			if pub2.ID().String() != hex.EncodeToString(sum[:KeyIDSize]) {
				t.Fatalf("key id %s, want the first 8 bytes of SHA-256 of the public body %x", pub2.ID(), sum[:KeyIDSize])
			}
			// What a sealer makes to the parsed public key opens with the
			// parsed private key.
			sealed, err := Seal([]byte("hello"), pub2, testContext)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := Open(sealed, priv2, testContext); err != nil || string(got) != "hello" {
				t.Fatalf("round trip through key files: %q, %v", got, err)
			}
		})
	}
	a, _ := GenerateKey(SuiteX25519)
	if a.Public().Equal(testPub(SuiteX25519)) || a.Public().ID() == testPub(SuiteX25519).ID() {
		t.Fatal("two generated keys are equal")
	}
	if _, err := GenerateKey(Suite(0x0010)); err == nil {
		t.Fatal("GenerateKey accepted DHKEM(P-256), which the format does not use")
	}
}

// TestKeyFileErrors: each way a key file can be wrong is refused with an
// error that says which.
func TestKeyFileErrors(t *testing.T) {
	priv := testKey(SuiteXWing)
	privFile, pubFile := priv.Marshal(), priv.Public().Marshal()
	block := func(typ string, body []byte) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: body})
	}
	pubBody, _ := pem.Decode(pubFile)
	privBody, _ := pem.Decode(privFile)
	x25519Pub := testPub(SuiteX25519).Marshal()
	for _, tc := range []struct {
		name    string
		data    []byte
		private bool
		want    string
	}{
		{"private file as public", privFile, false, "the other half"},
		{"public file as private", pubFile, true, "the other half"},
		{"not PEM", []byte("hello"), false, "not PEM"},
		{"raw bytes", pubBody.Bytes, false, "not PEM"},
		{"broken PEM", []byte("-----BEGIN CLEANWALL HPKE PUBLIC KEY-----\nAAAA\n"), false, "malformed PEM"},
		{"another PEM type", block("PUBLIC KEY", pubBody.Bytes), false, `"PUBLIC KEY"`},
		{"PEM headers", pem.EncodeToMemory(&pem.Block{Type: PublicKeyPEMType, Headers: map[string]string{"Suite": "xwing"}, Bytes: pubBody.Bytes}), false, "headers"},
		{"data after the block", append(bytes.Clone(pubFile), "trailing"...), false, "after the PEM block"},
		{"two blocks", append(bytes.Clone(pubFile), pubFile...), false, "after the PEM block"},
		{"empty body", block(PublicKeyPEMType, nil), false, "too short"},
		{"unknown suite", block(PublicKeyPEMType, append([]byte{0x00, 0x10}, pubBody.Bytes[2:]...)), false, "KEM 0x0010"},
		{"short public key", block(PublicKeyPEMType, pubBody.Bytes[:100]), false, "1216 bytes"},
		{"suite of another key size", block(PublicKeyPEMType, append([]byte{0x00, 0x20}, pubBody.Bytes[2:]...)), false, "x25519 public key is 32 bytes"},
		{"long private key", block(PrivateKeyPEMType, append(bytes.Clone(privBody.Bytes), 0)), true, "32 bytes"},
		{"X25519 public key labelled X-Wing", func() []byte {
			b, _ := pem.Decode(x25519Pub)
			return block(PublicKeyPEMType, append([]byte{0x64, 0x7a}, b.Bytes[2:]...))
		}(), false, "1216 bytes"},
	} {
		var err error
		if tc.private {
			_, err = ParsePrivateKey(tc.data)
		} else {
			_, err = ParsePublicKey(tc.data)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
	// Whitespace and CRLF around the block are fine (a file edited on
	// another system).
	crlf := bytes.ReplaceAll(pubFile, []byte("\n"), []byte("\r\n"))
	if _, err := ParsePublicKey(append(append([]byte("\n  "), crlf...), "\n\n"...)); err != nil {
		t.Fatalf("a key file with CRLF and blank lines: %v", err)
	}
	// A body in lines of another length is still the same key.
	long := "-----BEGIN " + PublicKeyPEMType + "-----\n" + base64.StdEncoding.EncodeToString(pubBody.Bytes) + "\n-----END " + PublicKeyPEMType + "-----\n"
	if k, err := ParsePublicKey([]byte(long)); err != nil || !k.Equal(priv.Public()) {
		t.Fatalf("a key file in one long line: %v", err)
	}
}

// TestParseSuite: the CLI's suite names.
func TestParseSuite(t *testing.T) {
	for name, want := range map[string]Suite{"xwing": SuiteXWing, "x25519": SuiteX25519} {
		if s, err := ParseSuite(name); err != nil || s != want || s.String() != name {
			t.Errorf("ParseSuite(%q) = %v, %v", name, s, err)
		}
	}
	if _, err := ParseSuite("p256"); err == nil {
		t.Error("ParseSuite accepted p256")
	}
	if DefaultSuite != SuiteXWing {
		t.Error("the default suite is not X-Wing")
	}
}
