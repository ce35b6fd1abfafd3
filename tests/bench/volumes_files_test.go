//go:build bench

package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/volumes/files"
)

// Files volume scenario (volumes-files): the encrypted file container
// (volumes/files: FUSE, AES-256-GCM per 4 KiB block, names encrypted)
// against gocryptfs (the Debian package, default settings: AES-256-GCM per
// 4 KiB block, names encrypted with EME) with both stores in the same
// directory of the same file system, in interleaved rounds. Workloads go
// through each mount's page cache as programs do; the plaintext file's
// cache is dropped (fadvise DONTNEED) before every read round, and random
// reads turn readahead off (fadvise RANDOM), so every measured read
// reaches the FUSE server. The store files sit in the host's page cache
// and nothing is fsynced: the rows are the path's CPU cost, not the disk.
const (
	filesVolFile   = 128 << 20
	filesSeqIO     = 1 << 20
	filesRandReads = 8192
	filesRandWrite = 4096
)

type filesWorkload struct {
	name   string
	target string
	check  func(*Comparison) bool
	run    func(path string, round int) (mibps float64, err error)
}

func benchVolumesFiles(t *testing.T, rep *Report) {
	ensureTools(t, map[string]string{"gocryptfs": "gocryptfs", "fusermount": "fuse3"})
	dir := t.TempDir()
	key := files.Key{ID: "bench-dek", Version: 1, Key: make([]byte, 32)}
	for i := range key.Key {
		key.Key[i] = byte(i)
	}

	// cleanwall
	ours := filepath.Join(dir, "cleanwall-mnt")
	if err := os.Mkdir(ours, 0o700); err != nil {
		t.Fatal(err)
	}
	s, err := files.OpenStore(filepath.Join(dir, "cleanwall-store"), key, true)
	if err != nil {
		t.Fatal(err)
	}
	m, err := files.Mount(context.Background(), s, ours, files.MountOptions{Name: "bench"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("closing the files volume: %v", err)
		}
	})

	// gocryptfs
	gcStore, gcMnt, pw := filepath.Join(dir, "gocryptfs-store"), filepath.Join(dir, "gocryptfs-mnt"), filepath.Join(dir, "pw")
	for _, d := range []string{gcStore, gcMnt} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(pw, []byte("bench password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gocryptfs", "-init", "-q", "-passfile", pw, gcStore).CombinedOutput(); err != nil {
		t.Fatalf("gocryptfs -init: %v: %s", err, out)
	}
	// Without -fg gocryptfs returns once the mount answers.
	if out, err := exec.Command("gocryptfs", "-q", "-passfile", pw, gcStore, gcMnt).CombinedOutput(); err != nil {
		t.Fatalf("gocryptfs mount: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", gcMnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", gcMnt, err, out)
		}
	})
	paths := map[string]string{"baseline": filepath.Join(gcMnt, "data"), "cleanwall": filepath.Join(ours, "data")}
	// Fill both once, so that random I/O finds a whole file.
	for _, p := range paths {
		if _, err := filesSeq(p, true, filesVolFile); err != nil {
			t.Fatalf("filling %s: %v", p, err)
		}
	}
	out, _ := exec.Command("gocryptfs", "-version").Output()
	rep.note("volumes-files: a %d MiB file through each mount (baseline: %s, default settings; cleanwall: volumes/files), both stores in one directory of the same file system; page cache dropped (fadvise DONTNEED) before each read round, readahead off for random reads; no fsync: the rows are the path's CPU cost; 4 KiB random I/O is one request at a time", filesVolFile>>20, firstLineOf(string(out)))

	atLeastBaseline := func(c *Comparison) bool { return c.Ratio >= 1.0 }
	workloads := []filesWorkload{
		{name: "seq write 1 MiB", target: ">=1.0x gocryptfs", check: atLeastBaseline,
			run: func(p string, _ int) (float64, error) { return filesSeq(p, true, filesVolFile) }},
		{name: "seq read 1 MiB", target: ">=1.0x gocryptfs", check: atLeastBaseline,
			run: func(p string, _ int) (float64, error) { return filesSeq(p, false, filesVolFile) }},
		{name: "rand read 4 KiB", target: ">=1.0x gocryptfs, >=20 MiB/s", check: func(c *Comparison) bool { return c.Ratio >= 1.0 && c.CleanwallMedian >= 20 },
			run: func(p string, r int) (float64, error) { return filesRand(p, false, filesRandReads, uint64(r)) }},
		{name: "rand write 4 KiB", target: ">=1.0x gocryptfs", check: atLeastBaseline,
			run: func(p string, r int) (float64, error) { return filesRand(p, true, filesRandWrite, uint64(r)) }},
	}
	for _, w := range workloads {
		c := &Comparison{Scenario: "files volume " + w.name, Unit: "MiB/s", Baseline: "gocryptfs", Cleanwall: "cleanwall", Target: w.target, Check: w.check}
		rep.addRow(c)
		for r := range rounds(5) {
			for _, side := range order(r) {
				cpu := takeCPU(0)
				v, err := w.run(paths[side], r)
				if err != nil {
					t.Fatalf("%s %s round %d: %v", w.name, side, r, err)
				}
				c.Add(r, side, v, cpu.extra(0, nil))
				t.Logf("round %d %-9s %s: %.1f MiB/s", r, side, w.name, v)
			}
		}
	}
}

