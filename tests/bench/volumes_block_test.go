//go:build bench

package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes/block"
)

// Block volume scenario (volumes-block): the encrypted block volume
// (volumes/block: loop device → FUSE → AES-256-GCM per sector → image
// file) against a plain loop device over an unencrypted image file of the
// same size in the same directory, both with 4096-byte logical blocks.
// Every workload uses O_DIRECT on the loop device, so neither loop
// device's page cache serves it; both image files sit in the host's page
// cache and the workloads never fsync, so the rows measure mostly the
// path's CPU cost. The block volume still flushes itself every 64 MiB held
// back (fdatasync of its store), so its sequential writes include the disk.
const (
	blockVolSize   = 256 << 20
	blockSeqBytes  = 128 << 20
	blockSeqIO     = 1 << 20
	blockRandReads = 8192
	blockRandWrite = 4096
)

// blockWorkload is one measured workload on a device.
type blockWorkload struct {
	name   string
	target string
	check  func(*Comparison) bool
	run    func(dev string, round int) (mibps float64, err error)
}

func benchVolumesBlock(t *testing.T, rep *Report) {
	ensureTools(t, map[string]string{"losetup": "util-linux"})
	dir := t.TempDir()
	key := proxies.DataKey{ID: "bench-dek", Version: 1, Key: make([]byte, 32)}
	for i := range key.Key {
		key.Key[i] = byte(i)
	}
	fuseDir := filepath.Join(dir, "fuse")
	if err := os.Mkdir(fuseDir, 0o700); err != nil {
		t.Fatal(err)
	}
	vol, err := block.Serve(context.Background(), block.Config{
		Store: filepath.Join(dir, "store.img"), Size: blockVolSize, Key: key, Dir: fuseDir, Name: "bench",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := vol.Close(); err != nil {
			t.Errorf("closing the block volume: %v", err)
		}
	})
	plain := filepath.Join(dir, "plain.img")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(plain, blockVolSize); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=off", plain).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	plainDev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", plainDev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", plainDev, err, out)
		}
	})
	devs := map[string]string{"baseline": plainDev, "cleanwall": vol.HostPath()}
	// Fill both once, so that no round reads holes or allocates blocks.
	for _, d := range devs {
		if _, err := seqIO(d, true, blockVolSize); err != nil {
			t.Fatalf("filling %s: %v", d, err)
		}
	}
	rep.note("volumes-block: %d MiB volume, O_DIRECT on the loop devices (baseline: losetup --sector-size 4096 --direct-io=off over a plain image; cleanwall: volumes/block, AES-256-GCM per 4 KiB sector), image files in the page cache, no fsync by the workloads: the rows are mostly the path's CPU cost, but the block volume flushes every 64 MiB held back (3 fdatasyncs of its store), so its sequential writes include the disk; 4 KiB random I/O is one request at a time", blockVolSize>>20)

	workloads := []blockWorkload{
		{name: "seq write 1 MiB", run: func(dev string, _ int) (float64, error) { return seqIO(dev, true, blockSeqBytes) }},
		{name: "seq read 1 MiB", run: func(dev string, _ int) (float64, error) { return seqIO(dev, false, blockSeqBytes) }},
		{name: "rand read 4 KiB", target: ">=20 MiB/s", check: func(c *Comparison) bool { return c.CleanwallMedian >= 20 },
			run: func(dev string, r int) (float64, error) { return randIO(dev, false, blockRandReads, uint64(r)) }},
		{name: "rand write 4 KiB", run: func(dev string, r int) (float64, error) { return randIO(dev, true, blockRandWrite, uint64(r)) }},
	}
	for _, w := range workloads {
		c := &Comparison{Scenario: "block volume " + w.name, Unit: "MiB/s", Baseline: "plain loop", Cleanwall: "cleanwall", Target: w.target, Check: w.check}
		rep.addRow(c)
		for r := range rounds(5) {
			for _, side := range order(r) {
				cpu := takeCPU(0)
				v, err := w.run(devs[side], r)
				if err != nil {
					t.Fatalf("%s %s round %d: %v", w.name, side, r, err)
				}
				c.Add(r, side, v, cpu.extra(0, nil))
				t.Logf("round %d %-9s %s: %.1f MiB/s", r, side, w.name, v)
			}
		}
	}
}

// alignedBuf is an anonymous mapping: page-aligned, as O_DIRECT wants.
func alignedBuf(n int) ([]byte, func(), error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, err
	}
	for i := range b {
		b[i] = byte(i*7 + i>>12)
	}
	return b, func() { _ = unix.Munmap(b) }, nil
}

func openDirect(dev string, write bool) (int, error) {
	flags := unix.O_RDONLY
	if write {
		flags = unix.O_WRONLY
	}
	return unix.Open(dev, flags|unix.O_DIRECT|unix.O_CLOEXEC, 0)
}

// seqIO writes or reads total bytes from the start of dev in 1 MiB
// O_DIRECT requests and returns MiB/s.
func seqIO(dev string, write bool, total int64) (float64, error) {
	fd, err := openDirect(dev, write)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	buf, free, err := alignedBuf(blockSeqIO)
	if err != nil {
		return 0, err
	}
	defer free()
	start := time.Now()
	for off := int64(0); off < total; off += blockSeqIO {
		var n int
		if write {
			n, err = unix.Pwrite(fd, buf, off)
		} else {
			n, err = unix.Pread(fd, buf, off)
		}
		if err != nil {
			return 0, fmt.Errorf("at %d: %w", off, err)
		}
		if n != blockSeqIO {
			return 0, fmt.Errorf("at %d: short I/O %d", off, n)
		}
	}
	return float64(total) / (1 << 20) / time.Since(start).Seconds(), nil
}

// randIO does n 4 KiB O_DIRECT requests at random aligned offsets (seeded
// by the round, so both sides get the same offsets) and returns MiB/s.
func randIO(dev string, write bool, n int, seed uint64) (float64, error) {
	fd, err := openDirect(dev, write)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	buf, free, err := alignedBuf(4096)
	if err != nil {
		return 0, err
	}
	defer free()
	rng := rand.New(rand.NewPCG(seed, 0xb10c))
	start := time.Now()
	for i := 0; i < n; i++ {
		off := rng.Int64N(blockVolSize/4096) * 4096
		if write {
			_, err = unix.Pwrite(fd, buf, off)
		} else {
			_, err = unix.Pread(fd, buf, off)
		}
		if err != nil {
			return 0, fmt.Errorf("at %d: %w", off, err)
		}
	}
	return float64(n) * 4096 / (1 << 20) / time.Since(start).Seconds(), nil
}
