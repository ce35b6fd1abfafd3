package seal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"
	"time"
)

// tamperSeg is small so that objects have many segments and every byte
// of them can be flipped.
const tamperSeg = MinSegmentSize

// object is a sealed object cut into its parts.
type object struct {
	pt     []byte
	sealed []byte
	header []byte
	frames [][]byte
}

func newObject(t testing.TB, c SealConfig, pt []byte) object {
	t.Helper()
	sealed, err := Seal(pt, c)
	if err != nil {
		t.Fatal(err)
	}
	h, n, err := ParseHeader(sealed)
	if err != nil {
		t.Fatal(err)
	}
	o := object{pt: pt, sealed: sealed, header: sealed[:n]}
	full := h.SegmentSize + FrameOverhead
	for off := n; off < len(sealed); off += full {
		o.frames = append(o.frames, sealed[off:min(off+full, len(sealed))])
	}
	return o
}

// relabel replaces the key id in sealed's header with one of the same length.
func relabel(sealed []byte, id string) []byte {
	out := slices.Clone(sealed)
	if int(out[10]) != len(id) {
		panic("relabel: key id length differs")
	}
	copy(out[11:], id)
	return out
}

// otherSalt makes c draw salts no other test config draws.
func otherSalt(c SealConfig) SealConfig {
	c.Rand = &counterRand{n: 100}
	return c
}

func join(header []byte, frames ...[]byte) []byte {
	return slices.Concat(append([][]byte{header}, frames...)...)
}

// refusal is what a tampered object must produce.
type refusal struct {
	kind    error
	segment int64 // -1: the header
	found   int64 // ErrOutOfOrder only
	// released is how many plaintext bytes the opener may have returned
	// before the error: the segments before the one it refused.
	released int
}

// checkRefusal opens sealed and checks the opener refused it as want,
// after releasing exactly the verified segments before the refusal.
func checkRefusal(t *testing.T, sealed, pt []byte, keys KeyFunc, want refusal, opts ...OpenOption) *Error {
	t.Helper()
	out, err := openAll(sealed, keys, opts...)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("opened without a seal error: %v (released %d bytes)", err, len(out))
	}
	if !errors.Is(err, want.kind) {
		t.Fatalf("error %v, want %v", err, want.kind)
	}
	if e.Segment != want.segment || (want.kind == ErrOutOfOrder && e.Found != want.found) {
		t.Fatalf("error %v: at segment %d (found %d), want segment %d (found %d)", err, e.Segment, e.Found, want.segment, want.found)
	}
	if len(out) != want.released || !bytes.Equal(out, pt[:len(out)]) {
		t.Fatalf("released %d bytes before the error (a verified prefix: %v), want the %d bytes of the segments before it",
			len(out), bytes.Equal(out, pt[:min(len(out), len(pt))]), want.released)
	}
	// The one-shot Open releases nothing at all.
	if got, err := Open(sealed, keys, opts...); err == nil || got != nil {
		t.Fatalf("Open: %d bytes, %v", len(got), err)
	}
	return e
}

