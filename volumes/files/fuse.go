package files

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// fsys is one mounted volume.
type fsys struct {
	s        *Store
	readOnly bool
	log      *slog.Logger
	// ns serialises changes of the tree (create, mkdir, rename, unlink,
	// rmdir: exclusive) against lookups and listings (shared), so that no
	// lookup sees a rename half done (store entry moved, header not yet
	// rebound).
	ns sync.RWMutex
}

// node is a directory or a regular file of the volume. Its place in the
// store is computed from its place in the inode tree (go-fuse keeps that
// current across renames): each name encrypted under its parent's id.
type node struct {
	fs.Inode
	v   *fsys
	dir bool
	id  ID // the directory's id (the volume id for the root) or the file's id

	mu   sync.Mutex // file, refs
	file *File      // open store file while there are handles
	refs int
}

var (
	_ fs.NodeLookuper  = (*node)(nil)
	_ fs.NodeGetattrer = (*node)(nil)
	_ fs.NodeSetattrer = (*node)(nil)
	_ fs.NodeReaddirer = (*node)(nil)
	_ fs.NodeMkdirer   = (*node)(nil)
	_ fs.NodeCreater   = (*node)(nil)
	_ fs.NodeOpener    = (*node)(nil)
	_ fs.NodeReader    = (*node)(nil)
	_ fs.NodeWriter    = (*node)(nil)
	_ fs.NodeFsyncer   = (*node)(nil)
	_ fs.NodeFlusher   = (*node)(nil)
	_ fs.NodeReleaser  = (*node)(nil)
	_ fs.NodeUnlinker  = (*node)(nil)
	_ fs.NodeRmdirer   = (*node)(nil)
	_ fs.NodeRenamer   = (*node)(nil)
	_ fs.NodeStatfser  = (*node)(nil)
)

// inoOf makes a stable inode number from an id: unique per file and
// directory, unchanged by renames.
func inoOf(id ID) uint64 {
	ino := binary.LittleEndian.Uint64(id[:8])
	if ino < 2 || ino == ^uint64(0) {
		ino += 2
	}
	return ino
}

// where is the node's store path, and its parent's id and its name (what
// its header or cw.dirid is bound to). ok is false for an unlinked node.
func (n *node) where() (path string, parent ID, name string, ok bool) {
	if n.IsRoot() {
		return n.v.s.root, ID{}, "", true
	}
	name, p := n.Parent()
	if p == nil {
		return "", ID{}, "", false
	}
	pn := p.Operations().(*node)
	pp, _, _, ok := pn.where()
	if !ok {
		return "", ID{}, "", false
	}
	st, _ := n.v.s.k.storeName(pn.id, name)
	return filepath.Join(pp, st), pn.id, name, true
}

func (n *node) dirPath() (string, syscall.Errno) {
	p, _, _, ok := n.where()
	if !ok {
		return "", syscall.ENOENT
	}
	return p, 0
}

// errno maps an error to what the caller of the file system sees;
// authentication failures are EIO and logged with what failed.
func (v *fsys) errno(op, path string, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if IsAuth(err) {
		v.log.Warn("volume: refused damaged or misplaced data", "op", op, "store_path", path, "err", err)
		return syscall.EIO
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return en
	}
	return fs.ToErrno(err)
}

func caller(ctx context.Context) (int, int) {
	if os.Geteuid() != 0 {
		return -1, -1
	}
	c, ok := fuse.FromContext(ctx)
	if !ok {
		return -1, -1
	}
	return int(c.Uid), int(c.Gid)
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if len(name) > maxName {
		return nil, syscall.ENAMETOOLONG
	}
	n.v.ns.RLock()
	defer n.v.ns.RUnlock()
	dp, en := n.dirPath()
	if en != 0 {
		return nil, en
	}
	st, _ := n.v.s.k.storeName(n.id, name)
	p := filepath.Join(dp, st)
	return n.lookupAt(ctx, p, name, out)
}

