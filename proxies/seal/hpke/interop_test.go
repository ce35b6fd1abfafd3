package hpke_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"testing"

	circl "github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"

	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// The interoperability tests: a second implementation of the format,
// written from docs/sealing.md with github.com/cloudflare/circl's HPKE
// (which has both suites, X-Wing as KEM_XWING), opens what this package
// seals and seals what it opens, with key files exchanged both ways. It
// uses only the package's exported API, the key files and the sealed
// bytes.

var circlKEM = map[hpke.Suite]circl.KEM{hpke.SuiteXWing: circl.KEM_XWING, hpke.SuiteX25519: circl.KEM_X25519_HKDF_SHA256}

func circlSuite(s hpke.Suite) circl.Suite {
	return circl.NewSuite(circlKEM[s], circl.KDF_HKDF_SHA256, circl.AEAD_AES256GCM)
}

// docPrefix is the bound prefix (magic through context digest).
func docPrefix(s hpke.Suite, chunk int, pubBody []byte, context string) []byte {
	b := []byte("CWHP\x01")
	b = binary.BigEndian.AppendUint16(b, uint16(s))
	b = binary.BigEndian.AppendUint16(b, 0x0001) // HKDF-SHA256
	b = binary.BigEndian.AppendUint16(b, 0x0002) // AES-256-GCM
	b = binary.BigEndian.AppendUint32(b, uint32(chunk))
	id := sha256.Sum256(pubBody) // the public key file's body: KEM id || key
	b = append(b, id[:8]...)
	ctx := sha256.Sum256([]byte(context))
	return append(b, ctx[:]...)
}

func docInfo(bound []byte) []byte { return append([]byte("cleanwall/hpke/v1\x00"), bound...) }

// docKeys are the three exports of the key schedule.
func docKeys(ctx circl.Context) (cipher.AEAD, []byte, []byte) {
	key := ctx.Export([]byte("cleanwall/hpke/v1 chunk key"), 32)
	nonce := ctx.Export([]byte("cleanwall/hpke/v1 chunk nonce"), 12)
	commit := ctx.Export([]byte("cleanwall/hpke/v1 commitment"), 32)
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return aead, nonce, commit
}

func docNonce(base []byte, i uint32) []byte {
	n := bytes.Clone(base)
	n[8] ^= byte(i >> 24)
	n[9] ^= byte(i >> 16)
	n[10] ^= byte(i >> 8)
	n[11] ^= byte(i)
	return n
}

// circlOpen opens a body as docs/sealing.md says, with circl's HPKE.
func circlOpen(privFile, pubFile, sealed []byte, context string) ([]byte, error) {
	b, _ := pem.Decode(privFile)
	suite := hpke.Suite(binary.BigEndian.Uint16(b.Bytes))
	pb, _ := pem.Decode(pubFile)
	scheme := circlKEM[suite].Scheme()
	sk, err := scheme.UnmarshalBinaryPrivateKey(b.Bytes[2:])
	if err != nil {
		return nil, fmt.Errorf("circl: private key: %w", err)
	}
	if len(sealed) < 55 {
		return nil, errors.New("short prefix")
	}
	chunk := int(binary.BigEndian.Uint32(sealed[11:15]))
	bound := sealed[:55]
	if !bytes.Equal(bound, docPrefix(suite, chunk, pb.Bytes, context)) {
		return nil, errors.New("prefix: another suite, key or context")
	}
	encSize := scheme.CiphertextSize()
	enc, commitment := sealed[55:55+encSize], sealed[55+encSize:55+encSize+32]
	rcv, err := circlSuite(suite).NewReceiver(sk, docInfo(bound))
	if err != nil {
		return nil, err
	}
	ctx, err := rcv.Setup(enc)
	if err != nil {
		return nil, err
	}
	aead, base, commit := docKeys(ctx)
	if subtle.ConstantTimeCompare(commit, commitment) != 1 {
		return nil, errors.New("commitment")
	}
	rest := sealed[55+encSize+32:]
	var out []byte
	for i := uint32(0); ; i++ {
		if len(rest) < 8 {
			return nil, errors.New("truncated")
		}
		fh := rest[:8]
		index, v := binary.BigEndian.Uint32(fh), binary.BigEndian.Uint32(fh[4:])
		final, n := v>>31 == 1, int(v&^(1<<31))
		if index != i || n > chunk || (!final && n != chunk) || (final && n == 0 && i != 0) || len(rest) < 8+n+16 {
			return nil, fmt.Errorf("chunk %d: bad frame", i)
		}
		pt, err := aead.Open(nil, docNonce(base, i), rest[8:8+n+16], fh)
		if err != nil {
			return nil, fmt.Errorf("chunk %d: %w", i, err)
		}
		out = append(out, pt...)
		rest = rest[8+n+16:]
		if final {
			if len(rest) != 0 {
				return nil, errors.New("trailing data")
			}
			return out, nil
		}
	}
}

