package seal

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
)

// SealConfig is what a sealer seals under.
type SealConfig struct {
	// Key is the 32-byte data key; KeyID and KeyVersion name it in the
	// header, so that an opener can ask its key source for it.
	Key        []byte
	KeyID      string
	KeyVersion int
	// Context is bound into the object key and carried in the header in
	// clear text (at most MaxContextLen bytes of UTF-8): for cleanwall's
	// proxies, the rule and the direction, so that an object sealed for
	// one cannot be passed off as the other. No secrets here.
	Context string
	// SegmentSize is the plaintext bytes per segment; zero means
	// DefaultSegmentSize.
	SegmentSize int
	// Interactive lets Flush seal what is buffered as a short segment, for
	// streams whose peer waits for each message (secure TCP). Objects
	// sealed so do not map plaintext ranges to segments.
	Interactive bool
	// Rand supplies the salt; nil means crypto/rand. Tests inject it to
	// get deterministic objects: never share a salt between objects.
	Rand io.Reader
}

// header validates c and returns the header it seals under, without salt
// and commitment.
func (c *SealConfig) header() (Header, error) {
	h := Header{
		KeyID:       c.KeyID,
		KeyVersion:  c.KeyVersion,
		Context:     c.Context,
		SegmentSize: c.SegmentSize,
		Interactive: c.Interactive,
	}
	if h.SegmentSize == 0 {
		h.SegmentSize = DefaultSegmentSize
	}
	if len(c.Key) != KeySize {
		return h, fmt.Errorf("seal: data key is %d bytes, want %d", len(c.Key), KeySize)
	}
	if err := h.check(); err != nil {
		return h, fmt.Errorf("seal: %w", err)
	}
	return h, nil
}

// Layout is the layout of the objects c seals: with it, SealedSize gives a
// Content-Length before sealing.
func (c SealConfig) Layout() (Layout, error) {
	h, err := c.header()
	if err != nil {
		return Layout{}, err
	}
	return h.Layout(), nil
}

// newObject draws a salt and derives the object's keys and commitment.
func (c *SealConfig) newObject() (Header, *objectKeys, error) {
	h, err := c.header()
	if err != nil {
		return h, nil, err
	}
	rnd := c.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	if _, err := io.ReadFull(rnd, h.Salt[:]); err != nil {
		return h, nil, fmt.Errorf("seal: drawing the salt: %w", err)
	}
	k, err := derive(c.Key, &h)
	if err != nil {
		return h, nil, fmt.Errorf("seal: %w", err)
	}
	h.Commitment = k.commitment
	return h, k, nil
}

// A Sealer seals what is written to it as one object on an upstream
// writer: the header with the first segment, then each segment as soon as
// it is full and more data follows, and the final segment at Close. It
// holds one segment in memory. Close does not close the upstream writer.
// A Sealer is not safe for concurrent use.
//
// Write errors are sticky: after the upstream writer failed, every call
// returns that error.
type Sealer struct {
	w     io.Writer
	keys  *objectKeys
	hdr   Header
	seg   int
	nonce [12]byte

	// buf is the encoded header followed by one frame (frame header,
	// segment plaintext, tag); the header goes out with the first frame.
	// It grows to a whole segment only when that much is buffered, so
	// that small objects cost little.
	buf        []byte
	hdrLen     int
	n          int    // plaintext bytes buffered
	index      uint64 // index of the next segment
	headerSent bool
	closed     bool
	err        error
}

// NewSealer starts an object sealed under c that goes to w. Nothing is
// written until the first segment (or a Flush).
func NewSealer(w io.Writer, c SealConfig) (*Sealer, error) {
	h, k, err := c.newObject()
	if err != nil {
		return nil, err
	}
	enc, err := h.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	s := &Sealer{w: w, keys: k, hdr: h, seg: h.SegmentSize, hdrLen: len(enc)}
	s.buf = make([]byte, len(enc)+frameHeaderSize+min(h.SegmentSize, initialRoom)+tagSize)
	copy(s.buf, enc)
	return s, nil
}

// initialRoom is the plaintext a new sealer's buffer holds before growing.
const initialRoom = 4 << 10

// reserve makes room in the frame for n plaintext bytes (at most a
// segment) and the tag after them, keeping what is buffered.
func (s *Sealer) reserve(n int) {
	need := s.hdrLen + frameHeaderSize + n + tagSize
	if len(s.buf) >= need {
		return
	}
	size := min(max(need, 2*len(s.buf)), s.hdrLen+frameHeaderSize+s.seg+tagSize)
	buf := make([]byte, size)
	copy(buf, s.buf[:s.hdrLen+frameHeaderSize+s.n])
	s.buf = buf
}

// Header is the object's header.
func (s *Sealer) Header() Header { return s.hdr }

// Layout is the object's layout.
func (s *Sealer) Layout() Layout { return s.hdr.Layout() }

// frame is the sealer's frame area: frame header, plaintext, tag.
func (s *Sealer) frame() []byte { return s.buf[s.hdrLen:] }

