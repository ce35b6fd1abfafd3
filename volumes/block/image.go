package block

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/proxies"
)

// ErrDamaged matches every DamagedError.
var ErrDamaged = errors.New("damaged sector")

// DamagedError is a sector whose tag does not verify (or whose stored bytes
// are missing): its plaintext is never returned.
type DamagedError struct {
	Sector int64
	Reason string
}

func (e *DamagedError) Error() string {
	return fmt.Sprintf("sector %d (bytes %d-%d) damaged: %s", e.Sector, e.Sector*SectorSize, (e.Sector+1)*SectorSize-1, e.Reason)
}

// Is makes errors.Is(err, ErrDamaged) true.
func (e *DamagedError) Is(target error) bool { return target == ErrDamaged }

const (
	// chunkSectors bounds one pread/pwrite batch (1 MiB of data; also under
	// IOV_MAX iovecs).
	chunkSectors = 256
	// stripeSectors sectors share a lock stripe; there are 64 stripes, so a
	// request's stripes fit a uint64 bitmask and are taken in ascending
	// order (no deadlock between requests).
	stripeSectors = 32
	stripes       = 64

	stride = SectorSize + tagSize // a sector's ciphertext followed by its tag, in memory
)

// Image is an open encrypted block image. Its ReadAt and WriteAt take
// any offset and length within Size (partial sectors are read, modified
// and rewritten) and are safe for concurrent use: requests touching the
// same sectors are serialised, so a reader never sees a tag of one write
// and data of another.
//
// Written sectors are held back in memory (sealed) until Sync, Close, or
// MaxDirty of them: a flush then writes the new slots (and a log of the
// sectors) first, makes them durable, and only then the data, so that after
// a crash at any point each sector still verifies against one of its two
// slots (docs/volumes-block.md, "Crashes").
type Image struct {
	f        *os.File
	fd       int
	hdr      Header
	aead     cipher.AEAD
	readOnly bool
	locks    [stripes]sync.RWMutex
	bufs     sync.Pool

	// dirty holds the sectors written since the last flush began;
	// flushing, those a flush is writing out (read-only while it runs).
	// Both maps are read and replaced under dirtyMu; a record in dirty is
	// changed only under its sector's stripe.
	dirtyMu  sync.Mutex
	dirty    map[int64]*dirtySector
	flushing map[int64]*dirtySector
	// flushMu serialises flushes.
	flushMu sync.Mutex
	// failed is set when a flush failed half-way: what is on the disk is
	// then not what the held sectors' slots assume, so every later read,
	// write and flush fails until the image is opened again (and
	// recovered from its flush log).
	failed error

	// store, if set (tests), takes the flush's writes and syncs instead of
	// the file, to model what a crash leaves behind.
	store storeHook

	closeMu sync.Mutex
	closed  bool
}

// dirtySector is a written sector not yet flushed: its entry as it will be
// stored (the new slot filled in, the other as on the store) and its
// ciphertext followed by the tag.
type dirtySector struct {
	entry [EntrySize]byte
	slot  int // 0 or 1: the slot this write fills
	ct    [stride]byte
}

// storeHook replaces the flush's writes and syncs in tests.
type storeHook interface {
	write(b []byte, off int64) error
	sync() error
}

// Header returns the image's header.
func (im *Image) Header() Header { return im.hdr }

// Size is the image's data size in bytes.
func (im *Image) Size() int64 { return im.hdr.Size }

// ReadOnly reports whether the image was opened read-only.
func (im *Image) ReadOnly() bool { return im.readOnly }