// TestTamper: each way of changing a sealed object is refused with its own
// error, at the place it happened, and the opener has released nothing but
// the verified segments before that place.
func TestTamper(t *testing.T) {
	const S = tamperSeg
	a := newObject(t, testConfig(S), pattern(4*S+20))            // 5 segments, the last short
	b := newObject(t, otherSalt(testConfig(S)), pattern(4*S+20)) // same key, context and plaintext; another salt
	f := a.frames
	other := testConfig(S)
	other.Context = "rule=blob-store dir=in"
	reflected := newObject(t, other, pattern(4*S+20))

	otherKey := func(id string, v int) ([]byte, error) { return testKey("another", v), nil }
	otherVersion := func(id string, v int) ([]byte, error) { return testKey(id, v+1), nil }
	// A header naming a key id the source holds, on segments sealed under another.
	renamed := newObject(t, func() SealConfig { c := testConfig(S); c.KeyID = "egress-dek-2"; return c }(), a.pt)
	relabelled := join(renamed.header, f...) // the commitment is renamed's, made with its own key
	anyID := func(id string, v int) ([]byte, error) { return testKey(id, v), nil }
	holdsBoth := func(id string, v int) ([]byte, error) { return testKey(testKeyID, v), nil }

	cases := []struct {
		name   string
		sealed []byte
		keys   KeyFunc
		opts   []OpenOption
		want   refusal
	}{
		{"dropped segment", join(a.header, f[0], f[2], f[3], f[4]), nil, nil,
			refusal{kind: ErrOutOfOrder, segment: 1, found: 2, released: S}},
		{"reordered segments", join(a.header, f[0], f[1], f[3], f[2], f[4]), nil, nil,
			refusal{kind: ErrOutOfOrder, segment: 2, found: 3, released: 2 * S}},
		{"repeated segment", join(a.header, f[0], f[1], f[1], f[2], f[3], f[4]), nil, nil,
			refusal{kind: ErrOutOfOrder, segment: 2, found: 1, released: 2 * S}},
		{"final segment moved up", join(a.header, f[0], f[4]), nil, nil,
			refusal{kind: ErrOutOfOrder, segment: 1, found: 4, released: S}},
		{"truncated at a segment boundary", join(a.header, f[0], f[1], f[2]), nil, nil,
			refusal{kind: ErrTruncated, segment: 3, released: 3 * S}},
		{"truncated after the header", a.header, nil, nil,
			refusal{kind: ErrTruncated, segment: 0}},
		{"truncated inside a segment", join(a.header, f[0], f[1], f[2][:40]), nil, nil,
			refusal{kind: ErrTruncated, segment: 2, released: 2 * S}},
		{"truncated inside a frame header", join(a.header, f[0], f[1][:5]), nil, nil,
			refusal{kind: ErrTruncated, segment: 1, released: S}},
		{"truncated inside the final segment", a.sealed[:len(a.sealed)-1], nil, nil,
			refusal{kind: ErrTruncated, segment: 4, released: 4 * S}},
		{"truncated inside the header", a.header[:50], nil, nil,
			refusal{kind: ErrTruncated, segment: -1}},
		{"empty input", nil, nil, nil,
			refusal{kind: ErrTruncated, segment: -1}},
		{"one byte appended", append(slices.Clip(a.sealed), 0), nil, nil,
			refusal{kind: ErrTrailingData, segment: 4, released: 4 * S}},
		{"segment appended", join(a.header, f[0], f[1], f[2], f[3], f[4], f[4]), nil, nil,
			refusal{kind: ErrTrailingData, segment: 4, released: 4 * S}},
		{"another object appended", slices.Concat(a.sealed, b.sealed), nil, nil,
			refusal{kind: ErrTrailingData, segment: 4, released: 4 * S}},
		{"spliced: another object's segments under this header", join(a.header, b.frames...), nil, nil,
			refusal{kind: ErrAuth, segment: 0}},
		{"spliced: another object's tail", join(a.header, f[0], f[1], b.frames[2], b.frames[3], b.frames[4]), nil, nil,
			refusal{kind: ErrAuth, segment: 2, released: 2 * S}},
		{"spliced: this object's segments under another's header", join(b.header, f...), nil, nil,
			refusal{kind: ErrAuth, segment: 0}},
		{"wrong key", a.sealed, otherKey, nil,
			refusal{kind: ErrCommitment, segment: -1}},
		{"wrong key version", a.sealed, otherVersion, nil,
			refusal{kind: ErrCommitment, segment: -1}},
		{"key id not held", renamed.sealed, nil, nil,
			refusal{kind: ErrKey, segment: -1}},
		{"key id relabelled in the header", relabel(a.sealed, "egress-dex"), anyID, nil,
			refusal{kind: ErrCommitment, segment: -1}},
		{"spliced under a header naming another key id", relabelled, holdsBoth, nil,
			refusal{kind: ErrAuth, segment: 0}},
		{"reflected: the other direction's object", reflected.sealed, nil, []OpenOption{WithContext(testContext)},
			refusal{kind: ErrRefused, segment: -1}},
		{"segments larger than this opener holds", a.sealed, nil, []OpenOption{WithMaxSegmentSize(S - 1)},
			refusal{kind: ErrHeader, segment: -1}},
		{"not sealed", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), nil, nil,
			refusal{kind: ErrNotSealed, segment: -1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			keys := tc.keys
			if keys == nil {
				keys = testKeys
			}
			checkRefusal(t, tc.sealed, a.pt, keys, tc.want, tc.opts...)
		})
	}

	// A sealer that ended a non-interactive object with an empty final
	// segment after full ones made a second encoding of the plaintext:
	// refused, so that sizes and ranges stay exact.
	h, hlen, _ := ParseHeader(a.sealed)
	k, err := derive(testKey(testKeyID, testVersion), &h)
	if err != nil {
		t.Fatal(err)
	}
	var nonce [12]byte
	noncanon := k.sealFrame(slices.Clone(a.sealed[:hlen]), 0, false, a.pt[:S], &nonce)
	noncanon = k.sealFrame(noncanon, 1, true, nil, &nonce)
	checkRefusal(t, noncanon, a.pt, testKeys, refusal{kind: ErrAuth, segment: 1, released: S})

	// The key source's own error is kept for the caller.
	_, err = Open(renamed.sealed, testKeys)
	if !errors.Is(err, errNoKey) {
		t.Errorf("ErrKey does not wrap the key source's error: %v", err)
	}
	// An accept hook's error is kept too.
	veto := errors.New("not this rule's key")
	if _, err := Open(a.sealed, testKeys, WithAccept(func(Header) error { return veto })); !errors.Is(err, ErrRefused) || !errors.Is(err, veto) {
		t.Errorf("WithAccept refusal: %v", err)
	}
	// A future version is refused as such.
	v2 := slices.Clone(a.sealed)
	v2[4] = Version + 1
	checkRefusal(t, v2, a.pt, testKeys, refusal{kind: ErrVersion, segment: -1})
}

