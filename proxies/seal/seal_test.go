package seal

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"testing"
	"testing/iotest"
)

// testKey is data key (id, version) as the tests' key source holds it.
func testKey(id string, version int) []byte {
	k := sha256.Sum256(fmt.Appendf(nil, "test data key %s v%d", id, version))
	return k[:]
}

const (
	testKeyID   = "egress-dek"
	testVersion = 3
	testContext = "rule=blob-store dir=out"
)

// testKeys is a key source holding every version of testKeyID and no
// other key id.
func testKeys(id string, version int) ([]byte, error) {
	if id != testKeyID {
		return nil, fmt.Errorf("key %q: %w", id, errNoKey)
	}
	return testKey(id, version), nil
}

var errNoKey = errors.New("data key not held")

// counterRand is a deterministic salt source: every salt it gives differs.
type counterRand struct{ n byte }

func (c *counterRand) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = c.n + byte(i)*7
	}
	c.n++
	return len(p), nil
}

func testConfig(seg int) SealConfig {
	return SealConfig{
		Key:         testKey(testKeyID, testVersion),
		KeyID:       testKeyID,
		KeyVersion:  testVersion,
		Context:     testContext,
		SegmentSize: seg,
		Rand:        &counterRand{},
	}
}

// pattern is n bytes that differ from segment to segment and within one.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*131 + i>>8)
	}
	return b
}

// sealStream seals pt with a Sealer fed in writes of chunk bytes.
func sealStream(t testing.TB, c SealConfig, pt []byte, chunk int) []byte {
	t.Helper()
	var out bytes.Buffer
	s, err := NewSealer(&out, c)
	if err != nil {
		t.Fatal(err)
	}
	for p := pt; len(p) > 0; {
		n := min(chunk, len(p))
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
func openAll(sealed []byte, keys KeyFunc, opts ...OpenOption) ([]byte, error) {
	o := NewOpener(bytes.NewReader(sealed), keys, opts...)
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

func sizesFor(seg int) []int {
	return []int{0, 1, seg - 1, seg, seg + 1, 2*seg - 1, 2 * seg, 2*seg + 1, 5*seg + seg/3}
}

// TestRoundTrip: every size around the segment boundaries comes back byte
// for byte, whichever way it is sealed (writes of any size, ReadFrom,
// Seal) and opened (Read, WriteTo, Open), and is exactly SealedSize long.
func TestRoundTrip(t *testing.T) {
	for _, seg := range []int{MinSegmentSize, 1000, DefaultSegmentSize} {
		for _, n := range sizesFor(seg) {
			t.Run(fmt.Sprintf("seg=%d/n=%d", seg, n), func(t *testing.T) {
				pt := pattern(n)
				c := testConfig(seg)
				l, err := c.Layout()
				if err != nil {
					t.Fatal(err)
				}
				oneShot, err := Seal(pt, testConfig(seg))
				if err != nil {
					t.Fatal(err)
				}
				if int64(len(oneShot)) != l.SealedSize(int64(n)) {
					t.Fatalf("sealed %d bytes, SealedSize says %d", len(oneShot), l.SealedSize(int64(n)))
				}
				if got, err := l.PlaintextSize(int64(len(oneShot))); err != nil || got != int64(n) {
					t.Fatalf("PlaintextSize = %d, %v; want %d", got, err, n)
				}
				// The same salt gives the same object whichever way it is written.
				for _, chunk := range []int{1, 7, seg - 1, seg, seg + 1, 3*seg + 5} {
					if n > 3*seg && chunk == 1 {
						continue
					}
					if got := sealStream(t, testConfig(seg), pt, chunk); !bytes.Equal(got, oneShot) {
						t.Fatalf("writes of %d bytes sealed differently from Seal", chunk)
					}
				}
				var rf bytes.Buffer
				s, err := NewSealer(&rf, testConfig(seg))
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

				got, err := openAll(oneShot, testKeys)
				if err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("Read: %d bytes, %v; want %d bytes", len(got), err, n)
				}
				got, err = Open(oneShot, testKeys, WithContext(testContext))
				if err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("Open: %d bytes, %v; want %d bytes", len(got), err, n)
				}
				var wt bytes.Buffer
				o := NewOpener(iotest.OneByteReader(bytes.NewReader(oneShot)), testKeys)
				if _, err := o.WriteTo(&wt); err != nil || !bytes.Equal(wt.Bytes(), pt) {
					t.Fatalf("WriteTo over one-byte reads: %d bytes, %v", wt.Len(), err)
				}
				h, err := o.Header()
				if err != nil || h.KeyID != testKeyID || h.KeyVersion != testVersion || h.Context != testContext || h.SegmentSize != seg {
					t.Fatalf("Header = %+v, %v", h, err)
				}
			})
		}
	}
}

// TestInteractive: an interactive sealer's flushes put short segments on
// the wire as they happen, and the stream still opens byte for byte.
func TestInteractive(t *testing.T) {
	c := testConfig(256)
	c.Interactive = true
	var wire bytes.Buffer
	s, err := NewSealer(&wire, c)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil { // header only
		t.Fatal(err)
	}
	if wire.Len() != s.Header().Size() {
		t.Fatalf("Flush with nothing buffered wrote %d bytes, want the %d-byte header", wire.Len(), s.Header().Size())
	}
	var want []byte
	for i, msg := range [][]byte{[]byte("PING"), pattern(300), []byte("x"), pattern(256), pattern(1000)} {
		before := wire.Len()
		if _, err := s.Write(msg); err != nil {
			t.Fatal(err)
		}
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
		want = append(want, msg...)
		// Everything written is on the wire after the flush.
		segs := (len(msg) + 255) / 256
		if got := wire.Len() - before; got != len(msg)+segs*FrameOverhead {
			t.Fatalf("message %d: flush put %d bytes on the wire, want %d", i, got, len(msg)+segs*FrameOverhead)
		}
		// The peer can open everything so far (it waits for more after).
		o := NewOpener(bytes.NewReader(wire.Bytes()), testKeys)
		got, err := io.ReadAll(io.LimitReader(o, int64(len(want))))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("message %d: peer read %d bytes, %v", i, len(got), err)
		}
	}
	// ReadFrom seals each read at once.
	before := wire.Len()
	if _, err := s.ReadFrom(iotest.OneByteReader(bytes.NewReader([]byte("abc")))); err != nil {
		t.Fatal(err)
	}
	want = append(want, "abc"...)
	if got := wire.Len() - before; got != 3*(1+FrameOverhead) {
		t.Fatalf("interactive ReadFrom of three 1-byte reads wrote %d bytes, want three segments", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := Open(wire.Bytes(), testKeys)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("Open: %d bytes, %v", len(got), err)
	}
	// A non-interactive sealer refuses to flush.
	s2, _ := NewSealer(io.Discard, testConfig(256))
	if err := s2.Flush(); !errors.Is(err, ErrNotInteractive) {
		t.Fatalf("Flush on a non-interactive sealer: %v", err)
	}
}

// TestSealerState: writes after Close fail, Close is idempotent, an
// upstream write error sticks, and a bad config is refused up front.
func TestSealerState(t *testing.T) {
	s, err := NewSealer(io.Discard, testConfig(64))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close: %v", err)
	}

	boom := errors.New("upstream gone")
	s, _ = NewSealer(&failWriter{err: boom}, testConfig(64))
	if _, err := s.Write(pattern(200)); !errors.Is(err, boom) {
		t.Fatalf("Write to a failing upstream: %v", err)
	}
	if err := s.Close(); !errors.Is(err, boom) {
		t.Fatalf("Close after a failed write: %v", err)
	}

	for name, mod := range map[string]func(*SealConfig){
		"short key":          func(c *SealConfig) { c.Key = c.Key[:16] },
		"no key id":          func(c *SealConfig) { c.KeyID = "" },
		"long key id":        func(c *SealConfig) { c.KeyID = string(pattern(256)) },
		"negative ver":       func(c *SealConfig) { c.KeyVersion = -1 },
		"huge ver":           func(c *SealConfig) { c.KeyVersion = MaxKeyVersion + 1 },
		"long context":       func(c *SealConfig) { c.Context = string(bytes.Repeat([]byte("c"), MaxContextLen+1)) },
		"binary context":     func(c *SealConfig) { c.Context = "\xff" },
		"small segment":      func(c *SealConfig) { c.SegmentSize = MinSegmentSize - 1 },
		"huge segment":       func(c *SealConfig) { c.SegmentSize = MaxSegmentSize + 1 },
		"failing randomness": func(c *SealConfig) { c.Rand = iotest.ErrReader(boom) },
	} {
		c := testConfig(64)
		mod(&c)
		if _, err := NewSealer(io.Discard, c); err == nil {
			t.Errorf("%s: NewSealer accepted it", name)
		}
		if _, err := Seal(nil, c); err == nil {
			t.Errorf("%s: Seal accepted it", name)
		}
	}
}

