package files

import (
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Store is an opened store directory: its config checked against the key,
// and its subkeys derived. It maps the volume's plaintext tree onto the
// store and seals and opens file content; the FUSE server and the CLI are
// both built on it.
type Store struct {
	root   string
	cfg    config
	k      *keys
	hdrLen int
}

// Key is the data key a store is sealed under, as the key broker names it.
type Key struct {
	ID      string
	Version int
	Key     []byte // 32 bytes
}

// ErrNotVolume is returned by OpenStore for a directory that holds no
// volume config and is not empty.
var ErrNotVolume = errors.New("not a cleanwall files volume (no " + configName + ") and not empty")

// OpenStore opens the store at root under key. If the directory holds no
// volume yet and create is set, an empty directory (made if missing)
// becomes a new volume sealed under key. key.ID empty skips the check of
// the key's name (a key holder opening a store: the MAC still checks the
// key itself).
func OpenStore(root string, key Key, create bool) (*Store, error) {
	b, err := os.ReadFile(filepath.Join(root, configName))
	if errors.Is(err, os.ErrNotExist) && create {
		return initStore(root, key)
	}
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(root); errors.Is(serr, os.ErrNotExist) {
			return nil, fmt.Errorf("store %s does not exist", root)
		}
		if empty, _ := isEmptyDir(root); empty {
			return nil, fmt.Errorf("store %s is empty: no volume sealed there yet", root)
		}
		return nil, fmt.Errorf("store %s: %w", root, ErrNotVolume)
	}
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", root, err)
	}
	cfg, err := parseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("store %s: %s: %w", root, configName, err)
	}
	if key.ID != "" && (cfg.KeyID != key.ID || int(cfg.KeyVersion) != key.Version) {
		return nil, fmt.Errorf("store %s is sealed under key %q version %d, not key %q version %d", root, cfg.KeyID, cfg.KeyVersion, key.ID, key.Version)
	}
	k, err := deriveKeys(key.Key, cfg.VolumeID)
	if err != nil {
		return nil, err
	}
	if err := verifyConfig(b, k); err != nil {
		return nil, fmt.Errorf("store %s: the key does not open this volume (its config does not authenticate under key %q version %d)", root, cfg.KeyID, cfg.KeyVersion)
	}
	return &Store{root: root, cfg: cfg, k: k, hdrLen: headerLen(len(cfg.KeyID))}, nil
}

