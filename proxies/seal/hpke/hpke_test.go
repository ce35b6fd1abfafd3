package hpke

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"testing"
	"testing/cryptotest"
	"testing/iotest"
)

const testContext = "rule=partner-crm"

var allSuites = []Suite{SuiteXWing, SuiteX25519}

// testKeys holds one key pair per suite for the whole test binary (and
// a second, "other", for wrong-key cases).
var testKeys = sync.OnceValue(func() map[string]*PrivateKey {
	m := map[string]*PrivateKey{}
	for _, s := range allSuites {
		for _, name := range []string{"", "other"} {
			k, err := GenerateKey(s)
			if err != nil {
				panic(err)
			}
			m[s.String()+name] = k
		}
	}
	return m
})

func testKey(s Suite) *PrivateKey  { return testKeys()[s.String()] }
func otherKey(s Suite) *PrivateKey { return testKeys()[s.String()+"other"] }
func testPub(s Suite) *PublicKey   { return testKey(s).Public() }
func chunkName(chunk int) string   { return fmt.Sprintf("chunk=%d", chunk) }
func sizesFor(chunk int) []int {
	return []int{0, 1, chunk - 1, chunk, chunk + 1, 2*chunk - 1, 2 * chunk, 2*chunk + 1, 5*chunk + chunk/3}
}
func sealedSizeFor(s Suite, chunk, n int) int {
	chunks := max(1, (n+chunk-1)/chunk)
	return PrefixSize(s) + chunks*FrameOverhead + n
}

// pattern is n bytes that differ from chunk to chunk and within one.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*131 + i>>8)
	}
	return b
}

