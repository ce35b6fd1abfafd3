package files

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

func testKey(t testing.TB, id string) Key {
	k := Key{ID: id, Version: 1, Key: make([]byte, 32)}
	rand.Read(k.Key)
	return k
}

// mountStore opens (creating) the store and mounts it; the mount is closed
// at cleanup.
func mountStore(t testing.TB, store string, key Key, ro bool) (string, *Mounted) {
	t.Helper()
	testutil.RequireRoot(t)
	s, err := OpenStore(store, key, !ro)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m, err := Mount(context.Background(), s, dir, MountOptions{ReadOnly: ro, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return dir, m
}

func closeMount(t testing.TB, m *Mounted) {
	t.Helper()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}

// storePath is where the volume's relative path rel is in the store.
func storePath(t testing.TB, s *Store, rel string) string {
	t.Helper()
	p, id := s.root, s.RootID()
	parts := strings.Split(rel, "/")
	for i, name := range parts {
		st, _ := s.k.storeName(id, name)
		p = filepath.Join(p, st)
		if i < len(parts)-1 {
			var err error
			if id, err = s.ReadDirID(p, id, name); err != nil {
				t.Fatal(err)
			}
		}
	}
	return p
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func wantEIO(t testing.TB, what string, err error) {
	t.Helper()
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("%s: got %v, want EIO", what, err)
	}
}

func readFile(p string) ([]byte, error) { return os.ReadFile(p) }

func TestSmokeRemount(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	p := filepath.Join(dir, "hello.txt")
	if err := os.WriteFile(p, []byte("hello world"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "hello world" {
		t.Fatalf("read %q %v", b, err)
	}
	closeMount(t, m)
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	dir2, _ := mountStore(t, store, key, false)
	if b, err := os.ReadFile(filepath.Join(dir2, "hello.txt")); err != nil || string(b) != "hello world" {
		t.Fatalf("after remount: read %q %v", b, err)
	}
	// The mountpoint answers the daemon's way too: a fresh mount shows
	// up in /proc/self/mountinfo with its fs name.
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if !strings.Contains(string(mi), dir2) || !strings.Contains(string(mi), "cleanwall-files:") {
		t.Fatalf("mount %s not in mountinfo", dir2)
	}
}

// model is what a file should hold.
type model []byte

func (m *model) writeAt(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(*m)) {
		*m = append(*m, make([]byte, end-int64(len(*m)))...)
	}
	copy((*m)[off:], p)
}

func (m *model) truncate(n int64) {
	if n <= int64(len(*m)) {
		*m = (*m)[:n]
	} else {
		*m = append(*m, make([]byte, n-int64(len(*m)))...)
	}
}

func checkFile(t testing.TB, p string, want []byte, rng *mrand.Rand) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != int64(len(want)) {
		t.Fatalf("%s: stat size %d, want %d", p, st.Size(), len(want))
	}
	got, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: content differs (len %d vs %d)", p, len(got), len(want))
	}
	// Random reads.
	for range 50 {
		if len(want) == 0 {
			break
		}
		off := rng.Int64N(int64(len(want)))
		n := rng.IntN(3*BlockSize) + 1
		buf := make([]byte, n)
		k, err := f.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:k], want[off:min(off+int64(n), int64(len(want)))]) {
			t.Fatalf("%s: read %d at %d differs", p, n, off)
		}
	}
}

