package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/proxies/seal"
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
		{"seal", "--key-file", f.keyFile, "--key-id", "k", "--hpke-key", "x"},
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
}
