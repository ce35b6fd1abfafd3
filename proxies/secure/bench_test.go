package secure

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
	tcpproxy "github.com/cleanwall/cleanwall/proxies/tcp"
)

// Benchmarks: secure TCP through the proxy against open-mode TCP through
// proxies/tcp, over loopback, in the same run. The target is
// secure at 0.80x open or better. Run them alone:
//
//	go test ./proxies/secure -run '^$' -bench Ratio -benchtime 100x -count 5
//
// Each iteration moves benchFlowBytes through one new flow of each proxy,
// open then secure, and times each from the sandbox's connect to the end
// of the transfer (the remote read the sandbox's EOF, or the sandbox read
// the remote's): interleaving keeps a shared machine's noise on both
// sides. The metric secure/open is the throughput ratio; the remote's
// work is the same on both sides (it reads and discards, or writes a
// buffer it prepared, sealed once for secure).

const benchFlowBytes = 16 << 20

// benchProxy is a proxy behind a loopback listener: every connection to
// it is served as a flow to dst.
type benchProxy struct {
	addr string
}

func startBenchProxy(b *testing.B, p proxies.StreamProxy, rule *policy.Rule, keys proxies.KeySource, dst netip.AddrPort) *benchProxy {
	b.Helper()
	cfg, err := p.Configure(rule)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f := &proxies.Flow{Sandbox: "bench", Rule: rule, Config: cfg, Dst: dst, Hosts: []string{dst.Addr().String()}, Keys: keys, Report: &reporter{}}
			go p.ServeStream(context.Background(), c, f)
		}
	}()
	return &benchProxy{addr: ln.Addr().String()}
}