func initStore(root string, key Key) (*Store, error) {
	if key.ID == "" || len(key.ID) > maxKeyID {
		return nil, fmt.Errorf("new store %s: key id must be 1 to %d bytes", root, maxKeyID)
	}
	if key.Version < 0 || int64(key.Version) > 1<<32-1 {
		return nil, fmt.Errorf("new store %s: key version %d out of range", root, key.Version)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	if empty, err := isEmptyDir(root); err != nil {
		return nil, err
	} else if !empty {
		return nil, fmt.Errorf("store %s: %w", root, ErrNotVolume)
	}
	cfg := config{KeyID: key.ID, KeyVersion: uint32(key.Version)}
	if _, err := rand.Read(cfg.VolumeID[:]); err != nil {
		return nil, err
	}
	k, err := deriveKeys(key.Key, cfg.VolumeID)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(root, configName, encodeConfig(cfg, k), 0o600); err != nil {
		return nil, err
	}
	return &Store{root: root, cfg: cfg, k: k, hdrLen: headerLen(len(cfg.KeyID))}, nil
}

func isEmptyDir(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	if err == io.EOF {
		return true, nil
	}
	return false, err
}

// writeFileAtomic writes data to dir/name through a temporary file renamed
// over it, fsynced.
func writeFileAtomic(dir, name string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(dir, tmpPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// Root is the store's directory; RootID is the root directory's id (the
// volume id).
func (s *Store) Root() string { return s.root }
func (s *Store) RootID() ID   { return s.cfg.VolumeID }

// KeyID and KeyVersion name the key the store is sealed under.
func (s *Store) KeyID() string   { return s.cfg.KeyID }
func (s *Store) KeyVersion() int { return int(s.cfg.KeyVersion) }

// Entry is a directory entry resolved in the store.
type Entry struct {
	Name   string // plaintext
	Stored string // the store's name (the encrypted name, or cw.long.HASH)
	Long   string // for a long name, the encrypted name its sidecar holds
	Dir    bool
}

// entryFor is where name in directory dir (store path dirPath) lives.
func (s *Store) entryFor(dirID ID, name string) Entry {
	st, long := s.k.storeName(dirID, name)
	return Entry{Name: name, Stored: st, Long: long}
}

// ReadDirID reads and authenticates the id of the directory at path, which
// is entry name of the directory parent.
func (s *Store) ReadDirID(path string, parent ID, name string) (ID, error) {
	b, err := readSmall(filepath.Join(path, dirIDName), dirIDLen+1)
	if err != nil {
		var id ID
		if errors.Is(err, os.ErrNotExist) {
			return id, fmt.Errorf("directory has no %s: %w", dirIDName, errAuth)
		}
		return id, err
	}
	return parseDirID(b, parent, name, s.k)
}

func readSmall(path string, max int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, max)
	n, err := io.ReadFull(f, b)
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		err = nil
	}
	return b[:n], err
}

// List reads the directory dirPath whose id is dirID: the entries whose
// names authenticate, and the store names that do not (bad), which the
// caller logs or refuses.
func (s *Store) List(dirPath string, dirID ID) (entries []Entry, bad []string, err error) {
	f, err := os.Open(dirPath)
	if err != nil {
		return nil, nil, err
	}
	des, err := f.ReadDir(-1)
	f.Close()
	if err != nil {
		return nil, nil, err
	}
	for _, de := range des {
		stored := de.Name()
		if stored == configName || stored == dirIDName || strings.HasPrefix(stored, tmpPrefix) ||
			(strings.HasPrefix(stored, longPrefix) && strings.HasSuffix(stored, longSuffix)) {
			continue
		}
		enc := stored
		long := ""
		if isLongName(stored) {
			b, err := readSmall(filepath.Join(dirPath, stored+longSuffix), 4*(aesBlock+maxName)/3+8)
			if err != nil || longStoreName(string(b)) != stored {
				bad = append(bad, stored)
				continue
			}
			enc, long = string(b), string(b)
		}
		name, err := s.k.decryptName(dirID, enc)
		if err != nil {
			bad = append(bad, stored)
			continue
		}
		if long != "" && len(name) <= maxShortName || long == "" && len(name) > maxShortName {
			bad = append(bad, stored)
			continue
		}
		entries = append(entries, Entry{Name: name, Stored: stored, Long: long, Dir: de.IsDir()})
	}
	return entries, bad, nil
}

const aesBlock = 16

// writeSidecar writes a long name's sidecar in dirPath.
func (s *Store) writeSidecar(dirPath string, e Entry) error {
	if e.Long == "" {
		return nil
	}
	return writeFileAtomic(dirPath, e.Stored+longSuffix, []byte(e.Long), 0o600)
}

func (s *Store) removeSidecar(dirPath string, e Entry) {
	if e.Long != "" {
		os.Remove(filepath.Join(dirPath, e.Stored+longSuffix))
	}
}

// Mkdir makes directory name in dirPath (id dirID): a temporary directory
// with its cw.dirid, renamed into place, so that it appears whole or not
// at all. It returns the new directory's id and store path.
func (s *Store) Mkdir(dirPath string, dirID ID, name string, mode uint32, uid, gid int) (ID, string, error) {
	var id ID
	if err := checkName(name); err != nil {
		return id, "", unix.EINVAL
	}
	e := s.entryFor(dirID, name)
	target := filepath.Join(dirPath, e.Stored)
	if _, err := os.Lstat(target); err == nil {
		return id, "", unix.EEXIST
	}
	if _, err := rand.Read(id[:]); err != nil {
		return id, "", err
	}
	tmp, err := os.MkdirTemp(dirPath, tmpPrefix+"*")
	if err != nil {
		return id, "", err
	}
	fail := func(err error) (ID, string, error) {
		os.RemoveAll(tmp)
		return ID{}, "", err
	}
	if err := writeFileAtomic(tmp, dirIDName, encodeDirID(id, dirID, name, s.k), 0o444); err != nil {
		return fail(err)
	}
	if err := os.Chmod(tmp, os.FileMode(mode&0o7777)); err != nil {
		return fail(err)
	}
	if uid >= 0 {
		os.Lchown(tmp, uid, gid)
	}
	if err := s.writeSidecar(dirPath, e); err != nil {
		return fail(err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, target, unix.RENAME_NOREPLACE); err != nil {
		s.removeSidecar(dirPath, e)
		return fail(err)
	}
	return id, target, nil
}

// Create makes the empty file name in dirPath (id dirID), header written,
// renamed into place without replacing anything, and returns it opened
// read-write.
func (s *Store) Create(dirPath string, dirID ID, name string, mode uint32, uid, gid int) (*File, string, error) {
	if err := checkName(name); err != nil {
		return nil, "", unix.EINVAL
	}
	e := s.entryFor(dirID, name)
	target := filepath.Join(dirPath, e.Stored)
	h := header{KeyID: s.cfg.KeyID, KeyVersion: s.cfg.KeyVersion}
	if _, err := rand.Read(h.FileID[:]); err != nil {
		return nil, "", err
	}
	f, err := os.CreateTemp(dirPath, tmpPrefix+"*")
	if err != nil {
		return nil, "", err
	}
	tmp := f.Name()
	fail := func(err error) (*File, string, error) {
		f.Close()
		os.Remove(tmp)
		return nil, "", err
	}
	if _, err := f.Write(appendHeader(nil, h, dirID, name, s.k)); err != nil {
		return fail(err)
	}
	if err := f.Chmod(os.FileMode(mode & 0o7777)); err != nil {
		return fail(err)
	}
	if uid >= 0 {
		f.Chown(uid, gid)
	}
	if err := s.writeSidecar(dirPath, e); err != nil {
		return fail(err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, target, unix.RENAME_NOREPLACE); err != nil {
		s.removeSidecar(dirPath, e)
		return fail(err)
	}
	file, err := s.newFile(f, h, dirID, name, false)
	if err != nil {
		return fail(err)
	}
	return file, target, nil
}

// OpenFile opens the store file at path, entry name of directory parent,
// and authenticates its header.
func (s *Store) OpenFile(path string, parent ID, name string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	h, err := s.readHeader(f, parent, name)
	if err != nil {
		f.Close()
		return nil, err
	}
	file, err := s.newFile(f, h, parent, name, readOnly)
	if err != nil {
		f.Close()
		return nil, err
	}
	return file, nil
}

func (s *Store) readHeader(f *os.File, parent ID, name string) (header, error) {
	b := make([]byte, s.hdrLen)
	if _, err := f.ReadAt(b, 0); err != nil {
		if err == io.EOF {
			return header{}, fmt.Errorf("header cut short: %w", errAuth)
		}
		return header{}, err
	}
	h, err := parseHeader(b, parent, name, s.k)
	if err != nil {
		return h, err
	}
	if h.KeyID != s.cfg.KeyID || h.KeyVersion != s.cfg.KeyVersion {
		return h, fmt.Errorf("file sealed under key %q version %d, the volume under %q version %d: %w", h.KeyID, h.KeyVersion, s.cfg.KeyID, s.cfg.KeyVersion, errAuth)
	}
	return h, nil
}

// ReadHeaderAt authenticates the header of the store file at path bound
// to (parent, name) and returns the file's id and plaintext size.
func (s *Store) ReadHeaderAt(path string, parent ID, name string) (ID, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return ID{}, 0, err
	}
	defer f.Close()
	h, err := s.readHeader(f, parent, name)
	return h.FileID, h.Size, err
}

// Rebind rewrites the header of the store file at path, authenticated as
// entry oldName of oldParent, for its new place newName in newParent: what
// a rename changes of a file (its content is bound to the file id only).
func (s *Store) Rebind(path string, oldParent ID, oldName string, newParent ID, newName string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	h, err := s.readHeader(f, oldParent, oldName)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(appendHeader(nil, h, newParent, newName, s.k), 0); err != nil {
		return err
	}
	return nil
}

// RebindDir rewrites the cw.dirid of the directory at path for its new
// place, after authenticating it for its old one.
func (s *Store) RebindDir(path string, oldParent ID, oldName string, newParent ID, newName string) (ID, error) {
	id, err := s.ReadDirID(path, oldParent, oldName)
	if err != nil {
		return id, err
	}
	return id, writeFileAtomic(path, dirIDName, encodeDirID(id, newParent, newName, s.k), 0o444)
}

// File is an open store file: its authenticated header and the file
// descriptor its blocks are read and written through. Its methods are
// safe for concurrent use.
type File struct {
	s        *Store
	f        *os.File
	fd       int
	readOnly bool
	aead     cipher.AEAD

	mu     sync.RWMutex
	h      header
	parent ID
	name   string
}

func (s *Store) newFile(f *os.File, h header, parent ID, name string, readOnly bool) (*File, error) {
	aead, err := s.k.fileAEAD(h.FileID)
	if err != nil {
		return nil, err
	}
	return &File{s: s, f: f, fd: int(f.Fd()), readOnly: readOnly, aead: aead, h: h, parent: parent, name: name}, nil
}

// ID is the file's id; Size its plaintext size.
func (f *File) ID() ID { return f.h.FileID }
func (f *File) Size() int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.h.Size
}

// Fd is the store file's descriptor (for fstat and fsync).
func (f *File) Fd() int { return f.fd }

// Close closes the store file.
func (f *File) Close() error { return f.f.Close() }

// Sync fsyncs the store file.
func (f *File) Sync() error { return f.f.Sync() }

// SetPlace records the file's new place after a rename (its header was
// rewritten by Rebind), so that later header writes bind it there.
func (f *File) SetPlace(parent ID, name string) {
	f.mu.Lock()
	f.parent, f.name = parent, name
	f.mu.Unlock()
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 64*storeBlockSize); return &b }}

