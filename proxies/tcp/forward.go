// Package tcpproxy is the L4 proxy of open mode for TCP without a protocol
// parser: it connects to the flow's original destination and copies bytes
// both ways with splice, half-closing each direction on EOF, counting bytes,
// enforcing an optional outbound byte budget and an idle timeout. It never
// imports bpf, policy or attest.
package tcpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for a zero Forwarder.
const (
	DefaultIdleTimeout = 5 * time.Minute
	DefaultDialTimeout = 10 * time.Second
	// DefaultChunk is how many bytes one splice round may move before the
	// counters, the budget and the idle deadline are updated.
	DefaultChunk = 256 << 10
)

// ErrBudgetExceeded ends a flow that tried to send more than MaxBytesOut.
var ErrBudgetExceeded = errors.New("outbound byte budget exceeded")

// ErrIdle ends a flow on which neither side sent anything for IdleTimeout.
var ErrIdle = errors.New("flow idle")

// Forwarder copies flows to their original destinations.
type Forwarder struct {
	// Dial opens the upstream connection. Nil: a net.Dialer with
	// DefaultDialTimeout. The returned conn must be a *net.TCPConn for
	// splice; other conns work through plain copies.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// IdleTimeout closes a flow idle in both directions. Zero: DefaultIdleTimeout.
	IdleTimeout time.Duration
	// Chunk bounds one splice round. Zero: DefaultChunk.
	Chunk int64
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

// Forward dials the destination and copies until both directions end, the
// budget is exceeded, the flow idles out or ctx is cancelled (which closes
// both connections: a policy change uses this). It closes client.
func (f *Forwarder) Forward(ctx context.Context, client net.Conn, flow Flow, stats *Stats) error {
	defer client.Close()
	if stats == nil {
		stats = &Stats{}
	}
	dial := f.Dial
	if dial == nil {
		d := net.Dialer{Timeout: DefaultDialTimeout}
		dial = d.DialContext
	}
	up, err := dial(ctx, "tcp", flow.Dst.String())
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
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			up.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()

	var last atomic.Int64 // unix nanos of the last byte moved in either direction
	last.Store(time.Now().UnixNano())
	p := pump{idle: idle, chunk: chunk, last: &last}

	errc := make(chan error, 2)
	go func() { errc <- p.copy(up, client, &stats.BytesOut, flow.MaxBytesOut) }()
	go func() { errc <- p.copy(client, up, &stats.BytesIn, 0) }()
	var first error
	for i := 0; i < 2; i++ {
		if err := <-errc; err != nil && first == nil {
			first = err
			closeBoth() // an error in one direction ends the flow
		}
	}
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return first
}

type pump struct {
	idle  time.Duration
	chunk int64
	last  *atomic.Int64
}

// copy moves src to dst in bounded splice rounds until EOF, then half-closes
// dst. A read deadline bounds each round; when it fires, the flow only
// counts as idle if the other direction was idle too.
func (p pump) copy(dst, src net.Conn, counter *atomic.Int64, budget int64) error {
	for {
		n := p.chunk
		if budget > 0 {
			left := budget - counter.Load()
			if left <= 0 {
				if err := p.overBudget(src); err != nil {
					return err
				}
				closeWrite(dst)
				return nil
			}
			n = min(n, left)
		}
		_ = src.SetReadDeadline(time.Now().Add(p.idle))
		moved, err := io.Copy(dst, &io.LimitedReader{R: src, N: n})
		if moved > 0 {
			counter.Add(moved)
			p.last.Store(time.Now().UnixNano())
		}
		switch {
		case err == nil && moved < n:
			closeWrite(dst) // EOF from src
			return nil
		case err == nil:
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			if time.Since(time.Unix(0, p.last.Load())) < p.idle {
				continue
			}
			return ErrIdle
		default:
			return err
		}
	}
}

// overBudget waits for one more byte: a clean EOF ends the direction, any
// byte beyond the budget ends the flow without forwarding it.
func (p pump) overBudget(src net.Conn) error {
	_ = src.SetReadDeadline(time.Now().Add(p.idle))
	var b [1]byte
	n, err := src.Read(b[:])
	if n > 0 {
		return ErrBudgetExceeded
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