// TestBitFlips flips every bit of a sealed object, one at a time: each
// flip is refused, with the error its place calls for, and nothing but the
// segments before the flipped one is released.
func TestBitFlips(t *testing.T) {
	const S = tamperSeg
	a := newObject(t, testConfig(S), pattern(2*S+20)) // 3 segments
	h, hlen, _ := ParseHeader(a.sealed)
	idEnd := 11 + len(h.KeyID)
	ctxStart := idEnd + 4 + 2
	saltStart := ctxStart + len(h.Context)
	// Header fields and the errors a flip there may cause.
	commitOrHeader := []error{ErrCommitment, ErrHeader}
	region := func(off int) []error {
		switch {
		case off < 4:
			return []error{ErrNotSealed}
		case off == 4:
			return []error{ErrVersion}
		case off == 5: // flags: the interactive bit is bound, the others unknown
			return commitOrHeader
		case off < 10: // segment size
			return []error{ErrCommitment, ErrHeader, ErrTruncated}
		case off == 10: // key id length: the header parses differently
			return []error{ErrHeader, ErrKey, ErrCommitment, ErrTruncated}
		case off < idEnd: // key id: the source holds no other id
			return []error{ErrKey, ErrHeader}
		case off < idEnd+4: // key version: another version's key
			return []error{ErrCommitment}
		case off < ctxStart: // context length
			return []error{ErrHeader, ErrCommitment, ErrTruncated}
		case off < saltStart: // context
			return commitOrHeader
		case off < hlen: // salt, commitment
			return []error{ErrCommitment}
		}
		return nil
	}
	for off := range a.sealed {
		for bit := range 8 {
			t.Run(fmt.Sprintf("byte %d bit %d", off, bit), func(t *testing.T) {
				bad := slices.Clone(a.sealed)
				bad[off] ^= 1 << bit
				out, err := openAll(bad, testKeys)
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("opened without a seal error: %v", err)
				}
				if kinds := region(off); kinds != nil {
					if !slices.ContainsFunc(kinds, func(k error) bool { return errors.Is(err, k) }) || e.Segment != -1 || len(out) != 0 {
						t.Fatalf("header flip: %v (released %d bytes), want one of %v in the header", err, len(out), kinds)
					}
					return
				}
				seg := (off - hlen) / (S + FrameOverhead)
				inFrame := (off - hlen) % (S + FrameOverhead)
				want := []error{ErrAuth}
				if inFrame >= 4 && inFrame < frameHeaderSize && seg == len(a.frames)-1 {
					// The final segment's length grew: the input ends before it.
					want = append(want, ErrTruncated)
				}
				if !slices.ContainsFunc(want, func(k error) bool { return errors.Is(err, k) }) || e.Segment != int64(seg) {
					t.Fatalf("flip in segment %d at %d: %v, want %v at segment %d", seg, inFrame, err, want, seg)
				}
				if len(out) != seg*S || !bytes.Equal(out, a.pt[:len(out)]) {
					t.Fatalf("flip in segment %d: released %d bytes, want the %d verified before it", seg, len(out), seg*S)
				}
			})
		}
	}
}

