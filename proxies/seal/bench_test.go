package seal

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"io"
	"testing"
	"time"
)

// Benchmarks: sealing and opening against raw AES-256-GCM on the same
// buffers in the same run. The target is sealing at 0.70x raw
// AES-GCM or better. Run them alone (two cores here):
//
//	go test ./proxies/seal -run '^$' -bench . -benchtime 2s
//
// BenchmarkRatio interleaves raw and sealed work inside each iteration and
// reports the throughput ratios directly (seal/raw, open/raw), which holds
// up better on a shared machine than comparing separate benchmarks.

const benchBuf = 1 << 20

func rawGCM(b *testing.B) cipher.AEAD {
	block, err := aes.NewCipher(testKey("raw", 0))
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	return aead
}

// rawSeal seals buf as 64 KiB chunks with one key and counter nonces:
// what the format costs at least.
func rawSeal(aead cipher.AEAD, dst, buf []byte, ctr *uint64) {
	var nonce [12]byte
	for p := buf; len(p) > 0; {
		n := min(DefaultSegmentSize, len(p))
		*ctr++
		binary.BigEndian.PutUint64(nonce[4:], *ctr)
		aead.Seal(dst[:0], nonce[:], p[:n], nil)
		p = p[n:]
	}
}

// rawOpen opens chunks that rawSeal-style sealing made. With read set,
// each chunk is first copied into dst and opened in place, as a streaming
// opener must: its input arrives from a reader (a socket read copies too).
func rawOpen(b *testing.B, aead cipher.AEAD, chunks [][]byte, dst []byte, read bool) {
	var nonce [12]byte
	for i, c := range chunks {
		binary.BigEndian.PutUint64(nonce[4:], uint64(i))
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
		n := min(DefaultSegmentSize, len(buf))
		binary.BigEndian.PutUint64(nonce[4:], uint64(i))
		chunks = append(chunks, aead.Seal(nil, nonce[:], buf[:n], nil))
		buf = buf[n:]
	}
	return chunks
}

func BenchmarkSeal(b *testing.B) {
	buf := pattern(benchBuf)
	b.Run("raw-aes-gcm-64KiB", func(b *testing.B) {
		aead := rawGCM(b)
		dst := make([]byte, DefaultSegmentSize+tagSize)
		var ctr uint64
		b.SetBytes(benchBuf)
		for b.Loop() {
			rawSeal(aead, dst, buf, &ctr)
		}
	})
	b.Run("raw-aes-gcm-whole", func(b *testing.B) {
		aead := rawGCM(b)
		dst := make([]byte, benchBuf+tagSize)
		var nonce [12]byte
		b.SetBytes(benchBuf)
		for b.Loop() {
			aead.Seal(dst[:0], nonce[:], buf, nil)
		}
	})
	b.Run("sealer-write", func(b *testing.B) {
		s, err := NewSealer(io.Discard, testConfig(0))
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
		_ = s.Close()
	})
	b.Run("sealer-readfrom", func(b *testing.B) {
		s, err := NewSealer(io.Discard, testConfig(0))
		if err != nil {
			b.Fatal(err)
		}
		r := bytes.NewReader(buf)
		b.SetBytes(benchBuf)
		b.ReportAllocs()
		for b.Loop() {
			r.Reset(buf)
			if _, err := s.ReadFrom(r); err != nil {
				b.Fatal(err)
			}
		}
		_ = s.Close()
	})
	// A small HTTP body: here the per-object key schedule dominates.
	b.Run("object-1KiB", func(b *testing.B) {
		small := buf[:1024]
		c := testConfig(0)
		b.SetBytes(1024)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Seal(small, c); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("raw-aes-gcm-1KiB", func(b *testing.B) {
		aead := rawGCM(b)
		dst := make([]byte, 1024+tagSize)
		var ctr uint64
		b.SetBytes(1024)
		for b.Loop() {
			rawSeal(aead, dst, buf[:1024], &ctr)
		}
	})
}

func BenchmarkOpen(b *testing.B) {
	buf := pattern(benchBuf)
	for _, read := range []bool{false, true} {
		name := "raw-aes-gcm-64KiB"
		if read {
			name += "+read"
		}
		b.Run(name, func(b *testing.B) {
			aead := rawGCM(b)
			chunks := rawChunks(aead, buf)
			dst := make([]byte, DefaultSegmentSize+tagSize)
			b.SetBytes(benchBuf)
			for b.Loop() {
				rawOpen(b, aead, chunks, dst, read)
			}
		})
	}
	b.Run("opener", func(b *testing.B) {
		sealed, err := Seal(buf, testConfig(0))
		if err != nil {
			b.Fatal(err)
		}
		r := bytes.NewReader(sealed)
		b.SetBytes(benchBuf)
		b.ReportAllocs()
		for b.Loop() {
			r.Reset(sealed)
			if _, err := NewOpener(r, testKeys).WriteTo(io.Discard); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRatio: each iteration seals and opens 1 MiB both raw (64 KiB
// AES-256-GCM chunks) and in the format, timing each; the metrics are
// throughput relative to raw.
func BenchmarkRatio(b *testing.B) {
	buf := pattern(benchBuf)
	aead := rawGCM(b)
	dst := make([]byte, DefaultSegmentSize+tagSize)
	chunks := rawChunks(aead, buf)
	sealed, err := Seal(buf, testConfig(0))
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewSealer(io.Discard, testConfig(0))
	if err != nil {
		b.Fatal(err)
	}
	r := bytes.NewReader(sealed)
	var ctr uint64
	var rawS, ourS, rawO, rawOR, ourO time.Duration
	b.SetBytes(benchBuf)
	for b.Loop() {
		t0 := time.Now()
		rawSeal(aead, dst, buf, &ctr)
		t1 := time.Now()
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		rawOpen(b, aead, chunks, dst, false)
		t3 := time.Now()
		rawOpen(b, aead, chunks, dst, true)
		t4 := time.Now()
		r.Reset(sealed)
		if _, err := NewOpener(r, testKeys).WriteTo(io.Discard); err != nil {
			b.Fatal(err)
		}
		t5 := time.Now()
		rawS += t1.Sub(t0)
		ourS += t2.Sub(t1)
		rawO += t3.Sub(t2)
		rawOR += t4.Sub(t3)
		ourO += t5.Sub(t4)
	}
	b.ReportMetric(float64(rawS)/float64(ourS), "seal/raw")
	b.ReportMetric(float64(rawO)/float64(ourO), "open/raw")
	b.ReportMetric(float64(rawOR)/float64(ourO), "open/raw+read")
	b.ReportMetric(float64(benchBuf)*float64(b.N)/rawS.Seconds()/1e9, "raw-seal-GB/s")
	b.ReportMetric(float64(benchBuf)*float64(b.N)/ourS.Seconds()/1e9, "seal-GB/s")
}
