package block

import (
	"context"
	"errors"
	"io"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// DiskName is the one file in a block volume's FUSE mount: the decrypted
// image that the loop device is attached to.
const DiskName = "disk"

// diskNode serves an Image as one file. Opens get FOPEN_DIRECT_IO so the
// decrypted image is never cached in the FUSE file's page cache: the loop
// device above it has its own cache, and plaintext should live in one
// place only.
type diskNode struct {
	fs.Inode
	im *Image
}

var (
	_ fs.NodeOpener    = (*diskNode)(nil)
	_ fs.NodeReader    = (*diskNode)(nil)
	_ fs.NodeWriter    = (*diskNode)(nil)
	_ fs.NodeFsyncer   = (*diskNode)(nil)
	_ fs.NodeFlusher   = (*diskNode)(nil)
	_ fs.NodeGetattrer = (*diskNode)(nil)
	_ fs.NodeSetattrer = (*diskNode)(nil)
)

func (n *diskNode) mode() uint32 {
	if n.im.ReadOnly() {
		return syscall.S_IFREG | 0o400
	}
	return syscall.S_IFREG | 0o600
}

func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.im.ReadOnly() && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	if flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EPERM
	}
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (n *diskNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	k, err := n.im.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (n *diskNode) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if n.im.ReadOnly() {
		return 0, syscall.EROFS
	}
	k, err := n.im.WriteAt(data, off)
	if err != nil {
		return uint32(k), toErrno(err)
	}
	return uint32(k), 0
}

func (n *diskNode) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if err := n.im.Sync(); err != nil {
		return toErrno(err)
	}
	return 0
}

func (n *diskNode) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno { return 0 }

func (n *diskNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = n.mode()
	out.Size = uint64(n.im.Size())
	out.Blocks = uint64(n.im.Size()) / 512
	out.Blksize = SectorSize
	out.Nlink = 1
	return 0
}

// Setattr accepts only what leaves the image as it is: its size is fixed.
func (n *diskNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.im.Size() {
		return syscall.EPERM
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	return n.Getattr(ctx, f, out)
}

// toErrno maps an Image error to what the kernel gets: EIO for a damaged
// sector (never its bytes), the errno itself for a system error.
func toErrno(err error) syscall.Errno {
	var e syscall.Errno
	switch {
	case errors.Is(err, ErrDamaged):
		return syscall.EIO
	case errors.As(err, &e):
		return e
	}
	return syscall.EIO
}

// rootNode is the mount's root directory, holding DiskName only.
type rootNode struct {
	fs.Inode
	im *Image
}

var _ fs.NodeOnAdder = (*rootNode)(nil)

func (r *rootNode) OnAdd(ctx context.Context) {
	mode := uint32(syscall.S_IFREG)
	ch := r.NewPersistentInode(ctx, &diskNode{im: r.im}, fs.StableAttr{Mode: mode, Ino: 2})
	r.AddChild(DiskName, ch, false)
}

var _ fs.NodeGetattrer = (*rootNode)(nil)

func (r *rootNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o700
	out.Nlink = 2
	return 0
}
