package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/proxies/seal"
	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// sealFixture is a key file and a plaintext file in a temporary directory.
type sealFixture struct {
	dir, keyFile, plainFile string
	key, plain              []byte
}

func newSealFixture(t *testing.T, size int) *sealFixture {
	t.Helper()
	dir := t.TempDir()
	k := sha256.Sum256([]byte("cleanwall seal CLI test key"))
	f := &sealFixture{dir: dir, keyFile: filepath.Join(dir, "data.key"), plainFile: filepath.Join(dir, "plain"), key: k[:]}
	f.plain = make([]byte, size)
	for i := range f.plain {
		f.plain[i] = byte(i*7 + i>>9)
	}
	if err := os.WriteFile(f.keyFile, f.key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.plainFile, f.plain, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *sealFixture) path(name string) string { return filepath.Join(f.dir, name) }

// runSeal runs `cleanwall seal ARGS` with stdin and returns stdout.
func runSeal(t *testing.T, stdin []byte, args ...string) ([]byte, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := sealCommand(args, bytes.NewReader(stdin), &stdout, &stderr)
	return stdout.Bytes(), stderr.String(), err
}

// sealedFile seals the fixture's plaintext into a file and returns it.
func (f *sealFixture) sealedFile(t *testing.T) (string, []byte) {
	t.Helper()
	out := f.path("sealed")
	if _, _, err := runSeal(t, nil, "seal", "--key-file", f.keyFile, "--key-id", "egress-dek", "--key-version", "3",
		"--context", "rule=blob-store dir=in", "-o", out, f.plainFile); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return out, b
}

// TestSealCommandRoundTrip: what `seal` writes opens with `open` (files,
// stdin, stdout) to the same bytes, and its header names the key and
// context given; the object is what the package would make of it.
func TestSealCommandRoundTrip(t *testing.T) {
	f := newSealFixture(t, 3*seal.DefaultSegmentSize+1234)
	sealedPath, sealed := f.sealedFile(t)

	h, _, err := seal.ParseHeader(sealed)
	if err != nil || h.KeyID != "egress-dek" || h.KeyVersion != 3 || h.Context != "rule=blob-store dir=in" {
		t.Fatalf("header %+v, %v", h, err)
	}
	if got, err := seal.Open(sealed, func(string, int) ([]byte, error) { return f.key, nil }); err != nil || !bytes.Equal(got, f.plain) {
		t.Fatalf("the package opens the CLI's object to %d bytes, %v", len(got), err)
	}

	out := f.path("opened")
	_, stderr, err := runSeal(t, nil, "open", "--key-file", f.keyFile, "-v", "-o", out, sealedPath)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, f.plain) {
		t.Fatal("open -o wrote other bytes than were sealed")
	}
	if !strings.Contains(stderr, `key "egress-dek" version 3, context "rule=blob-store dir=in"`) {
		t.Fatalf("-v printed %q", stderr)
	}
	// stdin to stdout, both ways.
	sealedOut, _, err := runSeal(t, f.plain, "seal", "--key-file", f.keyFile, "--key-id", "k")
	if err != nil {
		t.Fatal(err)
	}
	plainOut, _, err := runSeal(t, sealedOut, "open", "--key-file", f.keyFile, "-")
	if err != nil || !bytes.Equal(plainOut, f.plain) {
		t.Fatalf("stdin/stdout round trip: %d bytes, %v", len(plainOut), err)
	}
	if h, _, _ := seal.ParseHeader(sealedOut); h.KeyVersion != 1 || h.Context != "" {
		t.Fatalf("defaults: key version %d, context %q; want 1 and none", h.KeyVersion, h.Context)
	}
	// An empty input is an object too.
	empty, _, err := runSeal(t, nil, "seal", "--key-file", f.keyFile, "--key-id", "k")
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := runSeal(t, empty, "open", "--key-file", f.keyFile); err != nil || len(got) != 0 {
		t.Fatalf("empty object: %d bytes, %v", len(got), err)
	}
}

