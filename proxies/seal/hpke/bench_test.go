package hpke

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"
)

// Benchmarks: sealing and opening against raw AES-256-GCM on the same
// buffers in the same run, and the per-body cost of each suite's KEM. Run
// them alone (two cores here):
//
//	go test ./proxies/seal/hpke -run '^$' -bench . -benchtime 2s
//
// BenchmarkRatio interleaves raw and sealed work inside each iteration and
// reports the throughput ratios directly, which holds up better on a
// shared machine than comparing separate benchmarks.

const benchBuf = 1 << 20

func rawGCM(b *testing.B) cipher.AEAD {
	block, err := aes.NewCipher(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	return aead
}

// rawSeal seals buf as ChunkSize chunks with one key and counter nonces:
// what the format costs at least.
func rawSeal(aead cipher.AEAD, dst, buf []byte, ctr *uint64) {
	var nonce [12]byte
	for p := buf; len(p) > 0; {
		n := min(ChunkSize, len(p))
		*ctr++
		binary.BigEndian.PutUint64(nonce[4:], *ctr)
		aead.Seal(dst[:0], nonce[:], p[:n], nil)
		p = p[n:]
	}
}

// rawOpen opens chunks that rawChunks made, the first of them chunk
// first. With read set, each chunk is
// first copied into dst and opened in place, as a streaming opener must:
// its input arrives from a reader.
func rawOpen(b *testing.B, aead cipher.AEAD, chunks [][]byte, first int, dst []byte, read bool) {
	var nonce [12]byte
	for i, c := range chunks {
		binary.BigEndian.PutUint64(nonce[4:], uint64(first+i))
		in := c
		if read {
			in = dst[:copy(dst[:cap(dst)], c)]
		}
		if _, err := aead.Open(dst[:0], nonce[:], in, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func rawChunks(aead cipher.AEAD, buf []byte) [][]byte {
	var chunks [][]byte
	var nonce [12]byte
	for i := 0; len(buf) > 0; i++ {
		n := min(ChunkSize, len(buf))
		binary.BigEndian.PutUint64(nonce[4:], uint64(i))
		chunks = append(chunks, aead.Seal(nil, nonce[:], buf[:n], nil))
		buf = buf[n:]
	}
	return chunks
}

// streamOpener yields 1 MiB of plaintext per call from one long body
// through the opener's WriteTo (what io.Copy uses), so that the opener's
// steady state is measured; a new opener (and decapsulation) every 32 MiB.
type streamOpener struct {
	sealed []byte
	priv   *PrivateKey
	o      *Opener
	budget budgetWriter
}

// budgetWriter takes n bytes, then stops the WriteTo feeding it; the
// opener keeps what it did not write for the next call.
type budgetWriter struct{ n int }

var errBudget = errors.New("budget spent")

func (w *budgetWriter) Write(p []byte) (int, error) {
	if len(p) >= w.n {
		n := w.n
		w.n = 0
		return n, errBudget
	}
	w.n -= len(p)
	return len(p), nil
}

func (s *streamOpener) next(b *testing.B) {
	s.budget.n = benchBuf
	for s.budget.n > 0 {
		if s.o == nil {
			s.o = NewOpener(bytes.NewReader(s.sealed), s.priv, testContext).(*Opener)
		}
		_, err := s.o.WriteTo(&s.budget)
		switch {
		case err == nil: // the body ended: the next one
			s.o = nil
		case err != errBudget:
			b.Fatal(err)
		}
	}
}

// BenchmarkRatio: each iteration seals and opens 1 MiB both raw (16 KiB
// AES-256-GCM chunks) and in the format (default suite and chunk size),
// timing each; the metrics are throughput relative to raw. seal/raw and
// open/raw are the streaming steady state (one long body); body-seal/raw
// and body-open/raw seal and open a whole 1 MiB body each time, with its
// X-Wing encapsulation and decapsulation.
func BenchmarkRatio(b *testing.B) {
	buf := pattern(benchBuf)
	aead := rawGCM(b)
	dst := make([]byte, ChunkSize+tagSize)
	// The raw chunks span 32 MiB as the long body does, and each
	// iteration opens the next 1 MiB of them: both sides read memory that
	// is not in the cache.
	const longBufs = 32
	longPlain := bytes.Repeat(buf, longBufs)
	allChunks := rawChunks(aead, longPlain)
	perBuf := len(allChunks) / longBufs
	priv, pub := testKey(SuiteXWing), testPub(SuiteXWing)
	long, err := Seal(longPlain, pub, testContext)
	if err != nil {
		b.Fatal(err)
	}
	stream := &streamOpener{sealed: long, priv: priv}
	s, err := NewSealer(io.Discard, pub, testContext)
	if err != nil {
		b.Fatal(err)
	}
	oneBody, err := Seal(buf, pub, testContext)
	if err != nil {
		b.Fatal(err)
	}
	r := bytes.NewReader(oneBody)
	var ctr uint64
	window := 0
	var rawS, ourS, rawO, rawOR, ourO, bodyS, bodyO time.Duration
	b.SetBytes(benchBuf)
	for b.Loop() {
		first := window * perBuf
		chunks := allChunks[first : first+perBuf]
		window = (window + 1) % longBufs
		t0 := time.Now()
		rawSeal(aead, dst, buf, &ctr)
		t1 := time.Now()
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		rawOpen(b, aead, chunks, first, dst, false)
		t3 := time.Now()
		rawOpen(b, aead, chunks, first, dst, true)
		t4 := time.Now()
		stream.next(b)
		t5 := time.Now()
		w, err := NewSealer(io.Discard, pub, testContext)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := w.Write(buf); err != nil || w.Close() != nil {
			b.Fatal(err)
		}
		t6 := time.Now()
		r.Reset(oneBody)
		if _, err := io.Copy(io.Discard, NewOpener(r, priv, testContext)); err != nil {
			b.Fatal(err)
		}
		t7 := time.Now()
		rawS += t1.Sub(t0)
		ourS += t2.Sub(t1)
		rawO += t3.Sub(t2)
		rawOR += t4.Sub(t3)
		ourO += t5.Sub(t4)
		bodyS += t6.Sub(t5)
		bodyO += t7.Sub(t6)
	}
	b.ReportMetric(float64(rawS)/float64(ourS), "seal/raw")
	b.ReportMetric(float64(rawO)/float64(ourO), "open/raw")
	b.ReportMetric(float64(rawOR)/float64(ourO), "open/raw+read")
	b.ReportMetric(float64(rawS)/float64(bodyS), "body-seal/raw")
	b.ReportMetric(float64(rawO)/float64(bodyO), "body-open/raw")
	b.ReportMetric(float64(benchBuf)*float64(b.N)/rawS.Seconds()/1e9, "raw-seal-GB/s")
	b.ReportMetric(float64(benchBuf)*float64(b.N)/ourS.Seconds()/1e9, "seal-GB/s")
}

// BenchmarkSuites: the per-body cost of each suite, interleaved in each
// iteration: sealing an empty body (encapsulation, the three exports, one
// frame) and opening it (decapsulation, exports, commitment, one frame).
// The metrics are microseconds per body and X-Wing's cost over X25519's.
func BenchmarkSuites(b *testing.B) {
	var sealT, openT [2]time.Duration
	bodies := [2][]byte{}
	for i, suite := range allSuites {
		var err error
		if bodies[i], err = Seal(nil, testPub(suite), testContext); err != nil {
			b.Fatal(err)
		}
	}
	var out bytes.Buffer
	for b.Loop() {
		for i, suite := range allSuites {
			t0 := time.Now()
			out.Reset()
			w, err := NewSealer(&out, testPub(suite), testContext)
			if err != nil || w.Close() != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			if _, err := Open(bodies[i], testKey(suite), testContext); err != nil {
				b.Fatal(err)
			}
			t2 := time.Now()
			sealT[i] += t1.Sub(t0)
			openT[i] += t2.Sub(t1)
		}
	}
	us := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(b.N) }
	b.ReportMetric(us(sealT[0]), "xwing-seal-µs")
	b.ReportMetric(us(sealT[1]), "x25519-seal-µs")
	b.ReportMetric(us(openT[0]), "xwing-open-µs")
	b.ReportMetric(us(openT[1]), "x25519-open-µs")
	b.ReportMetric(float64(sealT[0])/float64(sealT[1]), "seal-xwing/x25519")
	b.ReportMetric(float64(openT[0])/float64(openT[1]), "open-xwing/x25519")
}

// BenchmarkChunkSize: sealing throughput by chunk size, the measurement
// behind ChunkSize.
func BenchmarkChunkSize(b *testing.B) {
	buf := pattern(benchBuf)
	for _, chunk := range []int{1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10} {
		b.Run(fmt.Sprintf("%dKiB", chunk>>10), func(b *testing.B) {
			s, err := newSealer(io.Discard, testPub(SuiteXWing), testContext, chunk)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(benchBuf)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkOpen: the opener's throughput through Read and WriteTo
// (io.Copy), steady state.
func BenchmarkOpen(b *testing.B) {
	buf := pattern(benchBuf)
	sealed, err := Seal(buf, testPub(SuiteX25519), testContext)
	if err != nil {
		b.Fatal(err)
	}
	r := bytes.NewReader(sealed)
	b.SetBytes(benchBuf)
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(sealed)
		if _, err := NewOpener(r, testKey(SuiteX25519), testContext).(*Opener).WriteTo(io.Discard); err != nil {
			b.Fatal(err)
		}
	}
}
