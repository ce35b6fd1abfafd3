package hpke

import (
	"bytes"
	stdhpke "crypto/hpke"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
)

// An Opener reads a sealed body and yields its plaintext. It checks the
// prefix (suite, key id, context) and the key commitment before opening
// any chunk, returns a chunk's plaintext only after the chunk
// authenticated at its position, and the final chunk's plaintext only
// once the input ended right after it. So whatever Read returned before an
// error is a verified prefix of what was sealed, and io.EOF means the
// whole body, exactly. Errors are sticky and are *Error values matching
// the package's sentinels (I/O errors of the underlying reader are
// returned as they are).
//
// A caller streaming plaintext onward must treat an error as "the data
// ended badly" (discard the output, reset the connection): the verified
// prefix is not the body. An Opener holds one chunk in memory and is not
// safe for concurrent use.
type Opener struct {
	r    io.Reader
	priv *PrivateKey
	// wantContext is the digest of the context the caller expects; nil
	// opens any.
	wantContext *[ContextDigestSize]byte

	started bool
	prefix  Prefix
	keys    *bodyKeys
	nonce   [nonceSize]byte
	fh      [frameHeaderSize]byte
	buf     []byte // one chunk's ciphertext and tag
	out     []byte // verified plaintext not yet returned
	next    int64  // position (expected index) of the next chunk
	pos     int64  // offset in the sealed body of what comes next
	done    bool
	err     error
}

// NewOpener returns a reader of the plaintext of the body r holds, sealed
// to priv's public key under context (another context is ErrContext). The
// Reader is an *Opener.
func NewOpener(r io.Reader, priv *PrivateKey, context string) io.Reader {
	d := ContextDigest(context)
	return newOpener(r, priv, &d)
}

// NewOpenerAnyContext opens a body whatever context it was sealed under:
// the context's digest is in the prefix and bound into the HPKE context,
// so a stored body opens with the private key alone (the key holder's
// offline tool). Prefix().ContextDigest says which context it was; compare
// it with ContextDigest of the one you expect.
func NewOpenerAnyContext(r io.Reader, priv *PrivateKey) *Opener {
	return newOpener(r, priv, nil)
}

func newOpener(r io.Reader, priv *PrivateKey, want *[ContextDigestSize]byte) *Opener {
	o := &Opener{r: r, priv: priv, wantContext: want}
	if priv == nil {
		o.err = errNilKey
	}
	return o
}

