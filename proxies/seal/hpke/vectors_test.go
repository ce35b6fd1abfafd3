package hpke

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	stdhpke "crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"os"
	"slices"
	"testing"
	"testing/cryptotest"
)

// The test vectors in testdata/vectors.json pin the format. HPKE's
// encapsulation is randomized, so a vector cannot say "seal this and get
// these bytes" to another implementation; it gives the recipient's key
// files, the sealed body, the key schedule's exports for it and the
// plaintext, and the body's chunks are the deterministic AES-256-GCM
// sealing of the plaintext under the exported key and nonce. TestVectors
// checks the file on those terms (as another implementation would), and
// that the generator still makes the same prefix fields, frame headers and
// sizes. After a deliberate format change (a new version), regenerate with
//
//	go test ./proxies/seal/hpke -run TestVectors -update
//
// and commit the result (the generator fixes the keys and, through
// testing/cryptotest, the encapsulation's randomness).
var update = flag.Bool("update", false, "rewrite testdata/vectors.json from the generator")

const vectorsFile = "testdata/vectors.json"

type vectorFile struct {
	About   []string        `json:"about"`
	Keys    []vectorKey     `json:"keys"`
	Valid   []validVector   `json:"valid"`
	Invalid []invalidVector `json:"invalid"`
}

type vectorKey struct {
	Name           string `json:"name"`
	Suite          string `json:"suite"`
	PrivateKeyFile string `json:"privateKeyFile"`
	PublicKeyFile  string `json:"publicKeyFile"`
	KeyID          string `json:"keyID"`
}

type validVector struct {
	Name      string `json:"name"`
	Key       string `json:"key"`
	Context   string `json:"context"`
	ChunkSize int    `json:"chunkSize"`
	// Plaintext is hex, or empty with PlaintextLength set: byte i of the
	// plaintext is i mod 251.
	Plaintext       string `json:"plaintext,omitempty"`
	PlaintextLength int    `json:"plaintextLength,omitempty"`
	// Info is HPKE's info; Enc the encapsulated key; ChunkKey, BaseNonce
	// and Commitment the HPKE context's exports.
	Info       string `json:"info"`
	Enc        string `json:"enc"`
	ChunkKey   string `json:"chunkKey"`
	BaseNonce  string `json:"baseNonce"`
	Commitment string `json:"commitment"`
	// Sealed is hex, or empty with SealedSHA256 set.
	Sealed       string `json:"sealed,omitempty"`
	SealedSHA256 string `json:"sealedSHA256,omitempty"`
	SealedLength int    `json:"sealedLength"`
}

type invalidVector struct {
	Name string `json:"name"`
	// Of is the valid vector it derives from; Key, when set, the key to
	// open it with instead of Of's, Context the context to expect instead
	// of Of's ("*" for any: the key holder's tool).
	Of      string `json:"of"`
	Key     string `json:"key,omitempty"`
	Context string `json:"context,omitempty"`
	Sealed  string `json:"sealed"`
	// Error is the sentinel the opener must refuse it with; Released how
	// many plaintext bytes (the verified chunks before the refusal) a
	// streaming opener may have returned first.
	Error    string `json:"error"`
	Released int    `json:"released"`
}

var sentinels = map[string]error{
	"ErrNotSealed": ErrNotSealed, "ErrVersion": ErrVersion, "ErrSuite": ErrSuite, "ErrPrefix": ErrPrefix,
	"ErrWrongKey": ErrWrongKey, "ErrContext": ErrContext, "ErrCommitment": ErrCommitment, "ErrAuth": ErrAuth,
	"ErrOutOfOrder": ErrOutOfOrder, "ErrTruncated": ErrTruncated, "ErrTrailingData": ErrTrailingData,
}

