package hpke

import (
	stdhpke "crypto/hpke"
	"fmt"
	"io"
)

// encapsulate sets up a fresh HPKE context to pub for one body and
// derives its chunk keys and prefix.
func encapsulate(pub *PublicKey, context string, chunk int) (Prefix, *bodyKeys, error) {
	p := Prefix{ChunkSize: chunk, ContextDigest: ContextDigest(context)}
	if pub == nil {
		return p, nil, errNilKey
	}
	if chunk < MinChunkSize || chunk > MaxChunkSize {
		return p, nil, fmt.Errorf("hpke: chunk size %d out of range %d-%d", chunk, MinChunkSize, MaxChunkSize)
	}
	p.Suite, p.KeyID = pub.suite, pub.id
	kdf, aead := hpkeSuite()
	enc, s, err := stdhpke.NewSender(pub.key, kdf, aead, p.info())
	if err != nil {
		return p, nil, fmt.Errorf("hpke: encapsulating to the %s key %s: %w", pub.suite, pub.id, err)
	}
	k, err := derive(s)
	if err != nil {
		return p, nil, fmt.Errorf("hpke: %w", err)
	}
	p.Enc, p.Commitment = enc, k.commitment
	return p, k, nil
}

// A Sealer seals what is written to it as one body on an upstream writer:
// the prefix with the first chunk, then each chunk as soon as it is full
// and more data follows, and the final chunk at Close. It holds one chunk
// in memory. Close does not close the upstream writer. A Sealer is not
// safe for concurrent use.
//
// Write errors are sticky: after the upstream writer failed, every call
// returns that error.
type Sealer struct {
	w      io.Writer
	keys   *bodyKeys
	prefix Prefix
	chunk  int
	nonce  [nonceSize]byte

	// buf is the encoded prefix followed by one frame (frame header,
	// chunk plaintext, tag); the prefix goes out with the first frame.
	buf        []byte
	preLen     int
	n          int    // plaintext bytes buffered
	index      uint64 // index of the next chunk
	prefixSent bool
	closed     bool
	err        error
}

// NewSealer starts a body sealed to pub under context that goes to w, in
// chunks of ChunkSize: its size is SealedSize. The context (the caller's:
// for cleanwall's proxy, the rule) is bound into the HPKE context, and its
// digest is in the prefix, so that an opener can insist on it. Every body
// gets a fresh encapsulation. Nothing is written until the first chunk is
// (or Close). The WriteCloser is a *Sealer.
func NewSealer(w io.Writer, pub *PublicKey, context string) (io.WriteCloser, error) {
	return newSealer(w, pub, context, ChunkSize)
}

func newSealer(w io.Writer, pub *PublicKey, context string, chunk int) (*Sealer, error) {
	p, k, err := encapsulate(pub, context, chunk)
	if err != nil {
		return nil, err
	}
	enc := p.marshal()
	s := &Sealer{w: w, keys: k, prefix: p, chunk: chunk, preLen: len(enc)}
	s.buf = make([]byte, len(enc)+frameHeaderSize+min(chunk, initialRoom)+tagSize)
	copy(s.buf, enc)
	return s, nil
}

// initialRoom is the plaintext a new sealer's buffer holds before growing,
// so that small bodies cost little.
const initialRoom = 4 << 10

// Prefix is the body's prefix.
func (s *Sealer) Prefix() Prefix { return s.prefix }

// reserve makes room in the frame for n plaintext bytes (at most a chunk)
// and the tag after them, keeping what is buffered.
func (s *Sealer) reserve(n int) {
	need := s.preLen + frameHeaderSize + n + tagSize
	if len(s.buf) >= need {
		return
	}
	size := min(max(need, 2*len(s.buf)), s.preLen+frameHeaderSize+s.chunk+tagSize)
	buf := make([]byte, size)
	copy(buf, s.buf[:s.preLen+frameHeaderSize+s.n])
	s.buf = buf
}

// frame is the sealer's frame area: frame header, plaintext, tag.
func (s *Sealer) frame() []byte { return s.buf[s.preLen:] }

