package block

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cleanwall/cleanwall/proxies"
)

func testKey(id string, fill byte) proxies.DataKey {
	return proxies.DataKey{ID: id, Version: 1, Key: bytes.Repeat([]byte{fill}, 32)}
}

func newImage(t *testing.T, size int64) (*Image, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "store.img")
	im, err := Create(path, testKey("vol-dek", 7), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im, path
}

// TestImageRandomIO writes random ranges (unaligned, spanning sectors and
// chunks) against a model, reads random ranges back, then reopens the
// image and compares all of it.
func TestImageRandomIO(t *testing.T) {
	const size = 4 << 20
	im, path := newImage(t, size)
	model := make([]byte, size)
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i < 300; i++ {
		off := rng.Int64N(size)
		n := rng.Int64N(min(size-off, 3<<20)) + 1
		if i%3 == 0 { // aligned whole sectors too
			off = off / SectorSize * SectorSize
			n = (n + SectorSize - 1) / SectorSize * SectorSize
			n = min(n, size-off)
		}
		buf := make([]byte, n)
		_, _ = rand.Read(buf)
		if k, err := im.WriteAt(buf, off); err != nil || k != int(n) {
			t.Fatalf("write %d at %d: %d %v", n, off, k, err)
		}
		copy(model[off:], buf)
		roff := rng.Int64N(size)
		got := make([]byte, rng.Int64N(size-roff)+1)
		if k, err := im.ReadAt(got, roff); err != nil || k != len(got) {
			t.Fatalf("read %d at %d: %d %v", len(got), roff, k, err)
		}
		if !bytes.Equal(got, model[roff:roff+int64(len(got))]) {
			t.Fatalf("read %d at %d differs from what was written", len(got), roff)
		}
	}
	// Past the end.
	tail := make([]byte, 10000)
	k, err := im.ReadAt(tail, size-100)
	if k != 100 || !errors.Is(err, io.EOF) || !bytes.Equal(tail[:100], model[size-100:]) {
		t.Fatalf("read across the end: %d %v", k, err)
	}
	if _, err := im.WriteAt(make([]byte, 2), size-1); err == nil {
		t.Fatal("write across the end accepted")
	}
	if err := im.Sync(); err != nil {
		t.Fatal(err)
	}
	im.Close()
	im2, err := Open(path, testKey("vol-dek", 7), false)
	if err != nil {
		t.Fatal(err)
	}
	defer im2.Close()
	all := make([]byte, size)
	if _, err := im2.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, model) {
		t.Fatal("reopened image differs from what was written")
	}
}

// TestImageSparseZeros: a new image reads as zeros and stays sparse.
func TestImageSparseZeros(t *testing.T) {
	im, path := newImage(t, 64<<20)
	buf := make([]byte, 1<<20)
	buf[0] = 1
	if _, err := im.ReadAt(buf, 32<<20); err != nil {
		t.Fatal(err)
	}
	if !allZero(buf) {
		t.Fatal("a new image does not read as zeros")
	}
	st, _ := os.Stat(path)
	h := im.Header()
	if st.Size() != h.FileSize() {
		t.Fatalf("file size %d, want %d", st.Size(), h.FileSize())
	}
	if used := diskUsage(t, path); used > 1<<20 {
		t.Fatalf("a new 64 MiB image uses %d bytes on disk: not sparse", used)
	}
}

// TestImageNoPlaintext: a canary written in every sector is nowhere in
// the store, nor is any 16-byte piece of it.
func TestImageNoPlaintext(t *testing.T) {
	im, path := newImage(t, 1<<20)
	canary := []byte("CANARY-block-volume-7f3a9c-CANARY")
	data := bytes.Repeat(canary, (1<<20)/len(canary)+1)[:1<<20]
	if _, err := im.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	store, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+16 <= len(canary); i++ {
		if bytes.Contains(store, canary[i:i+16]) {
			t.Fatalf("store holds plaintext %q", canary[i:i+16])
		}
	}
	if bytes.Contains(store, []byte("CANARY")) {
		t.Fatal("store holds the canary")
	}
}

