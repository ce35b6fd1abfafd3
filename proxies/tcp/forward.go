// Package tcpproxy is the L4 proxy of open mode for TCP without a protocol
// parser: it connects to the flow's original destination and copies bytes
// both ways, half-closing each direction on EOF, counting bytes, enforcing
// an optional outbound byte budget and an idle timeout. Proxy (proxy.go)
// serves (open, tcp) flows through the firewall's proxy interface; policy
// is imported only to read a rule's budget. It never imports bpf or attest.
//
// A direction starts by copying through a pooled buffer, taken only once
// its source is readable (an idle flow holds no buffer): most flows are a
// few small messages each way, for which read and write cost fewer and
// cheaper system calls than splice. The first read that fills the buffer
// marks a bulk transfer, and the direction splices from then on.
package tcpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/rawsys"
)

// Defaults for a zero Forwarder.
const (
	DefaultIdleTimeout = 5 * time.Minute
	DefaultDialTimeout = 10 * time.Second
	// DefaultChunk is the pipe size of a spliced direction: the most one
	// splice call moves.
	DefaultChunk = 1 << 20
)

// CopyBufferSize is the buffer a direction copies through; a read that
// fills it switches the direction to splice.
const CopyBufferSize = 32 << 10

// ErrBudgetExceeded ends a flow that tried to send more than MaxBytesOut.
var ErrBudgetExceeded = errors.New("outbound byte budget exceeded")

// ErrIdle ends a flow on which neither side sent anything for IdleTimeout.
var ErrIdle = errors.New("flow idle")

// Forwarder copies flows to their original destinations.
type Forwarder struct {
	// Dial opens the upstream connection. Nil: a net.Dialer with
	// DefaultDialTimeout and no TCP keepalive. The client and the returned
	// conn must be *net.TCPConn for splice and for reads that hold no
	// buffer while they wait; other conns work through plain copies.
	Dial func(ctx context.Context, dst netip.AddrPort) (net.Conn, error)
	// IdleTimeout closes a flow idle in both directions. Zero: DefaultIdleTimeout.
	IdleTimeout time.Duration
	// Chunk is the pipe size of a spliced direction (rounded up by the
	// kernel to a power of two pages). Zero: DefaultChunk.
	Chunk int
	// PlainIO turns raw I/O off (see internal/rawsys): the flow is then
	// copied through the conns' own Read, Write and CloseWrite, with no
	// splice and a buffer held while a read waits, as conns that are not
	// TCP sockets always are. False is the path that was measured.
	PlainIO bool
}

// Flow says where a client connection goes and under which limits.
type Flow struct {
	Dst         netip.AddrPort
	MaxBytesOut int64 // 0: unlimited
}

// Stats are updated while the flow runs (readable concurrently).
type Stats struct {
	BytesOut atomic.Int64 // sandbox -> upstream
	BytesIn  atomic.Int64 // upstream -> sandbox
}

// dialer is the default upstream dialer. Keepalive probes are off: the
// idle timeout bounds a flow, and each probe setting is a system call
// per connection.
var dialer = net.Dialer{Timeout: DefaultDialTimeout, KeepAlive: -1}

// dialTCP dials dst by its string: Dialer.DialTCP would skip the parsing,
// but binds the socket to the zero local address it is given (go.dev/issue/81620),
// an extra system call that also takes the ephemeral port at bind time.
func dialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	return dialer.DialContext(ctx, "tcp", dst.String())
}

// Forward dials the destination and copies until both directions end, the
// budget is exceeded, the flow idles out or ctx is cancelled (which closes
// both connections: a policy change uses this). It closes client.
//
// The sandbox-to-destination direction runs on the caller's goroutine,
// the other on one goroutine of its own.
func (f *Forwarder) Forward(ctx context.Context, client net.Conn, flow Flow, stats *Stats) error {
	defer client.Close()
	if stats == nil {
		stats = &Stats{}
	}
	dial := f.Dial
	if dial == nil {
		dial = dialTCP
	}
	up, err := dial(ctx, flow.Dst)
	if err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return fmt.Errorf("dialing %s: %w", flow.Dst, err)
	}
	defer up.Close()

	idle := f.IdleTimeout
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	chunk := f.Chunk
	if chunk <= 0 {
		chunk = DefaultChunk
	}
	s := &session{idle: idle}
	s.client.Init(client, !f.PlainIO)
	s.up.Init(up, !f.PlainIO)
	s.touch()
	s.out.init(s, &s.client, &s.up, &stats.BytesOut, flow.MaxBytesOut, chunk)
	s.in.init(s, &s.up, &s.client, &stats.BytesIn, 0, chunk)

	stop := context.AfterFunc(ctx, s.closeBoth)
	s.mu.Lock()
	s.timer = time.AfterFunc(idle, s.checkIdle)
	s.mu.Unlock()

	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.in.run()
	}()
	s.out.run()
	s.wg.Wait()

	s.mu.Lock()
	s.finished = true
	s.timer.Stop()
	first := s.err
	s.mu.Unlock()
	stop()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return first
}

