package files

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/volumes"
)

func init() { volumes.Register(policy.VolumeFiles, openVolume) }

// openVolume is the kind files Opener: the store (created empty if it does
// not exist yet and the volume is writable) mounted at r.Dir.
func openVolume(ctx context.Context, r volumes.Request) (volumes.Mounted, error) {
	key := Key{ID: r.Key.ID, Version: r.Key.Version, Key: r.Key.Key}
	s, err := OpenStore(r.Volume.Store, key, !r.Volume.ReadOnly)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", r.Volume.Name, err)
	}
	m, err := Mount(ctx, s, r.Dir, MountOptions{ReadOnly: r.Volume.ReadOnly, Logger: r.Logger, Name: r.Volume.Name})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", r.Volume.Name, err)
	}
	return m, nil
}

// MountOptions are Mount's options.
type MountOptions struct {
	// ReadOnly mounts read-only: every change is refused with EROFS.
	ReadOnly bool
	// Logger gets refusals of damaged data (may be nil).
	Logger *slog.Logger
	// Name shows in /proc/mounts as cleanwall-files:<Name>.
	Name string
}

// Mounted is a store served by FUSE at a directory.
type Mounted struct {
	dir    string
	server *fuse.Server
	conn   uint64   // the FUSE connection (st_dev of the mount), for abort
	lock   *os.File // the store's config, flocked while mounted

	once sync.Once
	err  error
}

var _ volumes.Mounted = (*Mounted)(nil)

// maxWrite is the largest FUSE read and write request: 1 MiB, the
// kernel's maximum, so that sequential I/O costs few round trips.
const maxWrite = 1 << 20

// Mount serves s at dir (an existing, empty directory) and returns once
// the mount answers. Other users may use it (allow_other; the kernel
// checks permissions against the modes and owners of the store's files,
// default_permissions). Close unmounts it.
func Mount(ctx context.Context, s *Store, dir string, o MountOptions) (*Mounted, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var before syscall.Stat_t
	if err := syscall.Stat(dir, &before); err != nil {
		return nil, fmt.Errorf("mountpoint: %w", err)
	}
	// One writer per store: a writable mount locks the store exclusively,
	// a read-only one shared, for as long as it is mounted.
	lock, err := lockStore(s.root, o.ReadOnly)
	if err != nil {
		return nil, err
	}
	v := &fsys{s: s, readOnly: o.ReadOnly, log: log}
	root := &node{v: v, dir: true, id: s.RootID()}
	timeout := time.Second
	name := o.Name
	if name == "" {
		name = filepath.Base(s.root)
	}
	opts := &fs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		MountOptions: fuse.MountOptions{
			AllowOther:        true,
			DirectMount:       true,
			DirectMountStrict: true,
			Options:           []string{"default_permissions"},
			MaxWrite:          maxWrite,
			MaxReadAhead:      128 << 10,
			FsName:            "cleanwall-files:" + name,
			Name:              "cleanwall",
			DisableXAttrs:     true,
			Logger:            slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		},
	}
	if o.ReadOnly {
		opts.MountOptions.DirectMountFlags = syscall.MS_RDONLY
	}
	opts.RootStableAttr = &fs.StableAttr{Ino: 1, Mode: syscall.S_IFDIR}
	server, err := fs.Mount(dir, root, opts)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	m := &Mounted{dir: dir, server: server, lock: lock}
	// The mount answers: a stat through it reaches our root.
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil || st.Dev == before.Dev {
		m.Close()
		if err == nil {
			err = errors.New("the directory's device did not change")
		}
		return nil, fmt.Errorf("mount %s does not answer: %v", dir, err)
	}
	m.conn = st.Dev
	select {
	case <-ctx.Done():
		m.Close()
		return nil, ctx.Err()
	default:
	}
	return m, nil
}

// HostPath is the mounted directory.
func (m *Mounted) HostPath() string { return m.dir }

// Device is not a block device: ok false.
func (m *Mounted) Device() (uint32, uint32, bool) { return 0, 0, false }

// Close unmounts and waits for the server to stop. If the mount is busy
// (a process still has a file open or its cwd in it), it is detached
// lazily; if the server still runs after that (busy, or the mount was
// bound into another mount namespace that outlives it), its FUSE
// connection is aborted, so that nothing is served after Close returns
// (users of a copy see ENOTCONN). It is idempotent.
func (m *Mounted) Close() error {
	m.once.Do(func() {
		defer m.lock.Close()
		err := unix.Unmount(m.dir, 0)
		if err != nil && !errors.Is(err, unix.EINVAL) {
			if derr := unix.Unmount(m.dir, unix.MNT_DETACH); derr != nil && !errors.Is(derr, unix.EINVAL) {
				m.err = fmt.Errorf("unmount %s: %v; lazy unmount: %v", m.dir, err, derr)
			}
		}
		done := make(chan struct{})
		go func() { m.server.Wait(); close(done) }()
		select {
		case <-done:
			return
		case <-time.After(500 * time.Millisecond):
		}
		// Still served: the connection (and so its device number) is
		// still ours to abort.
		if aerr := abortConn(m.conn); aerr != nil && m.err == nil {
			m.err = fmt.Errorf("unmount %s: %v", m.dir, aerr)
		}
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			if m.err == nil {
				m.err = fmt.Errorf("unmount %s: FUSE server still running 10s after its connection was aborted", m.dir)
			}
		}
	})
	return m.err
}

// lockStore flocks the store's config: shared for a read-only mount,
// exclusive otherwise, without waiting.
func lockStore(root string, shared bool) (*os.File, error) {
	f, err := os.Open(filepath.Join(root, configName))
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_EX
	if shared {
		how = unix.LOCK_SH
	}
	if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("store %s is mounted elsewhere (a writable mount excludes every other mount)", root)
		}
		return nil, fmt.Errorf("lock store %s: %w", root, err)
	}
	return f, nil
}

// abortConn aborts the FUSE connection of device dev through fusectl
// (mounting it if needed), which ends the server of a lazily detached
// mount whose files are still open.
func abortConn(dev uint64) error {
	const ctl = "/sys/fs/fuse/connections"
	const fusectlMagic = 0x65735543
	var sfs unix.Statfs_t
	if err := unix.Statfs(ctl, &sfs); err != nil || sfs.Type != fusectlMagic {
		if merr := unix.Mount("fusectl", ctl, "fusectl", 0, ""); merr != nil {
			return fmt.Errorf("abort FUSE connection: mount fusectl: %v", merr)
		}
	}
	p := filepath.Join(ctl, strconv.FormatUint(uint64(unix.Minor(dev)), 10), "abort")
	if err := os.WriteFile(p, []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("abort FUSE connection: %v", err)
	}
	return nil
}