// TestReadWrite writes files of many sizes through the mount, rewrites
// their middles, appends, truncates, reads back at random offsets, and
// again after a remount.
func TestReadWrite(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	rng := mrand.New(mrand.NewPCG(1, 2))
	sizes := []int{0, 1, 100, BlockSize - 1, BlockSize, BlockSize + 1, 3*BlockSize + 17, 1<<20 + 123, 5 << 20}
	models := map[string]*model{}
	for _, size := range sizes {
		name := fmt.Sprintf("f%d", size)
		md := model(randBytes(size))
		models[name] = &md
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, md, 0o644); err != nil {
			t.Fatal(err)
		}
		checkFile(t, p, md, rng)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Rewrite in the middle, across a block boundary.
		if size > 10 {
			off := int64(size / 2)
			buf := randBytes(min(BlockSize+10, size-int(off)))
			if _, err := f.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
			md.writeAt(buf, off)
		}
		// Append.
		app := randBytes(rng.IntN(2*BlockSize) + 1)
		if _, err := f.WriteAt(app, int64(len(md))); err != nil {
			t.Fatal(err)
		}
		md.writeAt(app, int64(len(md)))
		// Write past the end: a gap of zeros.
		gap := randBytes(10)
		off := int64(len(md)) + int64(rng.IntN(3*BlockSize))
		if _, err := f.WriteAt(gap, off); err != nil {
			t.Fatal(err)
		}
		md.writeAt(gap, off)
		// Shrink, then grow by truncate: the cut bytes come back as zeros.
		cut := int64(len(md)) * 2 / 3
		if err := f.Truncate(cut); err != nil {
			t.Fatal(err)
		}
		md.truncate(cut)
		if err := f.Truncate(cut + 5000); err != nil {
			t.Fatal(err)
		}
		md.truncate(cut + 5000)
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		checkFile(t, p, md, rng)
	}
	// O_APPEND and O_TRUNC.
	p := filepath.Join(dir, "appended")
	md := model{}
	for i := range 20 {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		b := randBytes(i * 333)
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		md = append(md, b...)
		f.Close()
	}
	models["appended"] = &md
	checkFile(t, p, md, rng)
	p = filepath.Join(dir, "trunc")
	os.WriteFile(p, randBytes(9000), 0o600)
	tr := model(randBytes(10))
	if err := os.WriteFile(p, tr, 0o600); err != nil { // O_TRUNC
		t.Fatal(err)
	}
	models["trunc"] = &tr
	checkFile(t, p, tr, rng)

	closeMount(t, m)
	dir, _ = mountStore(t, store, key, false)
	for name, md := range models {
		checkFile(t, filepath.Join(dir, name), *md, rng)
	}
}

