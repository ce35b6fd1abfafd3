package tcpproxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// The forwarder's per-flow cost on loopback, against the same exchange
// without it (direct). Process CPU per operation includes the client and
// the upstream; the difference between the two rows is the forwarder's.
//
//	go test -run '^$' -bench . -benchmem ./proxies/tcp/

var (
	benchRequest  = []byte("cleanwall bench\n")
	benchResponse = []byte("ok cleanwall  \n\n")
)

// serveLoopback listens on a loopback port and runs handle for every
// connection until the benchmark ends.
func serveLoopback(b *testing.B, handle func(net.Conn)) netip.AddrPort {
	b.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

// serveExchange answers each connection once and waits for its close, as
// the bench's connect server does.
func serveExchange(b *testing.B) netip.AddrPort {
	b.Helper()
	return serveLoopback(b, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, len(benchRequest))
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(benchResponse); err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, c)
	})
}

// serveForwarder forwards every connection to dst.
func serveForwarder(b *testing.B, f *Forwarder, dst netip.AddrPort) netip.AddrPort {
	b.Helper()
	return serveLoopback(b, func(c net.Conn) { _ = f.Forward(context.Background(), c, Flow{Dst: dst}, nil) })
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkRequestResponse(b *testing.B) {
	up := serveExchange(b)
	for _, side := range []string{"direct", "forward"} {
		b.Run(side, func(b *testing.B) {
			addr := up
			if side == "forward" {
				addr = serveForwarder(b, &Forwarder{}, up)
			}
			buf := make([]byte, len(benchResponse))
			cpu := processCPU()
			b.ResetTimer()
			for b.Loop() {
				c, err := net.Dial("tcp4", addr.String())
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(benchRequest); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			b.ReportMetric(float64(processCPU()-cpu)/float64(b.N), "cpu-ns/op")
		})
	}
}

func BenchmarkBulk(b *testing.B) {
	for _, side := range []string{"direct", "forward"} {
		b.Run(side, func(b *testing.B) {
			l, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			got := make(chan int64, 1)
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				n, _ := io.Copy(io.Discard, c)
				c.Close()
				got <- n
			}()
			addr := l.Addr().(*net.TCPAddr).AddrPort()
			if side == "forward" {
				addr = serveForwarder(b, &Forwarder{}, addr)
			}
			c, err := net.Dial("tcp4", addr.String())
			if err != nil {
				b.Fatal(err)
			}
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			cpu := processCPU()
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			if n := <-got; n != int64(b.N)*int64(len(chunk)) {
				b.Fatalf("upstream got %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
			}
			b.ReportMetric(float64(processCPU()-cpu)/float64(b.N), "cpu-ns/op")
			c.Close()
		})
	}
}
