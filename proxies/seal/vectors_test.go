package seal

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"slices"
	"testing"
)

// The test vectors in testdata/vectors.json pin the format: TestVectors
// seals each one's plaintext with its key, salt and header fields and must
// get its sealed bytes exactly, opens them back, and checks that each
// invalid object is refused as listed. After a deliberate format change
// (a new version), regenerate them with
//
//	go test ./proxies/seal -run TestVectors -update
//
// and commit the result.
var update = flag.Bool("update", false, "rewrite testdata/vectors.json from the generator")

const vectorsFile = "testdata/vectors.json"

type vectorFile struct {
	About   []string        `json:"about"`
	Valid   []validVector   `json:"valid"`
	Invalid []invalidVector `json:"invalid"`
}

type validVector struct {
	Name        string `json:"name"`
	Key         string `json:"key"`
	KeyID       string `json:"keyID"`
	KeyVersion  int    `json:"keyVersion"`
	Context     string `json:"context"`
	SegmentSize int    `json:"segmentSize"`
	Interactive bool   `json:"interactive,omitempty"`
	// FlushAfter lists the plaintext offsets after which an interactive
	// sealer flushed.
	FlushAfter []int  `json:"flushAfter,omitempty"`
	Salt       string `json:"salt"`
	// Plaintext is hex, or empty with PlaintextLength set: byte i of the
	// plaintext is i mod 251.
	Plaintext       string `json:"plaintext,omitempty"`
	PlaintextLength int    `json:"plaintextLength,omitempty"`
	// Intermediate values of the key schedule.
	SegmentKey  string `json:"segmentKey"`
	NoncePrefix string `json:"noncePrefix"`
	Commitment  string `json:"commitment"`
	// Sealed is hex, or empty with SealedSHA256 and SealedLength set.
	Sealed       string `json:"sealed,omitempty"`
	SealedSHA256 string `json:"sealedSHA256,omitempty"`
	SealedLength int    `json:"sealedLength"`
}

type invalidVector struct {
	Name string `json:"name"`
	// Of is the valid vector whose key (or Key, when set) opens it.
	Of     string `json:"of"`
	Key    string `json:"key,omitempty"`
	Sealed string `json:"sealed"`
	// Error is the sentinel the opener must refuse it with; Released how
	// many plaintext bytes (the verified segments before the refusal) a
	// streaming opener may have returned first.
	Error    string `json:"error"`
	Released int    `json:"released"`
}