// TestSealCommandTampered: a tampered, truncated or extended object, or the
// wrong key, fails; with -o nothing is left behind (an existing OUT keeps
// its content, no temporary file stays), and on stdout only the verified
// segments before the damage were written.
func TestSealCommandTampered(t *testing.T) {
	f := newSealFixture(t, 3*seal.DefaultSegmentSize+1234)
	_, sealed := f.sealedFile(t)
	h, hlen, _ := seal.ParseHeader(sealed)
	seg := h.SegmentSize + seal.FrameOverhead

	flipped := bytes.Clone(sealed)
	flipped[hlen+2*seg+100] ^= 0x20 // inside segment 2
	wrongKey := f.path("wrong.key")
	if err := os.WriteFile(wrongKey, bytes.Repeat([]byte{7}, 32), 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name     string
		input    []byte
		keyFile  string
		want     error
		verified int // plaintext bytes before the damage
	}{
		{"bit flipped in segment 2", flipped, f.keyFile, seal.ErrAuth, 2 * h.SegmentSize},
		{"truncated at a segment boundary", sealed[:hlen+3*seg], f.keyFile, seal.ErrTruncated, 3 * h.SegmentSize},
		{"truncated inside segment 1", sealed[:hlen+seg+10], f.keyFile, seal.ErrTruncated, h.SegmentSize},
		{"data appended", append(bytes.Clone(sealed), '\n'), f.keyFile, seal.ErrTrailingData, 3 * h.SegmentSize},
		{"wrong key", sealed, wrongKey, seal.ErrCommitment, 0},
		{"not sealed", f.plain, f.keyFile, seal.ErrNotSealed, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := f.path("input")
			if err := os.WriteFile(in, tc.input, 0o600); err != nil {
				t.Fatal(err)
			}
			// -o: OUT keeps what it held; no partial file stays.
			out := f.path("out")
			if err := os.WriteFile(out, []byte("previous content"), 0o600); err != nil {
				t.Fatal(err)
			}
			_, _, err := runSeal(t, nil, "open", "--key-file", tc.keyFile, "-o", out, in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("open -o: %v, want %v", err, tc.want)
			}
			if got, _ := os.ReadFile(out); string(got) != "previous content" {
				t.Fatalf("OUT was changed: %d bytes", len(got))
			}
			if partial, _ := filepath.Glob(f.path(".out.partial-*")); len(partial) != 0 {
				t.Fatalf("left %v behind", partial)
			}
			// stdout: only the verified segments.
			stdout, _, err := runSeal(t, tc.input, "open", "--key-file", tc.keyFile)
			if !errors.Is(err, tc.want) {
				t.Fatalf("open to stdout: %v, want %v", err, tc.want)
			}
			if len(stdout) != tc.verified || !bytes.Equal(stdout, f.plain[:len(stdout)]) {
				t.Fatalf("stdout got %d bytes (a prefix of the plaintext: %v), want the %d verified before the damage",
					len(stdout), bytes.HasPrefix(f.plain, stdout), tc.verified)
			}
			// The exit status a script sees.
			if code := run([]string{"seal", "open", "--key-file", tc.keyFile, "-o", out, in}); code != 1 {
				t.Fatalf("exit status %d, want 1", code)
			}
		})
	}
}