func patternPlaintext(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// vectorKeys are fixed key pairs: private keys of bytes 0x00-0x1f, 0x20-0x3f.
func vectorKeys(t *testing.T) ([]vectorKey, map[string]*PrivateKey) {
	keys := map[string]*PrivateKey{}
	var out []vectorKey
	for i, k := range []struct {
		name  string
		suite Suite
	}{{"xwing", SuiteXWing}, {"x25519", SuiteX25519}, {"xwing-other", SuiteXWing}} {
		raw := make([]byte, 32)
		for j := range raw {
			raw[j] = byte(32*(i%2) + j + 64*(i/2))
		}
		si, _ := k.suite.info()
		sk, err := si.kem.NewPrivateKey(raw)
		if err != nil {
			t.Fatal(err)
		}
		priv, err := newPrivateKey(k.suite, sk, raw)
		if err != nil {
			t.Fatal(err)
		}
		keys[k.name] = priv
		out = append(out, vectorKey{Name: k.name, Suite: k.suite.String(), PrivateKeyFile: string(priv.Marshal()),
			PublicKeyFile: string(priv.Public().Marshal()), KeyID: priv.Public().ID().String()})
	}
	return out, keys
}

// generateVectors makes the vector file from fixed inputs.
func generateVectors(t *testing.T) *vectorFile {
	cryptotest.SetGlobalRandom(t, 0x636c65616e77616c) // "cleanwal"
	keyList, keys := vectorKeys(t)
	f := &vectorFile{Keys: keyList, About: []string{
		"Test vectors of cleanwall's HPKE body format, version 1 (docs/sealing.md, Trusted mode: HPKE).",
		"keys: key files (PEM) and key ids. valid: sealed is a body sealed to key under context in chunks of chunkSize; opening it with the private key must give plaintext.",
		"info is HPKE's info; enc the encapsulated key in the prefix; chunkKey, baseNonce and commitment the HPKE context's exports (setting up the receiving context from enc and info gives them).",
		"The chunks are deterministic given chunkKey and baseNonce: sealing plaintext's chunks with them must give the sealed bytes after the prefix.",
		"plaintextLength instead of plaintext: byte i is i mod 251. sealedSHA256 instead of sealed: the SHA-256 of the sealed bytes.",
		"invalid: opening sealed with the private key of the valid vector named in of (or key), expecting its context (or context; * for any), must fail with error, after releasing at most released plaintext bytes.",
		"Regenerate (only for a new format version): go test ./proxies/seal/hpke -run TestVectors -update",
	}}
	const ctx = "rule=partner-crm"
	add := func(name, key, context string, chunk int, pt []byte, byLength bool) {
		priv := keys[key]
		sealed, err := sealChunks(pt, priv.Public(), context, chunk)
		if err != nil {
			t.Fatal(err)
		}
		p, _, err := ParsePrefix(sealed)
		if err != nil {
			t.Fatal(err)
		}
		ck, bn, cm := specExports(t, priv, &p)
		v := validVector{Name: name, Key: key, Context: context, ChunkSize: chunk,
			Info: hex.EncodeToString(p.info()), Enc: hex.EncodeToString(p.Enc),
			ChunkKey: hex.EncodeToString(ck), BaseNonce: hex.EncodeToString(bn), Commitment: hex.EncodeToString(cm),
			SealedLength: len(sealed)}
		if byLength {
			v.PlaintextLength = len(pt)
			sum := sha256.Sum256(sealed)
			v.SealedSHA256 = hex.EncodeToString(sum[:])
		} else {
			v.Plaintext = hex.EncodeToString(pt)
			v.Sealed = hex.EncodeToString(sealed)
		}
		f.Valid = append(f.Valid, v)
	}
	for _, s := range []struct {
		name string
		n    int
	}{{"empty", 0}, {"one-byte", 1}, {"chunk-minus-one", 63}, {"chunk", 64}, {"chunk-plus-one", 65}, {"several-chunks", 200}} {
		add("xwing-"+s.name, "xwing", ctx, 64, patternPlaintext(s.n), false)
	}
	add("x25519-one-byte", "x25519", ctx, 64, patternPlaintext(1), false)
	add("x25519-several-chunks", "x25519", ctx, 64, patternPlaintext(200), false)
	add("x25519-empty-context", "x25519", "", 64, []byte("hello, clean room"), false)
	add("xwing-default-chunk-exact", "xwing", ctx, ChunkSize, patternPlaintext(ChunkSize), true)
	add("xwing-default-chunk-plus-one", "xwing", ctx, ChunkSize, patternPlaintext(ChunkSize+1), true)

	base := f.Valid[5] // xwing-several-chunks: 64, 64, 64, 8
	sealed := unhex(t, base.Sealed)
	plen := PrefixSize(SuiteXWing)
	frame := func(i int) []byte {
		lo := plen + i*(64+FrameOverhead)
		return sealed[lo:min(lo+64+FrameOverhead, len(sealed))]
	}
	change := func(fn func([]byte)) []byte { b := slices.Clone(sealed); fn(b); return b }
	flip := func(off int) []byte { return change(func(b []byte) { b[off] ^= 0x01 }) }
	bad := func(v invalidVector, b []byte) {
		v.Of, v.Sealed = base.Name, hex.EncodeToString(b)
		f.Invalid = append(f.Invalid, v)
	}
	bad(invalidVector{Name: "bad-magic", Error: "ErrNotSealed"}, flip(0))
	bad(invalidVector{Name: "version-2", Error: "ErrVersion"}, change(func(b []byte) { b[4] = 2 }))
	bad(invalidVector{Name: "kem-p256", Error: "ErrSuite"}, change(func(b []byte) { binary.BigEndian.PutUint16(b[5:], 0x0010) }))
	bad(invalidVector{Name: "aead-chacha20poly1305", Error: "ErrSuite"}, change(func(b []byte) { binary.BigEndian.PutUint16(b[9:], 0x0003) }))
	bad(invalidVector{Name: "chunk-size-changed", Error: "ErrCommitment"}, change(func(b []byte) { binary.BigEndian.PutUint32(b[11:], 128) }))
	bad(invalidVector{Name: "key-id-changed", Error: "ErrWrongKey"}, flip(15))
	bad(invalidVector{Name: "context-digest-changed", Error: "ErrContext"}, flip(23))
	bad(invalidVector{Name: "context-digest-changed-any-context", Context: "*", Error: "ErrCommitment"}, flip(23))
	bad(invalidVector{Name: "enc-changed", Error: "ErrCommitment"}, flip(boundPrefixSize+100))
	bad(invalidVector{Name: "commitment-changed", Error: "ErrCommitment"}, flip(plen-1))
	bad(invalidVector{Name: "ciphertext-bit-flipped", Error: "ErrAuth", Released: 64}, flip(plen+64+FrameOverhead+frameHeaderSize+5))
	bad(invalidVector{Name: "tag-bit-flipped", Error: "ErrAuth", Released: 128}, flip(plen+3*(64+FrameOverhead)-1))
	bad(invalidVector{Name: "final-flag-cleared", Error: "ErrAuth", Released: 192}, flip(plen+3*(64+FrameOverhead)+4))
	bad(invalidVector{Name: "chunk-dropped", Error: "ErrOutOfOrder", Released: 64}, slices.Concat(sealed[:plen], frame(0), frame(2), frame(3)))
	bad(invalidVector{Name: "chunks-swapped", Error: "ErrOutOfOrder"}, slices.Concat(sealed[:plen], frame(1), frame(0), frame(2), frame(3)))
	bad(invalidVector{Name: "truncated-at-chunk-boundary", Error: "ErrTruncated", Released: 192}, sealed[:plen+3*(64+FrameOverhead)])
	bad(invalidVector{Name: "truncated-inside-chunk", Error: "ErrTruncated", Released: 64}, sealed[:plen+64+FrameOverhead+30])
	bad(invalidVector{Name: "byte-appended", Error: "ErrTrailingData", Released: 192}, append(slices.Clone(sealed), 0))
	bad(invalidVector{Name: "wrong-key", Key: "xwing-other", Error: "ErrWrongKey"}, sealed)
	bad(invalidVector{Name: "wrong-suite", Key: "x25519", Error: "ErrSuite"}, sealed)
	bad(invalidVector{Name: "wrong-context", Context: "rule=partner-crm dir=in", Error: "ErrContext"}, sealed)
	return f
}

// specExports sets up the receiving HPKE context of a body as the doc
// says (enc, the private key, HKDF-SHA256, AES-256-GCM, info) and exports
// the chunk key, base nonce and commitment.
func specExports(t *testing.T, priv *PrivateKey, p *Prefix) (chunkKey, baseNonce, commitment []byte) {
	t.Helper()
	info := append([]byte("cleanwall/hpke/v1\x00"), p.marshal()[:boundPrefixSize]...)
	r, err := stdhpke.NewRecipient(p.Enc, priv.key, stdhpke.HKDFSHA256(), stdhpke.AES256GCM(), info)
	if err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, 3)
	for i, l := range []struct {
		label string
		n     int
	}{{"cleanwall/hpke/v1 chunk key", 32}, {"cleanwall/hpke/v1 chunk nonce", 12}, {"cleanwall/hpke/v1 commitment", 32}} {
		if out[i], err = r.Export(l.label, l.n); err != nil {
			t.Fatal(err)
		}
	}
	return out[0], out[1], out[2]
}