func flipBit(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func wantDamaged(t *testing.T, im *Image, sector int64) {
	t.Helper()
	buf := make([]byte, SectorSize)
	for i := range buf {
		buf[i] = 0xAA
	}
	_, err := im.ReadAt(buf, sector*SectorSize)
	var de *DamagedError
	if !errors.As(err, &de) || de.Sector != sector || !errors.Is(err, ErrDamaged) {
		t.Fatalf("sector %d: want a DamagedError for it, got %v", sector, err)
	}
	// A read that covers it (from the sector before) fails too, and a
	// partial write into it cannot read-modify-write it.
	if sector > 0 {
		if _, err := im.ReadAt(make([]byte, 2*SectorSize), (sector-1)*SectorSize); !errors.Is(err, ErrDamaged) {
			t.Fatalf("read over sector %d: %v", sector, err)
		}
	}
	if !im.ReadOnly() {
		if _, err := im.WriteAt([]byte{1}, sector*SectorSize+5); !errors.Is(err, ErrDamaged) {
			t.Fatalf("partial write into damaged sector %d: %v", sector, err)
		}
	}
}

func wantIntact(t *testing.T, im *Image, sector int64, want []byte) {
	t.Helper()
	got := make([]byte, SectorSize)
	if _, err := im.ReadAt(got, sector*SectorSize); err != nil {
		t.Fatalf("sector %d: %v", sector, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("sector %d reads wrong bytes", sector)
	}
}

// TestImageTamper: a flipped bit in a sector's data, nonce, tag or
// reserved bytes, two sectors swapped, a tag entry zeroed, and a sector
// copied in from another image with the same key all read as damaged;
// the sectors around them still read right.
func TestImageTamper(t *testing.T) {
	key := testKey("vol-dek", 7)
	dir := t.TempDir()
	path := filepath.Join(dir, "a.img")
	im, err := Create(path, key, 64*SectorSize)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 64*SectorSize)
	_, _ = rand.Read(data)
	if _, err := im.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	h := im.Header()
	im.Close()
	sec := func(i int64) []byte { return data[i*SectorSize : (i+1)*SectorSize] }
	dataOff := func(i int64) int64 { return h.DataOffset() + i*SectorSize }
	entOff := func(i int64) int64 { return h.TagOffset() + i*EntrySize }

	flipBit(t, path, dataOff(3)+1000) // ciphertext
	flipBit(t, path, entOff(5)+2)     // nonce
	flipBit(t, path, entOff(7)+20)    // tag
	flipBit(t, path, entOff(9)+30)    // reserved
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	swap := func(a, b int64, size int64, at func(int64) int64) {
		x, y := make([]byte, size), make([]byte, size)
		_, _ = f.ReadAt(x, at(a))
		_, _ = f.ReadAt(y, at(b))
		_, _ = f.WriteAt(y, at(a))
		_, _ = f.WriteAt(x, at(b))
	}
	// Sectors 11 and 12 swapped with their tags: bound to their number.
	swap(11, 12, SectorSize, dataOff)
	swap(11, 12, EntrySize, entOff)
	// Sector 14's tag entry zeroed (its data is not a hole).
	_, _ = f.WriteAt(make([]byte, EntrySize), entOff(14))
	f.Close()

	// Another image, same key: its sector 20 copied over ours.
	other := filepath.Join(dir, "b.img")
	im2, err := Create(other, key, 64*SectorSize)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im2.WriteAt(sec(20), 20*SectorSize); err != nil {
		t.Fatal(err)
	}
	im2.Close()
	src, _ := os.ReadFile(other)
	f, _ = os.OpenFile(path, os.O_RDWR, 0)
	_, _ = f.WriteAt(src[dataOff(20):dataOff(21)], dataOff(20))
	_, _ = f.WriteAt(src[entOff(20):entOff(21)], entOff(20))
	f.Close()

	im, err = Open(path, key, false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for _, s := range []int64{3, 5, 7, 9, 11, 12, 14, 20} {
		wantDamaged(t, im, s)
	}
	for _, s := range []int64{0, 2, 4, 6, 8, 10, 13, 15, 19, 21, 63} {
		wantIntact(t, im, s, sec(s))
	}
	// A whole-sector rewrite of a damaged sector heals it.
	if _, err := im.WriteAt(sec(3), 3*SectorSize); err != nil {
		t.Fatal(err)
	}
	wantIntact(t, im, 3, sec(3))
}

// TestImageRefused: wrong key bytes, wrong key id, wrong key version, a
// damaged header, and a truncated or extended store are refused at open
// with a clear error.
func TestImageRefused(t *testing.T) {
	_, path := newImage(t, 16*SectorSize)
	// The store is locked by the open image: a second open is refused.
	if _, err := Open(path, testKey("vol-dek", 7), false); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second open of a served image: %v", err)
	}
	copyTo := func(name string, edit func(f *os.File)) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if edit != nil {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			edit(f)
			f.Close()
		}
		return p
	}
	cases := []struct {
		name string
		key  proxies.DataKey
		edit func(f *os.File)
		want string
	}{
		{"wrong key", testKey("vol-dek", 8), nil, "wrong key"},
		{"wrong key id", testKey("other", 7), nil, `sealed with key "vol-dek", not "other"`},
		{"wrong version", proxies.DataKey{ID: "vol-dek", Version: 2, Key: testKey("", 7).Key}, nil, "version 1, not version 2"},
		{"header bit", testKey("vol-dek", 7), func(f *os.File) { _, _ = f.WriteAt([]byte{0xff}, 30) }, "wrong key (or a damaged header)"},
		{"truncated", testKey("vol-dek", 7), func(f *os.File) { _ = f.Truncate(HeaderSize + 4096 + 8*SectorSize) }, "truncated or extended"},
		{"extended", testKey("vol-dek", 7), func(f *os.File) { _, _ = f.WriteAt([]byte{0}, 1<<20) }, "truncated or extended"},
		{"not an image", testKey("vol-dek", 7), func(f *os.File) { _, _ = f.WriteAt([]byte("XXXXXXXX"), 0) }, "bad magic"},
		{"flush log count", testKey("vol-dek", 7), func(f *os.File) { _, _ = f.WriteAt([]byte{0xff, 0xff, 0xff}, HeaderSize) }, "flush log lists 16777215 sectors"},
		{"flush log sector", testKey("vol-dek", 7), func(f *os.File) {
			_, _ = f.WriteAt([]byte{1, 0, 0, 0, 0, 0, 0, 0, 16}, HeaderSize)
		}, "flush log lists sector 16 of 16"},
	}
	for _, c := range cases {
		p := copyTo(strings.ReplaceAll(c.name, " ", "-"), c.edit)
		im, err := Open(p, c.key, false)
		if err == nil {
			im.Close()
			t.Fatalf("%s: opened", c.name)
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%s: error %q does not say %q", c.name, err, c.want)
		}
	}
	// OpenImage: size mismatch, and a missing read-only store.
	p := copyTo("size", nil)
	if _, err := OpenImage(p, testKey("vol-dek", 7), 32*SectorSize, false); err == nil || !strings.Contains(err.Error(), "sizeBytes is 131072") {
		t.Fatalf("size mismatch: %v", err)
	}
	if _, err := OpenImage(filepath.Join(t.TempDir(), "none.img"), testKey("vol-dek", 7), 32*SectorSize, true); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("missing read-only store: %v", err)
	}
	if _, err := OpenImage("relative.img", testKey("vol-dek", 7), 32*SectorSize, false); err == nil {
		t.Fatal("relative store accepted")
	}
	if _, err := Create(filepath.Join(t.TempDir(), "odd.img"), testKey("vol-dek", 7), 1000); err == nil {
		t.Fatal("size 1000 accepted")
	}
	// Create never replaces an existing file.
	if _, err := Create(p, testKey("vol-dek", 7), 16*SectorSize); !errors.Is(err, os.ErrExist) {
		t.Fatalf("create over an existing store: %v", err)
	}
}

