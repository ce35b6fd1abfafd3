package files

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
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

func TestSmoke(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	key := testKey(t, "k1")
	dir, m := mountStore(t, store, key, false)
	p := filepath.Join(dir, "hello.txt")
	if err := os.WriteFile(p, []byte("hello world"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil || string(b) != "hello world" {
		t.Fatalf("read %q %v", b, err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	dir2, _ := mountStore(t, store, key, false)
	b, err = os.ReadFile(filepath.Join(dir2, "hello.txt"))
	if err != nil || string(b) != "hello world" {
		t.Fatalf("after remount: read %q %v", b, err)
	}
}

var _ = bytes.Equal
var _ = errors.Is
var _ = io.EOF
var _ = mrand.IntN
var _ = strings.Contains
var _ = syscall.EIO
