package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/volumes/files"
)

func writeVolumeKey(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	p := filepath.Join(dir, "key")
	if err := os.WriteFile(p, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, key
}

// plainTree makes a small tree: nested directories, an empty file, a
// multi-block file and a long name.
func plainTree(t *testing.T, root string) map[string][]byte {
	t.Helper()
	big := make([]byte, 3*files.BlockSize+77)
	_, _ = rand.Read(big)
	want := map[string][]byte{
		"a.txt":                           []byte("hello"),
		"empty":                           {},
		"sub/deeper/big.bin":              big,
		"sub/" + strings.Repeat("n", 200): []byte("long"),
	}
	for p, b := range want {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return want
}

func checkTree(t *testing.T, root string, want map[string][]byte) {
	t.Helper()
	n := 0
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		w, ok := want[rel]
		if !ok {
			t.Errorf("unexpected %s", rel)
		} else if b, _ := os.ReadFile(p); !bytes.Equal(b, w) {
			t.Errorf("%s differs", rel)
		} else if info.Mode().Perm() != 0o640 {
			t.Errorf("%s: mode %v", rel, info.Mode())
		}
		n++
		return nil
	})
	if err != nil || n != len(want) {
		t.Fatalf("walk: %v, %d files, want %d", err, n, len(want))
	}
}

// TestVolumeFilesSealOpen: a tree sealed and opened again is the same
// tree; the store holds no plaintext name; damage exits 1 naming the file
// and writes nothing; the wrong key is refused.
func TestVolumeFilesSealOpen(t *testing.T) {
	dir := t.TempDir()
	keyFile, _ := writeVolumeKey(t, dir)
	src, store, dst := filepath.Join(dir, "src"), filepath.Join(dir, "store"), filepath.Join(dir, "dst")
	want := plainTree(t, src)
	if code := run([]string{"volume", "seal", "--kind", "files", "--key-file", keyFile, "--key-id", "vol-dek", "--key-version", "2", src, store}); code != 0 {
		t.Fatalf("seal exit %d", code)
	}
	filepath.Walk(store, func(p string, info os.FileInfo, err error) error {
		if strings.Contains(p, "a.txt") || strings.Contains(p, "deeper") || strings.Contains(p, "nnnn") {
			t.Errorf("plaintext name in the store: %s", p)
		}
		return nil
	})
	// Sealing into a volume again is refused.
	if code := run([]string{"volume", "seal", "--kind=files", "--key-file", keyFile, "--key-id", "vol-dek", src, store}); code != 1 {
		t.Fatalf("seal over a store: exit %d", code)
	}
	if code := run([]string{"volume", "open", "--kind", "files", "--key-file", keyFile, store, dst}); code != 0 {
		t.Fatalf("open exit %d", code)
	}
	checkTree(t, dst, want)

	// The wrong key.
	otherKey, _ := writeVolumeKey(t, t.TempDir())
	err := volumeCommand([]string{"open", "--kind", "files", "--key-file", otherKey, store, filepath.Join(dir, "dst2")}, os.Stdout, os.Stderr)
	if err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("wrong key: %v", err)
	}

	// A flipped bit in big.bin's store file: exit 1 naming it, no output.
	s, err := files.OpenStore(store, files.Key{Key: mustRead(t, keyFile)}, false)
	if err != nil {
		t.Fatal(err)
	}
	var target string
	filepath.Walk(store, func(p string, info os.FileInfo, err error) error {
		if info.Mode().IsRegular() && info.Size() > 3*files.BlockSize {
			target = p
		}
		return nil
	})
	_ = s
	b := mustRead(t, target)
	b[len(b)-100] ^= 1
	os.WriteFile(target, b, 0o600)
	dst3 := filepath.Join(dir, "dst3")
	err = volumeCommand([]string{"open", "--kind", "files", "--key-file", keyFile, store, dst3}, os.Stdout, os.Stderr)
	var de *files.DamageError
	if !errors.As(err, &de) || de.Path != filepath.Join("sub", "deeper", "big.bin") || !strings.Contains(err.Error(), "sub/deeper/big.bin") {
		t.Fatalf("damaged store: %v", err)
	}
	if code := run([]string{"volume", "open", "--kind", "files", "--key-file", keyFile, store, dst3}); code != 1 {
		t.Fatalf("damaged store: exit %d", code)
	}
	if _, err := os.Stat(dst3); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused open left %s: %v", dst3, err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".dst3.partial-*")); len(m) != 0 {
		t.Fatalf("refused open left %v", m)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVolumeUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"open", "--key-file", "k", "a", "b"}, "--kind is required"},
		{[]string{"open", "--kind", "nope", "--key-file", "k", "a", "b"}, `unknown --kind "nope"`},
		{[]string{"seal", "--kind", "files", "--key-file", "k", "a", "b"}, "--key-id is required"},
		{[]string{"seal", "--kind", "files", "--key-id", "x", "a", "b"}, "--key-file is required"},
		{[]string{"open", "--kind", "files", "--key-file", "k", "a"}, "want two arguments"},
		{[]string{"frob"}, `unknown volume command "frob"`},
	} {
		err := volumeCommand(c.args, os.Stdout, os.Stderr)
		var ue *usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want a usage error with %q", c.args, err, c.want)
		}
	}
	var out bytes.Buffer
	if err := volumeCommand([]string{"-h"}, &out, &out); err != nil || !strings.Contains(out.String(), "--kind files") {
		t.Fatalf("help: %v %q", err, out.String())
	}
}

// TestVolumeFilesMountInterop: what the CLI seals, the mount reads, and
// what is written through the mount, the CLI opens.
func TestVolumeFilesMountInterop(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	keyFile, key := writeVolumeKey(t, dir)
	src, store := filepath.Join(dir, "src"), filepath.Join(dir, "store")
	want := plainTree(t, src)
	if code := run([]string{"volume", "seal", "--kind", "files", "--key-file", keyFile, "--key-id", "vol-dek", src, store}); code != 0 {
		t.Fatalf("seal exit %d", code)
	}
	s, err := files.OpenStore(store, files.Key{ID: "vol-dek", Version: 1, Key: key}, false)
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	m, err := files.Mount(context.Background(), s, mnt, files.MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	checkTree(t, mnt, want)
	want["new/file"] = []byte("written through the mount")
	os.Mkdir(filepath.Join(mnt, "new"), 0o755)
	if err := os.WriteFile(filepath.Join(mnt, "new", "file"), want["new/file"], 0o640); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	if code := run([]string{"volume", "open", "--kind", "files", "--key-file", keyFile, store, dst}); code != 0 {
		t.Fatalf("open exit %d", code)
	}
	checkTree(t, dst, want)
}