// TestImageConcurrent: writers, readers and flushes on overlapping sectors
// never produce a torn sector (a tag of one write with the data of another
// reads as damaged); every read is one of the values written.
func TestImageConcurrent(t *testing.T) {
	im, _ := newImage(t, 256*SectorSize)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(w), 9))
			for i := 0; i < 300; i++ {
				s := rng.Int64N(250)
				n := rng.Int64N(6) + 1
				buf := bytes.Repeat([]byte{byte(w + 1)}, int(n*SectorSize))
				if _, err := im.WriteAt(buf, s*SectorSize); err != nil {
					errs <- err
					return
				}
				got := make([]byte, SectorSize)
				if _, err := im.ReadAt(got, rng.Int64N(256)*SectorSize); err != nil {
					errs <- err
					return
				}
				for _, c := range got {
					if c != got[0] || c > 4 {
						errs <- errors.New("a sector mixes writes")
						return
					}
				}
			}
		}(w)
	}
	// Flushes in between, as fsyncs from above would come.
	stop := make(chan struct{})
	flushed := make(chan int)
	go func() {
		n := 0
		defer func() { flushed <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := im.Sync(); err != nil {
				errs <- err
				return
			}
			n++
		}
	}()
	wg.Wait()
	close(stop)
	if n := <-flushed; n == 0 {
		t.Fatal("no flush ran during the writes")
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// FuzzParseHeader: any input parses or is refused without panicking; what
// parses is exactly what Marshal writes for it (up to the MAC).
func FuzzParseHeader(f *testing.F) {
	h := Header{Cipher: CipherAES256GCM, Size: 1 << 30, KeyID: "volume-dek", KeyVersion: 3}
	good, _ := h.Marshal(make([]byte, 32))
	f.Add(good)
	f.Add(good[:100])
	f.Add(make([]byte, HeaderSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		again, err := h.Marshal(make([]byte, 32))
		if err != nil {
			t.Fatalf("parsed header does not marshal: %v", err)
		}
		if !bytes.Equal(again[:macOffset], b[:macOffset]) {
			t.Fatal("parsed header is not canonical")
		}
		if h.FileSize() <= h.DataOffset() || h.DataOffset() < HeaderSize {
			t.Fatal("bad layout")
		}
	})
}

func diskUsage(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return statBlocks(st) * 512
}

// FuzzTamper: any set of byte changes to the tag table and data area of a
// written image makes each sector read either exactly what was written
// (only if none of its stored bytes changed) or a DamagedError for that
// sector: never other bytes.
func FuzzTamper(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5})
	f.Add([]byte{200, 0, 0, 9, 17, 1})
	f.Fuzz(func(t *testing.T, muts []byte) {
		const sectors = 8
		dir := t.TempDir()
		path := filepath.Join(dir, "f.img")
		key := testKey("k", 3)
		im, err := Create(path, key, sectors*SectorSize)
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, sectors*SectorSize)
		for i := range data {
			data[i] = byte(i*31 + i>>12)
		}
		// Sector 6 stays unwritten (reads as zeros).
		if _, err := im.WriteAt(data[:6*SectorSize], 0); err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(data[7*SectorSize:], 7*SectorSize); err != nil {
			t.Fatal(err)
		}
		clear(data[6*SectorSize : 7*SectorSize])
		h := im.Header()
		im.Close()
		store, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// Each mutation: 3 bytes, an offset (scaled over the tag table
		// and data) and an XOR value.
		touched := map[int64]bool{}
		body := int64(len(store)) - h.TagOffset()
		for i := 0; i+3 <= len(muts); i += 3 {
			x := muts[i+2]
			if x == 0 {
				continue
			}
			off := h.TagOffset() + (int64(muts[i])<<8|int64(muts[i+1]))*body/65536
			store[off] ^= x
			if off < h.DataOffset() {
				if s := (off - h.TagOffset()) / EntrySize; s < sectors {
					touched[s] = true
				}
			} else {
				touched[(off-h.DataOffset())/SectorSize] = true
			}
		}
		if err := os.WriteFile(path, store, 0o600); err != nil {
			t.Fatal(err)
		}
		im, err = Open(path, key, true)
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		for s := int64(0); s < sectors; s++ {
			got := make([]byte, SectorSize)
			_, err := im.ReadAt(got, s*SectorSize)
			want := data[s*SectorSize : (s+1)*SectorSize]
			switch {
			case err == nil && bytes.Equal(got, want):
			case err == nil:
				t.Fatalf("sector %d reads wrong bytes (touched %v)", s, touched[s])
			case errors.Is(err, ErrDamaged) && touched[s]:
			default:
				t.Fatalf("sector %d: %v (touched %v)", s, err, touched[s])
			}
		}
	})
}
