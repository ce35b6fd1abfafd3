package httpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/cleanwall/cleanwall/internal/rawsys"
)

// Waiting for readiness instead of reading an empty socket.
//
// A Read on a Go net.Conn first reads the socket and, when it is empty
// (EAGAIN), waits for the poller and reads again. On a keep-alive exchange
// the socket is empty every time: the upstream cannot have answered a
// request that was just written, and the sandbox's next request cannot
// have arrived before its answer was written. That is a system call per
// read for nothing, two per request, which on our machines cost as much as
// parsing and inspecting the request. rawsys.Conn.WaitRead
// (syscall.RawConn.Read) lets us wait first, but it forgets readiness that the poller recorded before it was
// called, so it is only used where nothing can be missed:
//
//   - Upstream: the request is written inside the upstream's WaitRead
//     callback, after the readiness was reset; the answer cannot arrive
//     before its request, so its arrival is seen (readAfterFlush).
//   - Sandbox: one WaitRead spans the requests that arrive whole
//     (serveArrived): the callback reads what arrived, serves it, and
//     waits for more only after a read found the socket empty, so the
//     readiness of anything that arrived after that read is kept. A short
//     read is not taken to mean empty: TCP stops a read at the urgent mark
//     with bytes still queued behind it, and no new readiness would come
//     for them (TestUrgentDataDoesNotStall). That costs one read of an
//     empty socket per request on this side (measured: ~2% of a keep-alive
//     request through the proxy).
//
// Only a raw rawsys.Conn (a *net.TCPConn, with raw I/O on) is read this
// way: a wrapper (the daemon's byte budget) keeps its own Read, and so does
// every connection with Proxy.PlainIO.
//
// The reads and writes of such a connection are internal/rawsys calls,
// made without telling the scheduler: the socket is non-blocking
// (checked), so they return at once, and a goroutine that is
// in a system call for more than 20 µs (which a write that delivers to a
// local peer often is) otherwise has its scheduler context taken away by
// the runtime's monitor, which then wakes another thread to run the rest:
// measured, half of the context switches of a keep-alive request, and as
// much CPU as the inspection.

// flushError is a failed write of the request that readAfterFlush sends.
type flushError struct{ err error }

func (e *flushError) Error() string { return "sending the request: " + e.err.Error() }
func (e *flushError) Unwrap() error { return e.err }

// readAfterFlush writes what w holds to the connection and reads the
// answer into p, waiting for it before reading (see above).
func (t *timedConn) readAfterFlush(w *bufio.Writer, p []byte) (int, error) {
	if t.readStep == nil {
		t.readStep = t.flushThenRead // once: a method value per call is an allocation per read
	}
	t.flushW, t.rp, t.rn, t.rerr, t.ferr = w, p, 0, nil, nil
	err := t.rw.WaitRead(t.readStep)
	n, rerr, ferr := t.rn, t.rerr, t.ferr
	t.flushW, t.rp, t.rerr, t.ferr = nil, nil, nil, nil
	switch {
	case ferr != nil:
		return 0, &flushError{ferr}
	case err != nil:
		return 0, err
	}
	return n, rerr
}

// flushThenRead is readAfterFlush's WaitRead callback: it sends the
// request at its first call, then reads once the socket is readable.
func (t *timedConn) flushThenRead(fd uintptr) bool {
	if w := t.flushW; w != nil {
		t.flushW = nil
		t.ferr = w.Flush()
		return t.ferr != nil
	}
	t.rn, t.rerr = rawsys.ReadNow(fd, t.rp)
	return t.rerr != rawsys.ErrWouldBlock
}

// serveArrived serves the requests of a keep-alive connection that arrive
// whole and need nothing more from the sandbox: a head, and its
// Content-Length body if any, read at once, no upgrade, no Expect, not
// chunked. It runs inside one WaitRead of the sandbox's socket, so that
// between requests it waits instead of reading an empty socket (see above).
// done reports that the connection is over (err as serve returns it);
// otherwise the next request needs the blocking path, its head buffered or
// parsed already (c.parsed).
func (c *conn) serveArrived() (done bool, err error) {
	cl := c.client
	cl.setReadTimeout(c.lim.IdleTimeout)
	rerr := cl.rw.WaitRead(func(fd uintptr) bool {
		cl.raw, cl.fd = true, fd
		defer func() { cl.raw = false }()
		for {
			if !headBuffered(c.cr) {
				switch {
				case c.cr.Buffered() > 0:
					return true // the rest of the head: read under HeaderTimeout
				}
				_, perr := c.cr.Peek(1)
				switch {
				case errors.Is(perr, rawsys.ErrWouldBlock):
					return false
				case errors.Is(perr, io.EOF) || c.isAborted():
					done = true // the sandbox closed between requests
					return true
				case perr != nil:
					done, err = true, fmt.Errorf("waiting for a request: %w", perr)
					return true
				}
				continue
			}
			start := time.Now()
			q := &c.req
			if rerr := c.rr.read(q); rerr != nil {
				done, err = true, c.headFailed(q, rerr, start)
				return true
			}
			if q.upgrade != "" || q.expect != "" || q.chunked || int64(c.cr.Buffered()) < q.contentLength {
				c.parsed, c.parsedAt = true, start
				return true
			}
			keep, herr := c.handle(q, start)
			if herr != nil || !keep {
				done, err = true, herr
				return true
			}
			cl.setReadTimeout(c.lim.IdleTimeout)
		}
	})
	if rerr != nil && !done {
		// The wait failed: idle timeout, the sandbox or ctx closed.
		if errors.Is(rerr, os.ErrDeadlineExceeded) || errors.Is(rerr, net.ErrClosed) || c.isAborted() {
			return true, nil
		}
		return true, fmt.Errorf("waiting for a request: %w", rerr)
	}
	return done, err
}