// TestLargeFile writes and reads back 100 MiB sequentially.
func TestLargeFile(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	p := filepath.Join(dir, "big")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	chunk := randBytes(1 << 20)
	h := sha256.New()
	for i := range 100 {
		chunk[0] = byte(i)
		f.Write(chunk)
		h.Write(chunk)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := h.Sum(nil)
	closeMount(t, m)
	dir, _ = mountStore(t, store, key, false)
	f, err = os.Open(filepath.Join(dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h = sha256.New()
	n, err := io.Copy(h, f)
	if err != nil || n != 100<<20 || !bytes.Equal(h.Sum(nil), want) {
		t.Fatalf("read back %d bytes, err %v, digest equal %v", n, err, bytes.Equal(h.Sum(nil), want))
	}
	st, _ := os.Stat(storePath(t, mustStore(t, store, key), "big"))
	if st.Size() != int64(headerLen(2))+(100<<20)/BlockSize*storeBlockSize {
		t.Fatalf("store file is %d bytes", st.Size())
	}
}

func mustStore(t testing.TB, store string, key Key) *Store {
	t.Helper()
	s, err := OpenStore(store, key, false)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestStoreHoldsNoPlaintext: no canary content or name is in the store.
func TestStoreHoldsNoPlaintext(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	canary := "CANARY-8f1c2e-secret-content"
	names := []string{"patient-records-canary", "diagnosis-canary.csv", strings.Repeat("longname-canary-", 14)}
	sub := filepath.Join(dir, "subdir-canary")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dir, sub} {
		for _, n := range names {
			if err := os.WriteFile(filepath.Join(d, n), []byte(strings.Repeat(canary, 500)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	closeMount(t, m)
	filepath.Walk(store, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(strings.ToLower(p), "canary") {
			t.Errorf("store path holds a plaintext name: %s", p)
		}
		if info.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, []byte(canary)) || bytes.Contains(b, []byte("canary")) {
				t.Errorf("store file %s holds plaintext", p)
			}
		}
		return nil
	})
	// The same name in two directories is stored under different names.
	s := mustStore(t, store, key)
	a, b := storePath(t, s, names[0]), storePath(t, s, "subdir-canary/"+names[0])
	if filepath.Base(a) == filepath.Base(b) {
		t.Fatalf("name encrypted the same in two directories: %s", filepath.Base(a))
	}
}

func flipByte(t testing.TB, p string, off int64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x04
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestTamper: every kind of damage to the store reads as EIO, never as
// other bytes; the untouched file next to it still reads.
func TestTamper(t *testing.T) {
	const nblocks = 5
	hl := int64(headerLen(2))
	blk := func(i int64) int64 { return hl + i*storeBlockSize }
	cases := []struct {
		name string
		// tamper changes the store; target is the file that must now
		// fail, a and b the store paths of files "a" and "b".
		tamper func(t *testing.T, store, a, b, aa string)
		// readOK: the damage shows only on reading (the header is fine).
		target string
	}{
		{"flip bit in block", func(t *testing.T, store, a, b, aa string) { flipByte(t, a, blk(2)+100) }, "a"},
		{"flip bit in nonce", func(t *testing.T, store, a, b, aa string) { flipByte(t, a, blk(1)+3) }, "a"},
		{"flip bit in tag", func(t *testing.T, store, a, b, aa string) { flipByte(t, a, blk(1)+storeBlockSize-1) }, "a"},
		{"flip bit in header size", func(t *testing.T, store, a, b, aa string) { flipByte(t, a, 28) }, "a"},
		{"flip bit in header file id", func(t *testing.T, store, a, b, aa string) { flipByte(t, a, 7) }, "a"},
		{"drop a block", func(t *testing.T, store, a, b, aa string) {
			c, _ := os.ReadFile(a)
			c = append(c[:blk(1)], c[blk(2):]...)
			os.WriteFile(a, c, 0o644)
		}, "a"},
		{"swap two blocks", func(t *testing.T, store, a, b, aa string) {
			c, _ := os.ReadFile(a)
			x := append([]byte(nil), c[blk(1):blk(2)]...)
			copy(c[blk(1):], c[blk(3):blk(4)])
			copy(c[blk(3):], x)
			os.WriteFile(a, c, 0o644)
		}, "a"},
		{"truncate the last whole block", func(t *testing.T, store, a, b, aa string) { os.Truncate(a, blk(nblocks-1)) }, "a"},
		{"truncate within the last block", func(t *testing.T, store, a, b, aa string) { os.Truncate(a, blk(nblocks)-10) }, "a"},
		{"truncate to the header", func(t *testing.T, store, a, b, aa string) { os.Truncate(a, hl) }, "a"},
		{"truncate into the header", func(t *testing.T, store, a, b, aa string) { os.Truncate(a, 20) }, "a"},
		{"block from another file", func(t *testing.T, store, a, b, aa string) {
			ca, _ := os.ReadFile(a)
			cb, _ := os.ReadFile(b)
			copy(ca[blk(1):blk(2)], cb[blk(1):blk(2)])
			os.WriteFile(a, ca, 0o644)
		}, "a"},
		{"swap two store files", func(t *testing.T, store, a, b, aa string) {
			os.Rename(a, a+".x")
			os.Rename(b, a)
			os.Rename(a+".x", b)
		}, "a"},
		{"copy a store file over another", func(t *testing.T, store, a, b, aa string) { copyFile(t, b, a) }, "a"},
		{"move a store file into another directory", func(t *testing.T, store, a, b, aa string) { copyFile(t, a, aa) }, "d/a"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			store := filepath.Join(t.TempDir(), "store")
			key := testKey(t, "k1")
			dir, m := mountStore(t, store, key, false)
			want := map[string][]byte{"a": randBytes(nblocks * BlockSize), "b": randBytes(nblocks * BlockSize), "c": randBytes(3 * BlockSize)}
			os.Mkdir(filepath.Join(dir, "d"), 0o755)
			want["d/a"] = randBytes(nblocks * BlockSize)
			for n, b := range want {
				if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			closeMount(t, m)
			s := mustStore(t, store, key)
			c.tamper(t, store, storePath(t, s, "a"), storePath(t, s, "b"), storePath(t, s, "d/a"))
			dir, _ = mountStore(t, store, key, false)
			got, err := readFile(filepath.Join(dir, c.target))
			wantEIO(t, "read "+c.target, err)
			// What a read returns before the damaged block is the
			// file's true content, never other bytes.
			if !bytes.HasPrefix(want[c.target], got) {
				t.Fatalf("a failed read returned %d bytes that are not the file's", len(got))
			}
			if got, err := readFile(filepath.Join(dir, "c")); err != nil || !bytes.Equal(got, want["c"]) {
				t.Fatalf("untouched file: %v", err)
			}
		})
	}
}

// TestForeignVolume: a store file moved from another volume fails, under
// another key and under the same key alike.
func TestForeignVolume(t *testing.T) {
	for _, sameKey := range []bool{false, true} {
		t.Run(fmt.Sprintf("sameKey=%v", sameKey), func(t *testing.T) {
			key1 := testKey(t, "k1")
			key2 := testKey(t, "k1")
			if sameKey {
				key2 = key1
			}
			s1, s2 := filepath.Join(t.TempDir(), "s1"), filepath.Join(t.TempDir(), "s2")
			d1, m1 := mountStore(t, s1, key1, false)
			d2, m2 := mountStore(t, s2, key2, false)
			os.WriteFile(filepath.Join(d1, "x"), randBytes(10000), 0o644)
			os.WriteFile(filepath.Join(d2, "x"), randBytes(10000), 0o644)
			closeMount(t, m1)
			closeMount(t, m2)
			st1, st2 := mustStore(t, s1, key1), mustStore(t, s2, key2)
			// Same name place: copy over the other volume's file.
			copyFile(t, storePath(t, st1, "x"), storePath(t, st2, "x"))
			// And dropped in under its own (foreign) encrypted name.
			copyFile(t, storePath(t, st1, "x"), filepath.Join(s2, filepath.Base(storePath(t, st1, "x"))))
			d2, _ = mountStore(t, s2, key2, false)
			_, err := readFile(filepath.Join(d2, "x"))
			wantEIO(t, "read moved file", err)
			ents, err := os.ReadDir(d2)
			if err != nil {
				t.Fatal(err)
			}
			if len(ents) != 1 || ents[0].Name() != "x" {
				t.Fatalf("listing shows %v; the foreign name must not be listed", ents)
			}
		})
	}
}

func TestWrongKey(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	if _, err := OpenStore(store, key, true); err != nil {
		t.Fatal(err)
	}
	other := testKey(t, "k1")
	if _, err := OpenStore(store, other, false); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("wrong key: %v", err)
	}
	renamed := key
	renamed.ID = "k2"
	if _, err := OpenStore(store, renamed, false); err == nil || !strings.Contains(err.Error(), `sealed under key "k1" version 1`) {
		t.Fatalf("other key id: %v", err)
	}
	renamed = key
	renamed.Version = 2
	if _, err := OpenStore(store, renamed, false); err == nil {
		t.Fatal("other key version opened the store")
	}
	// A non-empty directory without a config is not made a volume.
	plain := t.TempDir()
	os.WriteFile(filepath.Join(plain, "f"), nil, 0o644)
	if _, err := OpenStore(plain, key, true); !errors.Is(err, ErrNotVolume) {
		t.Fatalf("non-empty plain dir: %v", err)
	}
	// A missing one is not made without create.
	if _, err := OpenStore(filepath.Join(t.TempDir(), "missing"), key, false); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing store: %v", err)
	}
	// An empty one is not opened without create.
	if _, err := OpenStore(t.TempDir(), key, false); err == nil {
		t.Fatal("empty store opened read-only")
	}
}

// TestTree: directories, renames (rewriting only the header), unlink,
// rmdir, long names; all survive a remount.
func TestTree(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	j := func(p ...string) string { return filepath.Join(append([]string{dir}, p...)...) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	long := strings.Repeat("λ", 120) // 240 bytes: a long name
	must(os.MkdirAll(j("a", "b", "c"), 0o755))
	content := randBytes(3*BlockSize + 5)
	must(os.WriteFile(j("a", "b", "c", "f"), content, 0o644))
	must(os.WriteFile(j("a", long), []byte("long"), 0o644))
	must(os.Mkdir(j(long+"d"), 0o755))
	must(os.WriteFile(j(long+"d", "in"), []byte("in long dir"), 0o644))

	// A rename rewrites only the header: the blocks are byte for byte
	// the same.
	s := mustStore(t, store, key)
	before, _ := os.ReadFile(storePath(t, s, "a/b/c/f"))
	must(os.Rename(j("a", "b", "c", "f"), j("a", "g")))
	after, _ := os.ReadFile(storePath(t, s, "a/g"))
	hl := headerLen(2)
	if !bytes.Equal(before[hl:], after[hl:]) || bytes.Equal(before[:hl], after[:hl]) {
		t.Fatal("rename changed more (or less) than the header")
	}
	// Rename a directory with its contents; rename an open file.
	must(os.Rename(j("a", "b"), j("b2")))
	f, err := os.OpenFile(j("a", "g"), os.O_RDWR, 0)
	must(err)
	must(os.Rename(j("a", "g"), j("b2", "g2")))
	_, err = f.WriteAt([]byte("XYZ"), int64(len(content))) // grows: header rewritten at the new place
	must(err)
	content = append(content, "XYZ"...)
	f.Close()
	must(os.Rename(j("a", long), j("a", long+"2")))
	// Rename over an existing file replaces it.
	must(os.WriteFile(j("victim"), []byte("old"), 0o644))
	must(os.WriteFile(j("winner"), []byte("new"), 0o644))
	must(os.Rename(j("winner"), j("victim")))
	// rmdir of a non-empty directory fails; of an empty one works.
	if err := os.Remove(j("b2")); !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		t.Fatalf("rmdir non-empty: %v", err)
	}
	must(os.Remove(j("b2", "c")))
	must(os.Mkdir(j("gone"), 0o700))
	must(os.WriteFile(j("gone", "x"), nil, 0o644))
	must(os.Remove(j("gone", "x")))
	must(os.Remove(j("gone")))
	if _, err := os.Stat(j("b2", "c")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("removed dir still there: %v", err)
	}

	check := func(dir string) {
		t.Helper()
		j := func(p ...string) string { return filepath.Join(append([]string{dir}, p...)...) }
		if b, err := os.ReadFile(j("b2", "g2")); err != nil || !bytes.Equal(b, content) {
			t.Fatalf("renamed file: %v", err)
		}
		if b, err := os.ReadFile(j("a", long+"2")); err != nil || string(b) != "long" {
			t.Fatalf("long name: %q %v", b, err)
		}
		if b, err := os.ReadFile(j(long+"d", "in")); err != nil || string(b) != "in long dir" {
			t.Fatalf("in long dir: %q %v", b, err)
		}
		if b, err := os.ReadFile(j("victim")); err != nil || string(b) != "new" {
			t.Fatalf("replaced: %q %v", b, err)
		}
		var names []string
		ents, err := os.ReadDir(dir)
		must(err)
		for _, e := range ents {
			names = append(names, e.Name())
		}
		if got := strings.Join(names, ","); got != strings.Join([]string{"a", "b2", "victim", long + "d"}, ",") {
			t.Fatalf("root lists %q", got)
		}
		ents, _ = os.ReadDir(j("a"))
		if len(ents) != 1 || ents[0].Name() != long+"2" {
			t.Fatalf("a lists %v", ents)
		}
	}
	check(dir)
	closeMount(t, m)
	// Nothing but the volume's files is left in the store (no temporary
	// files, no stale sidecars).
	var count int
	filepath.Walk(store, func(p string, info os.FileInfo, err error) error {
		if strings.Contains(filepath.Base(p), tmpPrefix) {
			t.Errorf("leftover %s", p)
		}
		count++
		return nil
	})
	// store, config, a(+dirid), a/long2 + sidecar, b2(+dirid), b2/g2,
	// longd + sidecar (+dirid), longd/in, victim
	if count != 14 {
		t.Errorf("store holds %d entries, want 14", count)
	}
	dir, _ = mountStore(t, store, key, false)
	check(dir)
}

func TestReadOnly(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o666)
	os.Mkdir(filepath.Join(dir, "d"), 0o777)
	closeMount(t, m)
	dir, _ = mountStore(t, store, key, true)
	if b, err := os.ReadFile(filepath.Join(dir, "f")); err != nil || string(b) != "data" {
		t.Fatalf("read: %q %v", b, err)
	}
	for what, err := range map[string]error{
		"write":    os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o666),
		"create":   os.WriteFile(filepath.Join(dir, "new"), []byte("x"), 0o666),
		"mkdir":    os.Mkdir(filepath.Join(dir, "d2"), 0o777),
		"unlink":   os.Remove(filepath.Join(dir, "f")),
		"rmdir":    os.Remove(filepath.Join(dir, "d")),
		"rename":   os.Rename(filepath.Join(dir, "f"), filepath.Join(dir, "g")),
		"truncate": os.Truncate(filepath.Join(dir, "f"), 0),
	} {
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", what, err)
		}
	}
}

