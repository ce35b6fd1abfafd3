package seal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// KeyFunc returns version version of data key keyID (32 bytes). An opener
// calls it once, with what the object's header names.
type KeyFunc func(keyID string, version int) ([]byte, error)

// OpenOption configures an Opener.
type OpenOption func(*Opener)

// WithContext refuses (ErrRefused) an object whose header context is not
// ctx: what a proxy uses so that a stream reflected back, or an object
// sealed for another rule, does not open as the one it expects.
func WithContext(ctx string) OpenOption {
	return func(o *Opener) { o.wantContext = &ctx }
}

// WithAccept lets accept vet the header (its key id, version, context)
// before the key source is asked; an error refuses the object
// (ErrRefused, wrapping it). The header is not authenticated yet when
// accept sees it, but nothing of the object is released unless the key
// commits to exactly this header.
func WithAccept(accept func(Header) error) OpenOption {
	return func(o *Opener) { o.accept = accept }
}

// WithMaxSegmentSize refuses (ErrHeader) headers declaring segments larger
// than n bytes: an opener holds one segment, so this bounds its memory.
// The default is MaxSegmentSize.
func WithMaxSegmentSize(n int) OpenOption {
	return func(o *Opener) { o.maxSegment = n }
}

// WithRange opens one plaintext range of an object instead of the whole:
// the opener reads the object's header followed by its bytes [span.Start,
// span.End), checks that they are segments span.First to span.Last of
// this object (and that span.Last is final exactly when span.Final says),
// and yields the span.Length bytes of the range.
func WithRange(span Span) OpenOption {
	return func(o *Opener) { o.span = &span }
}

// An Opener reads a sealed object and yields its plaintext. It verifies
// the header's key commitment before opening any segment and returns a
// segment's plaintext only after the segment authenticated at its
// position; the final segment's plaintext only once the input ended right
// after it. So whatever Read returned before an error is a verified prefix
// of what was sealed, and io.EOF means the whole object, exactly. Errors
// are sticky and are *Error values matching the package's sentinels
// (I/O errors of the underlying reader are returned as they are).
//
// A caller streaming plaintext onward must treat an error as "the data
// ended badly" (reset the connection, drop the temporary file): the
// verified prefix is not the object. An Opener holds one segment in
// memory and is not safe for concurrent use.
type Opener struct {
	r           io.Reader
	keys        KeyFunc
	wantContext *string
	accept      func(Header) error
	maxSegment  int
	span        *Span

	started bool
	hdr     Header
	object  *objectKeys
	nonce   [12]byte
	fh      [frameHeaderSize]byte
	buf     []byte // one segment's ciphertext and tag
	out     []byte // verified plaintext not yet returned
	next    int64  // position (expected index) of the next segment
	pos     int64  // offset in the sealed object of what comes next
	skip    int64  // range: plaintext bytes still to drop
	left    int64  // range: plaintext bytes still to yield
	done    bool
	err     error
}

// NewOpener returns an Opener that reads a sealed object from r and asks
// keys for the data key its header names.
func NewOpener(r io.Reader, keys KeyFunc, opts ...OpenOption) *Opener {
	o := &Opener{r: r, keys: keys, maxSegment: MaxSegmentSize}
	for _, opt := range opts {
		opt(o)
	}
	if keys == nil {
		o.err = errors.New("seal: NewOpener without a KeyFunc")
	}
	return o
}

// Header reads and verifies the header (if no Read did yet) and returns
// it: the key commitment has been checked when it returns no error.
func (o *Opener) Header() (Header, error) {
	if !o.started {
		o.start()
	}
	if o.err != nil && o.object == nil {
		return o.hdr, o.err
	}
	return o.hdr, nil
}

// Read yields verified plaintext.
func (o *Opener) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, o.err
	}
	for len(o.out) == 0 {
		if err := o.advance(); err != nil {
			return 0, err
		}
	}
	n := copy(p, o.out)
	o.out = o.out[n:]
	return n, nil
}

// WriteTo writes the verified plaintext to w, segment by segment, from the
// opener's buffer (io.Copy uses it).
func (o *Opener) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(o.out) > 0 {
			n, err := w.Write(o.out)
			total += int64(n)
			o.out = o.out[n:]
			if err != nil {
				return total, err
			}
		}
		if err := o.advance(); err != nil {
			if err == io.EOF {
				return total, nil
			}
			return total, err
		}
	}
}