func firstLineOf(s string) string {
	for i, c := range s {
		if c == '\n' {
			return s[:i]
		}
	}
	return s
}

// dropCache drops what the mount's page cache holds of the open file.
func dropCache(fd int) error { return unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED) }

// filesSeq writes (from the start, the file keeping its size) or reads
// total bytes of path in 1 MiB requests and returns MiB/s.
func filesSeq(path string, write bool, total int64) (float64, error) {
	flags := os.O_RDONLY
	if write {
		flags = os.O_WRONLY | os.O_CREATE
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fd := int(f.Fd())
	buf := make([]byte, filesSeqIO)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	if !write {
		if err := dropCache(fd); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	for off := int64(0); off < total; off += filesSeqIO {
		var n int
		if write {
			n, err = unix.Pwrite(fd, buf, off)
		} else {
			n, err = unix.Pread(fd, buf, off)
		}
		if err != nil {
			return 0, fmt.Errorf("at %d: %w", off, err)
		}
		if n != filesSeqIO {
			return 0, fmt.Errorf("at %d: short I/O %d", off, n)
		}
	}
	if write {
		// close(2) flushes to the FUSE server; count it.
		if err := f.Close(); err != nil {
			return 0, err
		}
	}
	return float64(total) / (1 << 20) / time.Since(start).Seconds(), nil
}

// filesRand does n 4 KiB requests at random aligned offsets of path
// (seeded by the round, so both sides get the same offsets) and returns
// MiB/s.
func filesRand(path string, write bool, n int, seed uint64) (float64, error) {
	flags := os.O_RDONLY
	if write {
		flags = os.O_RDWR
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fd := int(f.Fd())
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = byte(i + int(seed))
	}
	if !write {
		if err := dropCache(fd); err != nil {
			return 0, err
		}
		if err := unix.Fadvise(fd, 0, 0, unix.FADV_RANDOM); err != nil {
			return 0, err
		}
	}
	rng := rand.New(rand.NewPCG(seed, 0xf11e))
	start := time.Now()
	for i := 0; i < n; i++ {
		off := rng.Int64N(filesVolFile/4096) * 4096
		var k int
		if write {
			k, err = unix.Pwrite(fd, buf, off)
		} else {
			k, err = unix.Pread(fd, buf, off)
		}
		if err != nil {
			return 0, fmt.Errorf("at %d: %w", off, err)
		}
		if k != 4096 {
			return 0, fmt.Errorf("at %d: short I/O %d", off, k)
		}
	}
	return float64(n) * 4096 / (1 << 20) / time.Since(start).Seconds(), nil
}