// Prefix reads and verifies the prefix (if no Read did yet) and returns
// it: the key commitment has been checked when it returns no error.
func (o *Opener) Prefix() (Prefix, error) {
	if !o.started {
		o.start()
	}
	if o.err != nil && o.keys == nil {
		return o.prefix, o.err
	}
	return o.prefix, nil
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

// WriteTo writes the verified plaintext to w, chunk by chunk, from the
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

// start reads the prefix, checks it against the private key and the
// expected context, decapsulates and checks the commitment.
func (o *Opener) start() {
	o.started = true
	if o.err != nil {
		return
	}
	p, n, err := readPrefix(o.r)
	o.pos = int64(n)
	o.prefix = p
	if err != nil {
		o.err = err
		return
	}
	k := o.priv
	switch {
	case p.Suite != k.suite:
		o.err = prefixError(ErrSuite, fmt.Sprintf("sealed to a %s key, this private key is %s", p.Suite, k.suite))
		return
	case p.KeyID != k.pub.id:
		o.err = prefixError(ErrWrongKey, fmt.Sprintf("sealed to key %s, this private key is %s", p.KeyID, k.pub.id))
		return
	case o.wantContext != nil && p.ContextDigest != *o.wantContext:
		o.err = prefixError(ErrContext, fmt.Sprintf("context digest %s…, want %s…",
			hex.EncodeToString(p.ContextDigest[:6]), hex.EncodeToString(o.wantContext[:6])))
		return
	}
	kdf, aead := hpkeSuite()
	rcpt, err := stdhpke.NewRecipient(p.Enc, k.key, kdf, aead, p.info())
	if err != nil {
		o.err = &Error{Kind: ErrCommitment, Chunk: -1, Detail: "the encapsulated key does not decapsulate", Err: err}
		return
	}
	keys, err := derive(rcpt)
	if err != nil {
		o.err = &Error{Kind: ErrCommitment, Chunk: -1, Err: err}
		return
	}
	if !keys.commits(&p) {
		o.err = prefixError(ErrCommitment, "the commitment does not match: the prefix changed, or it was sealed to another key")
		return
	}
	o.keys = keys
}

// advance reads, verifies and releases the next chunk into o.out; io.EOF
// once the body ended well.
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
	chunk, off := o.next, o.pos
	fail := func(kind error, found int64, detail string) error {
		o.out = nil
		o.err = &Error{Kind: kind, Chunk: chunk, Found: found, Offset: off, Detail: detail}
		return o.err
	}
	fh := o.fh[:]
	n, err := io.ReadFull(o.r, fh)
	o.pos += int64(n)
	switch {
	case err == io.EOF:
		return fail(ErrTruncated, 0, "the input ends at a chunk boundary, before the final chunk")
	case err == io.ErrUnexpectedEOF:
		return fail(ErrTruncated, 0, fmt.Sprintf("the input ends inside the frame header (%d of %d bytes)", n, frameHeaderSize))
	case err != nil:
		o.err = err
		return err
	}
	index, final, size := frameHeader(fh)
	switch {
	case size > o.prefix.ChunkSize:
		return fail(ErrAuth, 0, fmt.Sprintf("the frame header says %d bytes, more than a chunk", size))
	case !final && size != o.prefix.ChunkSize:
		return fail(ErrAuth, 0, fmt.Sprintf("the frame header says a non-final chunk of %d bytes", size))
	case final && size == 0 && index != 0:
		// Only the empty body ends with an empty chunk: one encoding per
		// plaintext keeps SealedSize exact.
		return fail(ErrAuth, 0, "the frame header says an empty final chunk after others")
	}
	if cap(o.buf) < size+tagSize {
		// A whole chunk's room, unless this is a short final chunk (a
		// small body needs no more).
		room := o.prefix.ChunkSize
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
		return fail(ErrTruncated, 0, fmt.Sprintf("the input ends inside the chunk (%d of %d bytes)", frameHeaderSize+n, frameHeaderSize+len(body)))
	case err != nil:
		o.err = err
		return err
	}
	o.keys.nonce(&o.nonce, index)
	pt, err := o.keys.aead.Open(body[:0], o.nonce[:], body, fh)
	if err != nil {
		if int64(index) != chunk {
			return fail(ErrAuth, 0, fmt.Sprintf("neither chunk %d nor the %d its frame header names: corrupted, or from another body", chunk, index))
		}
		return fail(ErrAuth, 0, "corrupted, or from another body")
	}
	if int64(index) != chunk {
		what := "a chunk is missing here (dropped, or moved later)"
		if int64(index) < chunk {
			what = "an earlier chunk again (repeated, or moved)"
		}
		return fail(ErrOutOfOrder, int64(index), fmt.Sprintf("found chunk %d: %s", index, what))
	}
	if final {
		// Nothing may follow: check before the last plaintext goes out,
		// so that io.EOF always means the exact body.
		var one [1]byte
		n, err := io.ReadFull(o.r, one[:])
		switch {
		case n > 0:
			return fail(ErrTrailingData, 0, "bytes follow the final chunk")
		case err != io.EOF:
			o.err = err
			return err
		}
		o.done = true
	}
	o.next++
	o.out = pt
	return nil
}

// readPrefix reads a prefix off r field by field, never past its end: the
// magic first, so that a body that is not sealed is refused as soon as 4
// bytes came; then the version; then the bound prefix, which names the
// suite and so the encapsulated key's size; then the rest.
func readPrefix(r io.Reader) (Prefix, int, error) {
	b := make([]byte, 0, PrefixSize(SuiteXWing))
	want := len(magic)
	for {
		b = slices.Grow(b, want-len(b))
		n, err := io.ReadFull(r, b[len(b):want])
		b = b[:len(b)+n]
		p, size, perr := ParsePrefix(b)
		if perr == nil {
			return p, size, nil
		}
		var e *Error
		if !errors.As(perr, &e) || e.Kind != ErrTruncated {
			return p, len(b), perr
		}
		if err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return p, len(b), perr
			}
			return p, len(b), err
		}
		switch want {
		case len(magic):
			want = len(magic) + 1
		case len(magic) + 1:
			want = boundPrefixSize
		default:
			want = PrefixSize(p.Suite)
		}
	}
}

// Open opens a whole sealed body held in memory, sealed to priv's public
// key under context. It returns nothing unless the whole body verified.
func Open(sealed []byte, priv *PrivateKey, context string) ([]byte, error) {
	o := NewOpener(bytes.NewReader(sealed), priv, context).(*Opener)
	var out bytes.Buffer
	out.Grow(len(sealed))
	if _, err := o.WriteTo(&out); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
