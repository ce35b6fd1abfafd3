// Package rawsys holds read(2), write(2) and splice(2) for non-blocking
// descriptors, made without telling the Go scheduler (syscall.RawSyscall),
// and Conn, the one connection type through which the proxies (tcp, http)
// use them, raw or, with raw I/O off, plain. It knows nothing of flows or
// protocols.
//
// A goroutine in a system call for more than 20 µs has its scheduler
// context (P) taken away by the runtime's monitor (sysmon), which then
// wakes another thread to run the rest, and keeps waking itself every
// 20 µs while it finds such calls. On a virtual machine a write that
// delivers to a local peer, or a splice, often takes that long: measured
// on cleanwall's proxies, half of the context switches of a keep-alive
// HTTP request, and a sixth of the L4 proxy's CPU in sysmon alone. A call
// on a non-blocking descriptor returns without sleeping, so making it raw
// costs nothing but the scheduler's accounting.
//
// Only for descriptors that are non-blocking (every socket of the net
// package until someone changes its flags, which Conn checks; pipes made
// with O_NONBLOCK) and with SPLICE_F_NONBLOCK: a raw
// call that blocks would hold its P for as long.
package rawsys

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read is read(2).
func Read(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// Write is write(2).
func Write(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// Splice is splice(2) without offsets, always with SPLICE_F_NONBLOCK.
func Splice(in, out, n int) (int, error) {
	r, _, errno := syscall.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_NONBLOCK)
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

// Shutdown is shutdown(2). Shutting down the write side sends a FIN, which
// to a local peer runs its receive path inside the call; it never sleeps
// (without SO_LINGER, which cleanwall never sets).
func Shutdown(fd, how int) error {
	_, _, errno := syscall.RawSyscall(syscall.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0)
	if errno != 0 {
		return errno
	}
	return nil
}