// emit seals one segment and writes it (after the header, the first
// time): the buffered plaintext, or direct when the buffer is empty and
// the caller's bytes can be sealed where they are.
func (s *Sealer) emit(final bool, direct []byte) error {
	if s.index >= MaxSegments {
		s.err = ErrTooLarge
		return s.err
	}
	f := s.frame()
	pt := f[frameHeaderSize : frameHeaderSize+s.n]
	if direct != nil {
		pt = direct
	}
	out := s.keys.sealFrame(f[:0], uint32(s.index), final, pt, &s.nonce)
	if !s.headerSent {
		out = s.buf[:s.hdrLen+len(out)]
		s.headerSent = true
	}
	s.index++
	s.n = 0
	if _, err := s.w.Write(out); err != nil {
		s.err = err
		return err
	}
	return nil
}

// Write buffers p and seals every segment that fills while more data
// follows; the last one waits for more data, a Flush or Close.
func (s *Sealer) Write(p []byte) (int, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	written := 0
	for len(p) > 0 {
		if s.n == s.seg { // a full segment and more data: not the last one
			if err := s.emit(false, nil); err != nil {
				return written, err
			}
		}
		if s.n == 0 && len(p) > s.seg {
			// Seal straight from p: no copy through the buffer.
			s.reserve(s.seg)
			if err := s.emit(false, p[:s.seg]); err != nil {
				return written, err
			}
			p = p[s.seg:]
			written += s.seg
			continue
		}
		end := min(s.n+len(p), s.seg)
		s.reserve(end)
		k := copy(s.frame()[frameHeaderSize+s.n:frameHeaderSize+end], p)
		s.n += k
		p = p[k:]
		written += k
	}
	return written, nil
}

// ReadFrom seals everything r yields until io.EOF, which it does not
// treat as the end of the object (call Close). An interactive sealer seals
// what each Read returned as a segment at once, so that a peer waiting for
// a message gets it; otherwise segments are filled. It reads into the
// segment buffer: no extra copy.
func (s *Sealer) ReadFrom(r io.Reader) (int64, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	s.reserve(s.seg)
	var total int64
	for {
		f := s.frame()
		var room []byte
		switch {
		case s.hdr.Interactive && s.n == s.seg:
			if err := s.emit(false, nil); err != nil {
				return total, err
			}
			continue
		case s.hdr.Interactive:
			room = f[frameHeaderSize+s.n : frameHeaderSize+s.seg]
		default:
			// Read past a full segment into the tag's room: bytes there
			// prove the segment is not the last one.
			room = f[frameHeaderSize+s.n : frameHeaderSize+s.seg+tagSize]
		}
		m, rerr := r.Read(room)
		s.n += m
		total += int64(m)
		switch {
		case s.n > s.seg:
			var over [tagSize]byte
			k := copy(over[:], f[frameHeaderSize+s.seg:frameHeaderSize+s.n])
			s.n = s.seg
			if err := s.emit(false, nil); err != nil {
				return total, err
			}
			s.n = copy(f[frameHeaderSize:], over[:k])
		case s.hdr.Interactive && m > 0:
			if err := s.emit(false, nil); err != nil {
				return total, err
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// Flush seals what is buffered as a (short) segment and writes it, or
// writes the header if nothing went out yet. Only interactive sealers
// flush: a short segment in the middle of an object breaks the mapping of
// plaintext ranges to segments. Flush does not flush the upstream writer.
func (s *Sealer) Flush() error {
	if err := s.usable(); err != nil {
		return err
	}
	if !s.hdr.Interactive {
		return ErrNotInteractive
	}
	if s.n > 0 {
		return s.emit(false, nil)
	}
	if !s.headerSent {
		s.headerSent = true
		if _, err := s.w.Write(s.buf[:s.hdrLen]); err != nil {
			s.err = err
			return err
		}
	}
	return nil
}

// Close seals what is buffered as the final segment and writes it. The
// object is complete only when Close returned nil. Closing again returns
// the first Close's result.
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

// sealFrame appends segment index's frame (frame header, ciphertext, tag)
// to dst. pt may be dst's spare capacity just past the frame header
// (sealing in place).
func (k *objectKeys) sealFrame(dst []byte, index uint32, final bool, pt []byte, nonce *[12]byte) []byte {
	start := len(dst)
	dst = binary.BigEndian.AppendUint64(dst, 0)
	putFrameHeader(dst[start:], index, final, len(pt))
	k.nonce(nonce, index)
	return k.aead.Seal(dst, nonce[:], pt, dst[start:start+frameHeaderSize])
}

// Seal seals plaintext as one object under c (a known-length object: the
// result is Layout().SealedSize(len(plaintext)) bytes).
func Seal(plaintext []byte, c SealConfig) ([]byte, error) {
	h, k, err := c.newObject()
	if err != nil {
		return nil, err
	}
	out, err := h.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	l := h.Layout()
	segs := l.Segments(int64(len(plaintext)))
	if segs > MaxSegments {
		return nil, ErrTooLarge
	}
	out = append(make([]byte, 0, l.SealedSize(int64(len(plaintext)))), out...)
	var nonce [12]byte
	for i := range segs {
		lo := min(int(i)*h.SegmentSize, len(plaintext))
		hi := min(lo+h.SegmentSize, len(plaintext))
		out = k.sealFrame(out, uint32(i), i == segs-1, plaintext[lo:hi], &nonce)
	}
	return out, nil
}
