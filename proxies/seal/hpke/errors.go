package hpke

import (
	"errors"
	"fmt"
)

// What an opener refuses, one sentinel per cause a caller may branch on or
// count. Opener errors are *Error values that match these with errors.Is.
// They are this package's own, not proxies/seal's: the words differ (a
// recipient's key pair, chunks), the ways of failing are the same.
var (
	// ErrNotSealed: the input does not start with the format's magic.
	ErrNotSealed = errors.New("not an HPKE-sealed body")
	// ErrVersion: a format version this package does not read.
	ErrVersion = errors.New("unsupported format version")
	// ErrSuite: the prefix names a KEM, KDF or AEAD this format does not
	// use, or a KEM other than the private key's.
	ErrSuite = errors.New("unsupported or mismatched HPKE suite")
	// ErrPrefix: a prefix field is out of range (the chunk size), or the
	// chunks are larger than the opener allows.
	ErrPrefix = errors.New("malformed prefix")
	// ErrWrongKey: the body was sealed to another public key (its key id
	// is not the private key's).
	ErrWrongKey = errors.New("sealed to another key")
	// ErrContext: the body was sealed under another context than the
	// opener expects.
	ErrContext = errors.New("sealed under another context")
	// ErrCommitment: the prefix does not verify under the private key: the
	// encapsulated key, the commitment or another prefix field changed
	// (or a forged key id). Checked before any chunk is opened.
	ErrCommitment = errors.New("prefix does not verify under this key")
	// ErrAuth: a chunk does not authenticate at its position: a bit
	// changed in it, or it comes from another body.
	ErrAuth = errors.New("chunk failed authentication")
	// ErrOutOfOrder: an authentic chunk of this body at the wrong
	// position: a chunk was dropped, moved or repeated.
	ErrOutOfOrder = errors.New("chunk out of order")
	// ErrTruncated: the input ends before the final chunk (in the prefix,
	// at a chunk boundary or inside a chunk).
	ErrTruncated = errors.New("sealed body truncated")
	// ErrTrailingData: bytes follow the final chunk.
	ErrTrailingData = errors.New("data after the final chunk")

	// ErrTooLarge: the sealer reached MaxChunks.
	ErrTooLarge = errors.New("body exceeds the format's chunk limit")
	// ErrClosed: a write after Close.
	ErrClosed = errors.New("sealer closed")
)

// Error is an opener's refusal: its cause (one of the sentinels above) and
// where in the sealed body it was found.
type Error struct {
	// Kind is the sentinel (ErrAuth, ErrTruncated, ...).
	Kind error
	// Chunk is the position (0-based) of the chunk the opener was reading,
	// -1 for the prefix.
	Chunk int64
	// Found is, for ErrOutOfOrder, the index the chunk at Chunk
	// authenticated as.
	Found int64
	// Offset is the byte offset in the sealed body where the chunk (or the
	// prefix) starts.
	Offset int64
	// Detail says more, in words.
	Detail string
	// Err is the underlying cause, when there is one.
	Err error
}

func (e *Error) Error() string {
	var s string
	if e.Chunk < 0 {
		s = "hpke: prefix: " + e.Kind.Error()
	} else {
		s = fmt.Sprintf("hpke: chunk %d (byte %d): %v", e.Chunk, e.Offset, e.Kind)
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap gives errors.Is and errors.As the sentinel and the cause.
func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

func prefixError(kind error, detail string) *Error {
	return &Error{Kind: kind, Chunk: -1, Detail: detail}
}
