// Package block serves a policy's volumes of kind block: a fixed-size image
// on the node whose 4 KiB sectors are sealed with AES-256-GCM (a tag table
// gives integrity), decrypted by a FUSE filesystem that presents it as one
// file, and a loop device attached to that file, which the sandbox sees as
// a block device. The image format and its limits are in
// docs/volumes-block.md.
package block

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes"
)

func init() {
	volumes.Register(policy.VolumeBlock, func(ctx context.Context, r volumes.Request) (volumes.Mounted, error) {
		m, err := Serve(ctx, Config{
			Store:    r.Volume.Store,
			Size:     r.Volume.SizeBytes,
			Key:      r.Key,
			ReadOnly: r.Volume.ReadOnly,
			Dir:      r.Dir,
			Name:     r.Volume.Name,
			Logger:   r.Logger,
		})
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", r.Volume.Name, err)
		}
		return m, nil
	})
}

// Config is one block volume to serve.
type Config struct {
	// Store is the image file; created (sparse) at first use unless
	// ReadOnly.
	Store string
	// Size is the image's data size; an existing image must have it.
	Size int64
	Key  proxies.DataKey
	// ReadOnly opens the image read-only and attaches the loop device
	// read-only.
	ReadOnly bool
	// Dir is an empty directory for the FUSE mount; Close leaves it empty.
	Dir string
	// Name labels the mount (fsname) and the loop device's file name.
	Name   string
	Logger *slog.Logger
	// LoopDirectIO asks the loop device for direct I/O on the FUSE file
	// (LO_FLAGS_DIRECT_IO). Off by default: see docs/volumes-block.md.
	LoopDirectIO bool
}

// Volume is a served block volume.
type Volume struct {
	im     *Image
	server *fuse.Server
	dir    string
	loop   *loopDev
	log    *slog.Logger

	devPath      string
	major, minor uint32

	mu      sync.Mutex
	closed  bool
	reaping bool // a goroutine waits for the loop device to be released
}

// HostPath is the loop device node, /dev/loopN.
func (v *Volume) HostPath() string { return v.devPath }

// Device is the loop device's major and minor number.
func (v *Volume) Device() (major, minor uint32, ok bool) {
	return v.major, v.minor, true
}

// DiskPath is the decrypted image file in the FUSE mount.
func (v *Volume) DiskPath() string { return filepath.Join(v.dir, DiskName) }

// Image is the open image behind the volume.
func (v *Volume) Image() *Image { return v.im }

// OpenImage opens the image at store sealed with key, creating it with
// size bytes if it does not exist and !readOnly. An existing image must
// have size bytes (size 0: any).
func OpenImage(store string, key proxies.DataKey, size int64, readOnly bool) (*Image, error) {
	if !filepath.IsAbs(store) {
		return nil, fmt.Errorf("store %q: not an absolute path", store)
	}
	im, err := Open(store, key, readOnly)
	if errors.Is(err, os.ErrNotExist) {
		if readOnly {
			return nil, fmt.Errorf("store %s does not exist and the volume is read-only", store)
		}
		if size == 0 {
			return nil, fmt.Errorf("store %s does not exist and no size is given", store)
		}
		im, err = Create(store, key, size)
		if errors.Is(err, os.ErrExist) {
			// Created by someone else in the meantime.
			im, err = Open(store, key, readOnly)
		}
	}
	if err != nil {
		return nil, err
	}
	if size != 0 && im.Size() != size {
		im.Close()
		return nil, fmt.Errorf("store %s holds an image of %d bytes, the volume's sizeBytes is %d", store, im.Size(), size)
	}
	return im, nil
}

