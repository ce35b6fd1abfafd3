package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes/block"
)

// TestVolumeBlockSealOpen: a plain image (not a multiple of 4 KiB, with
// zero runs) sealed and opened again is the same image padded with zeros;
// a flipped bit in the store makes open exit 1 naming the sector and leave
// no output; the wrong key is refused.
func TestVolumeBlockSealOpen(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, 3<<20+1000)
	_, _ = rand.Read(plain)
	clear(plain[1<<20 : 2<<20]) // a zero MiB stays unwritten
	src := filepath.Join(dir, "src.img")
	if err := os.WriteFile(src, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(dir, "store.img")
	var out bytes.Buffer
	if err := volumeCommand([]string{"seal", "--kind", "block", "--key-file", keyFile, "--key-id", "vol-dek", "--key-version", "2", src, store}, &out, &out); err != nil {
		t.Fatal(err)
	}
	wantSize := int64(3<<20 + 4096)
	if !strings.Contains(out.String(), "sizeBytes 3149824") {
		t.Fatalf("seal output: %s", out.String())
	}
	// Sealing again never replaces the store.
	if err := volumeBlockSeal([]string{"--key-file", keyFile, "--key-id", "vol-dek", src, store}, &out, &out); err == nil {
		t.Fatal("seal over an existing store succeeded")
	}
	dst := filepath.Join(dir, "dst.img")
	out.Reset()
	if err := volumeCommand([]string{"open", "--kind", "block", "--key-file", keyFile, store, dst}, &out, &out); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != wantSize || !bytes.Equal(got[:len(plain)], plain) || !blockIsZero(got[len(plain):]) {
		t.Fatalf("opened image differs (%d bytes)", len(got))
	}

	// An existing DST is never replaced.
	if err := volumeBlockOpen([]string{"--key-file", keyFile, store, dst}, &out, &out); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("open over an existing file: %v", err)
	}

	// Wrong key.
	other := filepath.Join(dir, "other")
	_ = os.WriteFile(other, make([]byte, 32), 0o600)
	if err := volumeBlockOpen([]string{"--key-file", other, store, filepath.Join(dir, "x.img")}, &out, &out); err == nil || !strings.Contains(err.Error(), "wrong key") {
		t.Fatalf("wrong key: %v", err)
	}

	// A flipped bit in sectors 7 and 600.
	im, err := block.Open(store, proxies.DataKey{ID: "vol-dek", Version: 2, Key: key}, true)
	if err != nil {
		t.Fatal(err)
	}
	h := im.Header()
	im.Close()
	f, _ := os.OpenFile(store, os.O_RDWR, 0)
	for _, s := range []int64{7, 600} {
		b := make([]byte, 1)
		at := h.DataOffset() + s*block.SectorSize + 9
		_, _ = f.ReadAt(b, at)
		b[0] ^= 1
		_, _ = f.WriteAt(b, at)
	}
	f.Close()
	bad := filepath.Join(dir, "bad.img")
	err = volumeBlockOpen([]string{"--key-file", keyFile, store, bad}, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "2 damaged sector(s): 7 (bytes 28672-32767), 600 (") {
		t.Fatalf("damaged store: %v", err)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatalf("output of a damaged store exists: %v", err)
	}
	if ents, _ := filepath.Glob(filepath.Join(dir, ".bad.img*")); len(ents) > 0 {
		t.Fatalf("left behind: %v", ents)
	}
	// The usage names the kind.
	out.Reset()
	if err := volumeCommand([]string{"-h"}, &out, &out); err != nil || !strings.Contains(out.String(), "Block volumes (--kind block") {
		t.Fatalf("volume -h: %v: %s", err, out.String())
	}
	// Usage errors.
	for _, args := range [][]string{
		{"--key-file", keyFile, src, filepath.Join(dir, "s2.img")}, // no key id
		{"--key-file", keyFile, "--key-id", "k", src},              // one file
		{"--key-id", "k", src, filepath.Join(dir, "s3.img")},       // no key file
	} {
		if err := volumeBlockSeal(args, &out, &out); err == nil {
			t.Fatalf("seal %v succeeded", args)
		}
	}
}

// TestVolumeBlockMountInterop: an ext4 image made outside (mkfs.ext4 -d)
// and sealed with `cleanwall volume seal` is served as a block volume,
// mounted (in a private mount namespace) and written; `cleanwall volume
// open` gives back a plain image in which debugfs reads the new file.
func TestVolumeBlockMountInterop(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "debugfs", "unshare"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, "needs "+tool+" (e2fsprogs, util-linux)")
		}
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	tree := filepath.Join(dir, "tree")
	_ = os.Mkdir(tree, 0o755)
	if err := os.WriteFile(filepath.Join(tree, "hello.txt"), []byte("sealed outside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", "-d", tree, src, "16M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	store := filepath.Join(dir, "store.img")
	if code := run([]string{"volume", "seal", "--kind", "block", "--key-file", keyFile, "--key-id", "vol-dek", src, store}); code != 0 {
		t.Fatalf("seal exit %d", code)
	}
	fuseDir := filepath.Join(dir, "fuse")
	_ = os.Mkdir(fuseDir, 0o700)
	v, err := block.Serve(context.Background(), block.Config{Store: store, Size: 16 << 20, Key: proxies.DataKey{ID: "vol-dek", Version: 1, Key: key}, Dir: fuseDir, Name: "interop"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	mnt := filepath.Join(dir, "mnt")
	_ = os.Mkdir(mnt, 0o700)
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-euc", `
mount -t ext4 `+v.HostPath()+` `+mnt+`
cat `+mnt+`/hello.txt
echo "written inside" > `+mnt+`/inside.txt
umount `+mnt).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sealed outside") {
		t.Fatalf("mount: %v: %s", err, out)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst.img")
	if code := run([]string{"volume", "open", "--kind", "block", "--key-file", keyFile, store, dst}); code != 0 {
		t.Fatalf("open exit %d", code)
	}
	got, err := exec.Command("debugfs", "-R", "cat /inside.txt", dst).Output()
	if err != nil || string(got) != "written inside\n" {
		t.Fatalf("debugfs: %v: %q", err, got)
	}
}
