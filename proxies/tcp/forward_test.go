package tcpproxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
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

// eachIO runs test with raw I/O on and off (Forwarder.PlainIO): the same
// bytes must arrive, counted the same, either way.
func eachIO(t *testing.T, test func(t *testing.T, plain bool)) {
	t.Helper()
	for _, plain := range []bool{false, true} {
		name := "raw"
		if plain {
			name = "plain"
		}
		t.Run(name, func(t *testing.T) { test(t, plain) })
	}
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
	eachIO(t, func(t *testing.T, plain bool) {
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
			done <- (&Forwarder{PlainIO: plain, Chunk: 64 << 10}).Forward(context.Background(), proxySide, Flow{Dst: dst}, &st)
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
	})
}

func TestForwardBudgetStopsExcessBytes(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		got := make(chan []byte, 1)
		dst := upstream(t, func(c *net.TCPConn) {
			b, _ := io.ReadAll(c)
			got <- b
		})
		proxySide, sandbox := clientPair(t)
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain}).Forward(context.Background(), proxySide, Flow{Dst: dst, MaxBytesOut: 1000}, nil)
		}()
		sandbox.Write(bytes.Repeat([]byte("a"), 1500))
		if err := <-done; !errors.Is(err, ErrBudgetExceeded) {
			t.Fatalf("err = %v, want budget exceeded", err)
		}
		if b := <-got; len(b) != 1000 {
			t.Fatalf("upstream received %d bytes, want exactly the budget (1000)", len(b))
		}
	})
}

func TestForwardIdleTimeout(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		dst := upstream(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
		proxySide, _ := clientPair(t)
		start := time.Now()
		err := (&Forwarder{PlainIO: plain, IdleTimeout: 200 * time.Millisecond}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
		if !errors.Is(err, ErrIdle) {
			t.Fatalf("err = %v, want idle", err)
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("idle flow was not closed promptly")
		}
	})
}

func TestForwardCancelClosesFlow(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
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
		go func() { done <- (&Forwarder{PlainIO: plain}).Forward(ctx, proxySide, Flow{Dst: dst}, nil) }()
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
	})
}

// prewritten sends payload from the sandbox side (and then half-closes,
// with eof) before the flow starts, so that the forwarder's first read
// finds all of it queued, up to the socket buffers: a read can fill the
// copy buffer and switch to splice.
func prewritten(t *testing.T, sandbox *net.TCPConn, payload []byte, eof bool) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := sandbox.Write(payload)
		if eof {
			sandbox.CloseWrite()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(100 * time.Millisecond):
		// More than the socket buffers hold: the rest goes once the flow runs.
		t.Cleanup(func() { <-done })
	}
}

func TestForwardExactBytesAcrossTheSpliceSwitch(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		for _, size := range []int{1, CopyBufferSize - 1, CopyBufferSize, CopyBufferSize + 1, 3*CopyBufferSize + 17, 4 << 20} {
			t.Run(fmt.Sprint(size), func(t *testing.T) {
				payload := make([]byte, size)
				rand.Read(payload)
				got := make(chan []byte, 1)
				dst := upstream(t, func(c *net.TCPConn) {
					b, _ := io.ReadAll(c)
					got <- b
					c.Write(payload[:min(size, 1000)])
				})
				proxySide, sandbox := clientPair(t)
				prewritten(t, sandbox, payload, true)
				var st Stats
				done := make(chan error, 1)
				go func() {
					done <- (&Forwarder{PlainIO: plain, Chunk: 64 << 10}).Forward(context.Background(), proxySide, Flow{Dst: dst}, &st)
				}()
				reply, err := io.ReadAll(sandbox)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(<-got, payload) {
					t.Fatal("upstream did not receive the exact bytes")
				}
				if !bytes.Equal(reply, payload[:min(size, 1000)]) {
					t.Fatal("sandbox did not receive the exact reply")
				}
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				if st.BytesOut.Load() != int64(size) || st.BytesIn.Load() != int64(len(reply)) {
					t.Fatalf("counters out=%d in=%d, want %d and %d", st.BytesOut.Load(), st.BytesIn.Load(), size, len(reply))
				}
			})
		}
	})
}