// TestOtherUser: a command running as another uid uses the mount (the
// sandbox's command may), and its files are its own.
func TestOtherUser(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, _ := mountStore(t, store, key, false)
	os.Chmod(filepath.Dir(dir), 0o755)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	run := func(uid uint32, script string) (string, error) {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run(4242, "echo hi > "+dir+"/mine && chmod 600 "+dir+"/mine && cat "+dir+"/mine"); err != nil || out != "hi\n" {
		t.Fatalf("as uid 4242: %q %v", out, err)
	}
	st, err := os.Stat(filepath.Join(dir, "mine"))
	if err != nil || st.Sys().(*syscall.Stat_t).Uid != 4242 {
		t.Fatalf("owner: %v", err)
	}
	if out, err := run(4343, "cat "+dir+"/mine"); err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("uid 4343 read a 0600 file of uid 4242: %q %v", out, err)
	}
}

// TestCloseBusy: Close of a mount with a file still open detaches it and
// stops the server; the store can then be mounted again.
func TestCloseBusy(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	f, err := os.Create(filepath.Join(dir, "open"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), " "+dir+" ") {
		t.Fatalf("%s still mounted", dir)
	}
	if _, err := f.Write([]byte("x")); err == nil {
		t.Fatal("write to a file of a closed volume succeeded")
	}
	dir2, _ := mountStore(t, store, key, false)
	if _, err := os.Stat(filepath.Join(dir2, "open")); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrent: parallel writers of their own files and of disjoint
// blocks of one shared file, readers, and renames and listings, through
// the mount; everything reads back after a remount.
func TestConcurrent(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	const workers = 8
	shared := filepath.Join(dir, "shared")
	if err := os.WriteFile(shared, make([]byte, workers*4*BlockSize), 0o644); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	sharedWant := make([]byte, workers*4*BlockSize)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, workers*4)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(w), 9))
			name := fmt.Sprintf("w%d", w)
			own := randBytes(rng.IntN(300000) + 1)
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, own, 0o644); err != nil {
				errs <- err
				return
			}
			// Rename back and forth while others list.
			for i := range 10 {
				q := filepath.Join(dir, fmt.Sprintf("%s.%d", name, i))
				if err := os.Rename(p, q); err != nil {
					errs <- err
					return
				}
				p = q
				if _, err := os.ReadDir(dir); err != nil {
					errs <- err
					return
				}
			}
			f, err := os.OpenFile(shared, os.O_RDWR, 0)
			if err != nil {
				errs <- err
				return
			}
			part := randBytes(4 * BlockSize)
			off := int64(w * 4 * BlockSize)
			if _, err := f.WriteAt(part, off); err != nil {
				errs <- err
			}
			f.Close()
			got, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(got, own) {
				errs <- fmt.Errorf("%s read back: %v", p, err)
			}
			mu.Lock()
			want[filepath.Base(p)] = own
			copy(sharedWant[off:], part)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	want["shared"] = sharedWant
	closeMount(t, m)
	dir, _ = mountStore(t, store, key, false)
	for name, b := range want {
		if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s after remount: %v", name, err)
		}
	}
}

