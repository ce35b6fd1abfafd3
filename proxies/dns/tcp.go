package dnsproxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ServeTCP answers the DNS queries that a sandbox sends on one TCP
// connection (RFC 7766: two-byte length prefix, pipelined queries), then
// closes conn. Up to Limits.TCPMaxInflight pipelined queries are answered at
// once and their responses may leave out of order (RFC 7766 6.2.1.1); reading
// pauses while that many are in flight. The connection is closed when no
// complete query arrives for Limits.TCPIdleTimeout, when a write fails, when
// ctx ends, or at once when the sandbox already has Limits.TCPMaxConns
// connections (ErrTooManyConns). It returns nil when the client closed the
// connection between messages or went idle, ctx's error when ctx ended, and
// a wrapped error otherwise.
func (p *Proxy) ServeTCP(ctx context.Context, sandbox string, conn net.Conn) error {
	p.init()
	defer conn.Close()

	conns := &p.noPolicyConns
	if st := p.sandbox(sandbox); st != nil {
		conns = &st.tcpConns
	}
	if conns.Add(1) > int32(p.lim.TCPMaxConns) {
		conns.Add(-1)
		p.Metrics.deny(sandbox, ReasonTooManyConns)
		if p.OnDeny != nil {
			p.OnDeny(sandbox, DenyEvent{Reason: ReasonTooManyConns, Rcode: -1, TCP: true})
		}
		return ErrTooManyConns
	}
	defer conns.Add(-1)

	// Closing the connection is the one way to interrupt a blocked read
	// that cannot race with the read deadline being pushed forward.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	var (
		wg       sync.WaitGroup
		writeMu  sync.Mutex
		writeErr atomic.Pointer[error]
		inflight = make(chan struct{}, p.lim.TCPMaxInflight)
		rd       = bufio.NewReader(conn)
		prefix   [2]byte
		err      error
	)
	for {
		if err = conn.SetReadDeadline(time.Now().Add(p.lim.TCPIdleTimeout)); err != nil {
			break
		}
		if _, err = io.ReadFull(rd, prefix[:]); err != nil {
			break
		}
		msg := make([]byte, binary.BigEndian.Uint16(prefix[:]))
		if _, err = io.ReadFull(rd, msg); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			break
		}
		inflight <- struct{}{}
		wg.Go(func() {
			defer func() { <-inflight }()
			resp, ok := p.Handle(ctx, sandbox, msg, true)
			if !ok {
				return
			}
			out := make([]byte, 2+len(resp))
			binary.BigEndian.PutUint16(out, uint16(len(resp)))
			copy(out[2:], resp)
			writeMu.Lock()
			defer writeMu.Unlock()
			if writeErr.Load() != nil {
				return
			}
			_ = conn.SetWriteDeadline(time.Now().Add(p.lim.TCPIdleTimeout))
			if _, err := conn.Write(out); err != nil {
				writeErr.Store(&err)
				conn.Close() // stops the reader
			}
		})
	}
	wg.Wait()

	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case writeErr.Load() != nil:
		return fmt.Errorf("writing dns response: %w", *writeErr.Load())
	case errors.Is(err, io.EOF), errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	default:
		return fmt.Errorf("reading dns query: %w", err)
	}
}