func getBuf(n int) *[]byte {
	p := bufPool.Get().(*[]byte)
	if cap(*p) < n {
		*p = make([]byte, n)
	}
	*p = (*p)[:n]
	return p
}

func (f *File) blockOff(n int64) int64 { return int64(f.s.hdrLen) + n*storeBlockSize }

// ReadAt reads up to len(p) plaintext bytes at off; it returns fewer only
// at the end of the file. A block that does not authenticate, or is
// missing, fails the whole read with an error wrapping errAuth: no byte of
// a damaged read is returned.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.readAt(p, off)
}

func (f *File) readAt(p []byte, off int64) (int, error) {
	size := f.h.Size
	if off < 0 {
		return 0, unix.EINVAL
	}
	if off >= size || len(p) == 0 {
		return 0, nil
	}
	end := min(off+int64(len(p)), size)
	first, last := off/BlockSize, (end-1)/BlockSize
	nb := last - first + 1
	bp := getBuf(int(nb) * storeBlockSize)
	defer bufPool.Put(bp)
	buf := *bp
	n, err := unix.Pread(f.fd, buf, f.blockOff(first))
	if err != nil {
		return 0, err
	}
	if n < len(buf) {
		return 0, fmt.Errorf("store file ends in block %d, its size says %d bytes: %w", first+int64(n)/storeBlockSize, size, errAuth)
	}
	var scratch [BlockSize]byte
	w := 0
	for i := int64(0); i < nb; i++ {
		b := first + i
		src := buf[i*storeBlockSize : (i+1)*storeBlockSize]
		bStart := b * BlockSize
		lo := max(off, bStart) - bStart
		hi := min(end, bStart+BlockSize) - bStart
		if lo == 0 && hi == BlockSize {
			if err := openBlock(f.aead, p[w:w+BlockSize], src, f.h.FileID, b); err != nil {
				return 0, err
			}
		} else {
			if err := openBlock(f.aead, scratch[:], src, f.h.FileID, b); err != nil {
				return 0, err
			}
			copy(p[w:], scratch[lo:hi])
		}
		w += int(hi - lo)
	}
	return w, nil
}