var sentinels = map[string]error{
	"ErrNotSealed": ErrNotSealed, "ErrVersion": ErrVersion, "ErrHeader": ErrHeader, "ErrKey": ErrKey,
	"ErrRefused": ErrRefused, "ErrCommitment": ErrCommitment, "ErrAuth": ErrAuth, "ErrOutOfOrder": ErrOutOfOrder,
	"ErrTruncated": ErrTruncated, "ErrTrailingData": ErrTrailingData,
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

// sealVector seals v's plaintext from v's inputs (key, salt, header
// fields, flushes).
func sealVector(t *testing.T, v *validVector) (pt, sealed []byte) {
	t.Helper()
	pt = unhex(t, v.Plaintext)
	if v.PlaintextLength > 0 {
		pt = patternPlaintext(v.PlaintextLength)
	}
	c := SealConfig{
		Key: unhex(t, v.Key), KeyID: v.KeyID, KeyVersion: v.KeyVersion, Context: v.Context,
		SegmentSize: v.SegmentSize, Interactive: v.Interactive, Rand: bytes.NewReader(unhex(t, v.Salt)),
	}
	var out bytes.Buffer
	s, err := NewSealer(&out, c)
	if err != nil {
		t.Fatal(err)
	}
	prev := 0
	for _, at := range v.FlushAfter {
		if _, err := s.Write(pt[prev:at]); err != nil {
			t.Fatal(err)
		}
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
		prev = at
	}
	if _, err := s.Write(pt[prev:]); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return pt, out.Bytes()
}

// generateVectors makes the vector file from fixed inputs.
func generateVectors(t *testing.T) *vectorFile {
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i)
	}
	wrongKey := sha256.Sum256([]byte("cleanwall seal vectors: another key"))
	salt := func(name string) string {
		s := sha256.Sum256([]byte("cleanwall seal vectors: salt of " + name))
		return hex.EncodeToString(s[:])
	}
	f := &vectorFile{About: []string{
		"Test vectors of cleanwall's sealing format, version 1 (docs/sealing.md).",
		"valid: seal plaintext under key with the salt, key id, key version, context and segment size given (interactive: flush after each flushAfter offset) and you must get sealed byte for byte; opening sealed must give plaintext.",
		"plaintextLength instead of plaintext: byte i is i mod 251. sealedSHA256 instead of sealed: the SHA-256 of the sealed bytes.",
		"segmentKey, noncePrefix and commitment are the key schedule's outputs for that object.",
		"invalid: opening sealed with the key of the valid vector named in of (or key) must fail with error, after releasing at most released plaintext bytes.",
		"Regenerate (only for a new format version): go test ./proxies/seal -run TestVectors -update",
	}}
	add := func(v validVector, pt []byte) {
		v.Key = hex.EncodeToString(key)
		if v.KeyID == "" {
			v.KeyID = "egress-dek"
		}
		v.Salt = salt(v.Name)
		if v.PlaintextLength == 0 {
			v.Plaintext = hex.EncodeToString(pt)
		}
		_, sealed := sealVector(t, &v)
		h, _, err := ParseHeader(sealed)
		if err != nil {
			t.Fatal(err)
		}
		seg, np, commit := specKeys(t, key, sealed[:h.Size()-CommitmentSize], h.Salt[:])
		v.SegmentKey, v.NoncePrefix, v.Commitment = hex.EncodeToString(seg), hex.EncodeToString(np), hex.EncodeToString(commit)
		v.SealedLength = len(sealed)
		if v.PlaintextLength > 0 {
			sum := sha256.Sum256(sealed)
			v.SealedSHA256 = hex.EncodeToString(sum[:])
		} else {
			v.Sealed = hex.EncodeToString(sealed)
		}
		f.Valid = append(f.Valid, v)
	}
	const ctx = "rule=blob-store dir=out"
	small := func(name string, n int) {
		add(validVector{Name: name, KeyVersion: 7, Context: ctx, SegmentSize: 64}, patternPlaintext(n))
	}
	small("empty", 0)
	small("one-byte", 1)
	small("segment-minus-one", 63)
	small("segment", 64)
	small("segment-plus-one", 65)
	small("several-segments", 200)
	add(validVector{Name: "no-context-version-0", KeyID: "k", KeyVersion: 0, SegmentSize: 64}, []byte("hello, clean room"))
	add(validVector{Name: "interactive", KeyVersion: 7, Context: "rule=db dir=out", SegmentSize: 64, Interactive: true,
		FlushAfter: []int{4, 104}}, append([]byte("PING"), patternPlaintext(100)...))
	for _, n := range []int{DefaultSegmentSize, DefaultSegmentSize + 1} {
		add(validVector{Name: "default-segment-" + map[bool]string{true: "plus-one", false: "exact"}[n > DefaultSegmentSize],
			KeyVersion: 7, Context: ctx, SegmentSize: DefaultSegmentSize, PlaintextLength: n}, nil)
	}

	base := f.Valid[5] // several-segments: 64, 64, 64, 8
	sealed := unhex(t, base.Sealed)
	hlen := len(sealed) - 200 - 4*FrameOverhead
	frame := func(i int) []byte {
		lo := hlen + i*(64+FrameOverhead)
		return sealed[lo:min(lo+64+FrameOverhead, len(sealed))]
	}
	flip := func(off int) []byte { b := slices.Clone(sealed); b[off] ^= 0x01; return b }
	bad := func(name string, b []byte, errName string, released int) {
		f.Invalid = append(f.Invalid, invalidVector{Name: name, Of: base.Name, Sealed: hex.EncodeToString(b), Error: errName, Released: released})
	}
	bad("bad-magic", flip(0), "ErrNotSealed", 0)
	bad("version-2", func() []byte { b := slices.Clone(sealed); b[4] = 2; return b }(), "ErrVersion", 0)
	bad("context-changed", flip(hlen-CommitmentSize-SaltSize-1), "ErrCommitment", 0)
	bad("salt-changed", flip(hlen-CommitmentSize-1), "ErrCommitment", 0)
	bad("commitment-changed", flip(hlen-1), "ErrCommitment", 0)
	bad("ciphertext-bit-flipped", flip(hlen+64+FrameOverhead+frameHeaderSize+5), "ErrAuth", 64)
	bad("tag-bit-flipped", flip(hlen+3*(64+FrameOverhead)-1), "ErrAuth", 128)
	bad("final-flag-cleared", flip(hlen+3*(64+FrameOverhead)+4), "ErrAuth", 192)
	bad("segment-dropped", slices.Concat(sealed[:hlen], frame(0), frame(2), frame(3)), "ErrOutOfOrder", 64)
	bad("segments-swapped", slices.Concat(sealed[:hlen], frame(1), frame(0), frame(2), frame(3)), "ErrOutOfOrder", 0)
	bad("truncated-at-segment-boundary", sealed[:hlen+3*(64+FrameOverhead)], "ErrTruncated", 192)
	bad("truncated-inside-segment", sealed[:hlen+64+FrameOverhead+30], "ErrTruncated", 64)
	bad("byte-appended", append(slices.Clone(sealed), 0), "ErrTrailingData", 192)
	f.Invalid = append(f.Invalid, invalidVector{Name: "wrong-key", Of: base.Name, Key: hex.EncodeToString(wrongKey[:]),
		Sealed: base.Sealed, Error: "ErrCommitment"})
	return f
}