func (n *node) lookupAt(ctx context.Context, p, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return nil, fs.ToErrno(err)
	}
	child := &node{v: n.v}
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		id, err := n.v.s.ReadDirID(p, n.id, name)
		if err != nil {
			return nil, n.v.errno("lookup", p, err)
		}
		child.dir, child.id = true, id
		out.Attr.FromStat(&st)
	case syscall.S_IFREG:
		id, size, err := n.v.s.ReadHeaderAt(p, n.id, name)
		if err != nil {
			return nil, n.v.errno("lookup", p, err)
		}
		child.id = id
		out.Attr.FromStat(&st)
		out.Attr.Size = uint64(size)
	default:
		return nil, n.v.errno("lookup", p, errors.Join(errors.New("not a directory or regular file"), errAuth))
	}
	mode := st.Mode & syscall.S_IFMT
	ch := n.NewInode(ctx, child, fs.StableAttr{Mode: mode, Ino: inoOf(child.id)})
	if existing := ch.Operations().(*node); existing != child {
		// The kernel's node for this file or directory: if it is open,
		// the open file's size is the current one.
		existing.mu.Lock()
		if existing.file != nil {
			out.Attr.Size = uint64(existing.file.Size())
		}
		existing.mu.Unlock()
	}
	return ch, 0
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.mu.Lock()
	file := n.file
	n.mu.Unlock()
	var st syscall.Stat_t
	if file != nil {
		if err := syscall.Fstat(file.Fd(), &st); err != nil {
			return fs.ToErrno(err)
		}
		out.Attr.FromStat(&st)
		out.Attr.Size = uint64(file.Size())
		return 0
	}
	n.v.ns.RLock()
	defer n.v.ns.RUnlock()
	p, parent, name, ok := n.where()
	if !ok {
		return syscall.ENOENT
	}
	if err := syscall.Lstat(p, &st); err != nil {
		return fs.ToErrno(err)
	}
	out.Attr.FromStat(&st)
	if !n.dir {
		_, size, err := n.v.s.ReadHeaderAt(p, parent, name)
		if err != nil {
			return n.v.errno("getattr", p, err)
		}
		out.Attr.Size = uint64(size)
	}
	return 0
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if n.v.readOnly {
		return syscall.EROFS
	}
	if size, ok := in.GetSize(); ok {
		if n.dir {
			return syscall.EISDIR
		}
		file, en := n.acquire(false)
		if en != 0 {
			return en
		}
		err := file.Truncate(int64(size))
		n.release()
		if err != nil {
			return n.v.errno("truncate", n.storePath(), err)
		}
	}
	p := n.storePath()
	if p == "" {
		return syscall.ENOENT
	}
	if m, ok := in.GetMode(); ok {
		if err := syscall.Chmod(p, m&0o7777); err != nil {
			return fs.ToErrno(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		u, g := -1, -1
		if uok {
			u = int(uid)
		}
		if gok {
			g = int(gid)
		}
		if err := syscall.Lchown(p, u, g); err != nil {
			return fs.ToErrno(err)
		}
	}
	mtime, mok := in.GetMTime()
	atime, aok := in.GetATime()
	if mok || aok {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if aok {
			ts[0] = unix.NsecToTimespec(atime.UnixNano())
		}
		if mok {
			ts[1] = unix.NsecToTimespec(mtime.UnixNano())
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fs.ToErrno(err)
		}
	}
	return n.Getattr(ctx, f, out)
}

func (n *node) storePath() string {
	n.v.ns.RLock()
	defer n.v.ns.RUnlock()
	p, _, _, _ := n.where()
	return p
}

// acquire opens the node's store file (or takes another reference to the
// open one).
//
// Lock order: the volume's ns before a node's mu (as Rename takes them).
func (n *node) acquire(readOnly bool) (*File, syscall.Errno) {
	n.v.ns.RLock()
	defer n.v.ns.RUnlock()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.file != nil {
		n.refs++
		return n.file, 0
	}
	p, parent, name, ok := n.where()
	if !ok {
		return nil, syscall.ENOENT
	}
	f, err := n.v.s.OpenFile(p, parent, name, n.v.readOnly)
	if err != nil {
		return nil, n.v.errno("open", p, err)
	}
	if f.ID() != n.id {
		f.Close()
		return nil, n.v.errno("open", p, errors.Join(errors.New("store file replaced under an open name"), errAuth))
	}
	n.file, n.refs = f, 1
	return f, 0
}

func (n *node) release() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.refs--
	if n.refs == 0 && n.file != nil {
		n.file.Close()
		n.file = nil
	}
}

// handle is an open file; the store file is shared by the node's handles.
type handle struct{ n *node }

