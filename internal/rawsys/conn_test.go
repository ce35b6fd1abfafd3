package rawsys

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

type wrapped struct{ net.Conn }

// A Conn is raw only when asked and only for a TCP socket that cannot make
// a raw call sleep.
func TestConnRawOnlyWhenAskedAndAble(t *testing.T) {
	a, _ := tcpPair(t)
	if !NewConn(a, true).Raw() {
		t.Error("a TCP socket asked to be raw is plain")
	}
	if NewConn(a, false).Raw() {
		t.Error("raw I/O off, and the Conn is raw")
	}
	if NewConn(wrapped{a}, true).Raw() {
		t.Error("a wrapped TCP conn is raw: its wrapper's Read would be bypassed")
	}
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if NewConn(p, true).Raw() {
		t.Error("a net.Pipe conn is raw")
	}
	b, _ := tcpPair(t)
	rc, err := b.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), false) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if NewConn(b, true).Raw() {
		t.Error("a TCP socket made blocking is raw: a raw read would hold its P while it sleeps")
	}
}

// Bytes written through a Conn arrive whole and in order, raw or plain,
// also when the writer must wait for room; CloseWrite ends the stream.
func TestConnWriteAndCloseWrite(t *testing.T) {
	for _, raw := range []bool{true, false} {
		a, b := tcpPair(t)
		c := NewConn(a, raw)
		if c.Raw() != raw {
			t.Fatalf("raw=%v: Raw() = %v", raw, c.Raw())
		}
		payload := make([]byte, 8<<20) // more than the socket buffers: Write waits for room
		rand.Read(payload)
		got := make(chan []byte, 1)
		go func() {
			_ = b.SetReadDeadline(time.Now().Add(10 * time.Second))
			all, _ := io.ReadAll(b)
			got <- all
		}()
		if n, err := c.Write(payload); n != len(payload) || err != nil {
			t.Fatalf("raw=%v: write: %d %v", raw, n, err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("raw=%v: CloseWrite: %v", raw, err)
		}
		if !bytes.Equal(<-got, payload) {
			t.Fatalf("raw=%v: the peer did not read the exact bytes, then EOF", raw)
		}
	}
}

// A raw write waits under the write deadline.
func TestConnWriteDeadline(t *testing.T) {
	a, _ := tcpPair(t) // the peer never reads
	c := NewConn(a, true)
	big := make([]byte, 64<<20)
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	n, err := c.Write(big)
	if !errors.Is(err, os.ErrDeadlineExceeded) || n == 0 || n == len(big) {
		t.Fatalf("write to a peer that never reads: %d %v, want some bytes, then the deadline", n, err)
	}
}

// ReadNow in a WaitRead callback: would-block on an empty socket, which
// WaitRead then waits on; the bytes; EOF after the peer's half-close.
func TestConnWaitReadAndReadNow(t *testing.T) {
	a, b := tcpPair(t)
	c := NewConn(a, true)
	buf := make([]byte, 64)
	calls := 0
	var n int
	var rerr error
	err := c.WaitRead(func(fd uintptr) bool {
		calls++
		n, rerr = ReadNow(fd, buf)
		if rerr == ErrWouldBlock && calls == 1 {
			go b.Write([]byte("late")) // after the socket was found empty: the wait must see it
		}
		return rerr != ErrWouldBlock
	})
	if err != nil || rerr != nil || string(buf[:n]) != "late" || calls < 2 {
		t.Fatalf("WaitRead: %v, ReadNow: %q %v after %d calls; want \"late\" after a would-block", err, buf[:n], rerr, calls)
	}
	b.CloseWrite()
	err = c.WaitRead(func(fd uintptr) bool {
		n, rerr = ReadNow(fd, buf)
		return rerr != ErrWouldBlock
	})
	if err != nil || n != 0 || rerr != io.EOF {
		t.Fatalf("after the peer's half-close: %d %v %v, want io.EOF", n, rerr, err)
	}
	if n, err := ReadNow(^uintptr(0), buf); n != 0 || !errors.Is(err, unix.EBADF) {
		t.Fatalf("a bad descriptor: %d %v, want EBADF", n, err)
	}
	if err := NewConn(a, false).WaitRead(func(uintptr) bool { return true }); err == nil {
		t.Fatal("WaitRead on a plain Conn did not fail")
	}
}

func TestSpliceNow(t *testing.T) {
	a, b := socketPair(t)
	c, d := socketPair(t)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := SpliceNow(b, p[1], 1<<16); err != ErrWouldBlock {
		t.Fatalf("from an empty socket: %v, want ErrWouldBlock", err)
	}
	if _, err := Write(a, []byte("spliced")); err != nil {
		t.Fatal(err)
	}
	if n, err := SpliceNow(b, p[1], 1<<16); n != 7 || err != nil {
		t.Fatalf("socket to pipe: %d %v", n, err)
	}
	if n, err := SpliceNow(p[0], c, 7); n != 7 || err != nil {
		t.Fatalf("pipe to socket: %d %v", n, err)
	}
	if _, err := SpliceNow(p[0], c, 7); err != ErrWouldBlock {
		t.Fatalf("from an empty pipe: %v, want ErrWouldBlock", err)
	}
	buf := make([]byte, 16)
	if n, err := Read(d, buf); string(buf[:n]) != "spliced" || err != nil {
		t.Fatalf("at the far end: %q %v", buf[:n], err)
	}
	if err := Shutdown(a, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	if n, err := SpliceNow(b, p[1], 1<<16); n != 0 || err != io.EOF {
		t.Fatalf("after the peer's shutdown: %d %v, want io.EOF", n, err)
	}
}