// Serve opens (or creates) the image, serves it decrypted through FUSE at
// c.Dir and attaches a loop device to it. It returns once the device is
// attached; on error nothing of it remains.
func Serve(ctx context.Context, c Config) (_ *Volume, err error) {
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	im, err := OpenImage(c.Store, c.Key, c.Size, c.ReadOnly)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			im.Close()
		}
	}()
	v := &Volume{im: im, dir: c.Dir, log: log}
	root := &rootNode{im: im}
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			DirectMount:   true,
			FsName:        "cleanwall-block:" + c.Name,
			Name:          "cleanwall",
			MaxWrite:      1 << 20,
			DisableXAttrs: true,
			// The loop device's requests come from kernel threads; the
			// mount is root's and used by root only.
			AllowOther: false,
		},
		// The one file never changes size or type: cache its attributes.
		AttrTimeout:  ptr(time.Hour),
		EntryTimeout: ptr(time.Hour),
	}
	if c.ReadOnly {
		opts.MountOptions.Options = append(opts.MountOptions.Options, "ro")
	}
	v.server, err = fs.Mount(c.Dir, root, opts)
	if err != nil {
		// A mount whose INIT failed may still be there.
		_ = unix.Unmount(c.Dir, unix.MNT_DETACH)
		return nil, fmt.Errorf("fuse mount at %s: %w", c.Dir, err)
	}
	defer func() {
		if err != nil {
			_ = v.unmount()
		}
	}()
	flags := os.O_RDWR
	if c.ReadOnly {
		flags = os.O_RDONLY
	}
	if c.LoopDirectIO {
		flags |= unix.O_DIRECT
	}
	backing, err := os.OpenFile(v.DiskPath(), flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// The loop device holds its own reference to the file.
	defer backing.Close()
	v.loop, err = attach(backing, "cleanwall:"+c.Name, loopOptions{readOnly: c.ReadOnly, directIO: c.LoopDirectIO})
	if err != nil {
		return nil, err
	}
	v.devPath, v.major, v.minor = v.loop.path, v.loop.major, v.loop.minor
	log.Info("block volume attached", "name", c.Name, "store", c.Store, "device", v.loop.path,
		"size", im.Size(), "readOnly", c.ReadOnly, "loopDirectIO", loopDirectIO(v.loop.n))
	return v, nil
}

// Close detaches the loop device, unmounts the FUSE filesystem and closes
// the image. It is idempotent. If the device is still in use (mounted
// somewhere), the kernel only marks it to detach when its last user lets
// go: Close then returns an error saying so, the FUSE server keeps serving
// the device (its user's I/O keeps working), and the volume closes itself
// as soon as the device is free; a later Close returns nil once it has.
func (v *Volume) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	if v.loop != nil {
		if err := v.loop.detach(detachTimeout); err != nil {
			if !v.reaping {
				v.reaping = true
				go v.reap()
			}
			return fmt.Errorf("%w; the volume stays served until then and closes itself", err)
		}
		v.loop = nil
	}
	return v.finishClose()
}

// finishClose unmounts and closes the image once the loop device is gone.
// The caller holds v.mu.
func (v *Volume) finishClose() error {
	if err := v.unmount(); err != nil {
		return err
	}
	v.closed = true
	v.log.Info("block volume detached", "dir", v.dir)
	return v.im.Close()
}

// reap waits for a loop device that was in use at Close to be released by
// its last user, then finishes the Close.
func (v *Volume) reap() {
	for {
		time.Sleep(reapInterval)
		v.mu.Lock()
		if v.closed {
			v.mu.Unlock()
			return
		}
		if b := backingFile(v.loop.n); b == "" || b != v.loop.backing {
			v.loop = nil
			if err := v.finishClose(); err != nil {
				v.log.Error("closing block volume after its device was released", "dir", v.dir, "error", err)
			}
			v.reaping = false
			v.mu.Unlock()
			return
		}
		v.mu.Unlock()
	}
}

func (v *Volume) unmount() error {
	if v.server == nil {
		return nil
	}
	if err := v.server.Unmount(); err != nil {
		return fmt.Errorf("fuse unmount %s: %w", v.dir, err)
	}
	v.server.Wait()
	v.server = nil
	return nil
}

// detachTimeout is how long Close waits for the kernel to let go of the
// loop device's backing file.
var detachTimeout = 5 * time.Second

// reapInterval is how often a volume whose device was in use at Close
// checks whether it has been released.
const reapInterval = 200 * time.Millisecond

// attach is attachLoop; tests replace it to fail half-way.
var attach = attachLoop

func ptr[T any](v T) *T { return &v }