// epoch anchors the monotonic activity clock of every flow.
var epoch = time.Now()

// session is one forwarded flow: both directions, the idle timer and the
// first error, which ends the flow.
type session struct {
	client, up rawsys.Conn // each written by one direction only
	idle       time.Duration
	last       atomic.Int64 // time.Since(epoch) of the last byte moved either way
	closed     atomic.Bool
	ended      atomic.Int32 // directions that ended at EOF
	out, in    pump
	wg         sync.WaitGroup

	mu       sync.Mutex
	timer    *time.Timer
	err      error
	finished bool
}

func (s *session) touch() { s.last.Store(int64(time.Since(epoch))) }

// checkIdle runs on the idle timer: it ends a flow on which nothing moved
// for the idle timeout, and otherwise waits for the rest of it.
func (s *session) checkIdle() {
	quiet := time.Since(epoch) - time.Duration(s.last.Load())
	if quiet >= s.idle {
		s.fail(ErrIdle)
		return
	}
	s.mu.Lock()
	if !s.finished {
		s.timer.Reset(s.idle - quiet)
	}
	s.mu.Unlock()
}

// fail records the flow's first error and ends the flow.
func (s *session) fail(err error) {
	s.mu.Lock()
	if s.finished {
		s.mu.Unlock()
		return
	}
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.closeBoth()
}

func (s *session) closeBoth() {
	if s.closed.CompareAndSwap(false, true) {
		s.client.Close()
		s.up.Close()
	}
}

// pump moves one direction of a flow.
type pump struct {
	s        *session
	src, dst *rawsys.Conn
	counter  *atomic.Int64
	budget   int64 // 0: unlimited
	chunk    int
	splice   bool // both ends are raw: bulk moves through a pipe

	// State of one raw read or splice (the callbacks are bound once, so a
	// round allocates nothing).
	buf     *[CopyBufferSize]byte
	lim     int
	n       int
	err     error
	pipe    *pipe
	readFn  func(uintptr) bool
	drainFn func(uintptr) bool
	pumpFn  func(uintptr) bool
}

func (p *pump) init(s *session, src, dst *rawsys.Conn, counter *atomic.Int64, budget int64, chunk int) {
	p.s, p.src, p.dst, p.counter, p.budget, p.chunk = s, src, dst, counter, budget, chunk
	if src.Raw() {
		p.readFn = p.rawRead
		p.splice = dst.Raw()
	}
}

// run moves src to dst until EOF, then half-closes dst. Any other end
// ends the whole flow.
func (p *pump) run() {
	err := p.copy()
	p.release()
	if p.pipe != nil {
		p.pipe.put()
		p.pipe = nil
	}
	if err != nil {
		p.s.fail(err)
		return
	}
	// The first direction to end half-closes; after the second, Forward
	// closes both sockets at once, which sends the same FIN (both receive
	// queues are empty: each was read to its EOF).
	if p.s.ended.Add(1) == 1 {
		_ = p.dst.CloseWrite()
	}
}

// moved accounts for n bytes that reached dst.
func (p *pump) moved(n int) {
	if n > 0 {
		p.counter.Add(int64(n))
		p.s.touch()
	}
}

// left is what the budget still allows (a positive number) and whether
// anything is left at all.
func (p *pump) left(want int) (int, bool) {
	if p.budget <= 0 {
		return want, true
	}
	left := p.budget - p.counter.Load()
	if left <= 0 {
		return 0, false
	}
	return int(min(int64(want), left)), true
}

