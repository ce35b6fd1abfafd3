package tcpproxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// upstream accepts one connection and hands it to fn.
func upstream(t *testing.T, fn func(c *net.TCPConn)) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		fn(c.(*net.TCPConn))
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

// clientPair returns the proxy side and the sandbox side of a TCP connection.
func clientPair(t *testing.T) (proxySide, sandboxSide *net.TCPConn) {
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
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

func TestForwardBothWaysWithHalfClose(t *testing.T) {
	payload := make([]byte, 3<<20)
	rand.Read(payload)
	got := make(chan []byte, 1)
	dst := upstream(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c) // until the sandbox half-closes
		got <- b
		c.Write([]byte("answer after half-close"))
	})
	proxySide, sandbox := clientPair(t)
	var st Stats
	done := make(chan error, 1)
	go func() {
		done <- (&Forwarder{Chunk: 64 << 10}).Forward(context.Background(), proxySide, Flow{Dst: dst}, &st)
	}()

	if _, err := sandbox.Write(payload); err != nil {
		t.Fatal(err)
	}
	sandbox.CloseWrite()
	reply, err := io.ReadAll(sandbox)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(<-got, payload) {
		t.Fatal("upstream did not receive the exact bytes")
	}
	if string(reply) != "answer after half-close" {
		t.Fatalf("reply %q", reply)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st.BytesOut.Load() != int64(len(payload)) || st.BytesIn.Load() != int64(len(reply)) {
		t.Fatalf("counters out=%d in=%d", st.BytesOut.Load(), st.BytesIn.Load())
	}
}

func TestForwardBudgetStopsExcessBytes(t *testing.T) {
	got := make(chan []byte, 1)
	dst := upstream(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		got <- b
	})
	proxySide, sandbox := clientPair(t)
	done := make(chan error, 1)
	go func() {
		done <- (&Forwarder{}).Forward(context.Background(), proxySide, Flow{Dst: dst, MaxBytesOut: 1000}, nil)
	}()
	sandbox.Write(bytes.Repeat([]byte("a"), 1500))
	if err := <-done; !errors.Is(err, ErrBudgetExceeded) {
		t.Fatalf("err = %v, want budget exceeded", err)
	}
	if b := <-got; len(b) != 1000 {
		t.Fatalf("upstream received %d bytes, want exactly the budget (1000)", len(b))
	}
}

func TestForwardIdleTimeout(t *testing.T) {
	dst := upstream(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	proxySide, _ := clientPair(t)
	start := time.Now()
	err := (&Forwarder{IdleTimeout: 200 * time.Millisecond}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
	if !errors.Is(err, ErrIdle) {
		t.Fatalf("err = %v, want idle", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("idle flow was not closed promptly")
	}
}

func TestForwardCancelClosesFlow(t *testing.T) {
	got := make(chan struct{})
	dst := upstream(t, func(c *net.TCPConn) {
		b := make([]byte, 5)
		io.ReadFull(c, b)
		close(got)
		io.Copy(io.Discard, c)
	})
	proxySide, sandbox := clientPair(t)
	ctx, cancel := context.WithCancelCause(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Forwarder{}).Forward(ctx, proxySide, Flow{Dst: dst}, nil) }()
	sandbox.Write([]byte("hello"))
	<-got // the flow is established end to end
	cause := errors.New("policy no longer allows this flow")
	cancel(cause)
	if err := <-done; !errors.Is(err, cause) {
		t.Fatalf("err = %v", err)
	}
	sandbox.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := sandbox.Read(make([]byte, 1)); err == nil {
		t.Fatal("sandbox connection still open after cancel")
	}
}