// The byte beyond the budget is never forwarded, whichever way the
// direction moves bytes when the budget runs out: through the copy
// buffer, exactly at the switch to splice, or while splicing.
func TestForwardBudgetExactAcrossTheSpliceSwitch(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		for _, budget := range []int{1, CopyBufferSize - 1, CopyBufferSize, CopyBufferSize + 1, 2*CopyBufferSize + 5, 1 << 20} {
			for _, extra := range []int{0, 1, 70000} {
				t.Run(fmt.Sprintf("budget=%d,extra=%d", budget, extra), func(t *testing.T) {
					payload := make([]byte, budget+extra)
					rand.Read(payload)
					got := make(chan []byte, 1)
					dst := upstream(t, func(c *net.TCPConn) {
						b, _ := io.ReadAll(c)
						got <- b
					})
					proxySide, sandbox := clientPair(t)
					prewritten(t, sandbox, payload, extra == 0)
					var st Stats
					err := (&Forwarder{PlainIO: plain, Chunk: 64 << 10}).Forward(context.Background(), proxySide, Flow{Dst: dst, MaxBytesOut: int64(budget)}, &st)
					switch {
					case extra == 0 && err != nil:
						t.Fatalf("err = %v; a flow that sends exactly its budget ends cleanly", err)
					case extra > 0 && !errors.Is(err, ErrBudgetExceeded):
						t.Fatalf("err = %v, want budget exceeded", err)
					}
					if b := <-got; !bytes.Equal(b, payload[:budget]) {
						t.Fatalf("upstream received %d bytes, want exactly the budget (%d)", len(b), budget)
					}
					if st.BytesOut.Load() != int64(budget) {
						t.Fatalf("counted %d bytes out, want %d", st.BytesOut.Load(), budget)
					}
				})
			}
		}
	})
}

// After a bulk transfer switched both directions to splice, small
// messages still go through promptly, both ways.
func TestForwardSmallMessagesAfterBulk(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		dst := upstream(t, func(c *net.TCPConn) { io.Copy(c, c) }) // echo
		proxySide, sandbox := clientPair(t)
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
		}()

		bulk := make([]byte, 2<<20)
		rand.Read(bulk)
		go sandbox.Write(bulk)
		echo := make([]byte, len(bulk))
		if _, err := io.ReadFull(sandbox, echo); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(echo, bulk) {
			t.Fatal("bulk echo differs")
		}
		sandbox.SetReadDeadline(time.Now().Add(5 * time.Second))
		for _, msg := range []string{"ping", "a", "small request\n"} {
			if _, err := sandbox.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, len(msg))
			if _, err := io.ReadFull(sandbox, b); err != nil {
				t.Fatalf("echo of %q: %v", msg, err)
			}
			if string(b) != msg {
				t.Fatalf("echo %q, want %q", b, msg)
			}
		}
		sandbox.CloseWrite()
		if _, err := io.ReadAll(sandbox); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// A flow that keeps moving bytes, however slowly, is not idle, before
// and after its switch to splice.
func TestForwardSlowFlowIsNotIdle(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		const idle = 300 * time.Millisecond
		got := make(chan int64, 1)
		dst := upstream(t, func(c *net.TCPConn) {
			n, _ := io.Copy(io.Discard, c)
			got <- n
		})
		proxySide, sandbox := clientPair(t)
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain, IdleTimeout: idle}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
		}()
		sent := 0
		for i := range 12 { // 1.2 s: four idle timeouts
			if i == 6 {
				n, _ := sandbox.Write(make([]byte, 4*CopyBufferSize)) // bulk: the direction splices from here on
				sent += n
			}
			n, err := sandbox.Write([]byte{'x'})
			if err != nil {
				t.Fatalf("write %d: %v (flow closed as idle?)", i, err)
			}
			sent += n
			time.Sleep(idle / 3)
		}
		sandbox.CloseWrite()
		if err := <-done; err != nil {
			t.Fatalf("err = %v", err)
		}
		if n := <-got; n != int64(sent) {
			t.Fatalf("upstream got %d bytes, want %d", n, sent)
		}
	})
}