const writeFlags = syscall.O_WRONLY | syscall.O_RDWR | syscall.O_TRUNC | syscall.O_APPEND

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.dir {
		return nil, 0, syscall.EISDIR
	}
	if n.v.readOnly && flags&writeFlags != 0 {
		return nil, 0, syscall.EROFS
	}
	file, en := n.acquire(n.v.readOnly)
	if en != 0 {
		return nil, 0, en
	}
	if flags&syscall.O_TRUNC != 0 {
		if err := file.Truncate(0); err != nil {
			n.release()
			return nil, 0, n.v.errno("open", n.storePath(), err)
		}
		return &handle{n}, 0, 0
	}
	// We are the store's only writer while it is mounted: what the kernel
	// cached of the file is still its content.
	return &handle{n}, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if n.v.readOnly {
		return nil, nil, 0, syscall.EROFS
	}
	if len(name) > maxName {
		return nil, nil, 0, syscall.ENAMETOOLONG
	}
	n.v.ns.Lock()
	defer n.v.ns.Unlock()
	dp, en := n.dirPath()
	if en != 0 {
		return nil, nil, 0, en
	}
	uid, gid := caller(ctx)
	file, p, err := n.v.s.Create(dp, n.id, name, mode, uid, gid)
	if errors.Is(err, syscall.EEXIST) && flags&syscall.O_EXCL == 0 {
		// Lost a race with another creator: open what is there.
		return nil, nil, 0, syscall.EEXIST
	}
	if err != nil {
		return nil, nil, 0, n.v.errno("create", dp, err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(file.Fd(), &st); err != nil {
		file.Close()
		os.Remove(p)
		return nil, nil, 0, fs.ToErrno(err)
	}
	out.Attr.FromStat(&st)
	out.Attr.Size = 0
	child := &node{v: n.v, id: file.ID(), file: file, refs: 1}
	ch := n.NewInode(ctx, child, fs.StableAttr{Mode: syscall.S_IFREG, Ino: inoOf(child.id)})
	return ch, &handle{child}, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		return nil, syscall.EBADF
	}
	got, err := h.n.file.ReadAt(dest, off)
	if err != nil {
		return nil, n.v.errno("read", n.storePath(), err)
	}
	return fuse.ReadResultData(dest[:got]), 0
}

func (n *node) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		return 0, syscall.EBADF
	}
	if n.v.readOnly {
		return 0, syscall.EROFS
	}
	got, err := h.n.file.WriteAt(data, off)
	if err != nil {
		return uint32(got), n.v.errno("write", n.storePath(), err)
	}
	return uint32(got), 0
}

func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	h, ok := f.(*handle)
	if !ok {
		return 0
	}
	return fs.ToErrno(h.n.file.Sync())
}

func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno { return 0 }

func (n *node) Release(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if h, ok := f.(*handle); ok {
		h.n.release()
	}
	return 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	n.v.ns.RLock()
	defer n.v.ns.RUnlock()
	dp, en := n.dirPath()
	if en != 0 {
		return nil, en
	}
	entries, bad, err := n.v.s.List(dp, n.id)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	for _, b := range bad {
		n.v.log.Warn("volume: store entry whose name does not authenticate in its directory, not listed", "store_path", filepath.Join(dp, b))
	}
	out := make([]fuse.DirEntry, 0, len(entries))
	for _, e := range entries {
		mode := uint32(syscall.S_IFREG)
		if e.Dir {
			mode = syscall.S_IFDIR
		}
		out = append(out, fuse.DirEntry{Name: e.Name, Mode: mode})
	}
	return fs.NewListDirStream(out), 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.v.readOnly {
		return nil, syscall.EROFS
	}
	if len(name) > maxName {
		return nil, syscall.ENAMETOOLONG
	}
	n.v.ns.Lock()
	defer n.v.ns.Unlock()
	dp, en := n.dirPath()
	if en != 0 {
		return nil, en
	}
	uid, gid := caller(ctx)
	id, p, err := n.v.s.Mkdir(dp, n.id, name, mode, uid, gid)
	if err != nil {
		return nil, n.v.errno("mkdir", dp, err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return nil, fs.ToErrno(err)
	}
	out.Attr.FromStat(&st)
	child := &node{v: n.v, dir: true, id: id}
	return n.NewInode(ctx, child, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: inoOf(id)}), 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if n.v.readOnly {
		return syscall.EROFS
	}
	n.v.ns.Lock()
	defer n.v.ns.Unlock()
	dp, en := n.dirPath()
	if en != 0 {
		return en
	}
	e := n.v.s.entryFor(n.id, name)
	if err := unix.Unlink(filepath.Join(dp, e.Stored)); err != nil {
		return fs.ToErrno(err)
	}
	n.v.s.removeSidecar(dp, e)
	return 0
}