// start reads the header, asks for the key and checks the commitment.
func (o *Opener) start() {
	o.started = true
	if o.err != nil {
		return
	}
	h, n, err := readHeader(o.r)
	o.pos = int64(n)
	o.hdr = h
	if err != nil {
		o.err = err
		return
	}
	if h.SegmentSize > o.maxSegment {
		o.err = headerError(ErrHeader, fmt.Sprintf("segment size %d above this opener's limit %d", h.SegmentSize, o.maxSegment))
		return
	}
	if o.wantContext != nil && h.Context != *o.wantContext {
		o.err = headerError(ErrRefused, fmt.Sprintf("context %q, want %q", h.Context, *o.wantContext))
		return
	}
	if o.accept != nil {
		if err := o.accept(h); err != nil {
			o.err = &Error{Kind: ErrRefused, Segment: -1, Err: err}
			return
		}
	}
	key, err := o.keys(h.KeyID, h.KeyVersion)
	if err != nil {
		o.err = &Error{Kind: ErrKey, Segment: -1, Detail: fmt.Sprintf("key %q version %d", h.KeyID, h.KeyVersion), Err: err}
		return
	}
	k, err := derive(key, &h)
	if err != nil {
		o.err = &Error{Kind: ErrKey, Segment: -1, Detail: fmt.Sprintf("key %q version %d", h.KeyID, h.KeyVersion), Err: err}
		return
	}
	if !k.commits(&h) {
		o.err = headerError(ErrCommitment, fmt.Sprintf("key %q version %d", h.KeyID, h.KeyVersion))
		return
	}
	if s := o.span; s != nil {
		l := h.Layout()
		switch {
		case l.Interactive:
			o.err = headerError(ErrRange, "an interactive object's segments do not map to offsets")
		case s.Layout != l:
			o.err = headerError(ErrRange, fmt.Sprintf("span computed for header size %d and segment size %d, the object has %d and %d",
				s.Layout.HeaderSize, s.Layout.SegmentSize, l.HeaderSize, l.SegmentSize))
		case s.First < 0 || s.Last < s.First || s.Last >= MaxSegments || s.Length <= 0 || s.Skip < 0 || s.Skip >= l.SegmentSize:
			o.err = headerError(ErrRange, "malformed span")
		}
		if o.err != nil {
			return
		}
		o.next, o.pos, o.skip, o.left = s.First, s.Start, s.Skip, s.Length
	}
	o.object = k
}

