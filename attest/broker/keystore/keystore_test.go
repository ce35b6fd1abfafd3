package keystore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func newStore(t *testing.T) (dir string, master []byte, s *Store) {
	t.Helper()
	dir = t.TempDir()
	mk := filepath.Join(dir, "master.key")
	if err := CreateMasterKey(mk); err != nil {
		t.Fatal(err)
	}
	master, err := LoadMasterKey(mk)
	if err != nil {
		t.Fatal(err)
	}
	s, err = Open(filepath.Join(dir, "keys"), master)
	if err != nil {
		t.Fatal(err)
	}
	return dir, master, s
}

func TestCreateRotateReopen(t *testing.T) {
	dir, master, s := newStore(t)
	if _, err := s.Latest("egress-dek"); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("Latest on empty store = %v", err)
	}
	v1, err := s.Create("egress-dek")
	if err != nil || v1 != 1 {
		t.Fatalf("Create = %d, %v", v1, err)
	}
	k1, _ := s.Latest("egress-dek")
	v2, err := s.Create("egress-dek")
	if err != nil || v2 != 2 {
		t.Fatalf("rotate = %d, %v", v2, err)
	}
	k2, _ := s.Latest("egress-dek")
	if k2.Number != 2 || bytes.Equal(k1.Bytes, k2.Bytes) || len(k2.Bytes) != KeySize {
		t.Fatalf("rotation did not make a new key: %+v %+v", k1, k2)
	}
	// Nothing in the clear on disk.
	raw, _ := os.ReadFile(filepath.Join(dir, "keys", "egress-dek", "v2.sealed"))
	if bytes.Contains(raw, k2.Bytes) {
		t.Fatal("key bytes stored in the clear")
	}

	s2, err := Open(filepath.Join(dir, "keys"), master)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s2.Latest("egress-dek")
	if err != nil || got.Number != 2 || !bytes.Equal(got.Bytes, k2.Bytes) {
		t.Fatalf("after reopen: %+v %v", got, err)
	}
	if v3, _ := s2.Create("egress-dek"); v3 != 3 {
		t.Fatalf("rotation after reopen = %d", v3)
	}
	// A store opened before the rotation sees it after Reload.
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if l, _ := s.Latest("egress-dek"); l.Number != 3 {
		t.Fatalf("Reload missed v3: %d", l.Number)
	}
	if ids := s.IDs(); len(ids) != 1 || ids[0] != "egress-dek" {
		t.Fatalf("IDs = %v", ids)
	}
}

func TestTamperingIsRefused(t *testing.T) {
	dir, master, s := newStore(t)
	s.Create("a")
	s.Create("b")
	keys := filepath.Join(dir, "keys")

	wrong := bytes.Repeat([]byte{7}, MasterKeySize)
	if _, err := Open(keys, wrong); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("wrong master key: %v", err)
	}
	// A version moved to another key's directory (with its claims edited to match) does not open.
	data, _ := os.ReadFile(filepath.Join(keys, "a", "v1.sealed"))
	moved := bytes.Replace(data, []byte(`"keyID":"a"`), []byte(`"keyID":"b"`), 1)
	os.WriteFile(filepath.Join(keys, "b", "v2.sealed"), bytes.Replace(moved, []byte(`"version":1`), []byte(`"version":2`), 1), 0o600)
	if _, err := Open(keys, master); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("moved key file accepted: %v", err)
	}
}

func TestMasterKeyChecks(t *testing.T) {
	dir := t.TempDir()
	mk := filepath.Join(dir, "m")
	if err := CreateMasterKey(mk); err != nil {
		t.Fatal(err)
	}
	if err := CreateMasterKey(mk); err == nil {
		t.Fatal("CreateMasterKey replaced an existing key")
	}
	os.Chmod(mk, 0o640)
	if _, err := LoadMasterKey(mk); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("group-readable master key: %v", err)
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("abc"), 0o600)
	if _, err := LoadMasterKey(short); err == nil {
		t.Fatal("short master key accepted")
	}
	long := filepath.Join(dir, "long")
	os.WriteFile(long, bytes.Repeat([]byte{1}, 33), 0o600)
	if _, err := LoadMasterKey(long); err == nil {
		t.Fatal("33-byte master key accepted")
	}
}

func TestKeyIDs(t *testing.T) {
	_, _, s := newStore(t)
	for _, id := range []string{"", "../x", ".hidden", "a/b", strings.Repeat("k", 129)} {
		if _, err := s.Create(id); !errors.Is(err, ErrBadKeyID) {
			t.Errorf("Create(%q) = %v", id, err)
		}
	}
}