// deterministic blanks what the encapsulation's randomness decides.
func deterministic(f vectorFile) vectorFile {
	f.Valid = slices.Clone(f.Valid)
	for i := range f.Valid {
		v := &f.Valid[i]
		v.Enc, v.ChunkKey, v.BaseNonce, v.Commitment, v.SealedSHA256 = "", "", "", "", ""
		if v.Sealed != "" {
			v.Sealed = v.Sealed[:2*boundPrefixSize]
		}
	}
	f.Invalid = nil
	return f
}

func TestVectors(t *testing.T) {
	gen := generateVectors(t)
	if *update {
		want, err := json.MarshalIndent(gen, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vectorsFile, append(want, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", vectorsFile)
	}
	raw, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	var f vectorFile
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	// What does not depend on randomness must be what the sealer makes now.
	g, w := deterministic(*gen), deterministic(f)
	gj, _ := json.Marshal(g)
	wj, _ := json.Marshal(w)
	if !bytes.Equal(gj, wj) || len(f.Invalid) != len(gen.Invalid) {
		t.Fatalf("%s differs from what the sealer makes now (keys, prefixes, info, sizes, or the invalid list): the format changed (if on purpose: -update and a new version)", vectorsFile)
	}

	// Check the file on its own terms, as another implementation would.
	keys := map[string]*PrivateKey{}
	for _, k := range f.Keys {
		priv, err := ParsePrivateKey([]byte(k.PrivateKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		pub, err := ParsePublicKey([]byte(k.PublicKeyFile))
		if err != nil || !priv.Public().Equal(pub) || pub.ID().String() != k.KeyID || pub.Suite().String() != k.Suite {
			t.Fatalf("key %s: the files do not make one %s pair with id %s: %v", k.Name, k.Suite, k.KeyID, err)
		}
		keys[k.Name] = priv
	}
	for _, v := range f.Valid {
		t.Run(v.Name, func(t *testing.T) {
			priv := keys[v.Key]
			pt := unhex(t, v.Plaintext)
			var sealed []byte
			if v.PlaintextLength > 0 {
				pt = patternPlaintext(v.PlaintextLength)
				// Rebuild the body from its parts: the prefix from the
				// vector's fields, the chunks from the exports.
				sealed = rebuild(t, priv, v, pt)
				if sum := sha256.Sum256(sealed); hex.EncodeToString(sum[:]) != v.SealedSHA256 {
					t.Fatal("the body rebuilt from the vector's exports does not hash to sealedSHA256")
				}
			} else {
				sealed = unhex(t, v.Sealed)
				if !bytes.Equal(rebuild(t, priv, v, pt), sealed) {
					t.Fatal("the body rebuilt from the vector's prefix fields and exports differs from sealed")
				}
			}
			if len(sealed) != v.SealedLength {
				t.Fatalf("sealed %d bytes, sealedLength %d", len(sealed), v.SealedLength)
			}
			p, _, err := ParsePrefix(sealed)
			if err != nil {
				t.Fatal(err)
			}
			ck, bn, cm := specExports(t, priv, &p)
			if hex.EncodeToString(p.info()) != v.Info || hex.EncodeToString(ck) != v.ChunkKey ||
				hex.EncodeToString(bn) != v.BaseNonce || hex.EncodeToString(cm) != v.Commitment {
				t.Fatal("info or exports differ from the vector")
			}
			got, err := Open(sealed, priv, v.Context)
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("opening: %d bytes, %v", len(got), err)
			}
		})
	}
	valid := map[string]validVector{}
	for _, v := range f.Valid {
		valid[v.Name] = v
	}
	for _, v := range f.Invalid {
		t.Run("invalid/"+v.Name, func(t *testing.T) {
			of := valid[v.Of]
			priv := keys[of.Key]
			if v.Key != "" {
				priv = keys[v.Key]
			}
			var o io.Reader
			switch v.Context {
			case "":
				o = NewOpener(bytes.NewReader(unhex(t, v.Sealed)), priv, of.Context)
			case "*":
				o = NewOpenerAnyContext(bytes.NewReader(unhex(t, v.Sealed)), priv)
			default:
				o = NewOpener(bytes.NewReader(unhex(t, v.Sealed)), priv, v.Context)
			}
			out, err := io.ReadAll(o)
			kind := sentinels[v.Error]
			if kind == nil || !errors.Is(err, kind) {
				t.Fatalf("%v, want %s", err, v.Error)
			}
			if len(out) > v.Released {
				t.Fatalf("released %d bytes, at most %d may be", len(out), v.Released)
			}
		})
	}
}

// rebuild makes a vector's body from its parts as the doc says: the
// bound prefix from the key file, chunk size and context, then enc and
// the commitment, then each chunk sealed under the exported key and nonce.
func rebuild(t *testing.T, priv *PrivateKey, v validVector, pt []byte) []byte {
	pubBody := priv.Public().body
	b := []byte("CWHP\x01")
	b = append(b, pubBody[:2]...) // the KEM id
	b = append(b, 0x00, 0x01, 0x00, 0x02)
	b = binary.BigEndian.AppendUint32(b, uint32(v.ChunkSize))
	id := sha256.Sum256(pubBody)
	b = append(b, id[:8]...)
	cd := sha256.Sum256([]byte(v.Context))
	b = append(b, cd[:]...)
	if hex.EncodeToString(append([]byte("cleanwall/hpke/v1\x00"), b...)) != v.Info {
		t.Fatal("the vector's info is not the label and the bound prefix")
	}
	b = append(append(b, unhex(t, v.Enc)...), unhex(t, v.Commitment)...)
	block, _ := aes.NewCipher(unhex(t, v.ChunkKey))
	aead, _ := cipher.NewGCM(block)
	base := unhex(t, v.BaseNonce)
	chunks := max(1, (len(pt)+v.ChunkSize-1)/v.ChunkSize)
	for i := range chunks {
		part := pt[i*v.ChunkSize : min((i+1)*v.ChunkSize, len(pt))]
		fl := uint32(len(part))
		if i == chunks-1 {
			fl |= 1 << 31
		}
		fh := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, uint32(i)), fl)
		nonce := slices.Clone(base)
		binary.BigEndian.PutUint32(nonce[8:], binary.BigEndian.Uint32(nonce[8:])^uint32(i))
		b = append(b, fh...)
		b = aead.Seal(b, nonce, part, fh)
	}
	return b
}