// readBlock opens block n into dst (BlockSize bytes), its bytes at or
// beyond the file's size zeroed.
func (f *File) readBlock(dst []byte, n int64) error {
	var src [storeBlockSize]byte
	got, err := unix.Pread(f.fd, src[:], f.blockOff(n))
	if err != nil {
		return err
	}
	if got < storeBlockSize {
		return fmt.Errorf("store file ends in block %d: %w", n, errAuth)
	}
	if err := openBlock(f.aead, dst, src[:], f.h.FileID, n); err != nil {
		return err
	}
	if valid := f.h.Size - n*BlockSize; valid < BlockSize {
		clear(dst[max(valid, 0):])
	}
	return nil
}

// WriteAt writes p at off, filling any gap after the end of the file with
// zeros, and updates the header's size when the file grows.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if f.readOnly {
		return 0, unix.EROFS
	}
	if off < 0 || off+int64(len(p)) < off || off+int64(len(p)) > 1<<62 {
		return 0, unix.EFBIG
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if off > f.h.Size {
		if err := f.fillZeros(off); err != nil {
			return 0, err
		}
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := f.writeBlocks(p, off); err != nil {
		return 0, err
	}
	if end := off + int64(len(p)); end > f.h.Size {
		if err := f.setSize(end); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// writeBlocks seals the blocks p at off covers (reading back the partial
// ones at the edges) and writes them with one pwrite. It does not touch
// the header.
func (f *File) writeBlocks(p []byte, off int64) error {
	end := off + int64(len(p))
	first, last := off/BlockSize, (end-1)/BlockSize
	nb := last - first + 1
	bp := getBuf(int(nb) * storeBlockSize)
	defer bufPool.Put(bp)
	buf := *bp
	nonces := make([]byte, nb*nonceSize)
	if _, err := rand.Read(nonces); err != nil {
		return err
	}
	var plain [BlockSize]byte
	for i := int64(0); i < nb; i++ {
		b := first + i
		bStart := b * BlockSize
		lo := max(off, bStart) - bStart
		hi := min(end, bStart+BlockSize) - bStart
		src := p[bStart+lo-off : bStart+hi-off]
		dst := buf[i*storeBlockSize : (i+1)*storeBlockSize]
		nonce := nonces[i*nonceSize : (i+1)*nonceSize]
		if lo == 0 && hi == BlockSize {
			sealBlock(f.aead, dst, src, nonce, f.h.FileID, b)
			continue
		}
		if bStart < f.h.Size {
			if err := f.readBlock(plain[:], b); err != nil {
				return err
			}
		} else {
			clear(plain[:])
		}
		copy(plain[lo:hi], src)
		sealBlock(f.aead, dst, plain[:], nonce, f.h.FileID, b)
	}
	n, err := unix.Pwrite(f.fd, buf, f.blockOff(first))
	if err == nil && n < len(buf) {
		err = io.ErrShortWrite
	}
	return err
}

var zeros [256 * BlockSize]byte

// fillZeros grows the file with zeros up to size.
func (f *File) fillZeros(size int64) error {
	for f.h.Size < size {
		n := min(size-f.h.Size, int64(len(zeros)))
		if err := f.writeBlocks(zeros[:n], f.h.Size); err != nil {
			return err
		}
		if err := f.setSize(f.h.Size + n); err != nil {
			return err
		}
	}
	return nil
}

// setSize rewrites the header with size.
func (f *File) setSize(size int64) error {
	old := f.h.Size
	f.h.Size = size
	var hb [34 + maxKeyID + macSize]byte
	b := appendHeader(hb[:0], f.h, f.parent, f.name, f.s.k)
	if _, err := unix.Pwrite(f.fd, b, 0); err != nil {
		f.h.Size = old
		return err
	}
	return nil
}

// Truncate sets the file's size: growing writes sealed zeros; shrinking
// writes the header first and then cuts the store file after the last
// block still needed (the bytes past the size in that block are never
// returned, and are zeroed when the block is next sealed).
func (f *File) Truncate(size int64) error {
	if f.readOnly {
		return unix.EROFS
	}
	if size < 0 || size > 1<<62 {
		return unix.EINVAL
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if size >= f.h.Size {
		return f.fillZeros(size)
	}
	if err := f.setSize(size); err != nil {
		return err
	}
	return unix.Ftruncate(f.fd, f.blockOff(blocksFor(size)))
}

// IsAuth reports whether err is an authentication failure of the store
// (a damaged, moved, replaced or foreign file, block or name).
func IsAuth(err error) bool { return errors.Is(err, errAuth) }

// Rebind rewrites the open file's header for its new place (newParent,
// newName), through its descriptor, and records the place. The caller
// holds what keeps the file's place from changing otherwise.
func (f *File) Rebind(newParent ID, newName string) error {
	if f.readOnly {
		return unix.EROFS
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	b := appendHeader(nil, f.h, newParent, newName, f.s.k)
	if _, err := unix.Pwrite(f.fd, b, 0); err != nil {
		return err
	}
	f.parent, f.name = newParent, newName
	return nil
}
