package hpke

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

type fuzzBody struct{ pt, sealed []byte }

// fuzzBodies are the bodies the fuzz targets' corpus starts from, keyed by
// encapsulated key: the only bodies that can open under the test keys,
// since forging another means forging the commitment or a GCM tag.
func fuzzBodies(t interface{ Fatal(...any) }) map[string]fuzzBody {
	bodies := map[string]fuzzBody{}
	for _, suite := range allSuites {
		for _, n := range []int{0, 1, 63, 64, 65, 200} {
			pt := pattern(n)
			sealed, err := sealChunks(pt, testPub(suite), testContext, MinChunkSize)
			if err != nil {
				t.Fatal(err)
			}
			p, _, _ := ParsePrefix(sealed)
			bodies[string(p.Enc)] = fuzzBody{pt, sealed}
		}
	}
	return bodies
}

// openProperty is the opener's contract, checked on any input and with
// each suite's key: either the input is byte for byte a body that was
// sealed, and opens to its plaintext, or it is refused with an *Error; and
// whatever the opener released before refusing is a prefix of that body's
// plaintext (so the prefix verified: the encapsulated key names the body).
func openProperty(t *testing.T, bodies map[string]fuzzBody, data []byte) {
	p, _, _ := ParsePrefix(data)
	body, known := bodies[string(p.Enc)]
	for _, suite := range allSuites {
		var out bytes.Buffer
		o := NewOpener(iotest.HalfReader(bytes.NewReader(data)), testKey(suite), testContext)
		_, err := io.Copy(&out, struct{ io.Reader }{o}) // through Read, not WriteTo
		if err == nil {
			if !known || !bytes.Equal(data, body.sealed) || !bytes.Equal(out.Bytes(), body.pt) {
				t.Fatalf("%s: input of %d bytes opened to %d bytes but is not a body that was sealed", suite, len(data), out.Len())
			}
		} else {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("%s: refusal is not an *hpke.Error: %v", suite, err)
			}
			if out.Len() > 0 && (!known || !bytes.HasPrefix(body.pt, out.Bytes())) {
				t.Fatalf("%s: released %d bytes before %v that are not a prefix of the sealed plaintext", suite, out.Len(), err)
			}
		}
		// The one-shot Open agrees and releases nothing on refusal.
		got, err2 := Open(data, testKey(suite), testContext)
		if (err == nil) != (err2 == nil) || err2 != nil && got != nil || err2 == nil && !bytes.Equal(got, out.Bytes()) {
			t.Fatalf("%s: Open disagrees with the streaming opener: %v vs %v", suite, err2, err)
		}
	}
}

// FuzzOpen mutates valid sealed bodies (and anything else): each input
// must open to exactly what was sealed, or be refused having released only
// a verified prefix.
func FuzzOpen(f *testing.F) {
	bodies := fuzzBodies(f)
	for _, b := range bodies {
		f.Add(b.sealed)
	}
	f.Add([]byte("CWHP"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		openProperty(t, bodies, data)
	})
}

// FuzzRoundTrip seals fuzzed plaintexts in fuzzed chunk and write sizes
// and checks they open byte for byte, at the size the layout says.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("hello"), uint16(64), uint8(3))
	f.Add(pattern(300), uint16(100), uint8(64))
	f.Add([]byte{}, uint16(0), uint8(0))
	f.Fuzz(func(t *testing.T, pt []byte, chunk uint16, step uint8) {
		c := MinChunkSize + int(chunk)%1000
		sealed := sealStream(t, testPub(SuiteX25519), testContext, c, pt, int(step)+1)
		if len(sealed) != sealedSizeFor(SuiteX25519, c, len(pt)) {
			t.Fatalf("sealed %d bytes, want %d", len(sealed), sealedSizeFor(SuiteX25519, c, len(pt)))
		}
		got, err := Open(sealed, testKey(SuiteX25519), testContext)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("round trip: %d of %d bytes, %v", len(got), len(pt), err)
		}
	})
}