// emit seals one chunk and writes it (after the prefix, the first time):
// the buffered plaintext, or direct when the buffer is empty and the
// caller's bytes can be sealed where they are.
func (s *Sealer) emit(final bool, direct []byte) error {
	if s.index >= MaxChunks {
		s.err = ErrTooLarge
		return s.err
	}
	f := s.frame()
	pt := f[frameHeaderSize : frameHeaderSize+s.n]
	if direct != nil {
		pt = direct
	}
	out := s.keys.sealFrame(f[:0], uint32(s.index), final, pt, &s.nonce)
	if !s.prefixSent {
		out = s.buf[:s.preLen+len(out)]
		s.prefixSent = true
	}
	s.index++
	s.n = 0
	if _, err := s.w.Write(out); err != nil {
		s.err = err
		return err
	}
	return nil
}

// Write buffers p and seals every chunk that fills while more data
// follows; the last one waits for more data or Close.
func (s *Sealer) Write(p []byte) (int, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	written := 0
	for len(p) > 0 {
		if s.n == s.chunk { // a full chunk and more data: not the last one
			if err := s.emit(false, nil); err != nil {
				return written, err
			}
		}
		if s.n == 0 && len(p) > s.chunk {
			// Seal straight from p: no copy through the buffer.
			s.reserve(s.chunk)
			if err := s.emit(false, p[:s.chunk]); err != nil {
				return written, err
			}
			p = p[s.chunk:]
			written += s.chunk
			continue
		}
		end := min(s.n+len(p), s.chunk)
		s.reserve(end)
		k := copy(s.frame()[frameHeaderSize+s.n:frameHeaderSize+end], p)
		s.n += k
		p = p[k:]
		written += k
	}
	return written, nil
}

// ReadFrom seals everything r yields until io.EOF, which it does not treat
// as the end of the body (call Close). It reads into the chunk buffer, so
// io.Copy into a Sealer copies nothing twice.
func (s *Sealer) ReadFrom(r io.Reader) (int64, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	s.reserve(s.chunk)
	var total int64
	for {
		f := s.frame()
		// Read past a full chunk into the tag's room: bytes there prove
		// the chunk is not the last one.
		m, rerr := r.Read(f[frameHeaderSize+s.n : frameHeaderSize+s.chunk+tagSize])
		s.n += m
		total += int64(m)
		if s.n > s.chunk {
			var over [tagSize]byte
			k := copy(over[:], f[frameHeaderSize+s.chunk:frameHeaderSize+s.n])
			s.n = s.chunk
			if err := s.emit(false, nil); err != nil {
				return total, err
			}
			s.n = copy(f[frameHeaderSize:], over[:k])
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// Close seals what is buffered as the final chunk and writes it. The body
// is complete only when Close returned nil. Closing again returns the
// first Close's result.
func (s *Sealer) Close() error {
	if s.closed {
		return s.err
	}
	s.closed = true
	if s.err != nil {
		return s.err
	}
	return s.emit(true, nil)
}

func (s *Sealer) usable() error {
	if s.err != nil {
		return s.err
	}
	if s.closed {
		return ErrClosed
	}
	return nil
}

// Seal seals plaintext held in memory as one body to pub under context:
// the same bytes a Sealer writes, SealedSize(len(plaintext), pub) of them.
func Seal(plaintext []byte, pub *PublicKey, context string) ([]byte, error) {
	return sealChunks(plaintext, pub, context, ChunkSize)
}

func sealChunks(plaintext []byte, pub *PublicKey, context string, chunk int) ([]byte, error) {
	p, k, err := encapsulate(pub, context, chunk)
	if err != nil {
		return nil, err
	}
	n := int64(len(plaintext))
	chunks := max(1, (n+int64(chunk)-1)/int64(chunk))
	if chunks > MaxChunks {
		return nil, ErrTooLarge
	}
	out := make([]byte, 0, int64(p.Size())+chunks*FrameOverhead+n)
	out = append(out, p.marshal()...)
	var nonce [nonceSize]byte
	for i := range chunks {
		lo := min(int(i)*chunk, len(plaintext))
		hi := min(lo+chunk, len(plaintext))
		out = k.sealFrame(out, uint32(i), i == chunks-1, plaintext[lo:hi], &nonce)
	}
	return out, nil
}
