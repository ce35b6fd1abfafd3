package seal

import "fmt"

// Layout maps plaintext sizes and offsets to sealed ones for objects of
// one header size and segment size (a SealConfig's, or a parsed Header's).
// The mapping holds for objects sealed without Flush, which is every
// object a non-interactive sealer or Seal makes.
type Layout struct {
	HeaderSize  int64
	SegmentSize int64
	// Interactive objects may have short segments anywhere: Range refuses
	// them, and SealedSize is only what a sealer that never flushed writes.
	Interactive bool
}

// Segments is the number of segments an object of n plaintext bytes has
// (an empty object has one, empty and final).
func (l Layout) Segments(n int64) int64 {
	if n <= 0 {
		return 1
	}
	return (n + l.SegmentSize - 1) / l.SegmentSize
}

// SealedSize is the sealed size of n plaintext bytes: the header, and each
// segment's plaintext plus FrameOverhead. Use it for Content-Length.
func (l Layout) SealedSize(n int64) int64 {
	return l.HeaderSize + l.Segments(n)*FrameOverhead + n
}

// PlaintextSize is the inverse of SealedSize: the plaintext size of a
// sealed object of the given size, or ErrRange when no object of this
// layout has that size.
func (l Layout) PlaintextSize(sealed int64) (int64, error) {
	body := sealed - l.HeaderSize
	full := l.SegmentSize + FrameOverhead
	if body < FrameOverhead {
		return 0, fmt.Errorf("%w: %d bytes is less than a header and a segment", ErrRange, sealed)
	}
	if body == FrameOverhead {
		return 0, nil
	}
	q, r := body/full, body%full
	switch {
	case r == 0:
		return q * l.SegmentSize, nil
	case r > FrameOverhead:
		return q*l.SegmentSize + r - FrameOverhead, nil
	}
	return 0, fmt.Errorf("%w: no object of this layout is %d bytes", ErrRange, sealed)
}

// Span is where a plaintext byte range lies in a sealed object: the
// segments that hold it and their bytes in the sealed object. To open it,
// give an Opener made WithRange(span) the object's header followed by
// sealed bytes [Start, End).
type Span struct {
	// First and Last are the indexes of the first and last segment that
	// hold the range; Final says whether Last is the object's final one.
	First, Last int64
	Final       bool
	// Start and End (exclusive) are the sealed-object offsets of the
	// frames of segments First to Last.
	Start, End int64
	// Skip is how many plaintext bytes of segment First precede the range;
	// Length is the range's size.
	Skip, Length int64
	// Layout is the layout the span was computed for.
	Layout Layout
}

// Range maps plaintext bytes [off, off+length) of an object holding total
// plaintext bytes to its segments. Interactive objects, empty ranges and
// ranges past the end are ErrRange.
func (l Layout) Range(off, length, total int64) (Span, error) {
	switch {
	case l.Interactive:
		return Span{}, fmt.Errorf("%w: an interactive object's segments do not map to offsets", ErrRange)
	case off < 0 || length <= 0 || total < 0 || off > total-length:
		return Span{}, fmt.Errorf("%w: bytes %d+%d of a %d-byte object", ErrRange, off, length, total)
	case l.Segments(total) > MaxSegments:
		return Span{}, fmt.Errorf("%w: a %d-byte object exceeds the segment limit", ErrRange, total)
	}
	segs := l.Segments(total)
	first := off / l.SegmentSize
	last := (off + length - 1) / l.SegmentSize
	full := l.SegmentSize + FrameOverhead
	lastLen := l.SegmentSize
	if last == segs-1 {
		lastLen = total - last*l.SegmentSize
	}
	return Span{
		First:  first,
		Last:   last,
		Final:  last == segs-1,
		Start:  l.HeaderSize + first*full,
		End:    l.HeaderSize + last*full + FrameOverhead + lastLen,
		Skip:   off - first*l.SegmentSize,
		Length: length,
		Layout: l,
	}, nil
}
