package seal

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"testing"
)

// TestLayoutSizes: SealedSize is what sealing writes, and PlaintextSize
// inverts it and refuses sizes no object has.
func TestLayoutSizes(t *testing.T) {
	const S = 64
	l, err := testConfig(S).Layout()
	if err != nil {
		t.Fatal(err)
	}
	valid := map[int64]int64{}
	for n := range int64(10*S + 3) {
		sealed, err := Seal(pattern(int(n)), testConfig(S))
		if err != nil {
			t.Fatal(err)
		}
		if got := l.SealedSize(n); got != int64(len(sealed)) {
			t.Fatalf("SealedSize(%d) = %d, sealing wrote %d", n, got, len(sealed))
		}
		valid[int64(len(sealed))] = n
	}
	for size := int64(0); size < l.SealedSize(10*S+3); size++ {
		n, err := l.PlaintextSize(size)
		want, ok := valid[size]
		switch {
		case ok && (err != nil || n != want):
			t.Fatalf("PlaintextSize(%d) = %d, %v; want %d", size, n, err, want)
		case !ok && !errors.Is(err, ErrRange):
			t.Fatalf("PlaintextSize(%d) = %d, %v; no object has that size", size, n, err)
		}
	}
}

// TestRange: every plaintext range of an object opens from the header and
// the sealed bytes its span names, to exactly those plaintext bytes.
func TestRange(t *testing.T) {
	const S = 64
	for _, total := range []int{1, S - 1, S, S + 1, 3*S + 17} {
		pt := pattern(total)
		sealed, err := Seal(pt, testConfig(S))
		if err != nil {
			t.Fatal(err)
		}
		h, hlen, _ := ParseHeader(sealed)
		l := h.Layout()
		for off := range total {
			for length := 1; off+length <= total; length++ {
				span, err := l.Range(int64(off), int64(length), int64(total))
				if err != nil {
					t.Fatal(err)
				}
				got, err := Open(slices.Concat(sealed[:hlen], sealed[span.Start:span.End]), testKeys, WithRange(span))
				if err != nil || !bytes.Equal(got, pt[off:off+length]) {
					t.Fatalf("total %d, bytes %d+%d (span %+v): %d bytes, %v", total, off, length, span, len(got), err)
				}
			}
		}
	}
}

// TestRangeRefusals: a span that does not fit the object, bytes that are
// not the span's, and interactive objects are refused.
func TestRangeRefusals(t *testing.T) {
	const S = 64
	pt := pattern(4*S + 10)
	sealed, _ := Seal(pt, testConfig(S))
	h, hlen, _ := ParseHeader(sealed)
	l := h.Layout()
	hdr := sealed[:hlen]
	span, _ := l.Range(S+5, S, int64(len(pt))) // segments 1-2
	last, _ := l.Range(3*S, S+10, int64(len(pt)))

	for _, tc := range []struct {
		name  string
		input []byte
		span  Span
		want  error
	}{
		{"bytes of other segments", slices.Concat(hdr, sealed[span.Start+S+FrameOverhead:span.End+S+FrameOverhead]), span, ErrOutOfOrder},
		{"bytes cut short", slices.Concat(hdr, sealed[span.Start:span.End-1]), span, ErrTruncated},
		{"bytes past the span", slices.Concat(hdr, sealed[span.Start:]), span, ErrTrailingData},
		{"span says final, object goes on", slices.Concat(hdr, sealed[span.Start:span.End]), func() Span { s := span; s.Final = true; return s }(), ErrRange},
		{"span past the object's end", slices.Concat(hdr, sealed[last.Start:last.End]), func() Span { s := last; s.Last++; s.Final = false; return s }(), ErrRange},
		{"span for another layout", slices.Concat(hdr, sealed[span.Start:span.End]), func() Span { s := span; s.Layout.SegmentSize *= 2; return s }(), ErrRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := openAll(tc.input, testKeys, WithRange(tc.span))
			if !errors.Is(err, tc.want) {
				t.Fatalf("%v, want %v", err, tc.want)
			}
			if !bytes.HasPrefix(pt[tc.span.First*S+tc.span.Skip:], out) {
				t.Fatalf("released %d bytes that are not the range's", len(out))
			}
		})
	}

	if _, err := l.Range(0, 0, 10); !errors.Is(err, ErrRange) {
		t.Errorf("empty range: %v", err)
	}
	if _, err := l.Range(5, 10, 10); !errors.Is(err, ErrRange) {
		t.Errorf("range past the end: %v", err)
	}
	ic := testConfig(S)
	ic.Interactive = true
	il, _ := ic.Layout()
	if _, err := il.Range(0, 1, 10); !errors.Is(err, ErrRange) {
		t.Errorf("interactive layout mapped a range: %v", err)
	}
	isealed, _ := Seal(pt, ic)
	ih, ihlen, _ := ParseHeader(isealed)
	fixed := ih.Layout()
	fixed.Interactive = false
	ispan, _ := fixed.Range(0, 10, int64(len(pt)))
	if _, err := Open(slices.Concat(isealed[:ihlen], isealed[ispan.Start:ispan.End]), testKeys, WithRange(ispan)); !errors.Is(err, ErrRange) {
		t.Errorf("range of an interactive object: %v", err)
	}
}

func ExampleLayout_Range() {
	c := SealConfig{Key: make([]byte, 32), KeyID: "egress-dek", KeyVersion: 1, Context: "rule=blob-store dir=out"}
	l, _ := c.Layout()
	total := int64(1 << 20)
	fmt.Println("Content-Length:", l.SealedSize(total))
	span, _ := l.Range(100000, 50000, total) // Range: bytes=100000-149999 of the plaintext
	fmt.Printf("segments %d-%d: fetch bytes=%d-%d after the %d-byte header, skip %d\n",
		span.First, span.Last, span.Start, span.End-1, l.HeaderSize, span.Skip)
	// Output:
	// Content-Length: 1049074
	// segments 1-2: fetch bytes=65674-196793 after the 114-byte header, skip 34464
}
