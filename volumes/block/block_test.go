package block

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes"
)

func statBlocks(st os.FileInfo) int64 { return st.Sys().(*syscall.Stat_t).Blocks }

// requireBlock skips unless the test can mount FUSE and attach loop
// devices (root, /dev/fuse, /dev/loop-control).
func requireBlock(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			testutil.Skip(t, "needs "+p)
		}
	}
}

// testVolume is one volume for a test: its store and its FUSE directory.
type testVolume struct {
	store, dir string
	vol        policy.Volume
}

func newTestVolume(t *testing.T, size int64) *testVolume {
	t.Helper()
	d := t.TempDir()
	tv := &testVolume{store: filepath.Join(d, "store.img"), dir: filepath.Join(d, "fuse")}
	if err := os.Mkdir(tv.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	tv.vol = policy.Volume{Name: "scratch", Kind: policy.VolumeBlock, Store: tv.store, SizeBytes: size, KeyID: "vol-dek", Path: "/dev/cw-scratch"}
	return tv
}

// open serves the volume through the registry (volumes.Open), as the
// runtime does.
func (tv *testVolume) open(t *testing.T, key proxies.DataKey) (volumes.Mounted, error) {
	t.Helper()
	m, err := volumes.Open(context.Background(), volumes.Request{Volume: tv.vol, Key: key, Dir: tv.dir, Logger: testutil.Logger(t)})
	if err == nil {
		t.Cleanup(func() { _ = m.Close() })
	}
	return m, err
}

// attachedTo lists the loop devices whose backing file is under dir.
func attachedTo(dir string) []string {
	var out []string
	devs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range devs {
		b, err := os.ReadFile(p)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			out = append(out, p)
		}
	}
	return out
}

// mounted reports whether dir is a mount point (in this namespace).
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// wantGone checks that nothing of the volume is left: no loop device on
// its FUSE file, no mount at its directory, the directory empty, and the
// store unlocked (it opens again).
func (tv *testVolume) wantGone(t *testing.T, key proxies.DataKey) {
	t.Helper()
	if a := attachedTo(tv.dir); len(a) > 0 {
		t.Fatalf("still attached: %v", a)
	}
	if mounted(t, tv.dir) {
		t.Fatalf("%s is still mounted", tv.dir)
	}
	if ents, err := os.ReadDir(tv.dir); err != nil || len(ents) > 0 {
		t.Fatalf("%s: %v %v", tv.dir, ents, err)
	}
	if _, err := os.Stat(tv.store); err == nil {
		im, err := Open(tv.store, key, false)
		if err != nil && !strings.Contains(err.Error(), "sealed with key") && !errors.Is(err, ErrWrongKey) {
			t.Fatalf("store after close: %v", err)
		}
		if im != nil {
			im.Close()
		}
	}
}

// inMountNS runs a shell script in a private mount namespace of its own, so
// that what it mounts never shows on the host and goes away with it.
func inMountNS(t *testing.T, script string) string {
	t.Helper()
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-euc", script).CombinedOutput()
	if err != nil {
		t.Fatalf("%s\n%v: %s", script, err, out)
	}
	return string(out)
}

const canary = "CANARY-blockvol-6d1e0b"

