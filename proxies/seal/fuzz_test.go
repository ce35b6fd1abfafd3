package seal

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

// fuzzObjects are the objects the fuzz targets' corpus starts from, keyed
// by salt: the only objects that can open under the fuzz key, since
// forging another one means forging the key commitment or a GCM tag.
func fuzzObjects(t interface{ Fatal(...any) }) map[[SaltSize]byte]struct{ pt, sealed []byte } {
	objs := map[[SaltSize]byte]struct{ pt, sealed []byte }{}
	rnd := &counterRand{}
	add := func(c SealConfig, pt []byte, flushAt ...int) {
		c.Rand = rnd
		var out bytes.Buffer
		s, err := NewSealer(&out, c)
		if err != nil {
			t.Fatal(err)
		}
		prev := 0
		for _, at := range flushAt {
			_, _ = s.Write(pt[prev:at])
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			prev = at
		}
		_, _ = s.Write(pt[prev:])
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		objs[s.Header().Salt] = struct{ pt, sealed []byte }{pt, out.Bytes()}
	}
	for _, n := range []int{0, 1, 63, 64, 65, 200} {
		add(testConfig(MinSegmentSize), pattern(n))
	}
	ic := testConfig(MinSegmentSize)
	ic.Interactive = true
	add(ic, pattern(150), 3, 70, 71)
	return objs
}

// openProperty is the decoder's contract, checked on any input: either the
// input is byte for byte an object that was sealed, and opens to its
// plaintext, or it is refused; and whatever the opener released before
// refusing is a prefix of that object's plaintext (so the header verified:
// the salt names the object).
func openProperty(t *testing.T, objs map[[SaltSize]byte]struct{ pt, sealed []byte }, data []byte) {
	var out bytes.Buffer
	o := NewOpener(iotest.HalfReader(bytes.NewReader(data)), testKeys)
	_, err := io.Copy(&out, struct{ io.Reader }{o}) // through Read, not WriteTo
	h, _, _ := ParseHeader(data)
	obj, known := objs[h.Salt]
	if err == nil {
		if !known || !bytes.Equal(data, obj.sealed) || !bytes.Equal(out.Bytes(), obj.pt) {
			t.Fatalf("input of %d bytes opened to %d bytes but is not an object that was sealed", len(data), out.Len())
		}
	} else {
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("refusal is not a *seal.Error: %v", err)
		}
		if out.Len() > 0 && (!known || !bytes.HasPrefix(obj.pt, out.Bytes())) {
			t.Fatalf("released %d bytes before %v that are not a prefix of the sealed plaintext", out.Len(), err)
		}
	}
	// The one-shot Open agrees and releases nothing on refusal.
	got, err2 := Open(data, testKeys)
	if (err == nil) != (err2 == nil) || err2 != nil && got != nil || err2 == nil && !bytes.Equal(got, out.Bytes()) {
		t.Fatalf("Open disagrees with the streaming opener: %v vs %v", err2, err)
	}
}

// FuzzOpen mutates valid sealed objects (and anything else): each input
// must open to exactly what was sealed, or be refused having released only
// a verified prefix.
func FuzzOpen(f *testing.F) {
	objs := fuzzObjects(f)
	for _, o := range objs {
		f.Add(o.sealed)
	}
	f.Add([]byte("CWSL"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		openProperty(t, objs, data)
	})
}

// FuzzRoundTrip seals fuzzed plaintexts in fuzzed write sizes, with and
// without flushes, and checks they open byte for byte, with Layout's size
// for objects that were not flushed.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("hello"), uint16(64), uint8(3), false)
	f.Add(pattern(300), uint16(100), uint8(64), true)
	f.Add([]byte{}, uint16(0), uint8(0), true)
	f.Fuzz(func(t *testing.T, pt []byte, seg uint16, chunk uint8, interactive bool) {
		c := testConfig(MinSegmentSize + int(seg)%1000)
		c.Interactive = interactive
		var out bytes.Buffer
		s, err := NewSealer(&out, c)
		if err != nil {
			t.Fatal(err)
		}
		step := int(chunk) + 1
		for p := pt; len(p) > 0; {
			n := min(step, len(p))
			if _, err := s.Write(p[:n]); err != nil {
				t.Fatal(err)
			}
			if interactive && chunk%3 == 0 {
				if err := s.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			p = p[n:]
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if !interactive || chunk%3 != 0 {
			if want := s.Layout().SealedSize(int64(len(pt))); int64(out.Len()) != want {
				t.Fatalf("sealed %d bytes, SealedSize %d", out.Len(), want)
			}
		}
		got, err := Open(out.Bytes(), testKeys, WithContext(testContext))
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("round trip: %d of %d bytes, %v", len(got), len(pt), err)
		}
	})
}
