package block

import (
	"bytes"
	"errors"
	mrand "math/rand/v2"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

var errCrash = errors.New("crash (test)")

// crashStore models a store file under a crash: writes since the last sync
// sit in the page cache, and a crash persists any subset of them, 4 KiB
// page by page (a page is written whole or not at all); a sync persists
// them all. The flush's ops are counted, and the crash comes at op crashAt.
type crashStore struct {
	fd      int
	rng     *mrand.Rand
	pending []pendingWrite
	ops     int
	crashAt int
	crashed bool
}

type pendingWrite struct {
	b   []byte
	off int64
}

func (c *crashStore) tick() error {
	if c.crashed {
		return errCrash
	}
	c.ops++
	if c.ops == c.crashAt {
		c.crashed = true
		// Any subset of what was written since the last sync reaches the
		// disk, page by page.
		for _, w := range c.pending {
			for o := 0; o < len(w.b); {
				n := min(len(w.b)-o, SectorSize-int((w.off+int64(o))%SectorSize))
				if c.rng.IntN(2) == 0 {
					_ = pwriteFull(c.fd, w.b[o:o+n], w.off+int64(o))
				}
				o += n
			}
		}
		return errCrash
	}
	return nil
}

func (c *crashStore) write(b []byte, off int64) error {
	if err := c.tick(); err != nil {
		return err
	}
	c.pending = append(c.pending, pendingWrite{bytes.Clone(b), off})
	return nil
}

func (c *crashStore) sync() error {
	if err := c.tick(); err != nil {
		return err
	}
	for _, w := range c.pending {
		if err := pwriteFull(c.fd, w.b, w.off); err != nil {
			return err
		}
	}
	c.pending = nil
	return unix.Fdatasync(c.fd)
}

// abandon closes the store without flushing: the process died.
func (im *Image) abandon() {
	im.closeMu.Lock()
	defer im.closeMu.Unlock()
	im.closed = true
	im.f.Close()
}

// TestCrashDuringFlush: a crash at every point of a flush, with any subset
// of the unsynced writes persisted, leaves every sector reading either what
// the last completed flush made durable or what the interrupted flush was
// writing: never EIO. Repeated crashes on the same image (so recovery and
// the next writes' choice of slot are tested too).
func TestCrashDuringFlush(t *testing.T) {
	const sectors = 48
	rng := mrand.New(mrand.NewPCG(crashSeed, 7))
	path := filepath.Join(t.TempDir(), "crash.img")
	key := testKey("k", 5)
	im, err := Create(path, key, sectors*SectorSize)
	if err != nil {
		t.Fatal(err)
	}
	durable := make([][]byte, sectors)
	for i := range durable {
		durable[i] = make([]byte, SectorSize)
	}
	crashes := 0
	for round := 0; round < 300; round++ {
		// Write some sectors (runs and singles, some twice).
		pending := map[int64][]byte{}
		for w := 0; w < 1+rng.IntN(6); w++ {
			s := rng.Int64N(sectors)
			n := 1 + rng.Int64N(min(4, sectors-s))
			buf := make([]byte, n*SectorSize)
			for i := range buf {
				buf[i] = byte(rng.IntN(256))
			}
			if _, err := im.WriteAt(buf, s*SectorSize); err != nil {
				t.Fatal(err)
			}
			for i := range n {
				pending[s+i] = buf[i*SectorSize : (i+1)*SectorSize]
			}
		}
		cs := &crashStore{fd: im.fd, rng: rng, crashAt: 1 + rng.IntN(2*len(pending)+8)}
		im.store = cs
		err := im.Sync()
		im.store = nil
		if err == nil {
			for s, b := range pending {
				durable[s] = b
			}
			continue
		}
		if !errors.Is(err, errCrash) {
			t.Fatal(err)
		}
		crashes++
		// A flush that failed half-way leaves the image refusing I/O
		// until it is opened again.
		if _, err := im.ReadAt(make([]byte, 10), 0); err == nil {
			t.Fatal("read after a failed flush succeeded")
		}
		if _, err := im.WriteAt(make([]byte, 10), 0); err == nil {
			t.Fatal("write after a failed flush succeeded")
		}
		im.abandon()
		im, err = Open(path, key, false)
		if err != nil {
			t.Fatalf("round %d: reopen after a crash at op %d: %v", round, cs.crashAt, err)
		}
		for s := int64(0); s < sectors; s++ {
			got := make([]byte, SectorSize)
			if _, err := im.ReadAt(got, s*SectorSize); err != nil {
				t.Fatalf("round %d: crash at op %d: sector %d: %v", round, cs.crashAt, s, err)
			}
			switch {
			case bytes.Equal(got, durable[s]):
			case pending[s] != nil && bytes.Equal(got, pending[s]):
				durable[s] = pending[s]
			default:
				t.Fatalf("round %d: crash at op %d: sector %d reads neither its old nor its new content", round, cs.crashAt, s)
			}
		}
	}
	if crashes < 50 {
		t.Fatalf("only %d of 300 rounds crashed: the model does not reach the flush", crashes)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d crashes", crashes)
}

// crashSeed seeds TestCrashDuringFlush's writes and crash points.
var crashSeed uint64 = 7

// TestFlushPastMaxDirty: concurrent writers can hold more than MaxDirty
// sectors before one of them flushes; the flush then goes in batches and
// the log never runs into the tag table.
func TestFlushPastMaxDirty(t *testing.T) {
	const sectors = MaxDirty + 2*chunkSectors
	path := filepath.Join(t.TempDir(), "big.img")
	key := testKey("k", 6)
	im, err := Create(path, key, sectors*SectorSize)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, chunkSectors*SectorSize)
	for s := int64(0); s < sectors; s += chunkSectors {
		for i := range chunk {
			chunk[i] = byte(s/chunkSectors) ^ byte(i>>12)
		}
		// writeChunk, not WriteAt: WriteAt would flush at MaxDirty.
		if err := im.writeChunk(chunk, s*SectorSize); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(im.dirty); n != sectors {
		t.Fatalf("%d sectors held, want %d", n, sectors)
	}
	h := im.Header()
	ps := &passStore{fd: im.fd, check: func(b []byte, off int64) {
		if off < h.TagOffset() && off+int64(len(b)) > h.TagOffset() {
			t.Errorf("a write of %d bytes at %d runs from the log into the tag table (at %d)", len(b), off, h.TagOffset())
		}
	}}
	im.store = ps
	if err := im.Sync(); err != nil {
		t.Fatal(err)
	}
	if ps.syncs != 6 {
		t.Fatalf("%d syncs, want 6 (two batches of three)", ps.syncs)
	}
	im.store = nil
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(path, key, false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, chunkSectors*SectorSize)
	for s := int64(0); s < sectors; s += chunkSectors {
		if _, err := im.ReadAt(got, s*SectorSize); err != nil {
			t.Fatalf("sector %d: %v", s, err)
		}
		for i := range got {
			if got[i] != byte(s/chunkSectors)^byte(i>>12) {
				t.Fatalf("sector %d reads wrong bytes", s+int64(i)/SectorSize)
			}
		}
	}
}

// passStore writes through, checking each write.
type passStore struct {
	fd    int
	check func(b []byte, off int64)
	syncs int
}

func (p *passStore) write(b []byte, off int64) error {
	p.check(b, off)
	return pwriteFull(p.fd, b, off)
}

func (p *passStore) sync() error {
	p.syncs++
	return unix.Fdatasync(p.fd)
}

// blockingStore writes through and holds the flush's first sync until
// released.
type blockingStore struct {
	fd      int
	inFlush chan struct{}
	release chan struct{}
	once    bool
}

func (b *blockingStore) write(p []byte, off int64) error {
	return pwriteFull(b.fd, p, off)
}

func (b *blockingStore) sync() error {
	if !b.once {
		b.once = true
		close(b.inFlush)
		<-b.release
	}
	return unix.Fdatasync(b.fd)
}

// TestWriteDuringFlush: reads and writes go on while a flush syncs; a
// sector rewritten during its own flush reads its newest content at once,
// and after the next flush and a reopen.
func TestWriteDuringFlush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "during.img")
	key := testKey("k", 8)
	im, err := Create(path, key, 16*SectorSize)
	if err != nil {
		t.Fatal(err)
	}
	sector := func(v byte) []byte { return bytes.Repeat([]byte{v}, SectorSize) }
	for s := int64(0); s < 4; s++ {
		if _, err := im.WriteAt(sector(1), s*SectorSize); err != nil {
			t.Fatal(err)
		}
	}
	bs := &blockingStore{fd: im.fd, inFlush: make(chan struct{}), release: make(chan struct{})}
	im.store = bs
	done := make(chan error)
	go func() { done <- im.Sync() }()
	<-bs.inFlush
	// The flush is stuck in its first fdatasync: sector 1 (being flushed)
	// and sector 9 (not) are written and read meanwhile.
	if _, err := im.WriteAt(sector(2), 1*SectorSize); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(sector(3), 9*SectorSize); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10*SectorSize)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Join([][]byte{sector(1), sector(2), sector(1), sector(1), sector(0), sector(0), sector(0), sector(0), sector(0), sector(3)}, nil)
	if !bytes.Equal(got, want) {
		t.Fatal("reads during a flush do not see the newest writes")
	}
	close(bs.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	im.store = nil
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(path, key, false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("after reopening, the image does not hold the newest writes")
	}
}