func TestVectors(t *testing.T) {
	gen := generateVectors(t)
	want, err := json.MarshalIndent(gen, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, '\n')
	if *update {
		if err := os.WriteFile(vectorsFile, want, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", vectorsFile)
	}
	raw, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, want) {
		t.Errorf("%s differs from what the sealer makes now: the format changed (if on purpose: -update and a new version)", vectorsFile)
	}

	// Check the file on its own terms, as another implementation would.
	var f vectorFile
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	keys := map[string][]byte{}
	for i := range f.Valid {
		v := &f.Valid[i]
		t.Run(v.Name, func(t *testing.T) {
			pt, sealed := sealVector(t, v)
			switch {
			case v.Sealed != "" && !bytes.Equal(sealed, unhex(t, v.Sealed)):
				t.Fatal("sealing gives other bytes than the vector")
			case v.Sealed == "" && hex.EncodeToString(func() []byte { s := sha256.Sum256(sealed); return s[:] }()) != v.SealedSHA256:
				t.Fatal("sealing gives other bytes than the vector (SHA-256)")
			case len(sealed) != v.SealedLength:
				t.Fatalf("sealed %d bytes, the vector %d", len(sealed), v.SealedLength)
			}
			key := unhex(t, v.Key)
			keys[v.Name] = key
			h, _, _ := ParseHeader(sealed)
			seg, np, commit := specKeys(t, key, sealed[:h.Size()-CommitmentSize], h.Salt[:])
			if hex.EncodeToString(seg) != v.SegmentKey || hex.EncodeToString(np) != v.NoncePrefix || hex.EncodeToString(commit) != v.Commitment {
				t.Fatal("key schedule outputs differ from the vector")
			}
			got, err := Open(sealed, func(id string, ver int) ([]byte, error) {
				if id != v.KeyID || ver != v.KeyVersion {
					t.Errorf("opener asked for key %q v%d, the header names %q v%d", id, ver, v.KeyID, v.KeyVersion)
				}
				return key, nil
			})
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("opening: %d bytes, %v", len(got), err)
			}
		})
	}
	for _, v := range f.Invalid {
		t.Run("invalid/"+v.Name, func(t *testing.T) {
			key := keys[v.Of]
			if v.Key != "" {
				key = unhex(t, v.Key)
			}
			kind := sentinels[v.Error]
			out, err := openAll(unhex(t, v.Sealed), func(string, int) ([]byte, error) { return key, nil })
			if kind == nil || !errors.Is(err, kind) {
				t.Fatalf("%v, want %s", err, v.Error)
			}
			if len(out) > v.Released {
				t.Fatalf("released %d bytes, at most %d may be", len(out), v.Released)
			}
		})
	}
}