func compileOpenTCP(b *testing.B) *policy.Rule {
	b.Helper()
	p, err := policy.Parse([]byte(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: bench}
spec:
  egress:
    - name: db
      to: [{cidr: 127.0.0.1/32}]
      ports: [{port: 80}]
      mode: open
`))
	if err != nil {
		b.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		b.Fatal(err)
	}
	return c.Rules[0]
}

// sinkRemote reads each connection to its end, answers with reply (an
// empty object for secure flows, whose inbound direction must end well)
// and reports how many bytes it read.
func sinkRemote(b *testing.B, reply []byte) (netip.AddrPort, <-chan int64) {
	got := make(chan int64, 1)
	r := listenRemote(b, func(c net.Conn) {
		buf := make([]byte, 256<<10)
		var n int64
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				break
			}
		}
		c.Write(reply)
		c.Close()
		got <- n
	})
	return r.addr(), got
}

// emptyInbound is the remote's direction of a secure flow that sends
// nothing: an empty object.
func emptyInbound(b *testing.B, keys *memKeys) []byte {
	_, in := Contexts("db")
	k, _ := keys.Current(testKeyID)
	sealed, err := seal.Seal(nil, seal.SealConfig{Key: k.Key, KeyID: testKeyID, KeyVersion: k.Version, Context: in, Interactive: true})
	if err != nil {
		b.Fatal(err)
	}
	return sealed
}

// sourceRemote writes payload on each connection, then half-closes and
// waits for the other side's close.
func sourceRemote(b *testing.B, payload []byte) netip.AddrPort {
	r := listenRemote(b, func(c net.Conn) {
		defer c.Close()
		if _, err := c.Write(payload); err != nil {
			return
		}
		_ = closeWrite(c)
		_, _ = io.Copy(io.Discard, c)
	})
	return r.addr()
}

// upload sends n bytes through the proxy at addr and waits until the
// remote read the sandbox's EOF.
func upload(b *testing.B, addr string, chunk []byte, n int, done <-chan int64) {
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	for sent := 0; sent < n; sent += len(chunk) {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatal("the remote did not see the end of the upload")
	}
}

// download reads a flow from the proxy at addr to its end.
func download(b *testing.B, addr string, buf []byte, want int) {
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.(*net.TCPConn).CloseWrite()
	got := 0
	for {
		n, err := c.Read(buf)
		got += n
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	if got != want {
		b.Fatalf("downloaded %d bytes, want %d", got, want)
	}
}

// sides are what BenchmarkRatio compares: open mode as deployed (its
// bulk directions splice), open mode copying through user space (its
// PlainIO, what any proxy that must read the bytes pays), and secure.
var sides = []string{"open", "open-copy", "secure"}

// ratioRun times each side's flows, rotating which side goes first.
type ratioRun struct {
	wall, cpu [3]time.Duration
}

func (r *ratioRun) round(i int, flow [3]func()) {
	for k := range 3 {
		side := (i + k) % 3
		t0, c0 := time.Now(), processCPU()
		flow[side]()
		r.wall[side] += time.Since(t0)
		r.cpu[side] += processCPU() - c0
	}
}

// report sets the ratios (secure's throughput over each open side's),
// every side's throughput and its process CPU per byte moved (the
// sandbox's and the remote's work included: the same on every side).
func (r *ratioRun) report(b *testing.B) {
	n := float64(benchFlowBytes) * float64(b.N)
	b.ReportMetric(float64(r.wall[0])/float64(r.wall[2]), "secure/open")
	b.ReportMetric(float64(r.wall[1])/float64(r.wall[2]), "secure/open-copy")
	for i, side := range sides {
		b.ReportMetric(n/r.wall[i].Seconds()/1e9, side+"-GB/s")
		b.ReportMetric(float64(r.cpu[i])/n, side+"-cpu-ns/B")
	}
}

func BenchmarkRatio(b *testing.B) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	secureRule := compileRule(b, "db", `{keyID: `+testKeyID+`, protocol: tcp}`)
	openRule := compileOpenTCP(b)
	chunk := pattern(1<<20, canary)
	proxiesFor := func(dst [3]netip.AddrPort) [3]*benchProxy {
		return [3]*benchProxy{
			startBenchProxy(b, &tcpproxy.Proxy{}, openRule, nil, dst[0]),
			startBenchProxy(b, &tcpproxy.Proxy{Forwarder: tcpproxy.Forwarder{PlainIO: true}}, openRule, nil, dst[1]),
			startBenchProxy(b, &TCP{}, secureRule, keys, dst[2]),
		}
	}

	b.Run("upload", func(b *testing.B) {
		var dst [3]netip.AddrPort
		var done [3]<-chan int64
		for i := range 3 {
			var reply []byte
			if sides[i] == "secure" {
				reply = emptyInbound(b, keys)
			}
			dst[i], done[i] = sinkRemote(b, reply)
		}
		px := proxiesFor(dst)
		var run ratioRun
		b.SetBytes(benchFlowBytes)
		for i := 0; b.Loop(); i++ {
			run.round(i, [3]func(){
				func() { upload(b, px[0].addr, chunk, benchFlowBytes, done[0]) },
				func() { upload(b, px[1].addr, chunk, benchFlowBytes, done[1]) },
				func() { upload(b, px[2].addr, chunk, benchFlowBytes, done[2]) },
			})
		}
		run.report(b)
	})

	b.Run("download", func(b *testing.B) {
		plain := bytes.Repeat(chunk, benchFlowBytes/len(chunk))
		_, in := Contexts("db")
		k, _ := keys.Current(testKeyID)
		var sealed bytes.Buffer
		s, err := seal.NewSealer(&sealed, seal.SealConfig{Key: k.Key, KeyID: testKeyID, KeyVersion: k.Version, Context: in, Interactive: true})
		if err != nil {
			b.Fatal(err)
		}
		// As a remote streaming back would: a segment per 64 KiB written.
		for p := plain; len(p) > 0; p = p[min(len(p), seal.DefaultSegmentSize):] {
			s.Write(p[:min(len(p), seal.DefaultSegmentSize)])
			s.Flush()
		}
		s.Close()
		px := proxiesFor([3]netip.AddrPort{sourceRemote(b, plain), sourceRemote(b, plain), sourceRemote(b, sealed.Bytes())})
		buf := make([]byte, 256<<10)
		var run ratioRun
		b.SetBytes(benchFlowBytes)
		for i := 0; b.Loop(); i++ {
			run.round(i, [3]func(){
				func() { download(b, px[0].addr, buf, len(plain)) },
				func() { download(b, px[1].addr, buf, len(plain)) },
				func() { download(b, px[2].addr, buf, len(plain)) },
			})
		}
		run.report(b)
	})
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
