package rawsys

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Conn is a proxy's connection, read and written with the calls of this
// package when it is raw, through its net.Conn when it is plain. Raw or
// not, the net package's poller does the waiting (syscall.RawConn), so
// deadlines and Close work as they do on the net.Conn.
//
// A Conn is raw only when asked to be and only for a *net.TCPConn whose
// socket is non-blocking. Any other conn is plain: a wrapper (the daemon's
// byte budget) may hold bytes of its own that the socket does not, and a
// socket made blocking (by (*os.File).Fd on a dup of it, which shares its
// flags) would hold the goroutine's P for as long as a raw call sleeps.
// Raw I/O off (the proxies' PlainIO) makes every Conn plain: a way to
// tell whether a problem comes from this package, and a second path that
// the proxies' tests run.
//
// Read is always the net.Conn's; the raw reads of a raw Conn are ReadNow
// and Splice in a WaitRead callback, where the caller decides what an
// empty socket means. Write and CloseWrite are raw on a raw Conn. One
// goroutine writes a Conn at a time, and a Conn is not copied once Init
// has run.
type Conn struct {
	net.Conn
	rc syscall.RawConn // nil: plain

	// Write's state: its callback is bound once, so a write allocates
	// nothing.
	wp      []byte
	wn      int
	werr    error
	writeFn func(fd uintptr) bool
}

// ErrWouldBlock is what ReadNow and SpliceNow return when nothing can move
// without waiting; a WaitRead or WaitWrite callback then returns false.
var ErrWouldBlock = errors.New("rawsys: would block")

// errPlain: WaitRead or WaitWrite on a plain Conn, a caller's bug.
var errPlain = errors.New("rawsys: waiting on a plain Conn")

// NewConn returns nc as a Conn, raw when raw is true and nc can be.
func NewConn(nc net.Conn, raw bool) *Conn {
	c := new(Conn)
	c.Init(nc, raw)
	return c
}

// Init makes c the Conn of nc, as NewConn does, for a Conn held by value
// in a proxy's per-connection state (no allocation of its own).
func (c *Conn) Init(nc net.Conn, raw bool) {
	*c = Conn{Conn: nc}
	if raw {
		c.rc = rawConnOf(nc)
	}
}

// rawConnOf is nc's raw socket when nc is a *net.TCPConn with a
// non-blocking socket (as every one of the net package is until someone
// changes its flags), else nil.
func rawConnOf(nc net.Conn) syscall.RawConn {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	nonblock := false
	err = rc.Control(func(fd uintptr) {
		// F_GETFL never sleeps: raw, like the calls it guards.
		flags, _, errno := syscall.RawSyscall(syscall.SYS_FCNTL, fd, syscall.F_GETFL, 0)
		nonblock = errno == 0 && flags&syscall.O_NONBLOCK != 0
	})
	if err != nil || !nonblock {
		return nil
	}
	return rc
}

// Raw reports whether c reads and writes its socket with this package's
// calls.
func (c *Conn) Raw() bool { return c.rc != nil }

// Write writes all of p. Raw, it writes the socket and waits for room
// through the poller (so under the write deadline) when its buffer is
// full; plain, it is the net.Conn's Write.
func (c *Conn) Write(p []byte) (int, error) {
	if c.rc == nil {
		return c.Conn.Write(p)
	}
	if c.writeFn == nil {
		c.writeFn = c.writeSome // once: a method value per call is an allocation per write
	}
	c.wp, c.wn, c.werr = p, 0, nil
	err := c.rc.Write(c.writeFn)
	n := c.wn
	if err == nil {
		err = c.werr
	}
	c.wp, c.werr = nil, nil
	return n, err
}

// writeSome is Write's callback: false means "no room yet, wait".
func (c *Conn) writeSome(fd uintptr) bool {
	for c.wn < len(c.wp) {
		n, err := Write(int(fd), c.wp[c.wn:])
		switch err {
		case nil:
			c.wn += n
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.werr = os.NewSyscallError("write", err)
			return true
		}
	}
	return true
}

// WaitRead calls fn with the socket, and again each time the socket
// becomes readable, until fn returns true (syscall.RawConn.Read: under the
// read deadline, ended by Close). It forgets readiness that the poller
// recorded before it was called, so fn's first call must look at the
// socket itself; readiness recorded while fn runs wakes the next wait.
// Raw Conns only.
func (c *Conn) WaitRead(fn func(fd uintptr) bool) error {
	if c.rc == nil {
		return errPlain
	}
	return c.rc.Read(fn)
}

// WaitWrite is WaitRead for room to write (syscall.RawConn.Write). Raw
// Conns only.
func (c *Conn) WaitWrite(fn func(fd uintptr) bool) error {
	if c.rc == nil {
		return errPlain
	}
	return c.rc.Write(fn)
}

// CloseWrite half-closes the connection. Raw, it is shutdown(2) of the
// write side; plain, the net.Conn's CloseWrite, or Close for a conn that
// cannot half-close.
func (c *Conn) CloseWrite() error {
	if c.rc != nil {
		var serr error
		if err := c.rc.Control(func(fd uintptr) { serr = Shutdown(int(fd), unix.SHUT_WR) }); err == nil {
			if serr != nil {
				return os.NewSyscallError("shutdown", serr)
			}
			return nil
		}
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// ReadNow reads the socket fd once, without waiting, in a WaitRead
// callback: n > 0 bytes, io.EOF at the end of the stream, ErrWouldBlock
// when the socket is empty, or an *os.SyscallError. An empty p reads
// nothing.
func ReadNow(fd uintptr, p []byte) (int, error) {
	for {
		n, err := Read(int(fd), p)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return 0, ErrWouldBlock
		case err != nil:
			return 0, os.NewSyscallError("read", err)
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// SpliceNow moves at most n bytes from in to out once, without waiting
// (one end is a pipe; see Splice): n > 0 bytes, io.EOF at the end of in,
// ErrWouldBlock when in is empty or out is full, or an *os.SyscallError.
func SpliceNow(in, out, n int) (int, error) {
	for {
		m, err := Splice(in, out, n)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return 0, ErrWouldBlock
		case err != nil:
			return 0, os.NewSyscallError("splice", err)
		case m == 0 && n > 0:
			return 0, io.EOF
		}
		return m, nil
	}
}