// Create makes a new image at path of size bytes, sealed with key. It never
// replaces an existing file: the image is written under a temporary name
// and linked into place. The data area is sparse (unwritten sectors read
// as zeros).
func Create(path string, key proxies.DataKey, size int64) (*Image, error) {
	if err := checkSize(size); err != nil {
		return nil, err
	}
	h := Header{Cipher: CipherAES256GCM, Size: size, KeyID: key.ID, KeyVersion: uint32(key.Version)}
	if _, err := rand.Read(h.ImageID[:]); err != nil {
		return nil, err
	}
	macKey, _, err := deriveKeys(key.Key, h.ImageID)
	if err != nil {
		return nil, err
	}
	hb, err := h.Marshal(macKey)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".new-*")
	if err != nil {
		return nil, err
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName)
	err = func() error {
		defer tmp.Close()
		if err := tmp.Chmod(0o600); err != nil {
			return err
		}
		if _, err := tmp.WriteAt(hb, 0); err != nil {
			return err
		}
		if err := tmp.Truncate(h.FileSize()); err != nil {
			return err
		}
		return tmp.Sync()
	}()
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", path, err)
	}
	if err := os.Link(tmpName, path); err != nil {
		return nil, fmt.Errorf("creating %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return Open(path, key, false)
}

// Open opens an existing image sealed with key. It checks the header's key
// id, key version (when both are set) and MAC, and that the file has the
// length the header implies. The store is locked (flock, exclusive unless
// readOnly) so that no second server uses it at the same time.
func Open(path string, key proxies.DataKey, readOnly bool) (*Image, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	im, err := open(f, key, readOnly)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return im, nil
}

func open(f *os.File, key proxies.DataKey, readOnly bool) (*Image, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file (%s)", st.Mode().Type())
	}
	lock := unix.LOCK_EX
	if readOnly {
		lock = unix.LOCK_SH
	}
	if err := unix.Flock(int(f.Fd()), lock|unix.LOCK_NB); err != nil {
		return nil, fmt.Errorf("image is in use by another server (flock: %w)", err)
	}
	hb := make([]byte, HeaderSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		return nil, fmt.Errorf("reading header: %w", err)
	}
	h, err := ParseHeader(hb)
	if err != nil {
		return nil, err
	}
	if h.KeyID != key.ID {
		return nil, fmt.Errorf("image is sealed with key %q, not %q", h.KeyID, key.ID)
	}
	if h.KeyVersion != 0 && key.Version != 0 && h.KeyVersion != uint32(key.Version) {
		return nil, fmt.Errorf("image is sealed with key %s version %d, not version %d", h.KeyID, h.KeyVersion, key.Version)
	}
	macKey, sectorKey, err := deriveKeys(key.Key, h.ImageID)
	if err != nil {
		return nil, err
	}
	if err := VerifyHeader(hb, macKey); err != nil {
		return nil, fmt.Errorf("key %s: %w", key.ID, err)
	}
	if st.Size() != h.FileSize() {
		return nil, fmt.Errorf("image file is %d bytes, its header says %d (truncated or extended)", st.Size(), h.FileSize())
	}
	block, err := aes.NewCipher(sectorKey)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	im := &Image{f: f, fd: int(f.Fd()), hdr: *h, aead: aead, readOnly: readOnly, dirty: map[int64]*dirtySector{}}
	im.bufs.New = func() any {
		b := make([]byte, chunkSectors*stride+chunkSectors*EntrySize)
		return &b
	}
	if !readOnly {
		if err := im.recover(); err != nil {
			return nil, err
		}
	}
	return im, nil
}