// TestTamperDistinct: the tampering cases that the opener can tell apart
// produce distinct errors (kind, and where it was found). Dropping a
// segment and moving a later one up look the same at the point they are
// found: both are "segment i missing, segment j here".
func TestTamperDistinct(t *testing.T) {
	const S = tamperSeg
	a := newObject(t, testConfig(S), pattern(4*S+20))
	b := newObject(t, otherSalt(testConfig(S)), pattern(4*S+20))
	f := a.frames
	flipped := slices.Clone(a.sealed)
	flipped[len(a.header)+2*(S+FrameOverhead)+20] ^= 1
	cases := map[string][]byte{
		"flip":             flipped,
		"drop":             join(a.header, f[0], f[2], f[3], f[4]),
		"repeat":           join(a.header, f[0], f[1], f[1], f[2], f[3], f[4]),
		"truncate-at-seg":  join(a.header, f[0], f[1]),
		"truncate-mid-seg": join(a.header, f[0], f[1], f[2][:30]),
		"append":           append(slices.Clip(a.sealed), 1),
		"splice":           join(a.header, f[0], b.frames[1], b.frames[2], b.frames[3], b.frames[4]),
	}
	seen := map[string]string{}
	for name, sealed := range cases {
		_, err := Open(sealed, testKeys)
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("%s: %v", name, err)
		}
		// Detail words distinguish a cut at a boundary from one inside a segment.
		key := fmt.Sprintf("%v@%d/%d/%s", e.Kind, e.Segment, e.Found, e.Detail)
		if prev, dup := seen[key]; dup {
			t.Errorf("%s and %s give the same error: %v", name, prev, err)
		}
		seen[key] = name
		t.Logf("%-17s %v", name, err)
	}
}

// A stream that is not sealed is refused as soon as its first 4 bytes are
// in, even when the peer then waits: a short answer in clear must not hold
// the flow until the peer closes.
func TestShortClearAnswerRefusedAtOnce(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() { _, _ = pw.Write([]byte("ok\n!")) }() // then nothing, and no close
	done := make(chan error, 1)
	go func() {
		_, err := NewOpener(pr, func(string, int) ([]byte, error) { return nil, errors.New("no key wanted") }).Read(make([]byte, 16))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNotSealed) {
			t.Fatalf("got %v, want ErrNotSealed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the opener waited for more than the magic")
	}
}
