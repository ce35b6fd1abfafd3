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
type Image struct {
	f        *os.File
	fd       int
	hdr      Header
	aead     cipher.AEAD
	readOnly bool
	locks    [stripes]sync.RWMutex
	bufs     sync.Pool
	closeMu  sync.Mutex
	closed   bool
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
	im := &Image{f: f, fd: int(f.Fd()), hdr: *h, aead: aead, readOnly: readOnly}
	im.bufs.New = func() any {
		b := make([]byte, chunkSectors*stride+chunkSectors*EntrySize)
		return &b
	}
	return im, nil
}

// Close closes the store file. It is idempotent.
func (im *Image) Close() error {
	im.closeMu.Lock()
	defer im.closeMu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	return im.f.Close()
}

// Sync flushes written sectors and tags to stable storage.
func (im *Image) Sync() error {
	if im.readOnly {
		return nil
	}
	return unix.Fdatasync(im.fd)
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

func aad(sector int64) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(sector))
	return b[:]
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
	if rerr := im.readSectors(first, last, off, p[:end-off]); rerr != nil {
		return 0, rerr
	}
	return int(end - off), err
}

// readSectors decrypts sectors [first, last] and copies the bytes of
// [off, off+len(p)) into p. The caller holds the sectors' locks.
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

// openSector verifies and decrypts sector sec (entry ent, ciphertext in
// ct[:SectorSize], ct having room for the tag after it) and copies the
// part of it inside [off, off+len(p)) into p.
func (im *Image) openSector(sec int64, ent, ct []byte, off int64, p []byte) error {
	secOff := sec * SectorSize
	lo, hi := max(secOff, off), min(secOff+SectorSize, off+int64(len(p)))
	dst := p[lo-off : hi-off]
	if allZero(ent) {
		// Never written: the data must be a hole too.
		if !allZero(ct[:SectorSize]) {
			return &DamagedError{Sector: sec, Reason: "data without a tag"}
		}
		clear(dst)
		return nil
	}
	if !allZero(ent[nonceSize+tagSize:]) {
		return &DamagedError{Sector: sec, Reason: "tag entry's reserved bytes are not zero"}
	}
	copy(ct[SectorSize:], ent[nonceSize:nonceSize+tagSize])
	if lo == secOff && hi == secOff+SectorSize {
		if _, err := im.aead.Open(dst[:0], ent[:nonceSize], ct, aad(sec)); err != nil {
			clear(dst)
			return &DamagedError{Sector: sec, Reason: "tag does not verify"}
		}
		return nil
	}
	pt, err := im.aead.Open(ct[:0], ent[:nonceSize], ct, aad(sec))
	if err != nil {
		return &DamagedError{Sector: sec, Reason: "tag does not verify"}
	}
	copy(dst, pt[lo-secOff:hi-secOff])
	return nil
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
// sectors at either end are read (verified), modified and resealed.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, errors.New("image is read-only")
	}
	if off < 0 || off+int64(len(p)) > im.hdr.Size || off+int64(len(p)) < off {
		return 0, fmt.Errorf("write of %d bytes at %d outside the image (%d bytes): %w", len(p), off, im.hdr.Size, unix.ENOSPC)
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	first, last := off/SectorSize, (end-1)/SectorSize
	unlock := im.lock(first, last, true)
	defer unlock()
	// Partial head or tail: build whole sectors first.
	var head, tail []byte
	if off%SectorSize != 0 || (first == last && end%SectorSize != 0) {
		head = make([]byte, SectorSize)
		if err := im.readSectors(first, first, first*SectorSize, head); err != nil {
			return 0, err
		}
	}
	if end%SectorSize != 0 && last != first {
		tail = make([]byte, SectorSize)
		if err := im.readSectors(last, last, last*SectorSize, tail); err != nil {
			return 0, err
		}
	}
	if head != nil {
		copy(head[off-first*SectorSize:], p)
	}
	if tail != nil {
		copy(tail, p[last*SectorSize-off:])
	}
	// plain returns sector sec's new plaintext.
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
	bp := im.bufs.Get().(*[]byte)
	defer im.bufs.Put(bp)
	buf := *bp
	for s := first; s <= last; s += chunkSectors {
		n := min(int64(chunkSectors), last-s+1)
		ents := buf[chunkSectors*stride : chunkSectors*stride+n*EntrySize]
		clear(ents)
		for i := range n {
			if _, err := rand.Read(ents[i*EntrySize : i*EntrySize+nonceSize]); err != nil {
				return 0, err
			}
		}
		iov := make([][]byte, n)
		_ = inParallel(n, func(lo, hi int64) error {
			for i := lo; i < hi; i++ {
				ent := ents[i*EntrySize : (i+1)*EntrySize]
				out := im.aead.Seal(buf[i*stride:i*stride], ent[:nonceSize], plain(s+i), aad(s+i))
				copy(ent[nonceSize:nonceSize+tagSize], out[SectorSize:])
				iov[i] = out[:SectorSize]
			}
			return nil
		})
		// Data first, then tags: until both are written the sector reads
		// as damaged (see docs/volumes-block.md on crashes).
		if err := im.pwritev(iov, im.hdr.DataOffset()+s*SectorSize); err != nil {
			return 0, err
		}
		if err := pwriteFull(im.fd, ents, im.hdr.TagOffset()+s*EntrySize); err != nil {
			return 0, err
		}
	}
	return len(p), nil
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