// TestSealCommandUsage: bad invocations and bad key files are refused
// before anything is read or written.
func TestSealCommandUsage(t *testing.T) {
	f := newSealFixture(t, 10)
	short := f.path("short.key")
	if err := os.WriteFile(short, append(bytes.Clone(f.key), '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"open"},
		{"seal", "--key-file", f.keyFile},
		{"frobnicate", "--key-file", f.keyFile},
		{"open", "--key-file", f.keyFile, "a", "b"},
		{"open", "--key-file", short, f.plainFile},
		{"open", "--key-file", f.path("missing"), f.plainFile},
		// --hpke-key opens trusted mode's bodies; sealing to a public key is
		// the trusted proxy's job, not the tool's.
		{"seal", "--key-file", f.keyFile, "--key-id", "k", "--hpke-key", "x"},
		{"open", "--key-file", f.keyFile, "--hpke-key", f.keyFile, f.plainFile},
		{"open", "-o", f.path("out"), f.plainFile},
		{"open", "--hpke-key", f.keyFile, f.plainFile},
		{"open", "--hpke-key", f.path("missing"), f.plainFile},
		{"keygen"},
		{"keygen", "--private-key", f.path("k1")},
		{"keygen", "--public-key", f.path("k1.pub")},
		{"keygen", "--private-key", f.path("k1"), "--public-key", f.path("k1")},
		{"keygen", "--private-key", f.path("k1"), "--public-key", f.path("k1.pub"), "--suite", "p256"},
		{"keygen", "--private-key", f.path("k1"), "--public-key", f.path("k1.pub"), "extra"},
		{"seal", "--key-file", f.keyFile, "--key-id", "k", "--key-version", "-1"},
		{"open", "--key-file", f.keyFile, f.path("missing")},
	} {
		stdout, _, err := runSeal(t, nil, args...)
		if err == nil || len(stdout) != 0 {
			t.Errorf("cleanwall seal %q: %v, %d bytes written", args, err, len(stdout))
		}
	}
	if code := run([]string{"seal"}); code != 2 {
		t.Errorf("cleanwall seal without a command: exit %d, want 2", code)
	}
	if _, stderr, err := runSeal(t, nil, "open", "-h"); err != nil || !strings.Contains(stderr, "only verified segments are written") {
		t.Errorf("open -h: %v, %q", err, stderr)
	}
	if _, stderr, err := runSeal(t, nil, "keygen", "-h"); err != nil || !strings.Contains(stderr, "--suite xwing") {
		t.Errorf("keygen -h: %v, %q", err, stderr)
	}
	// None of the refused keygens wrote a key.
	if left, _ := filepath.Glob(f.path("k1*")); len(left) != 0 {
		t.Errorf("refused keygens left %v", left)
	}
	// A public key file where the private one belongs is named as such.
	pair := newHPKEPair(t, f.dir, "pair", "x25519")
	if _, _, err := runSeal(t, nil, "open", "--hpke-key", pair.pubFile, f.plainFile); err == nil || !strings.Contains(err.Error(), "the other half of the pair") {
		t.Errorf("--hpke-key with the public key file: %v", err)
	}
}

// hpkePair is a key pair `cleanwall seal keygen` wrote.
type hpkePair struct {
	privFile, pubFile string
	priv              *hpke.PrivateKey
	pub               *hpke.PublicKey
	keygenOut         string
}

func newHPKEPair(t *testing.T, dir, name, suite string) *hpkePair {
	t.Helper()
	p := &hpkePair{privFile: filepath.Join(dir, name+".key"), pubFile: filepath.Join(dir, name+".pub")}
	args := []string{"keygen", "--private-key", p.privFile, "--public-key", p.pubFile}
	if suite != "" {
		args = append(args, "--suite", suite)
	}
	out, _, err := runSeal(t, nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	p.keygenOut = string(out)
	privData, err := os.ReadFile(p.privFile)
	if err != nil {
		t.Fatal(err)
	}
	pubData, err := os.ReadFile(p.pubFile)
	if err != nil {
		t.Fatal(err)
	}
	if p.priv, err = hpke.ParsePrivateKey(privData); err != nil {
		t.Fatal(err)
	}
	if p.pub, err = hpke.ParsePublicKey(pubData); err != nil {
		t.Fatal(err)
	}
	return p
}

// seal seals plain to the pair's public key as a trusted proxy does.
func (p *hpkePair) seal(t *testing.T, plain []byte, context string) []byte {
	t.Helper()
	var out bytes.Buffer
	s, err := hpke.NewSealer(&out, p.pub, context)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(plain); err != nil || s.Close() != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestSealKeygen: keygen writes a pair in the documented files (the
// private key 0600), of the suite asked for (X-Wing by default), and never
// overwrites a file: a refusal leaves both paths as they were.
func TestSealKeygen(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		flag string
		want hpke.Suite
	}{{"", hpke.SuiteXWing}, {"xwing", hpke.SuiteXWing}, {"x25519", hpke.SuiteX25519}} {
		p := newHPKEPair(t, dir, "k-"+tc.flag, tc.flag)
		if p.priv.Suite() != tc.want || !p.priv.Public().Equal(p.pub) {
			t.Fatalf("--suite %q: a %s pair (halves match: %v), want %s", tc.flag, p.priv.Suite(), p.priv.Public().Equal(p.pub), tc.want)
		}
		if st, _ := os.Stat(p.privFile); st.Mode().Perm() != 0o600 {
			t.Fatalf("private key file mode %v, want 0600", st.Mode().Perm())
		}
		if !strings.Contains(p.keygenOut, "key id "+p.pub.ID().String()) || !strings.Contains(p.keygenOut, "suite "+tc.want.String()) {
			t.Fatalf("keygen printed %q", p.keygenOut)
		}
	}
	existing := newHPKEPair(t, dir, "existing", "x25519")
	privBefore, _ := os.ReadFile(existing.privFile)
	pubBefore, _ := os.ReadFile(existing.pubFile)
	fresh := filepath.Join(dir, "fresh")
	for _, args := range [][]string{
		{"keygen", "--private-key", existing.privFile, "--public-key", fresh + ".pub"},
		{"keygen", "--private-key", fresh + ".key", "--public-key", existing.pubFile},
	} {
		if _, _, err := runSeal(t, nil, args...); err == nil || !strings.Contains(err.Error(), "never overwrites") {
			t.Fatalf("%q: %v", args, err)
		}
	}
	privAfter, _ := os.ReadFile(existing.privFile)
	pubAfter, _ := os.ReadFile(existing.pubFile)
	if !bytes.Equal(privBefore, privAfter) || !bytes.Equal(pubBefore, pubAfter) {
		t.Fatal("a refused keygen changed an existing key file")
	}
	if left, _ := filepath.Glob(fresh + "*"); len(left) != 0 {
		t.Fatalf("a refused keygen wrote %v", left)
	}
}

// TestSealHPKERoundTrip: what a trusted proxy seals to a keygen pair opens
// with `open --hpke-key` to the same bytes, for sizes around the chunk
// and both suites, to a file (-o) and to stdout; -v names the suite, key
// and context; --context accepts the body's own context.
func TestSealHPKERoundTrip(t *testing.T) {
	const context = "rule=partner-crm"
	for _, suite := range []string{"xwing", "x25519"} {
		p := newHPKEPair(t, t.TempDir(), "k", suite)
		for _, n := range []int{0, 1, hpke.ChunkSize - 1, hpke.ChunkSize, hpke.ChunkSize + 1, 3*hpke.ChunkSize + 5} {
			f := newSealFixture(t, n)
			sealed := p.seal(t, f.plain, context)
			in := f.path("body")
			if err := os.WriteFile(in, sealed, 0o600); err != nil {
				t.Fatal(err)
			}
			out := f.path("opened")
			_, stderr, err := runSeal(t, nil, "open", "--hpke-key", p.privFile, "-v", "-o", out, in)
			if err != nil {
				t.Fatalf("%s, %d bytes: %v", suite, n, err)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, f.plain) {
				t.Fatalf("%s, %d bytes: open -o wrote %d other bytes", suite, n, len(got))
			}
			digest := hpke.ContextDigest(context)
			if want := fmt.Sprintf("HPKE %s, key %s, context sha256 %x", suite, p.pub.ID(), digest); !strings.Contains(stderr, want) {
				t.Fatalf("-v printed %q, want %q", stderr, want)
			}
			stdout, _, err := runSeal(t, sealed, "open", "--hpke-key", p.privFile, "--context", context)
			if err != nil || !bytes.Equal(stdout, f.plain) {
				t.Fatalf("%s, %d bytes: stdin to stdout: %d bytes, %v", suite, n, len(stdout), err)
			}
		}
	}
}

// TestSealHPKETampered: a changed, cut or extended body, another key or
// context, or something else than an HPKE body fails with exit status 1;
// with -o nothing is left behind, and on stdout only the verified chunks
// before the damage were written.
func TestSealHPKETampered(t *testing.T) {
	dir := t.TempDir()
	p := newHPKEPair(t, dir, "k", "")
	other := newHPKEPair(t, dir, "other", "")
	f := newSealFixture(t, 3*hpke.ChunkSize+1234)
	sealed := p.seal(t, f.plain, "rule=partner-crm")
	pre := hpke.PrefixSize(hpke.SuiteXWing)
	chunk := hpke.ChunkSize + hpke.FrameOverhead
	flipped := bytes.Clone(sealed)
	flipped[pre+2*chunk+100] ^= 0x20 // inside chunk 2
	_, secureObject := f.sealedFile(t)
	otherBody := p.seal(t, f.plain, "rule=partner-crm")

	cases := []struct {
		name     string
		input    []byte
		keyFile  string
		extra    []string
		want     error
		verified int // plaintext bytes before the damage
	}{
		{"bit flipped in chunk 2", flipped, p.privFile, nil, hpke.ErrAuth, 2 * hpke.ChunkSize},
		{"truncated at a chunk boundary", sealed[:pre+3*chunk], p.privFile, nil, hpke.ErrTruncated, 3 * hpke.ChunkSize},
		{"truncated inside chunk 1", sealed[:pre+chunk+10], p.privFile, nil, hpke.ErrTruncated, hpke.ChunkSize},
		{"chunk dropped", slices.Concat(sealed[:pre+chunk], sealed[pre+2*chunk:]), p.privFile, nil, hpke.ErrOutOfOrder, hpke.ChunkSize},
		{"data appended", append(bytes.Clone(sealed), '\n'), p.privFile, nil, hpke.ErrTrailingData, 3 * hpke.ChunkSize},
		{"spliced with another body", slices.Concat(sealed[:pre+2*chunk], otherBody[pre+2*chunk:]), p.privFile, nil, hpke.ErrAuth, 2 * hpke.ChunkSize},
		{"wrong key", sealed, other.privFile, nil, hpke.ErrWrongKey, 0},
		{"wrong context", sealed, p.privFile, []string{"--context", "rule=partner-crm dir=in"}, hpke.ErrContext, 0},
		{"a secure-mode object", secureObject, p.privFile, nil, hpke.ErrNotSealed, 0},
		{"not sealed", f.plain, p.privFile, nil, hpke.ErrNotSealed, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := f.path("input")
			if err := os.WriteFile(in, tc.input, 0o600); err != nil {
				t.Fatal(err)
			}
			out := f.path("out")
			if err := os.WriteFile(out, []byte("previous content"), 0o600); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"open", "--hpke-key", tc.keyFile}, tc.extra...)
			_, _, err := runSeal(t, nil, append(slices.Clone(args), "-o", out, in)...)
			if !errors.Is(err, tc.want) {
				t.Fatalf("open -o: %v, want %v", err, tc.want)
			}
			if got, _ := os.ReadFile(out); string(got) != "previous content" {
				t.Fatalf("OUT was changed: %d bytes", len(got))
			}
			if partial, _ := filepath.Glob(f.path(".out.partial-*")); len(partial) != 0 {
				t.Fatalf("left %v behind", partial)
			}
			stdout, _, err := runSeal(t, tc.input, args...)
			if !errors.Is(err, tc.want) {
				t.Fatalf("open to stdout: %v, want %v", err, tc.want)
			}
			if len(stdout) != tc.verified || !bytes.Equal(stdout, f.plain[:len(stdout)]) {
				t.Fatalf("stdout got %d bytes (a prefix of the plaintext: %v), want the %d verified before the damage",
					len(stdout), bytes.HasPrefix(f.plain, stdout), tc.verified)
			}
			if code := run(append(slices.Concat([]string{"seal"}, args), "-o", out, in)); code != 1 {
				t.Fatalf("exit status %d, want 1", code)
			}
		})
	}
}

// TestSealOpenContext: --context also holds a secure-mode object to the
// context it expects.
func TestSealOpenContext(t *testing.T) {
	f := newSealFixture(t, 100)
	sealedPath, _ := f.sealedFile(t)
	if _, _, err := runSeal(t, nil, "open", "--key-file", f.keyFile, "--context", "rule=blob-store dir=out", sealedPath); !errors.Is(err, seal.ErrRefused) {
		t.Fatalf("another context: %v, want ErrRefused", err)
	}
	if got, _, err := runSeal(t, nil, "open", "--key-file", f.keyFile, "--context", "rule=blob-store dir=in", sealedPath); err != nil || !bytes.Equal(got, f.plain) {
		t.Fatalf("its own context: %d bytes, %v", len(got), err)
	}
}