// sealStream seals pt with a Sealer of the given chunk size fed in writes
// of step bytes.
func sealStream(t testing.TB, pub *PublicKey, context string, chunk int, pt []byte, step int) []byte {
	t.Helper()
	var out bytes.Buffer
	s, err := newSealer(&out, pub, context, chunk)
	if err != nil {
		t.Fatal(err)
	}
	for p := pt; len(p) > 0; {
		n := min(step, len(p))
		if k, err := s.Write(p[:n]); err != nil || k != n {
			t.Fatalf("Write: %d, %v", k, err)
		}
		p = p[n:]
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// openAll opens sealed through Read with small buffers and returns what
// the opener released before its error.
func openAll(sealed []byte, priv *PrivateKey, context string) ([]byte, error) {
	o := NewOpener(bytes.NewReader(sealed), priv, context)
	var out []byte
	buf := make([]byte, 1000)
	for {
		n, err := o.Read(buf)
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

// TestRoundTrip: every size around the chunk boundaries comes back byte
// for byte under both suites, whichever way it is sealed (writes of any
// size, ReadFrom, Seal: the same bytes under the same randomness) and
// opened (Read, WriteTo over one-byte reads, Open, any context), and is
// exactly SealedSize long.
func TestRoundTrip(t *testing.T) {
	for _, suite := range allSuites {
		for _, chunk := range []int{MinChunkSize, ChunkSize} {
			for _, n := range sizesFor(chunk) {
				t.Run(fmt.Sprintf("%s/%s/n=%d", suite, chunkName(chunk), n), func(t *testing.T) {
					pub, priv := testPub(suite), testKey(suite)
					pt := pattern(n)
					cryptotest.SetGlobalRandom(t, 1)
					oneShot, err := sealChunks(pt, pub, testContext, chunk)
					if err != nil {
						t.Fatal(err)
					}
					if len(oneShot) != sealedSizeFor(suite, chunk, n) {
						t.Fatalf("sealed %d bytes, want %d", len(oneShot), sealedSizeFor(suite, chunk, n))
					}
					if chunk == ChunkSize && int64(len(oneShot)) != SealedSize(int64(n), pub) {
						t.Fatalf("sealed %d bytes, SealedSize says %d", len(oneShot), SealedSize(int64(n), pub))
					}
					for _, step := range []int{1, 7, chunk - 1, chunk, chunk + 1, 3*chunk + 5} {
						if n > 3*chunk && step == 1 {
							continue
						}
						cryptotest.SetGlobalRandom(t, 1)
						if got := sealStream(t, pub, testContext, chunk, pt, step); !bytes.Equal(got, oneShot) {
							t.Fatalf("writes of %d bytes sealed differently from Seal", step)
						}
					}
					cryptotest.SetGlobalRandom(t, 1)
					var rf bytes.Buffer
					s, err := newSealer(&rf, pub, testContext, chunk)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := s.ReadFrom(iotest.HalfReader(bytes.NewReader(pt))); err != nil {
						t.Fatal(err)
					}
					if err := s.Close(); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(rf.Bytes(), oneShot) {
						t.Fatal("ReadFrom sealed differently from Seal")
					}

					got, err := openAll(oneShot, priv, testContext)
					if err != nil || !bytes.Equal(got, pt) {
						t.Fatalf("Read: %d bytes, %v; want %d bytes", len(got), err, n)
					}
					got, err = Open(oneShot, priv, testContext)
					if err != nil || !bytes.Equal(got, pt) {
						t.Fatalf("Open: %d bytes, %v; want %d bytes", len(got), err, n)
					}
					var wt bytes.Buffer
					o := NewOpenerAnyContext(iotest.OneByteReader(bytes.NewReader(oneShot)), priv)
					if _, err := o.WriteTo(&wt); err != nil || !bytes.Equal(wt.Bytes(), pt) {
						t.Fatalf("WriteTo over one-byte reads: %d bytes, %v", wt.Len(), err)
					}
					p, err := o.Prefix()
					if err != nil || p.Suite != suite || p.ChunkSize != chunk || p.KeyID != pub.ID() || p.ContextDigest != ContextDigest(testContext) {
						t.Fatalf("Prefix = %+v, %v", p, err)
					}
				})
			}
		}
	}
}

// TestSealedSize: the sizes a proxy sets as Content-Length, and an
// unknown length stays unknown.
func TestSealedSize(t *testing.T) {
	for _, tc := range []struct {
		suite Suite
		n     int64
		want  int64
	}{
		{SuiteXWing, 0, 1207 + 24},
		{SuiteXWing, 1, 1207 + 24 + 1},
		{SuiteXWing, ChunkSize, 1207 + 24 + ChunkSize},
		{SuiteXWing, ChunkSize + 1, 1207 + 48 + ChunkSize + 1},
		{SuiteX25519, 0, 119 + 24},
		{SuiteX25519, 10 * ChunkSize, 119 + 240 + 10*ChunkSize},
		{SuiteX25519, -1, -1},
	} {
		if got := SealedSize(tc.n, testPub(tc.suite)); got != tc.want {
			t.Errorf("SealedSize(%d, %s) = %d, want %d", tc.n, tc.suite, got, tc.want)
		}
	}
	if PrefixSize(SuiteXWing) != 1207 || PrefixSize(SuiteX25519) != 119 {
		t.Fatalf("prefix sizes %d and %d, the doc says 1207 and 119", PrefixSize(SuiteXWing), PrefixSize(SuiteX25519))
	}
}

// TestFreshEncapsulation: two bodies of the same plaintext to the same key
// share nothing but the prefix fields the caller chose.
func TestFreshEncapsulation(t *testing.T) {
	for _, suite := range allSuites {
		a, _ := Seal(pattern(100), testPub(suite), testContext)
		b, _ := Seal(pattern(100), testPub(suite), testContext)
		pa, n, err := ParsePrefix(a)
		if err != nil {
			t.Fatal(err)
		}
		pb, _, _ := ParsePrefix(b)
		if !bytes.Equal(a[:boundPrefixSize], b[:boundPrefixSize]) {
			t.Fatalf("%s: the bound prefixes of two bodies differ", suite)
		}
		if bytes.Equal(pa.Enc, pb.Enc) || pa.Commitment == pb.Commitment || bytes.Equal(a[n:], b[n:]) {
			t.Fatalf("%s: two bodies share an encapsulated key, a commitment or ciphertext", suite)
		}
	}
}

// TestSealerState: writes after Close fail, Close is idempotent, an
// upstream write error sticks, and bad arguments are refused up front.
func TestSealerState(t *testing.T) {
	pub := testPub(SuiteX25519)
	w, err := NewSealer(io.Discard, pub, testContext)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close: %v", err)
	}
	if _, err := w.(io.ReaderFrom).ReadFrom(bytes.NewReader([]byte("x"))); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadFrom after Close: %v", err)
	}

	boom := errors.New("upstream gone")
	s, _ := newSealer(&failWriter{err: boom}, pub, testContext, MinChunkSize)
	if _, err := s.Write(pattern(200)); !errors.Is(err, boom) {
		t.Fatalf("Write to a failing upstream: %v", err)
	}
	if _, err := s.Write(pattern(1)); !errors.Is(err, boom) {
		t.Fatalf("Write after a failed write: %v", err)
	}
	if err := s.Close(); !errors.Is(err, boom) {
		t.Fatalf("Close after a failed write: %v", err)
	}

	if _, err := NewSealer(io.Discard, nil, testContext); err == nil {
		t.Error("NewSealer accepted a nil key")
	}
	if _, err := Seal(nil, nil, testContext); err == nil {
		t.Error("Seal accepted a nil key")
	}
	for _, chunk := range []int{MinChunkSize - 1, MaxChunkSize + 1} {
		if _, err := newSealer(io.Discard, pub, testContext, chunk); err == nil {
			t.Errorf("chunk size %d accepted", chunk)
		}
	}
	if _, err := NewOpener(bytes.NewReader(nil), nil, testContext).Read(make([]byte, 1)); err == nil {
		t.Error("an opener without a key read")
	}
}

type failWriter struct{ err error }

func (w *failWriter) Write(p []byte) (int, error) { return 0, w.err }

// TestChunkLimit: a sealer refuses to seal chunk 2^32 (the index would
// wrap and a nonce repeat).
func TestChunkLimit(t *testing.T) {
	s, err := newSealer(io.Discard, testPub(SuiteX25519), testContext, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	s.index = MaxChunks - 1
	if _, err := s.Write(pattern(MinChunkSize + 1)); err != nil { // seals the last index
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("sealing chunk 2^32: %v", err)
	}
}

// Test50MiB streams 50 MiB through a sealer and an opener joined by a
// pipe, with the default suite and chunk size, comparing hashes, and
// checks memory stays flat: the pipeline allocates a few chunks' worth,
// not the body.
func Test50MiB(t *testing.T) {
	if testing.Short() {
		t.Skip("50 MiB stream: not in -short")
	}
	const total = 50 << 20
	pr, pw := io.Pipe()
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)

	sealErr := make(chan error, 1)
	go func() {
		s, err := NewSealer(pw, testPub(SuiteXWing), testContext)
		if err == nil {
			if _, err = io.Copy(s, &patternReader{left: total}); err == nil {
				err = s.Close()
			}
		}
		pw.CloseWithError(err)
		sealErr <- err
	}()
	gotHash := sha256.New()
	n, err := io.Copy(gotHash, NewOpener(pr, testKey(SuiteXWing), testContext))
	if err != nil {
		t.Fatal(err)
	}
	if err := <-sealErr; err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&ms1)
	wantHash := sha256.New()
	if _, err := io.Copy(wantHash, &patternReader{left: total}); err != nil {
		t.Fatal(err)
	}
	if n != total || !bytes.Equal(gotHash.Sum(nil), wantHash.Sum(nil)) {
		t.Fatalf("opened %d bytes, hash mismatch: %v", n, !bytes.Equal(gotHash.Sum(nil), wantHash.Sum(nil)))
	}
	alloc := ms1.TotalAlloc - ms0.TotalAlloc
	t.Logf("50 MiB sealed and opened; %d KiB allocated", alloc>>10)
	if alloc > 1<<20 {
		t.Fatalf("allocated %d bytes for a 50 MiB stream: memory is not flat", alloc)
	}
}

// patternReader yields left bytes of a pattern, in reads of at most 32 KiB
// (like a socket).
type patternReader struct {
	left int64
	off  int64
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.left, 32<<10))
	for i := range n {
		p[i] = byte((r.off + int64(i)) * 131)
	}
	r.off += int64(n)
	r.left -= int64(n)
	return n, nil
}