// TestTools: ordinary programs (cp -a, tar, sort, diff -r, dd with
// conv=notrunc, a shell appending) on the mount see a normal file system.
func TestTools(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, _ := mountStore(t, store, key, false)
	src := t.TempDir()
	for i := range 20 {
		sub := filepath.Join(src, fmt.Sprintf("d%d", i%4))
		os.MkdirAll(sub, 0o755)
		os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%d", i)), randBytes(i*3000), 0o640)
	}
	script := `set -e
cp -a "$SRC" "$DST/copy"
diff -r "$SRC" "$DST/copy"
tar -C "$SRC" -cf "$DST/t.tar" .
mkdir "$DST/untar" && tar -C "$DST/untar" -xf "$DST/t.tar"
diff -r "$SRC" "$DST/untar"
seq 1 20000 | sort -r > "$DST/sorted"
test "$(sort -n "$DST/sorted" | tail -1)" = 20000
for i in 1 2 3; do echo "line $i" >> "$DST/log"; done
test "$(wc -l < "$DST/log")" = 3
dd if=/dev/zero of="$DST/sorted" bs=1 seek=5 count=3 conv=notrunc status=none
head -c 10 "$DST/sorted" | od -c | head -1
mv "$DST/copy" "$DST/moved" && diff -r "$SRC" "$DST/moved"
rm -r "$DST/moved" "$DST/untar"
ls -la "$DST"
`
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Env = append(os.Environ(), "SRC="+src, "DST="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(string(out), "\\0  \\0  \\0") {
		t.Fatalf("dd conv=notrunc did not write zeros in the middle:\n%s", out)
	}
}

// TestCloseWithBindElsewhere: a copy of the mount elsewhere (as a
// sandbox's mount namespace holds one) does not keep the volume served
// after Close.
func TestCloseWithBindElsewhere(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if err := syscall.Mount(dir, other, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(other, syscall.MNT_DETACH)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := os.ReadFile(filepath.Join(other, "f"))
	if !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("read through the copy after Close: %v, want ENOTCONN", err)
	}
}

// TestSQLiteAndMmap: a database (sqlite3: small random writes, fsyncs,
// vacuum) and shared writable mmap on the mount; the database reads back
// after a remount.
func TestSQLiteAndMmap(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	const script = `
import sqlite3, mmap, os, sys
d, phase = sys.argv[1], sys.argv[2]
p = os.path.join(d, "t.db")
if phase == "write":
    db = sqlite3.connect(p)
    db.execute("create table t(k integer primary key, v text)")
    db.executemany("insert into t(v) values (?)", [("row %d" % i,) for i in range(5000)])
    db.commit()
    db.execute("update t set v = 'x' where k % 7 = 0")
    db.commit()
    db.execute("vacuum")
    db.close()
    m = os.path.join(d, "m")
    with open(m, "wb") as f:
        f.write(b"\0" * 20000)
    with open(m, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[5000:5005] = b"hello"
        mm.flush()
        mm.close()
else:
    db = sqlite3.connect(p)
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert db.execute("select count(*), max(k) from t").fetchone() == (5000, 5000)
    assert db.execute("select count(*) from t where v = 'x'").fetchone()[0] == 714
    with open(os.path.join(d, "m"), "rb") as f:
        b = f.read()
    assert len(b) == 20000 and b[5000:5005] == b"hello" and b[:5000] == b"\0" * 5000
print("ok")
`
	py := func(dir, phase string) {
		t.Helper()
		out, err := exec.Command("/usr/bin/python3", "-c", script, dir, phase).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "ok" {
			t.Fatalf("python %s: %v\n%s", phase, err, out)
		}
	}
	py(dir, "write")
	py(dir, "read")
	closeMount(t, m)
	dir, _ = mountStore(t, store, key, false)
	py(dir, "read")
}

// TestOneWriter: a writable mount excludes every other mount of the same
// store; read-only mounts share it.
func TestOneWriter(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	_, m := mountStore(t, store, key, false)
	s := mustStore(t, store, key)
	for _, ro := range []bool{false, true} {
		if m2, err := Mount(context.Background(), s, t.TempDir(), MountOptions{ReadOnly: ro}); err == nil || !strings.Contains(err.Error(), "mounted elsewhere") {
			if m2 != nil {
				m2.Close()
			}
			t.Fatalf("second mount (read-only %v) beside a writable one: %v", ro, err)
		}
	}
	closeMount(t, m)
	mountStore(t, store, key, true)
	mountStore(t, store, key, true)
	if m2, err := Mount(context.Background(), s, t.TempDir(), MountOptions{}); err == nil {
		m2.Close()
		t.Fatal("a writable mount beside read-only ones")
	}
}
