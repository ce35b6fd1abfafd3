package seal

import (
	"errors"
	"fmt"
)

// What an opener refuses, one sentinel per cause a caller may branch on or
// count. Opener errors are *Error values that match these with errors.Is.
var (
	// ErrNotSealed: the input does not start with the format's magic.
	ErrNotSealed = errors.New("not a sealed object")
	// ErrVersion: a format version this package does not read.
	ErrVersion = errors.New("unsupported format version")
	// ErrHeader: the header is not well formed (a field out of range,
	// unknown flags), or declares segments larger than the opener allows.
	ErrHeader = errors.New("malformed header")
	// ErrKey: the key source has no usable key for the header's key id and
	// version (it wraps the source's error).
	ErrKey = errors.New("no data key for the object")
	// ErrRefused: the opener's WithContext or WithAccept refused the header.
	ErrRefused = errors.New("header refused")
	// ErrCommitment: the data key does not match the header's commitment:
	// a wrong key (or key version), or a header that was altered. Checked
	// before any segment is opened.
	ErrCommitment = errors.New("data key does not match the object's commitment")
	// ErrAuth: a segment does not authenticate as this object's segment at
	// its position: a bit changed in it, or it comes from another object.
	ErrAuth = errors.New("segment failed authentication")
	// ErrOutOfOrder: an authentic segment of this object at the wrong
	// position: a segment was dropped, moved or repeated.
	ErrOutOfOrder = errors.New("segment out of order")
	// ErrTruncated: the input ends before the final segment (at a segment
	// boundary, inside a segment or inside the header).
	ErrTruncated = errors.New("sealed stream truncated")
	// ErrTrailingData: bytes follow the final segment.
	ErrTrailingData = errors.New("data after the final segment")
	// ErrRange: a range opener's span does not fit the object.
	ErrRange = errors.New("range does not fit the object")

	// ErrTooLarge: the sealer reached MaxSegments.
	ErrTooLarge = errors.New("object exceeds the format's segment limit")
	// ErrClosed: a write or flush after Close.
	ErrClosed = errors.New("sealer closed")
	// ErrNotInteractive: Flush on a sealer that was not made Interactive.
	ErrNotInteractive = errors.New("flush needs an interactive sealer")
)

// Error is an opener's refusal: its cause (one of the sentinels above) and
// where in the sealed stream it was found.
type Error struct {
	// Kind is the sentinel (ErrAuth, ErrTruncated, ...).
	Kind error
	// Segment is the position (0-based) of the segment the opener was
	// reading, -1 for the header.
	Segment int64
	// Found is, for ErrOutOfOrder, the index the segment at Segment
	// authenticated as.
	Found int64
	// Offset is the byte offset in the sealed stream where the segment
	// (or the header) starts.
	Offset int64
	// Detail says more, in words.
	Detail string
	// Err is the underlying cause, when there is one (the key source's
	// error for ErrKey).
	Err error
}

func (e *Error) Error() string {
	var s string
	if e.Segment < 0 {
		s = "seal: header: " + e.Kind.Error()
	} else {
		s = fmt.Sprintf("seal: segment %d (byte %d): %v", e.Segment, e.Offset, e.Kind)
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

func headerError(kind error, detail string) *Error {
	return &Error{Kind: kind, Segment: -1, Detail: detail}
}
