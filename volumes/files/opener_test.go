package files

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes"
)

// TestOpener: the runtime's way in: volumes.Open with a policy's volume
// and a released key mounts at Dir; Close unmounts and leaves Dir empty;
// read-only refuses writes; the wrong key refuses to mount.
func TestOpener(t *testing.T) {
	testutil.RequireRoot(t)
	store := filepath.Join(t.TempDir(), "store") // does not exist yet: a new volume
	vol := policy.Volume{Name: "patients", Kind: policy.VolumeFiles, Store: store, KeyID: "volume-dek", Path: "/data/patients"}
	key := proxies.DataKey{ID: "volume-dek", Version: 1, Key: make([]byte, 32)}
	for i := range key.Key {
		key.Key[i] = byte(i)
	}
	open := func(v policy.Volume, k proxies.DataKey) (volumes.Mounted, string, error) {
		dir := t.TempDir()
		m, err := volumes.Open(context.Background(), volumes.Request{Volume: v, Key: k, Dir: dir, Logger: testutil.Logger(t)})
		return m, dir, err
	}
	m, dir, err := open(vol, key)
	if err != nil {
		t.Fatal(err)
	}
	if m.HostPath() != dir {
		t.Fatalf("HostPath %q, want %q", m.HostPath(), dir)
	}
	if _, _, ok := m.Device(); ok {
		t.Fatal("a files volume has no device")
	}
	if err := os.WriteFile(filepath.Join(dir, "x"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Fatalf("Dir after Close: %v %v", ents, err)
	}

	ro := vol
	ro.ReadOnly = true
	m, dir, err = open(ro, key)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if b, err := os.ReadFile(filepath.Join(dir, "x")); err != nil || string(b) != "x" {
		t.Fatalf("read-only read: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "y"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("read-only create: %v", err)
	}

	wrong := key
	wrong.Key = make([]byte, 32)
	if _, _, err := open(vol, wrong); err == nil || !strings.Contains(err.Error(), "volume patients") {
		t.Fatalf("wrong key: %v", err)
	}
	ro.Store = filepath.Join(t.TempDir(), "never-sealed")
	if _, _, err := open(ro, key); err == nil {
		t.Fatal("a read-only volume over a missing store mounted")
	}
}