// advance reads, verifies and releases the next segment into o.out;
// io.EOF once the object ended well.
func (o *Opener) advance() error {
	if !o.started {
		o.start()
	}
	if o.err != nil {
		return o.err
	}
	if o.done {
		return io.EOF
	}
	seg, off := o.next, o.pos
	fail := func(kind error, found int64, detail string) error {
		o.out = nil
		o.err = &Error{Kind: kind, Segment: seg, Found: found, Offset: off, Detail: detail}
		return o.err
	}
	fh := o.fh[:]
	n, err := io.ReadFull(o.r, fh)
	o.pos += int64(n)
	switch {
	case err == io.EOF:
		return fail(ErrTruncated, 0, "the input ends at a segment boundary, before the final segment")
	case err == io.ErrUnexpectedEOF:
		return fail(ErrTruncated, 0, fmt.Sprintf("the input ends inside the frame header (%d of %d bytes)", n, frameHeaderSize))
	case err != nil:
		o.err = err
		return err
	}
	index, final, size := frameHeader(fh)
	switch {
	case size > o.hdr.SegmentSize:
		return fail(ErrAuth, 0, fmt.Sprintf("the frame header says %d bytes, more than a segment", size))
	case !final && size != o.hdr.SegmentSize && (!o.hdr.Interactive || size == 0):
		return fail(ErrAuth, 0, fmt.Sprintf("the frame header says a non-final segment of %d bytes", size))
	case final && size == 0 && index != 0 && !o.hdr.Interactive:
		// Only the empty object ends with an empty segment: one encoding
		// per plaintext keeps sizes and ranges exact.
		return fail(ErrAuth, 0, "the frame header says an empty final segment after others")
	}
	if cap(o.buf) < size+tagSize {
		// A whole segment's room, unless this is a short final segment
		// (a small object needs no more).
		room := o.hdr.SegmentSize
		if final {
			room = size
		}
		o.buf = make([]byte, room+tagSize)
	}
	body := o.buf[:size+tagSize]
	n, err = io.ReadFull(o.r, body)
	o.pos += int64(n)
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		return fail(ErrTruncated, 0, fmt.Sprintf("the input ends inside the segment (%d of %d bytes)", frameHeaderSize+n, frameHeaderSize+len(body)))
	case err != nil:
		o.err = err
		return err
	}
	o.object.nonce(&o.nonce, index)
	pt, err := o.object.aead.Open(body[:0], o.nonce[:], body, fh)
	if err != nil {
		if int64(index) != seg {
			return fail(ErrAuth, 0, fmt.Sprintf("neither segment %d nor the %d its frame header names: corrupted, or from another object", seg, index))
		}
		return fail(ErrAuth, 0, "corrupted, or from another object")
	}
	if int64(index) != seg {
		what := "a segment is missing here (dropped, or moved later)"
		if int64(index) < seg {
			what = "an earlier segment again (repeated, or moved)"
		}
		return fail(ErrOutOfOrder, int64(index), fmt.Sprintf("found segment %d: %s", index, what))
	}
	end := final
	if s := o.span; s != nil {
		switch {
		case final && seg != s.Last:
			return fail(ErrRange, 0, fmt.Sprintf("the object's final segment is %d, the range ends at %d", seg, s.Last))
		case seg == s.Last && final != s.Final:
			return fail(ErrRange, 0, fmt.Sprintf("segment %d is not the object's final segment", seg))
		}
		end = seg == s.Last
	}
	if end {
		// Nothing may follow: check before the last plaintext goes out,
		// so that io.EOF always means the exact object.
		var one [1]byte
		n, err := io.ReadFull(o.r, one[:])
		switch {
		case n > 0:
			return fail(ErrTrailingData, 0, "bytes follow the final segment")
		case err != io.EOF:
			o.err = err
			return err
		}
		o.done = true
	}
	o.next++
	if o.span != nil {
		d := min(o.skip, int64(len(pt)))
		pt = pt[d:]
		o.skip -= d
		pt = pt[:min(int64(len(pt)), o.left)]
		o.left -= int64(len(pt))
		if end && o.left != 0 {
			return fail(ErrRange, 0, fmt.Sprintf("the range is %d bytes short of its length", o.left))
		}
	}
	o.out = pt
	return nil
}

// readHeader reads a header off r field by field, never past its end.
func readHeader(r io.Reader) (Header, int, error) {
	b := make([]byte, 0, MaxHeaderSize)
	// The magic (so that a stream that is not sealed is refused as soon as
	// 4 bytes came, not when a longer read would have been filled: a peer
	// answering "ok\n" in clear must not hold the flow), the rest of the
	// fixed start, then the key id, version and context length, then the
	// context, salt and commitment: each step's size is known from the
	// step before. ParseHeader refuses what is wrong as early as it can be
	// seen.
	want := len(magic)
	for {
		n, err := io.ReadFull(r, b[len(b):want])
		b = b[:len(b)+n]
		h, size, perr := ParseHeader(b)
		if perr == nil {
			return h, size, nil
		}
		var e *Error
		if !errors.As(perr, &e) || e.Kind != ErrTruncated {
			return h, len(b), perr
		}
		if err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return h, len(b), perr
			}
			return h, len(b), err
		}
		switch want {
		case len(magic):
			want = 4 + 1 + 1 + 4 + 1
		case 4 + 1 + 1 + 4 + 1:
			want += int(b[10]) + 4 + 2
		default:
			ctx := int(b[want-2])<<8 | int(b[want-1])
			want += ctx + SaltSize + CommitmentSize
		}
	}
}

// Open opens a whole sealed object held in memory.
func Open(sealed []byte, keys KeyFunc, opts ...OpenOption) ([]byte, error) {
	o := NewOpener(bytes.NewReader(sealed), keys, opts...)
	var out bytes.Buffer
	out.Grow(len(sealed))
	if _, err := o.WriteTo(&out); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