// emptyStoreDir reports whether the store directory p holds nothing but
// its cw.dirid.
func emptyStoreDir(p string) (bool, error) {
	f, err := os.Open(p)
	if err != nil {
		return false, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return false, err
	}
	for _, nm := range names {
		if nm != dirIDName && !strings.HasPrefix(nm, tmpPrefix) {
			return false, nil
		}
	}
	return true, nil
}

func removeStoreDir(p string) error {
	if ok, err := emptyStoreDir(p); err != nil {
		return err
	} else if !ok {
		return syscall.ENOTEMPTY
	}
	// What is left of a create or mkdir a crash interrupted (none is in
	// progress: the caller holds the tree lock) goes with the directory.
	if names, err := filepath.Glob(filepath.Join(p, tmpPrefix+"*")); err == nil {
		for _, nm := range names {
			os.RemoveAll(nm)
		}
	}
	if err := os.Remove(filepath.Join(p, dirIDName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syscall.Rmdir(p)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if n.v.readOnly {
		return syscall.EROFS
	}
	n.v.ns.Lock()
	defer n.v.ns.Unlock()
	dp, en := n.dirPath()
	if en != 0 {
		return en
	}
	e := n.v.s.entryFor(n.id, name)
	p := filepath.Join(dp, e.Stored)
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return fs.ToErrno(err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return syscall.ENOTDIR
	}
	if err := removeStoreDir(p); err != nil {
		return fs.ToErrno(err)
	}
	n.v.s.removeSidecar(dp, e)
	return 0
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if n.v.readOnly {
		return syscall.EROFS
	}
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if flags&^uint32(unix.RENAME_NOREPLACE) != 0 {
		return syscall.EINVAL // RENAME_EXCHANGE and RENAME_WHITEOUT are not supported
	}
	if len(newName) > maxName {
		return syscall.ENAMETOOLONG
	}
	s := n.v.s
	n.v.ns.Lock()
	defer n.v.ns.Unlock()
	dp, en := n.dirPath()
	if en != 0 {
		return en
	}
	ndp, en := np.dirPath()
	if en != 0 {
		return en
	}
	src, dst := s.entryFor(n.id, name), s.entryFor(np.id, newName)
	sp, dstp := filepath.Join(dp, src.Stored), filepath.Join(ndp, dst.Stored)
	if sp == dstp {
		return 0
	}
	var sst, dst2 syscall.Stat_t
	if err := syscall.Lstat(sp, &sst); err != nil {
		return fs.ToErrno(err)
	}
	srcDir := sst.Mode&syscall.S_IFMT == syscall.S_IFDIR
	if err := syscall.Lstat(dstp, &dst2); err == nil {
		if flags&unix.RENAME_NOREPLACE != 0 {
			return syscall.EEXIST
		}
		dstDir := dst2.Mode&syscall.S_IFMT == syscall.S_IFDIR
		switch {
		case srcDir && !dstDir:
			return syscall.ENOTDIR
		case !srcDir && dstDir:
			return syscall.EISDIR
		case dstDir:
			if err := removeStoreDir(dstp); err != nil {
				return fs.ToErrno(err)
			}
		}
	}

	// Rebind first (authenticating the entry at its old place), then move.
	var child *node
	if ch := n.GetChild(name); ch != nil {
		child, _ = ch.Operations().(*node)
	}
	var file *File
	if child != nil {
		child.mu.Lock()
		defer child.mu.Unlock()
		file = child.file
	}
	var err error
	switch {
	case srcDir:
		_, err = s.RebindDir(sp, n.id, name, np.id, newName)
	case file != nil:
		err = file.Rebind(np.id, newName)
	default:
		err = s.Rebind(sp, n.id, name, np.id, newName)
	}
	if err != nil {
		return n.v.errno("rename", sp, err)
	}
	undo := func() {
		switch {
		case srcDir:
			s.RebindDir(sp, np.id, newName, n.id, name)
		case file != nil:
			file.Rebind(n.id, name)
		default:
			s.Rebind(sp, np.id, newName, n.id, name)
		}
	}
	if err := s.writeSidecar(ndp, dst); err != nil {
		undo()
		return fs.ToErrno(err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, sp, unix.AT_FDCWD, dstp, uint(flags)); err != nil {
		undo()
		return fs.ToErrno(err)
	}
	s.removeSidecar(dp, src)
	return 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var st syscall.Statfs_t
	if err := syscall.Statfs(n.v.s.root, &st); err != nil {
		return fs.ToErrno(err)
	}
	out.FromStatfsT(&st)
	out.NameLen = maxName
	return 0
}