// Conns that are not sockets are copied through the buffer, with the
// same budget semantics.
func TestForwardPlainConns(t *testing.T) {
	sandbox, proxySide := net.Pipe()
	upProxy, upServer := net.Pipe()
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, 5)
		io.ReadFull(upServer, b)
		upServer.Write([]byte("hello back"))
		rest, _ := io.ReadAll(upServer)
		got <- append(b, rest...)
	}()
	f := &Forwarder{Dial: func(context.Context, netip.AddrPort) (net.Conn, error) { return upProxy, nil }}
	done := make(chan error, 1)
	go func() {
		done <- f.Forward(context.Background(), proxySide, Flow{Dst: netip.MustParseAddrPort("192.0.2.1:80"), MaxBytesOut: 8}, nil)
	}()
	sandbox.Write([]byte("hello"))
	b := make([]byte, 10)
	if _, err := io.ReadFull(sandbox, b); err != nil || string(b) != "hello back" {
		t.Fatalf("reply %q, %v", b, err)
	}
	go sandbox.Write([]byte("1234567890")) // 15 bytes in all: 7 beyond the budget
	if err := <-done; !errors.Is(err, ErrBudgetExceeded) {
		t.Fatalf("err = %v, want budget exceeded", err)
	}
	if b := <-got; string(b) != "hello123" {
		t.Fatalf("upstream received %q, want exactly the budget", b)
	}
}

// An upstream that resets ends the flow, and the sandbox's side with it.
func TestForwardUpstreamResetEndsFlow(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		dst := upstream(t, func(c *net.TCPConn) {
			b := make([]byte, 5)
			io.ReadFull(c, b)
			c.SetLinger(0)
		})
		proxySide, sandbox := clientPair(t)
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
		}()
		sandbox.Write([]byte("hello"))
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("a reset flow ended without an error")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("flow still running after the upstream reset")
		}
		sandbox.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := sandbox.Read(make([]byte, 1)); err == nil {
			t.Fatal("sandbox connection still open")
		}
	})
}

// A destination that reads slowly fills its socket while the direction
// splices: the forwarder waits for room and delivers every byte.
func TestForwardSlowReaderDuringSplice(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		payload := make([]byte, 8<<20)
		rand.Read(payload)
		got := make(chan []byte, 1)
		dst := upstream(t, func(c *net.TCPConn) {
			var b []byte
			buf := make([]byte, 256<<10)
			for {
				n, err := c.Read(buf)
				b = append(b, buf[:n]...)
				if err != nil {
					break
				}
				time.Sleep(2 * time.Millisecond)
			}
			got <- b
		})
		proxySide, sandbox := clientPair(t)
		var st Stats
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain}).Forward(context.Background(), proxySide, Flow{Dst: dst}, &st)
		}()
		if _, err := sandbox.Write(payload); err != nil {
			t.Fatal(err)
		}
		sandbox.CloseWrite()
		if !bytes.Equal(<-got, payload) {
			t.Fatal("upstream did not receive the exact bytes")
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if st.BytesOut.Load() != int64(len(payload)) {
			t.Fatalf("counted %d bytes out, want %d", st.BytesOut.Load(), len(payload))
		}
	})
}

// A destination that resets in the middle of a bulk transfer ends the
// flow promptly.
func TestForwardResetDuringSplice(t *testing.T) {
	eachIO(t, func(t *testing.T, plain bool) {
		dst := upstream(t, func(c *net.TCPConn) {
			io.CopyN(io.Discard, c, 1<<20)
			c.SetLinger(0)
		})
		proxySide, sandbox := clientPair(t)
		done := make(chan error, 1)
		go func() {
			done <- (&Forwarder{PlainIO: plain}).Forward(context.Background(), proxySide, Flow{Dst: dst}, nil)
		}()
		go func() {
			for {
				if _, err := sandbox.Write(make([]byte, 1<<20)); err != nil {
					return
				}
			}
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("a reset flow ended without an error")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("flow still running after the upstream reset")
		}
	})
}