// TestExt4RoundTrip: a new volume gets mkfs.ext4, a mount, files written;
// everything is detached; the volume is served again with the same key and
// the files read back. The store never holds the canary.
func TestExt4RoundTrip(t *testing.T) {
	requireBlock(t)
	for _, tool := range []string{"mkfs.ext4", "unshare", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, "needs "+tool+" (e2fsprogs, util-linux)")
		}
	}
	key := testKey("vol-dek", 7)
	tv := newTestVolume(t, 256<<20)
	m, err := tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	dev := m.HostPath()
	maj, min, ok := m.Device()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil || !ok || st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != maj || unix.Minor(st.Rdev) != min {
		t.Fatalf("%s: Device() %d:%d %v, stat %v %+v", dev, maj, min, ok, err, st)
	}
	// The loop device's block size is the sector size.
	if b, _ := exec.Command("blockdev", "--getss", dev).Output(); strings.TrimSpace(string(b)) != "4096" {
		t.Fatalf("logical block size %q, want 4096", b)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	inMountNS(t, `
mount -t ext4 `+dev+` `+mnt+`
i=0; while [ $i -lt 200 ]; do echo "`+canary+` $i" > `+mnt+`/f$i; i=$((i+1)); done
head -c 20000000 /dev/urandom > `+mnt+`/big
sha256sum `+mnt+`/big | cut -d' ' -f1 > `+mnt+`/big.sum
sync
umount `+mnt)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	tv.wantGone(t, key)
	store, err := os.ReadFile(tv.store)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(store, []byte("CANARY")) {
		t.Fatal("the store holds the plaintext canary")
	}

	m, err = tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	out := inMountNS(t, `
mount -t ext4 -o ro `+m.HostPath()+` `+mnt+`
cat `+mnt+`/f0 `+mnt+`/f199
[ "$(sha256sum `+mnt+`/big | cut -d' ' -f1)" = "$(cat `+mnt+`/big.sum)" ] && echo BIG-OK
umount `+mnt)
	for _, want := range []string{canary + " 0", canary + " 199", "BIG-OK"} {
		if !strings.Contains(out, want) {
			t.Fatalf("after re-attach: %q lacks %q", out, want)
		}
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	tv.wantGone(t, key)
}

// TestDamagedSectorEIO: a bit flipped in the store makes that sector, and
// only it, read as EIO through the loop device (O_DIRECT) and the FUSE
// file.
func TestDamagedSectorEIO(t *testing.T) {
	requireBlock(t)
	key := testKey("vol-dek", 7)
	tv := newTestVolume(t, 1<<20)
	m, err := tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	if err := directIO(m.HostPath(), data, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	im, err := Open(tv.store, key, true)
	if err != nil {
		t.Fatal(err)
	}
	hdr := im.Header()
	dataOff := hdr.DataOffset()
	im.Close()
	flipBit(t, tv.store, dataOff+5*SectorSize+77)

	m, err = tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, SectorSize)
	if err := directIO(m.HostPath(), got, 4*SectorSize, false); err != nil || !bytes.Equal(got, data[4*SectorSize:5*SectorSize]) {
		t.Fatalf("sector 4: %v", err)
	}
	for i := range got {
		got[i] = 0
	}
	if err := directIO(m.HostPath(), got, 5*SectorSize, false); !errors.Is(err, unix.EIO) {
		t.Fatalf("damaged sector 5 through the loop device: %v, want EIO", err)
	}
	if !allZero(got) {
		t.Fatal("the failed read filled the buffer")
	}
	out, err := exec.Command("dd", "if="+m.HostPath(), "of=/dev/null", "bs=4096", "skip=5", "count=1", "iflag=direct").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Input/output error") {
		t.Fatalf("dd of the damaged sector: %v: %s", err, out)
	}
	// Through the FUSE file too.
	disk := filepath.Join(tv.dir, DiskName)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(got, 5*SectorSize+100)
	f.Close()
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("damaged sector through %s: %v", disk, err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	tv.wantGone(t, key)
}

// directIO reads or writes b at off on path with O_DIRECT (b is copied
// into an aligned buffer).
func directIO(path string, b []byte, off int64, write bool) error {
	flags := unix.O_RDONLY
	if write {
		flags = unix.O_WRONLY
	}
	fd, err := unix.Open(path, flags|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, len(b), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	if write {
		copy(buf, b)
		_, err = unix.Pwrite(fd, buf, off)
		if err == nil {
			err = unix.Fsync(fd)
		}
		return err
	}
	n, err := unix.Pread(fd, buf, off)
	if err == nil {
		copy(b, buf[:n])
	}
	return err
}

// TestRefusedNothingAttached: a wrong key, a wrong key id and a size
// mismatch are refused with a clear error and leave nothing mounted or
// attached; so does a failure after the FUSE mount (the loop attach).
func TestRefusedNothingAttached(t *testing.T) {
	requireBlock(t)
	key := testKey("vol-dek", 7)
	tv := newTestVolume(t, 1<<20)
	m, err := tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		key  proxies.DataKey
		size int64
		want string
	}{
		{"wrong key", testKey("vol-dek", 8), 1 << 20, "wrong key"},
		{"wrong key id", testKey("other", 7), 1 << 20, "sealed with key"},
		{"size", key, 2 << 20, "sizeBytes is 2097152"},
	} {
		tv.vol.SizeBytes = c.size
		_, err := tv.open(t, c.key)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "volume scratch") {
			t.Fatalf("%s: %v", c.name, err)
		}
		tv.wantGone(t, key)
	}
	tv.vol.SizeBytes = 1 << 20
	attach = func(*os.File, string, loopOptions) (*loopDev, error) {
		return nil, errors.New("injected attach failure")
	}
	_, err = tv.open(t, key)
	attach = attachLoop
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("injected failure: %v", err)
	}
	tv.wantGone(t, key)
}

