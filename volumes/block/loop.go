package block

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// loopDev is an attached loop device. We keep its node open until detach:
// the device is configured with LO_FLAGS_AUTOCLEAR, so if this process dies
// the kernel detaches it as soon as its last opener (a mount, the sandbox)
// lets go. The node is a raw descriptor, not an *os.File, whose finalizer
// would close it (and so detach the device) if the volume were dropped
// without Close.
type loopDev struct {
	n            int
	path         string
	backing      string // the backing file's path as sysfs shows it
	fd           int    // -1 once closed
	major, minor uint32
}

// loopOptions are how attachLoop configures the device.
type loopOptions struct {
	readOnly bool
	directIO bool
}

// attachLoop attaches a free loop device to backing (an open file) with a
// 4096-byte logical block size.
func attachLoop(backing *os.File, name string, o loopOptions) (*loopDev, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loop: %w", err)
	}
	defer ctl.Close()
	var lastErr error
	for try := 0; try < 20; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loop: LOOP_CTL_GET_FREE: %w", err)
		}
		path := "/dev/loop" + strconv.Itoa(n)
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			// A container's /dev may lack nodes the kernel just made.
			if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(unix.Mkdev(7, uint32(n)))); err != nil && !errors.Is(err, os.ErrExist) {
				return nil, fmt.Errorf("loop: mknod %s: %w", path, err)
			}
		}
		flags := unix.O_RDWR
		if o.readOnly {
			flags = unix.O_RDONLY
		}
		dev, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("loop: open %s: %w", path, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: SectorSize}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		if o.readOnly {
			cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
		if o.directIO {
			cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
		}
		copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)
		err = unix.IoctlLoopConfigure(dev, &cfg)
		if errors.Is(err, unix.EBUSY) {
			// Another process took it between GET_FREE and CONFIGURE.
			unix.Close(dev)
			lastErr = err
			continue
		}
		if err != nil {
			unix.Close(dev)
			return nil, fmt.Errorf("loop: LOOP_CONFIGURE %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(dev, &st); err != nil {
			l := &loopDev{n: n, path: path, fd: dev, backing: backingFile(n)}
			_ = l.detach(5 * time.Second)
			return nil, fmt.Errorf("loop: %w", err)
		}
		return &loopDev{n: n, path: path, fd: dev, backing: backingFile(n), major: unix.Major(st.Rdev), minor: unix.Minor(st.Rdev)}, nil
	}
	return nil, fmt.Errorf("loop: no free device after 20 tries: %w", lastErr)
}

// backingFile reads /sys/block/loopN/loop/backing_file ("" when the
// device is not attached).
func backingFile(n int) string {
	b, err := os.ReadFile("/sys/block/loop" + strconv.Itoa(n) + "/loop/backing_file")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// directIO reports the loop device's dio setting from sysfs.
func loopDirectIO(n int) bool {
	b, err := os.ReadFile("/sys/block/loop" + strconv.Itoa(n) + "/loop/dio")
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// detach clears the loop device and waits up to timeout for the kernel to
// let go of the backing file. While someone else holds the device open (a
// mount), LOOP_CLR_FD only marks it for autoclear; detach then reports that
// it is still attached.
func (l *loopDev) detach(timeout time.Duration) error {
	if l.fd >= 0 {
		err := unix.IoctlSetInt(l.fd, unix.LOOP_CLR_FD, 0)
		unix.Close(l.fd)
		l.fd = -1
		if err != nil && !errors.Is(err, unix.ENXIO) {
			// ENXIO: already detached.
			return fmt.Errorf("loop: LOOP_CLR_FD %s: %w", l.path, err)
		}
	}
	deadline := time.Now().Add(timeout)
	for b := backingFile(l.n); b != "" && b == l.backing; b = backingFile(l.n) {
		if time.Now().After(deadline) {
			return fmt.Errorf("loop: %s is still attached (open elsewhere, e.g. mounted); it detaches when its last user closes it", l.path)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