type failWriter struct {
	err error
}

func (w *failWriter) Write(p []byte) (int, error) { return 0, w.err }

// TestSaltsDiffer: two objects of the same plaintext under the same key
// share nothing but the header fields the caller chose.
func TestSaltsDiffer(t *testing.T) {
	c := testConfig(64)
	c.Rand = nil // crypto/rand
	a, _ := Seal(pattern(100), c)
	b, _ := Seal(pattern(100), c)
	ha, n, err := ParseHeader(a)
	if err != nil {
		t.Fatal(err)
	}
	hb, _, _ := ParseHeader(b)
	if ha.Salt == hb.Salt || ha.Commitment == hb.Commitment || bytes.Equal(a[n:], b[n:]) {
		t.Fatal("two objects share a salt, a commitment or ciphertext")
	}
}

// Test100MiB streams 100 MiB through a sealer and an opener joined by a
// pipe, comparing hashes, and checks memory stays flat: the pipeline
// allocates a few segments' worth, not the stream.
func Test100MiB(t *testing.T) {
	if testing.Short() {
		t.Skip("100 MiB stream: not in -short")
	}
	const total = 100 << 20
	src := &patternReader{left: total}
	pr, pw := io.Pipe()
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)

	sealErr := make(chan error, 1)
	go func() {
		s, err := NewSealer(pw, testConfig(0))
		if err == nil {
			if _, err = s.ReadFrom(src); err == nil {
				err = s.Close()
			}
		}
		pw.CloseWithError(err)
		sealErr <- err
	}()
	gotHash := sha256.New()
	n, err := NewOpener(pr, testKeys).WriteTo(gotHash)
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
	t.Logf("100 MiB sealed and opened; %d KiB allocated", alloc>>10)
	if alloc > 2<<20 {
		t.Fatalf("allocated %d bytes for a 100 MiB stream: memory is not flat", alloc)
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

// TestSegmentLimit: a sealer refuses to seal segment 2^32 (the index would
// wrap and a nonce repeat).
func TestSegmentLimit(t *testing.T) {
	s, err := NewSealer(io.Discard, testConfig(MinSegmentSize))
	if err != nil {
		t.Fatal(err)
	}
	s.index = MaxSegments - 1
	if _, err := s.Write(pattern(MinSegmentSize + 1)); err != nil { // seals the last index
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("sealing segment 2^32: %v", err)
	}
}
