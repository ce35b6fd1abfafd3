package rawsys

import (
	"errors"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func socketPair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return fds[0], fds[1]
}

func TestReadWriteShutdown(t *testing.T) {
	a, b := socketPair(t)
	buf := make([]byte, 16)
	if _, err := Read(b, buf); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("read of an empty non-blocking socket: %v, want EAGAIN", err)
	}
	if n, err := Write(a, []byte("hello")); n != 5 || err != nil {
		t.Fatalf("write: %d %v", n, err)
	}
	if n, err := Read(b, buf); n != 5 || err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read: %d %v %q", n, err, buf[:n])
	}
	if n, err := Write(a, nil); n != 0 || err != nil {
		t.Fatalf("empty write: %d %v", n, err)
	}
	if err := Shutdown(a, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	if n, err := Read(b, buf); n != 0 || err != nil {
		t.Fatalf("read after the peer's shutdown: %d %v, want EOF (0, nil)", n, err)
	}
	if _, err := Write(-1, []byte("x")); !errors.Is(err, syscall.EBADF) {
		t.Fatalf("write to a bad descriptor: %v", err)
	}
}

func TestSpliceThroughAPipe(t *testing.T) {
	a, b := socketPair(t)
	c, d := socketPair(t)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := Splice(b, p[1], 1<<16); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("splice from an empty socket: %v, want EAGAIN", err)
	}
	if _, err := Write(a, []byte("spliced")); err != nil {
		t.Fatal(err)
	}
	n, err := Splice(b, p[1], 1<<16)
	if n != 7 || err != nil {
		t.Fatalf("socket to pipe: %d %v", n, err)
	}
	if n, err := Splice(p[0], c, n); n != 7 || err != nil {
		t.Fatalf("pipe to socket: %d %v", n, err)
	}
	buf := make([]byte, 16)
	if n, err := Read(d, buf); string(buf[:n]) != "spliced" || err != nil {
		t.Fatalf("at the far end: %q %v", buf[:n], err)
	}
}