// circlSeal seals a body as docs/sealing.md says, with circl's HPKE.
func circlSeal(pubFile, pt []byte, context string, chunk int) ([]byte, error) {
	b, _ := pem.Decode(pubFile)
	suite := hpke.Suite(binary.BigEndian.Uint16(b.Bytes))
	pk, err := circlKEM[suite].Scheme().UnmarshalBinaryPublicKey(b.Bytes[2:])
	if err != nil {
		return nil, fmt.Errorf("circl: public key: %w", err)
	}
	bound := docPrefix(suite, chunk, b.Bytes, context)
	snd, err := circlSuite(suite).NewSender(pk, docInfo(bound))
	if err != nil {
		return nil, err
	}
	enc, ctx, err := snd.Setup(rand.Reader)
	if err != nil {
		return nil, err
	}
	aead, base, commit := docKeys(ctx)
	out := append(append(bytes.Clone(bound), enc...), commit...)
	chunks := max(1, (len(pt)+chunk-1)/chunk)
	for i := range chunks {
		part := pt[i*chunk : min((i+1)*chunk, len(pt))]
		v := uint32(len(part))
		if i == chunks-1 {
			v |= 1 << 31
		}
		fh := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, uint32(i)), v)
		out = append(out, fh...)
		out = aead.Seal(out, docNonce(base, uint32(i)), part, fh)
	}
	return out, nil
}

func interopPattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>10)
	}
	return b
}

// TestInteropCircl: for both suites and sizes around the chunk boundary,
// bodies this package seals open with the circl implementation and the
// reverse, with keys generated on either side.
func TestInteropCircl(t *testing.T) {
	const context = "rule=partner-crm"
	sizes := []int{0, 1, hpke.ChunkSize - 1, hpke.ChunkSize, hpke.ChunkSize + 1, 3*hpke.ChunkSize + 17}
	for _, suite := range []hpke.Suite{hpke.SuiteXWing, hpke.SuiteX25519} {
		t.Run(suite.String(), func(t *testing.T) {
			// A key pair of each side, exchanged as key files.
			ours, err := hpke.GenerateKey(suite)
			if err != nil {
				t.Fatal(err)
			}
			circlPub, circlPriv, err := circlKEM[suite].Scheme().GenerateKeyPair()
			if err != nil {
				t.Fatal(err)
			}
			theirs := keyFilesOf(t, suite, circlPub, circlPriv)
			for _, pair := range []struct {
				name              string
				privFile, pubFile []byte
			}{
				{"our key", ours.Marshal(), ours.Public().Marshal()},
				{"circl's key", theirs.priv, theirs.pub},
			} {
				priv, err := hpke.ParsePrivateKey(pair.privFile)
				if err != nil {
					t.Fatal(err)
				}
				pub, err := hpke.ParsePublicKey(pair.pubFile)
				if err != nil {
					t.Fatal(err)
				}
				if !priv.Public().Equal(pub) {
					t.Fatalf("%s: the private key file's public half is not the public key file's", pair.name)
				}
				for _, n := range sizes {
					pt := interopPattern(n)
					// Ours to circl, through the streaming sealer.
					var sealed bytes.Buffer
					w, err := hpke.NewSealer(&sealed, pub, context)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := w.Write(pt); err != nil || w.Close() != nil {
						t.Fatal(err)
					}
					got, err := circlOpen(pair.privFile, pair.pubFile, sealed.Bytes(), context)
					if err != nil || !bytes.Equal(got, pt) {
						t.Fatalf("%s, %d bytes: circl opened our body to %d bytes, %v", pair.name, n, len(got), err)
					}
					// circl to ours, through the streaming opener.
					theirBody, err := circlSeal(pair.pubFile, pt, context, hpke.ChunkSize)
					if err != nil {
						t.Fatal(err)
					}
					if int64(len(theirBody)) != hpke.SealedSize(int64(n), pub) {
						t.Fatalf("%s, %d bytes: circl's body is %d bytes, SealedSize says %d", pair.name, n, len(theirBody), hpke.SealedSize(int64(n), pub))
					}
					got, err = hpke.Open(theirBody, priv, context)
					if err != nil || !bytes.Equal(got, pt) {
						t.Fatalf("%s, %d bytes: we opened circl's body to %d bytes, %v", pair.name, n, len(got), err)
					}
				}
			}
			// circl's body under another chunk size opens too: the size is
			// the prefix's, not a constant.
			body, err := circlSeal(ours.Public().Marshal(), interopPattern(1000), context, 64)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := hpke.Open(body, ours, context); err != nil || !bytes.Equal(got, interopPattern(1000)) {
				t.Fatalf("circl's body in 64-byte chunks: %d bytes, %v", len(got), err)
			}
			// And the second implementation refuses what it should: a
			// body cut at a chunk boundary, another context.
			full, _ := hpke.Seal(interopPattern(3*hpke.ChunkSize), ours.Public(), context)
			cutAt := hpke.PrefixSize(suite) + 2*(hpke.ChunkSize+hpke.FrameOverhead)
			if _, err := circlOpen(ours.Marshal(), ours.Public().Marshal(), full[:cutAt], context); err == nil {
				t.Fatal("circl opened a truncated body")
			}
			if _, err := circlOpen(ours.Marshal(), ours.Public().Marshal(), full, "rule=other"); err == nil {
				t.Fatal("circl opened a body under another context")
			}
		})
	}
}

type keyFiles struct{ priv, pub []byte }

// keyFilesOf writes circl's key pair as key files, as the doc says.
func keyFilesOf(t *testing.T, suite hpke.Suite, pub kem.PublicKey, priv kem.PrivateKey) keyFiles {
	t.Helper()
	pk, err := pub.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	sk, err := priv.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	id := binary.BigEndian.AppendUint16(nil, uint16(suite))
	return keyFiles{
		priv: pem.EncodeToMemory(&pem.Block{Type: "CLEANWALL HPKE PRIVATE KEY", Bytes: append(bytes.Clone(id), sk...)}),
		pub:  pem.EncodeToMemory(&pem.Block{Type: "CLEANWALL HPKE PUBLIC KEY", Bytes: append(bytes.Clone(id), pk...)}),
	}
}