// TestReadOnly: a read-only volume attaches a read-only device, and writes
// to it fail; the store is unchanged.
func TestReadOnly(t *testing.T) {
	requireBlock(t)
	key := testKey("vol-dek", 7)
	tv := newTestVolume(t, 1<<20)
	m, err := tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x5a}, 1<<20)
	if err := directIO(m.HostPath(), data, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(tv.store)
	tv.vol.ReadOnly = true
	m, err = tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	n := strings.TrimPrefix(m.HostPath(), "/dev/")
	if b, _ := os.ReadFile("/sys/block/" + n + "/ro"); strings.TrimSpace(string(b)) != "1" {
		t.Fatalf("%s is not read-only: %q", n, b)
	}
	got := make([]byte, 1<<20)
	if err := directIO(m.HostPath(), got, 0, false); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read-only read: %v", err)
	}
	if err := directIO(m.HostPath(), data[:SectorSize], 0, true); err == nil {
		t.Fatal("write to a read-only volume succeeded")
	}
	if f, err := os.OpenFile(filepath.Join(tv.dir, DiskName), os.O_RDWR, 0); err == nil {
		f.Close()
		t.Fatal("the FUSE file of a read-only volume opens for writing")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(tv.store)
	if !bytes.Equal(before, after) {
		t.Fatal("a read-only volume changed its store")
	}
	tv.wantGone(t, key)
}

// TestCloseWhileInUse: while something holds the device open, Close says
// so and keeps serving (the holder's I/O still works); once the holder
// lets go, the volume closes itself (nothing left) and Close returns nil.
func TestCloseWhileInUse(t *testing.T) {
	requireBlock(t)
	key := testKey("vol-dek", 7)
	tv := newTestVolume(t, 1<<20)
	m, err := tv.open(t, key)
	if err != nil {
		t.Fatal(err)
	}
	detachTimeout = 300 * time.Millisecond
	defer func() { detachTimeout = 5 * time.Second }()
	holder, err := os.OpenFile(m.HostPath(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		err = m.Close()
		if err == nil || !strings.Contains(err.Error(), "still attached") {
			holder.Close()
			t.Fatalf("Close %d while in use: %v", i, err)
		}
	}
	if _, err := holder.WriteAt(make([]byte, SectorSize), 0); err != nil {
		t.Fatalf("I/O after a refused Close: %v", err)
	}
	if err := holder.Sync(); err != nil {
		t.Fatal(err)
	}
	holder.Close()
	// The volume closes itself once the device is free.
	deadline := time.Now().Add(10 * time.Second)
	for mounted(t, tv.dir) {
		if time.Now().After(deadline) {
			t.Fatal("the volume did not close itself after its device was released")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	tv.wantGone(t, key)
}