// Close flushes what was written and closes the store file. It is
// idempotent.
func (im *Image) Close() error {
	im.closeMu.Lock()
	defer im.closeMu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	err := im.Sync()
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Sync flushes written sectors and their tags to stable storage: every
// write that returned before Sync was called is durable when it returns.
// Reads and writes go on while it writes and syncs.
func (im *Image) Sync() error {
	if im.readOnly {
		return nil
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	if err := im.failure(); err != nil {
		return err
	}
	// Take the dirty set over while no write is half-way through it.
	unlock := im.lock(0, im.hdr.Sectors()-1, true)
	im.dirtyMu.Lock()
	fl := im.dirty
	im.dirty, im.flushing = map[int64]*dirtySector{}, fl
	im.dirtyMu.Unlock()
	unlock()
	err := im.flush(fl)
	im.dirtyMu.Lock()
	im.flushing = nil
	if err != nil {
		im.failed = fmt.Errorf("an earlier flush failed (%w): reopen the image", err)
	}
	im.dirtyMu.Unlock()
	return err
}

// failure is the error of a flush that failed half-way, if any.
func (im *Image) failure() error {
	im.dirtyMu.Lock()
	defer im.dirtyMu.Unlock()
	return im.failed
}

// lock takes the stripes of sectors [first, last] in ascending order and
// returns the function that releases them.
func (im *Image) lock(first, last int64, write bool) func() {
	var mask uint64
	if last-first+1 >= stripes*stripeSectors {
		mask = ^uint64(0)
	} else {
		for g := first / stripeSectors; g <= last/stripeSectors; g++ {
			mask |= 1 << (g % stripes)
		}
	}
	for m := mask; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		if write {
			im.locks[i].Lock()
		} else {
			im.locks[i].RLock()
		}
	}
	return func() {
		for m := mask; m != 0; m &= m - 1 {
			i := bits.TrailingZeros64(m)
			if write {
				im.locks[i].Unlock()
			} else {
				im.locks[i].RUnlock()
			}
		}
	}
}

// aad binds a sealed sector to its number and its slot's counter.
func aad(sector int64, counter uint32) []byte {
	var b [12]byte
	binary.LittleEndian.PutUint64(b[:], uint64(sector))
	binary.LittleEndian.PutUint32(b[8:], counter)
	return b[:]
}

func slotCounter(slot []byte) uint32 {
	return binary.LittleEndian.Uint32(slot[nonceSize+tagSize:])
}

// ReadAt reads len(p) bytes at off. It returns io.EOF at or past the end,
// and a *DamagedError (errors.Is ErrDamaged) for the first sector whose tag
// does not verify; no byte of a damaged sector is ever returned.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	if off >= im.hdr.Size {
		return 0, io.EOF
	}
	end := off + int64(len(p))
	var err error
	if end > im.hdr.Size {
		end, err = im.hdr.Size, io.EOF
	}
	if end == off {
		return 0, err
	}
	first, last := off/SectorSize, (end-1)/SectorSize
	unlock := im.lock(first, last, false)
	defer unlock()
	if ferr := im.failure(); ferr != nil {
		return 0, ferr
	}
	if rerr := im.readSectors(first, last, off, p[:end-off]); rerr != nil {
		return 0, rerr
	}
	return int(end - off), err
}