// copy moves bytes through the pooled buffer until a read fills it, then
// splices. It returns nil at EOF.
func (p *pump) copy() error {
	for {
		lim, ok := p.left(CopyBufferSize)
		if !ok {
			return p.overBudget()
		}
		n, err := p.read(lim)
		if n > 0 {
			w, werr := p.dst.Write(p.buf[:n])
			p.release()
			p.moved(w)
			if werr != nil {
				return werr
			}
		}
		switch {
		case err != nil:
			return err
		case n == 0:
			return nil
		case n == CopyBufferSize && p.splice:
			return p.spliceAll()
		}
	}
}

// read reads at most lim bytes into p.buf (taken from the pool once src
// is readable, when src is raw). n == 0 with a nil error is EOF.
func (p *pump) read(lim int) (int, error) {
	if !p.src.Raw() {
		p.buf = bufPool.Get().(*[CopyBufferSize]byte)
		for {
			n, err := p.src.Read(p.buf[:lim])
			if errors.Is(err, io.EOF) {
				err = nil
				if n == 0 {
					return 0, nil
				}
			}
			if n > 0 || err != nil {
				return n, err
			}
		}
	}
	p.lim, p.n, p.err = lim, 0, nil
	if err := p.src.WaitRead(p.readFn); err != nil {
		return 0, err
	}
	return p.n, p.err
}

// rawRead is the read callback: false means "not readable yet, wait".
func (p *pump) rawRead(fd uintptr) bool {
	if p.buf == nil {
		p.buf = bufPool.Get().(*[CopyBufferSize]byte)
	}
	n, err := rawsys.ReadNow(fd, p.buf[:p.lim])
	switch err {
	case nil:
		p.n = n
	case io.EOF:
		p.n = 0
	case rawsys.ErrWouldBlock:
		p.release() // no buffer held while waiting
		return false
	default:
		p.err = err
	}
	return true
}

func (p *pump) release() {
	if p.buf != nil {
		bufPool.Put(p.buf)
		p.buf = nil
	}
}

var bufPool = sync.Pool{New: func() any { return new([CopyBufferSize]byte) }}

// overBudget waits for one more byte: a clean EOF ends the direction, any
// byte beyond the budget ends the flow without forwarding it.
func (p *pump) overBudget() error {
	n, err := p.read(1)
	p.release()
	switch {
	case n > 0:
		return ErrBudgetExceeded
	case err != nil:
		return err
	}
	return nil
}

// spliceAll moves the rest of the direction through a pipe: socket to
// pipe, then pipe to socket, counting every splice. Without a pipe it
// keeps copying.
func (p *pump) spliceAll() error {
	pp, err := getPipe(p.chunk)
	if err != nil {
		p.splice = false
		return p.copy()
	}
	p.pipe = pp
	p.drainFn, p.pumpFn = p.drain, p.pumpOut
	for first := true; ; first = false {
		max, ok := p.left(pp.size)
		if !ok {
			return p.overBudget()
		}
		p.lim, p.n, p.err = max, 0, nil
		if err := p.src.WaitRead(p.drainFn); err != nil {
			return err
		}
		if first && errors.Is(p.err, unix.EINVAL) {
			// This kernel cannot splice from the socket; nothing was
			// consumed: keep copying.
			p.pipe.put()
			p.pipe, p.splice = nil, false
			return p.copy()
		}
		if p.err != nil {
			return p.err
		}
		if p.n == 0 {
			return nil // EOF
		}
		pp.data = p.n
		p.err = nil
		if err := p.dst.WaitWrite(p.pumpFn); err != nil {
			return err
		}
		if p.err != nil {
			return p.err
		}
	}
}

// drain is the splice callback from the source socket into the (empty)
// pipe: would-block can only mean the socket has nothing to read.
func (p *pump) drain(fd uintptr) bool {
	n, err := rawsys.SpliceNow(int(fd), p.pipe.w, p.lim)
	switch err {
	case nil:
		p.n = n
	case io.EOF:
		p.n = 0
	case rawsys.ErrWouldBlock:
		return false
	default:
		p.err = err
	}
	return true
}

// pumpOut is the splice callback from the pipe into the destination
// socket, until the pipe is empty: would-block means the socket's send
// buffer is full.
func (p *pump) pumpOut(fd uintptr) bool {
	for p.pipe.data > 0 {
		n, err := rawsys.SpliceNow(p.pipe.r, int(fd), p.pipe.data)
		switch err {
		case nil:
			p.pipe.data -= n
			p.moved(n)
		case rawsys.ErrWouldBlock:
			return false
		default:
			p.err = err
			return true
		}
	}
	return true
}