// readSectors decrypts sectors [first, last] (those written and not yet
// flushed from memory) and copies the bytes of [off, off+len(p)) into p.
// The caller holds the sectors' locks.
func (im *Image) readSectors(first, last, off int64, p []byte) error {
	bp := im.bufs.Get().(*[]byte)
	defer im.bufs.Put(bp)
	buf := *bp
	for s := first; s <= last; s += chunkSectors {
		n := min(int64(chunkSectors), last-s+1)
		ents := buf[chunkSectors*stride : chunkSectors*stride+n*EntrySize]
		if err := im.preadFull(ents, im.hdr.TagOffset()+s*EntrySize, s); err != nil {
			return err
		}
		iov := make([][]byte, n)
		for i := range n {
			iov[i] = buf[i*stride : i*stride+SectorSize]
		}
		if err := im.preadv(iov, im.hdr.DataOffset()+s*SectorSize, s); err != nil {
			return err
		}
		im.dirtyMu.Lock()
		if len(im.dirty) > 0 || len(im.flushing) > 0 {
			for i := range n {
				d := im.dirty[s+i]
				if d == nil {
					d = im.flushing[s+i]
				}
				if d != nil {
					copy(ents[i*EntrySize:], d.entry[:])
					copy(buf[i*stride:], d.ct[:SectorSize])
				}
			}
		}
		im.dirtyMu.Unlock()
		err := inParallel(n, func(lo, hi int64) error {
			for i := lo; i < hi; i++ {
				if err := im.openSector(s+i, ents[i*EntrySize:(i+1)*EntrySize], buf[i*stride:(i+1)*stride], off, p); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// slotOrder returns the order in which to try the entry's slots: the
// non-empty ones, the higher counter first, then the empty ones. An empty
// slot stands for the sector before its first write: all zeros.
func slotOrder(entry []byte) []int {
	a, b := entry[:SlotSize], entry[SlotSize:]
	switch za, zb := allZero(a), allZero(b); {
	case za && zb:
		return nil
	case zb:
		return []int{0, 1}
	case za:
		return []int{1, 0}
	case slotCounter(b) > slotCounter(a):
		return []int{1, 0}
	}
	return []int{0, 1}
}

// verify opens ct (ciphertext, room for the tag after it) of sector sec
// under one slot into dst (len SectorSize, not overlapping ct).
func (im *Image) verify(sec int64, slot, ct, dst []byte) bool {
	copy(ct[SectorSize:], slot[nonceSize:nonceSize+tagSize])
	_, err := im.aead.Open(dst[:0], slot[:nonceSize], ct, aad(sec, slotCounter(slot)))
	return err == nil
}

// openSector verifies and decrypts sector sec (entry, ciphertext in
// ct[:SectorSize] with room for the tag after it) against the slot written
// last, or else the other one, and copies the part of it inside [off,
// off+len(p)) into p.
func (im *Image) openSector(sec int64, entry, ct []byte, off int64, p []byte) error {
	secOff := sec * SectorSize
	lo, hi := max(secOff, off), min(secOff+SectorSize, off+int64(len(p)))
	dst := p[lo-off : hi-off]
	order := slotOrder(entry)
	if order == nil {
		// Never written: the data must be a hole too.
		if !allZero(ct[:SectorSize]) {
			return &DamagedError{Sector: sec, Reason: "data without a tag"}
		}
		clear(dst)
		return nil
	}
	whole := lo == secOff && hi == secOff+SectorSize
	var tmp []byte
	if !whole {
		tmp = make([]byte, SectorSize)
	}
	for _, k := range order {
		slot := entry[k*SlotSize : (k+1)*SlotSize]
		if allZero(slot) {
			// The sector as it was before its first write, if its
			// first flush did not get as far as the data.
			if allZero(ct[:SectorSize]) {
				clear(dst)
				return nil
			}
			continue
		}
		if whole {
			if im.verify(sec, slot, ct, dst) {
				return nil
			}
			continue
		}
		if im.verify(sec, slot, ct, tmp) {
			copy(dst, tmp[lo-secOff:hi-secOff])
			return nil
		}
	}
	if whole {
		clear(dst)
	}
	return &DamagedError{Sector: sec, Reason: "tag does not verify"}
}

// parallelMin is the batch size from which the sectors' crypto is split
// over the CPUs: a loop device sends one request at a time, so a large
// request would otherwise use one core.
const parallelMin = 64

// inParallel runs fn over [0, n) split into up to GOMAXPROCS ranges when n
// is large, and returns the error of the lowest range that failed.
func inParallel(n int64, fn func(lo, hi int64) error) error {
	parts := min(int64(runtime.GOMAXPROCS(0)), n/(parallelMin/2))
	if n < parallelMin || parts < 2 {
		return fn(0, n)
	}
	errs := make([]error, parts)
	var wg sync.WaitGroup
	for k := range parts {
		lo, hi := n*k/parts, n*(k+1)/parts
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = fn(lo, hi)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// WriteAt writes p at off; the range must lie inside the image. Partial
// sectors at either end are read (verified), modified and resealed. The
// sectors are held in memory until the next flush.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, errors.New("image is read-only")
	}
	if off < 0 || off+int64(len(p)) > im.hdr.Size || off+int64(len(p)) < off {
		return 0, fmt.Errorf("write of %d bytes at %d outside the image (%d bytes): %w", len(p), off, im.hdr.Size, unix.ENOSPC)
	}
	done := 0
	for done < len(p) {
		// Up to chunkSectors sectors at a time, so that the held-back
		// sectors never outgrow the flush log.
		at := off + int64(done)
		n := min(len(p)-done, int((at/SectorSize+chunkSectors)*SectorSize-at))
		if err := im.writeChunk(p[done:done+n], at); err != nil {
			return done, err
		}
		done += n
		im.dirtyMu.Lock()
		full := len(im.dirty) > MaxDirty-chunkSectors
		im.dirtyMu.Unlock()
		if full {
			if err := im.Sync(); err != nil {
				return done, err
			}
		}
	}
	return done, nil
}

// writeChunk seals p (at most chunkSectors sectors) into the dirty set.
func (im *Image) writeChunk(p []byte, off int64) error {
	end := off + int64(len(p))
	first, last := off/SectorSize, (end-1)/SectorSize
	unlock := im.lock(first, last, true)
	defer unlock()
	if err := im.failure(); err != nil {
		return err
	}
	// Partial head or tail: build whole sectors first.
	var head, tail []byte
	if off%SectorSize != 0 || (first == last && end%SectorSize != 0) {
		head = make([]byte, SectorSize)
		if err := im.readSectors(first, first, first*SectorSize, head); err != nil {
			return err
		}
	}
	if end%SectorSize != 0 && last != first {
		tail = make([]byte, SectorSize)
		if err := im.readSectors(last, last, last*SectorSize, tail); err != nil {
			return err
		}
	}
	if head != nil {
		copy(head[off-first*SectorSize:], p)
	}
	if tail != nil {
		copy(tail, p[last*SectorSize-off:])
	}
	plain := func(sec int64) []byte {
		switch {
		case sec == first && head != nil:
			return head
		case sec == last && tail != nil:
			return tail
		}
		o := sec*SectorSize - off
		return p[o : o+SectorSize]
	}
	n := last - first + 1
	recs := make([]*dirtySector, n)
	flushing := make([]*dirtySector, n)
	var stored []byte // the store's entries, read once if a sector is new to the dirty set
	im.dirtyMu.Lock()
	for i := range n {
		recs[i] = im.dirty[first+i]
		flushing[i] = im.flushing[first+i]
	}
	im.dirtyMu.Unlock()
	fresh := make([]bool, n)
	for i := range n {
		if recs[i] != nil {
			continue
		}
		d := &dirtySector{}
		switch {
		case flushing[i] != nil:
			// Being flushed: its entry is what the store will hold.
			copy(d.entry[:], flushing[i].entry[:])
		default:
			if stored == nil {
				stored = make([]byte, n*EntrySize)
				if err := im.preadFull(stored, im.hdr.TagOffset()+first*EntrySize, first); err != nil {
					return err
				}
			}
			copy(d.entry[:], stored[i*EntrySize:(i+1)*EntrySize])
		}
		// Overwrite the slot written earlier (lower counter, or empty);
		// the other one still matches the data on the store until the
		// flush has made the new slot durable.
		a, b := d.entry[:SlotSize], d.entry[SlotSize:]
		ca, cb := slotCounter(a), slotCounter(b)
		if allZero(a) {
			ca = 0
		}
		if allZero(b) {
			cb = 0
		}
		if cb < ca {
			d.slot = 1
		}
		c := max(ca, cb) + 1
		if c == 0 {
			c = 1
		}
		slot := d.entry[d.slot*SlotSize : (d.slot+1)*SlotSize]
		clear(slot)
		binary.LittleEndian.PutUint32(slot[nonceSize+tagSize:], c)
		recs[i], fresh[i] = d, true
	}
	nonces := make([]byte, n*nonceSize)
	if _, err := rand.Read(nonces); err != nil {
		return err
	}
	_ = inParallel(n, func(lo, hi int64) error {
		for i := lo; i < hi; i++ {
			d := recs[i]
			slot := d.entry[d.slot*SlotSize : (d.slot+1)*SlotSize]
			copy(slot[:nonceSize], nonces[i*nonceSize:])
			out := im.aead.Seal(d.ct[:0], slot[:nonceSize], plain(first+i), aad(first+i, slotCounter(slot)))
			copy(slot[nonceSize:nonceSize+tagSize], out[SectorSize:])
		}
		return nil
	})
	im.dirtyMu.Lock()
	for i := range n {
		if fresh[i] {
			im.dirty[first+i] = recs[i]
		}
	}
	im.dirtyMu.Unlock()
	return nil
}

// flush makes the dirty sectors durable, in an order that a crash at any
// point cannot turn into a sector that verifies against neither slot:
//
//  1. the flush log (which sectors), then fdatasync;
//  2. the new entries, then fdatasync;
//  3. the data, then fdatasync;
//  4. the log cleared (made durable by the next flush; a stale log only
//     makes the next open check those sectors again).
//
// Each entry keeps the slot that matches the data on the disk and gets the
// new one in its other slot, so until step 3 is durable the old data still
// verifies, and after it the new data does.
//
// fl is the taken-over dirty set; the caller holds flushMu.
func (im *Image) flush(fl map[int64]*dirtySector) error {
	secs := make([]int64, 0, len(fl))
	for s := range fl {
		secs = append(secs, s)
	}
	if len(secs) == 0 {
		return nil
	}
	slices.Sort(secs)
	// Concurrent writers can push the set a little past MaxDirty before
	// one of them flushes: the log has room for MaxDirty, so flush in
	// batches of at most that.
	for len(secs) > 0 {
		batch := secs[:min(len(secs), MaxDirty)]
		if err := im.flushBatch(fl, batch); err != nil {
			return err
		}
		secs = secs[len(batch):]
	}
	return nil
}

// flushBatch runs the flush protocol for secs (sorted, at most MaxDirty)
// of fl.
func (im *Image) flushBatch(fl map[int64]*dirtySector, secs []int64) error {
	log := make([]byte, 8+8*len(secs))
	binary.LittleEndian.PutUint64(log, uint64(len(secs)))
	for i, s := range secs {
		binary.LittleEndian.PutUint64(log[8+8*i:], uint64(s))
	}
	if err := im.write(log, im.hdr.LogOffset()); err != nil {
		return err
	}
	// The log must be durable before any entry is: an entry on the disk
	// that the log does not list would escape recovery.
	if err := im.datasync(); err != nil {
		return err
	}
	// Runs of consecutive sectors: one write of entries, one of data.
	runs := func(fn func(run []int64) error) error {
		for i := 0; i < len(secs); {
			j := i + 1
			for j < len(secs) && secs[j] == secs[j-1]+1 && j-i < chunkSectors {
				j++
			}
			if err := fn(secs[i:j]); err != nil {
				return err
			}
			i = j
		}
		return nil
	}
	ents := make([]byte, chunkSectors*EntrySize)
	err := runs(func(run []int64) error {
		for i, s := range run {
			copy(ents[i*EntrySize:], fl[s].entry[:])
		}
		return im.write(ents[:len(run)*EntrySize], im.hdr.TagOffset()+run[0]*EntrySize)
	})
	if err != nil {
		return err
	}
	if err := im.datasync(); err != nil {
		return err
	}
	err = runs(func(run []int64) error {
		iov := make([][]byte, len(run))
		for i, s := range run {
			iov[i] = fl[s].ct[:SectorSize]
		}
		return im.writev(iov, im.hdr.DataOffset()+run[0]*SectorSize)
	})
	if err != nil {
		return err
	}
	if err := im.datasync(); err != nil {
		return err
	}
	return im.write(make([]byte, 8), im.hdr.LogOffset())
}

// recover finishes a flush that a crash interrupted: for each sector in the
// flush log, the slot that matches the stored data is kept and the other
// one cleared, so that the next write of the sector overwrites the stale
// slot, not the one its data needs. A sector that matches neither is left
// as it is (it reads as damaged).
func (im *Image) recover() error {
	var cnt [8]byte
	if err := im.preadFull(cnt[:], im.hdr.LogOffset(), 0); err != nil {
		return err
	}
	n := binary.LittleEndian.Uint64(cnt[:])
	if n == 0 {
		return nil
	}
	if n > MaxDirty {
		return fmt.Errorf("flush log lists %d sectors, at most %d fit: damaged", n, MaxDirty)
	}
	log := make([]byte, 8*n)
	if err := im.preadFull(log, im.hdr.LogOffset()+8, 0); err != nil {
		return err
	}
	entry := make([]byte, EntrySize)
	ct := make([]byte, stride)
	pt := make([]byte, SectorSize)
	for i := range n {
		s := int64(binary.LittleEndian.Uint64(log[8*i:]))
		if s < 0 || s >= im.hdr.Sectors() {
			return fmt.Errorf("flush log lists sector %d of %d: damaged", s, im.hdr.Sectors())
		}
		if err := im.preadFull(entry, im.hdr.TagOffset()+s*EntrySize, s); err != nil {
			return err
		}
		if err := im.preadFull(ct[:SectorSize], im.hdr.DataOffset()+s*SectorSize, s); err != nil {
			return err
		}
		for _, k := range slotOrder(entry) {
			slot := entry[k*SlotSize : (k+1)*SlotSize]
			if allZero(slot) && allZero(ct[:SectorSize]) || !allZero(slot) && im.verify(s, slot, ct, pt) {
				other := entry[(1-k)*SlotSize : (2-k)*SlotSize]
				if !allZero(other) {
					clear(other)
					if err := pwriteFull(im.fd, entry, im.hdr.TagOffset()+s*EntrySize); err != nil {
						return err
					}
				}
				break
			}
		}
	}
	if err := pwriteFull(im.fd, make([]byte, 8), im.hdr.LogOffset()); err != nil {
		return err
	}
	return unix.Fdatasync(im.fd)
}

// write, writev and datasync are the flush's I/O (or a test's model of it).
func (im *Image) write(b []byte, off int64) error {
	if im.store != nil {
		return im.store.write(b, off)
	}
	return pwriteFull(im.fd, b, off)
}

func (im *Image) writev(iov [][]byte, off int64) error {
	if im.store != nil {
		for _, b := range iov {
			if err := im.store.write(b, off); err != nil {
				return err
			}
			off += int64(len(b))
		}
		return nil
	}
	return im.pwritev(iov, off)
}

func (im *Image) datasync() error {
	if im.store != nil {
		return im.store.sync()
	}
	return unix.Fdatasync(im.fd)
}

func (im *Image) preadFull(b []byte, off int64, sector int64) error {
	for len(b) > 0 {
		n, err := unix.Pread(im.fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return &DamagedError{Sector: sector, Reason: "store file ends early"}
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func (im *Image) preadv(iov [][]byte, off int64, sector int64) error {
	for len(iov) > 0 {
		n, err := unix.Preadv(im.fd, iov, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return &DamagedError{Sector: sector, Reason: "store file ends early"}
		}
		off += int64(n)
		for n > 0 && len(iov) > 0 {
			if n >= len(iov[0]) {
				n -= len(iov[0])
				iov = iov[1:]
				sector++
			} else {
				iov[0] = iov[0][n:]
				n = 0
			}
		}
	}
	return nil
}

func (im *Image) pwritev(iov [][]byte, off int64) error {
	for len(iov) > 0 {
		n, err := unix.Pwritev(im.fd, iov, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		off += int64(n)
		for n > 0 && len(iov) > 0 {
			if n >= len(iov[0]) {
				n -= len(iov[0])
				iov = iov[1:]
			} else {
				iov[0] = iov[0][n:]
				n = 0
			}
		}
	}
	return nil
}

func pwriteFull(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}
